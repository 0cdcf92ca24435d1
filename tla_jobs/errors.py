"""The exception types the CLI turns into a single clear line on stderr, and `tla`'s exit codes.

Exit codes, the same for every command (README, "Exit codes"):
  0  done (a followed run COMPLETED)
  1  a followed run or job ended FAILED, CANCELLED or TIMEOUT
  2  bad input: an unknown option, a missing data folder, a malformed profile, no such run ...
  3  a check found a problem: a damaged run or checkpoint file, a cluster that does not answer
  75 (the trainer) checkpointed on a signal and stopped: resuming continues the run
  76 (the trainer) a newer attempt of the same run took over
  130 interrupted (Ctrl-C)
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_CHECKS = 0, 1, 2, 3


class TlaError(Exception):
    """A problem with what the user asked for: bad data, config, checkpoint, run name, profile."""

    exit_code = EXIT_USAGE


class ChecksFailed(TlaError):
    """A check found a problem on disk or on the cluster (after printing what it checked)."""

    exit_code = EXIT_CHECKS


class DataError(TlaError):
    """The data folder is missing, empty, unreadable or inconsistent."""


class CheckpointError(TlaError):
    """A checkpoint is missing, damaged, or belongs to another model."""


class SubmissionError(TlaError):
    """The scheduler refused the job (sbatch failed: an unknown account, QOS, a limit, ...)."""
