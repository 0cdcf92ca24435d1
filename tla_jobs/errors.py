"""The exception types the CLI turns into a single clear line on stderr (and exit code 2)."""


class TlaError(Exception):
    """A problem with what the user asked for: bad data, config, checkpoint, run name, profile."""


class DataError(TlaError):
    """The data folder is missing, empty, unreadable or inconsistent."""


class CheckpointError(TlaError):
    """A checkpoint is missing, damaged, or belongs to another model."""


class SubmissionError(TlaError):
    """The scheduler refused the job (sbatch failed: an unknown account, QOS, a limit, ...)."""
