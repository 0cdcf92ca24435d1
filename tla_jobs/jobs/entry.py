"""The callables submitit pickles into every job: training and evaluation.

They hold only a plain dict (the TrainConfig as stored in run.json) and import the training stack
when they run, so submitting pulls in neither torch nor timm. ``checkpoint`` is submitit's
requeue hook: the resubmitted job drops any explicit ``--resume`` and continues from the run's own
newest checkpoint, which the trainer wrote when the signal arrived.

A requeue does not always come through submitit: SLURM requeues a preempted job by itself
(PreemptMode=REQUEUE), and in a container the host shell does. So every attempt of a SLURM job
first counts the attempts of the same job before it that ended other than at the time limit, and
refuses to start past the profile's ``max_requeue_preempt`` (an "end" record with reason
"requeue limit", then the job fails instead of being requeued again). Attempts that ended by a
failure do not count there: they have their own limit, max_requeue_failure (jobs/retry.py: the batch
shell requeues a SLURM job whose step failed; a local job's failed rank asks submitit's controller).
"""

from __future__ import annotations

import os
from pathlib import Path


def _timed_out(attempt: dict, time_min: int) -> bool:
    """submitit's rule: an attempt that ran at least min(0.8 limit, limit - 10 min) hit the limit."""
    start, end = attempt["start"].get("time"), (attempt["end"] or {}).get("time")
    if not isinstance(start, (int, float)) or not isinstance(end, (int, float)):
        return False
    limit = time_min * 60.0
    return end - start >= min(0.8 * limit, limit - 600)


def preemptions(run_dir: Path, job_id: str, time_min: int) -> int:
    """Attempts of this job that were followed by another one and did not end at the time limit."""
    from tla_jobs.jobs.attempts import attempts_of
    from tla_jobs.jobs.retry import is_failure

    mine = [a for a in attempts_of(run_dir) if str(a["start"].get("job_id", "")) == job_id]
    return sum(1 for a in mine if not _timed_out(a, time_min) and not is_failure(a["end"]))


def refuse_past_requeue_limit(run_dir: Path, max_requeue_preempt: int | None, time_min: int) -> None:
    """Called at the start of every attempt of a SLURM job; raises when the limit is passed."""
    from tla_jobs import rundir
    from tla_jobs.errors import TlaError

    ident = rundir.job_identity()
    if max_requeue_preempt is None or ident["executor"] != "slurm" or ident["restart_count"] == 0:
        return
    if not rundir_is_main():
        return
    done = preemptions(run_dir, ident["job_id"], time_min)
    if done <= max_requeue_preempt:
        return
    msg = (f"requeued after {done} preemptions or requeues, more than the profile's max_requeue_preempt "
           f"({max_requeue_preempt}); not continuing (`tla resume` starts a new job)")
    from tla_jobs.train.runlog import RunLog  # torch-free: the trainer's one way to record an attempt

    log = RunLog(run_dir, is_main=True, world_size=1, epochs=0)
    log.record_attempt("start")
    log.record_attempt("end", reason="requeue limit", error=msg)
    raise TlaError(msg)


def rundir_is_main() -> bool:
    """Rank 0 (SLURM_PROCID, else submitit's local id) writes the run's records."""
    return os.environ.get("SLURM_PROCID", os.environ.get("SUBMITIT_LOCAL_GLOBALID", "0")) == "0"


class TrainJob:
    def __init__(self, max_requeue_preempt: int | None = None, time_min: int = 0, max_stalled_attempts: int = 0,
                 max_requeue_failure: int = 0):
        self.max_requeue_preempt = max_requeue_preempt
        self.time_min = time_min
        self.max_stalled_attempts = max_stalled_attempts  # the profile's policy; the trainer counts the attempts
        self.max_requeue_failure = max_requeue_failure  # a local job's; a SLURM job's batch shell has its own

    def __call__(self, spec: dict) -> dict:
        import time

        from tla_jobs.config import TrainConfig
        from tla_jobs.train.loop import train

        started = time.time()
        limit = getattr(self, "max_requeue_preempt", None)  # jobs pickled by older versions have none
        if limit is not None and spec.get("output_dir"):
            refuse_past_requeue_limit(Path(spec["output_dir"]), limit, getattr(self, "time_min", 0))
        slot = None
        if spec.get("output_dir"):  # a local sweep's run waits for a free slot (jobs/local.py)
            from tla_jobs.jobs.local import wait_for_slot
            from tla_jobs.train.runlog import waiting_for_slot

            out = Path(spec["output_dir"])
            slot = wait_for_slot(out, rundir_is_main(), lambda n: waiting_for_slot(out, n))
        try:
            return train(TrainConfig(**spec), max_stalled_attempts=getattr(self, "max_stalled_attempts", 0))
        except Exception as exc:  # a local job's rank failed: requeued within the limit (exits), else raised
            if spec.get("output_dir"):
                from tla_jobs.jobs.retry import local_failure

                local_failure(Path(spec["output_dir"]), getattr(self, "max_requeue_failure", 0), exc, started)
            raise
        finally:
            if slot is not None:
                slot.close()

    def checkpoint(self, spec: dict):
        import submitit

        return submitit.helpers.DelayedSubmission(self, {**spec, "resume": ""})


class EvalJob:
    def __call__(self, spec: dict) -> dict:
        from tla_jobs.config import TrainConfig
        from tla_jobs.train.loop import train

        return train(TrainConfig(**{**spec, "eval_only": True}))

    def checkpoint(self, spec: dict):
        import submitit

        return submitit.helpers.DelayedSubmission(self, spec)
