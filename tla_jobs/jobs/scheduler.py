"""What a scheduler says about jobs, in one shape for every backend: SLURM (sacct, squeue; see
slurm.py) and the local executor (the process table; see local.py)."""

from __future__ import annotations

from dataclasses import dataclass, field

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED_RUNNING"}
FINAL_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# in a view's source: accounting (sacct) did not answer in time; the states come from squeue and the runs' files
SACCT_SILENT = "sacct did not answer"

# every state a run can end in: `tla status --watch` and `--follow` stop when each run shown has one
FINAL = FINAL_BAD | {"COMPLETED", "STOPPED", "UNKNOWN", "NOT SUBMITTED", "DAMAGED"}


@dataclass
class JobRecord:
    job_id: str
    state: str
    source: str
    exit_code: str = ""
    start: str = ""
    end: str = ""
    elapsed_s: int = 0
    gpus: int = 0
    nodes: str = ""
    reason: str = ""


@dataclass
class SchedulerView:
    """What the scheduler says about a set of jobs: job id -> its records (one per attempt). ``source``
    names who said it: sacct, squeue ("squeue (sacct did not answer)" when accounting timed out), none."""

    jobs: dict[str, list[JobRecord]] = field(default_factory=dict)
    source: str = "none"

    def latest(self, job_id: str) -> str | None:
        """The job's newest state, None when the scheduler has no record of it."""
        recs = self.jobs.get(str(job_id), [])
        return recs[-1].state if recs else None
