"""The layout of a run directory: the one place that names its files.

The trainer writes (rank 0 only, except per-rank logs) and `tla` reads; neither needs the other
running. Everything here is plain JSON/JSONL, readable by any shell on any later day.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path

from tla_jobs import procs

RUN_JSON = "run.json"  # spec, profile, code version, submissions (written by `tla`)
METRICS = "metrics.jsonl"  # one line per finished epoch (rewritten from the checkpoint on resume)
HEARTBEAT = "heartbeat.json"  # the trainer's latest position, updated while it runs
ATTEMPTS = "attempts.jsonl"  # one line when an attempt starts and one when it ends
SUMMARY = "summary.json"  # written when training finishes
EVAL = "eval.json"  # written by --eval-only
EVALS_DIR = "evals"  # eval jobs of `tla eval checkpoint`, one JSON each
SUBMITIT_DIR = "submitit"  # submitit's folder: pickles, sbatch scripts, per-task logs (named by submitit's JobPaths)
CONTROLLER_LOG = "controller.log"  # in a submitit folder: the output of the local executor's controller
LOG_PATTERN = "log_rank{rank}.txt"  # the trainer's log of each rank
LOG_GLOB = "log_rank*.txt"
LOG_RE = r"log_rank(\d+)\.txt"
SWEEP_DIR = ".sweep-{name}"  # in a runs root: the submitit folder of a sweep's job array
OWNER = "owner.json"  # which attempt owns the run now; an attempt that is no longer it stops writing
CHECKPOINT_LAST = "checkpoint_last.pth"  # written at every save; what a resumed attempt continues from
CHECKPOINT_PREV = "checkpoint_prev.pth"  # the one before, kept in case the last is damaged
CHECKPOINT_BEST = "checkpoint_best.pth"  # the model of the best top-1 epoch
CHECKPOINT_EPOCH = "checkpoint_epoch{epoch}.pth"  # kept every --checkpoint-every-epochs
CHECKPOINT_EPOCH_RE = r"checkpoint_epoch(\d+)\.pth"
CHECKPOINT_LOG = "checkpoints.jsonl"  # one line per checkpoint written: name, sha256, epoch, top-1/5, size
TENSORBOARD_DIR = "tensorboard"  # TensorBoard event files of rank 0 (`tensorboard --logdir runs/`)
CONFIG_YAML = "config.yaml"  # the resolved TrainConfig, so `--config runs/NAME/config.yaml` repeats a run
STATUS_CACHE = ".status-cache.json"  # `tla status`'s copy of a finished run's status (jobs/state.py: only a cache)


def refuse_linked_dirs(run_dir: Path) -> None:
    """The folders tla and its jobs write into inside a run (submitit's, the eval jobs', TensorBoard's) are
    folders of the run, not links out of it (fsutil.UnsafeFile names the one that is): files written
    there would land wherever the link points."""
    from tla_jobs.fsutil import refuse_links

    for name in (SUBMITIT_DIR, EVALS_DIR, TENSORBOARD_DIR):
        refuse_links(run_dir, run_dir / name)


def read_config(run_dir: Path) -> dict | None:
    """The run's config.yaml as a mapping; None when there is none. One that cannot be used (not a regular
    file, too large, not YAML, not a mapping) is a TlaError naming it: which recipe trained the folder is
    then unknown, and a caller must not guess."""
    import yaml

    from tla_jobs.errors import TlaError
    from tla_jobs.fsutil import MAX_TEXT, UnsafeFile, read_regular_text

    path = run_dir / CONFIG_YAML
    try:
        value = yaml.safe_load(read_regular_text(path, MAX_TEXT))
    except FileNotFoundError:
        return None
    except (UnsafeFile, OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise TlaError(f"{path} is damaged ({getattr(exc, 'what', None) or exc.__class__.__name__}): cannot tell "
                       "which recipe trained this folder") from None
    if not isinstance(value, dict):
        raise TlaError(f"{path} is damaged (not a mapping of option: value): cannot tell which recipe trained "
                       "this folder")
    return value


def sweep_dir(root: Path, name: str) -> Path:
    return root / SWEEP_DIR.format(name=name)


def eval_dir(run_dir: Path, eval_id: str) -> Path:
    """Where an eval job of `tla eval checkpoint` writes its eval.json."""
    return run_dir / EVALS_DIR / eval_id


def rank_logs(run_dir: Path) -> dict[int, Path]:
    """The trainer's per-rank logs of a run, by rank."""
    out = {}
    for p in run_dir.glob(LOG_GLOB):
        m = re.fullmatch(LOG_RE, p.name)
        if m:
            out[int(m.group(1))] = p
    return dict(sorted(out.items()))


EXIT_INTERRUPTED = 75  # the trainer checkpointed on a signal and stopped; resuming continues the run
EXIT_SUPERSEDED = 76  # a newer attempt of the same run took over (e.g. a requeue after a node failure)


def job_identity() -> dict:
    """Who is running this attempt: SLURM job/array ids and restart count, or the local job id."""
    from tla_jobs import envvars
    from tla_jobs.errors import TlaError

    env = os.environ
    try:
        restarts = envvars.restart_count()
    except TlaError:  # not a count: 0 here (this record is written whatever the environment says);
        restarts = 0  # the trainer's preflight names the variable (envvars.check_trainer_env)
    job_id = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or ""
    if env.get("SLURM_ARRAY_JOB_ID"):
        job_id = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    return {
        "job_id": job_id,
        "restart_count": restarts,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        **procs.identity(os.getpid()),  # what proves later that a process with this PID is this one
        "executor": "slurm" if env.get("SLURM_JOB_ID") else ("local" if env.get("SUBMITIT_LOCAL_JOB_ID") else "shell"),
    }


def append_event(path: str | Path, event: dict) -> None:
    """Append one JSON line; a single write() of a short line with O_APPEND does not interleave."""
    from tla_jobs.fsutil import open_for_append

    line = json.dumps({"time": time.time(), **event}, default=str) + "\n"
    fd = open_for_append(path)  # never through a link out of the run directory, never into a FIFO
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def metrics_summary(rows: list[dict]) -> dict:
    """What `tla status` and `tla report` show of metrics.jsonl. The trainer puts it in every
    heartbeat, so listing a thousand runs does not parse a thousand metric histories."""
    keep = ("epoch", "acc1", "acc5", "val_loss", "train_loss", "ema_acc1", "ema_acc5")
    best = max(rows, key=lambda r: r["acc1"]) if rows else None
    ema = [r for r in rows if r.get("ema_acc1") is not None]  # runs with --model-ema: DeiT reports both
    best_ema = max(ema, key=lambda r: r["ema_acc1"]) if ema else None
    return {
        "epochs_done": rows[-1]["epoch"] + 1 if rows else 0,
        "best": {k: best.get(k) for k in keep} if best else None,
        "last": {k: rows[-1].get(k) for k in keep} if rows else None,
        "best_ema": {k: best_ema.get(k) for k in ("epoch", "ema_acc1", "ema_acc5")} if best_ema else None,
        "mean_epoch_s": sum(r.get("epoch_s", 0.0) for r in rows) / len(rows) if rows else None,
    }
