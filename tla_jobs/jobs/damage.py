"""What is wrong with a run directory's files, for readers that must never break on one.

`tla status`, `report` and `logs` read every run under the runs root; a file cut short by a full
disk, edited by hand, or written by some other tool must not take the listing down, nor make its
run vanish. Each reader here returns the value and a short description of what is wrong (None when
nothing is): the run is then shown with that description instead of its figures.

Plain checks of the fields the readers use (no pydantic: `tla status` reads thousands of these).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tla_jobs import rundir
from tla_jobs.fsutil import read_json_checked, read_jsonl_checked


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _time(v: Any) -> bool:
    """A Unix time a clock could show (not 1e308, which no date can be made of)."""
    return _number(v) and 0 <= v < 1e11


def _real(v: Any) -> bool:
    """A number, NaN and infinity included (a diverged loss is a fact, not damage)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _percent(v: Any) -> bool:
    """A top-1/top-5 accuracy: a finite number from 0 to 100 (1e300 or -50 is damage, not a result)."""
    return _number(v) and 0 <= v <= 100


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(v: Any, check) -> bool:
    return v is None or check(v)


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _type(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(v), type(v).__name__)


def _job_problem(job: Any, what: str, i: int) -> str | None:
    if not isinstance(job, dict):
        return f"{what} {i + 1} is {_type(job)}, not an object"
    if not isinstance(job.get("job_id"), str) or not job["job_id"]:
        return f"{what} {i + 1} has no job_id"
    if job.get("executor") not in ("local", "slurm"):
        return f"{what} {i + 1} has executor {job.get('executor')!r} (local or slurm)"
    if not _opt(job.get("submitted"), _time):
        return f"{what} {i + 1} has a submitted time that is not a number"
    for key in ("submitit_folder", "output_dir", "reason"):
        if not _opt(job.get(key), _str):
            return f"{what} {i + 1} has a {key} that is not text"
    return None


def record_problem(record: Any) -> str | None:
    """What in run.json would stop `tla` from using it; None when it is usable."""
    if not isinstance(record, dict):
        return f"run.json is {_type(record)}, not an object"
    for key in ("spec", "profile"):
        if key not in record:
            return f"run.json has no {key}"
        if not isinstance(record[key], dict):
            return f"run.json's {key} is {_type(record[key])}, not an object"
    spec = record["spec"]
    if not _opt(spec.get("epochs"), _int):
        return "run.json's spec.epochs is not a whole number"
    if not _opt(spec.get("model"), _str):
        return "run.json's spec.model is not text"
    for key in ("submissions", "evals"):
        jobs = record.get(key, [])
        if not isinstance(jobs, list):
            return f"run.json's {key} is {_type(jobs)}, not a list"
        for i, job in enumerate(jobs):
            problem = _job_problem(job, "submission" if key == "submissions" else "eval", i)
            if problem:
                return f"run.json: {problem}"
    if not _opt(record.get("created"), _time):
        return "run.json's created time is not a number"
    for key in ("name", "sweep", "kind"):
        if not _opt(record.get(key), _str):
            return f"run.json's {key} is not text"
    if not _opt(record.get("cancelled"), lambda v: isinstance(v, bool)):
        return "run.json's cancelled is not true/false"
    return None


def record(path: Path) -> tuple[dict | None, str | None]:
    """run.json of a run directory: (record, None), (None, None) when missing, (None, problem)."""
    value, problem = read_json_checked(path / rundir.RUN_JSON)
    if problem:
        return None, problem
    if value is None and not (path / rundir.RUN_JSON).exists():
        return None, None
    problem = record_problem(value)
    return (None, problem) if problem else (value, None)


def _progress_problem(progress: Any) -> str | None:
    if not isinstance(progress, dict):
        return "progress is not an object"
    if not _int(progress.get("epochs_done")):
        return "progress.epochs_done is not a whole number"
    for key in ("best", "last"):
        row = progress.get(key)
        if row is None:
            continue
        if not isinstance(row, dict) or not all(_opt(row.get(k), _percent) for k in ("acc1", "acc5", "ema_acc1",
                                                                                     "ema_acc5")):
            return f"progress.{key} is not a row of accuracies (0-100)"
    if not _opt(progress.get("mean_epoch_s"), _real):
        return "progress.mean_epoch_s is not a number"
    return None


THROUGHPUT = ("images_per_s", "images_per_s_per_device", "tflops_per_device", "mfu")
HEARTBEAT_NUMBERS = ("time", "epoch", "epochs", "step", "steps_per_epoch", "global_step", "train_loss", "lr", "pid",
                     "world_size", "restart_count", *THROUGHPUT)


def heartbeat_problem(beat: Any) -> str | None:
    if not isinstance(beat, dict):
        return f"is {_type(beat)}, not an object"
    if not _time(beat.get("time")):
        return "has no time (or not a number)"
    for key in HEARTBEAT_NUMBERS:
        if not _opt(beat.get(key), _real):
            return f"{key} is not a number"
    if not _opt(beat.get("phase"), _str):
        return "phase is not text"
    if "progress" in beat and beat["progress"] is not None:
        return _progress_problem(beat["progress"])
    return None


def _checked(path: Path, name: str, check) -> tuple[Any, str | None]:
    value, problem = read_json_checked(path / name)
    if problem:
        return None, problem
    if value is None:
        return None, None if not (path / name).exists() else f"{name} is null"
    problem = check(value)
    return (None, f"{name} {problem}") if problem else (value, None)


def heartbeat(path: Path) -> tuple[dict | None, str | None]:
    return _checked(path, rundir.HEARTBEAT, heartbeat_problem)


def summary(path: Path) -> tuple[dict | None, str | None]:
    return _checked(path, rundir.SUMMARY, lambda v: None if isinstance(v, dict) else f"is {_type(v)}, not an object")


def eval_result(path: Path) -> tuple[dict | None, str | None]:
    """eval.json of an eval job's folder (evals/eval-ID/eval.json)."""
    def check(v):
        if not isinstance(v, dict):
            return f"is {_type(v)}, not an object"
        for key in ("acc1", "acc5"):
            if not _opt(v.get(key), _real):
                return f"{key} is not a number"
            if not _opt(v.get(key), _percent):
                return f"{key} is not an accuracy (0-100)"
        if not _opt(v.get("time"), _time):
            return "time is not a time"
        return None

    value, problem = _checked(path, rundir.EVAL, check)
    return value, (f"{path.name}/{problem}" if problem else None)


def _attempt_ok(row: dict) -> bool:
    if row.get("event") not in ("start", "end") or not _opt(row.get("time"), _time):
        return False
    res = row.get("resumed_from")
    if res is not None and not (isinstance(res, dict) and _str(res.get("path"))):
        return False
    return all(_opt(row.get(k), _real) for k in ("epoch", "step", "global_step")) and \
        _opt(row.get("reason"), _str) and _opt(row.get("job_id"), lambda v: isinstance(v, (str, int)))


def _metric_ok(row: dict) -> bool:
    return _int(row.get("epoch")) and row["epoch"] >= 0 and _percent(row.get("acc1")) and \
        all(_opt(row.get(k), _percent) for k in ("acc5", "ema_acc1", "ema_acc5")) and \
        all(_opt(row.get(k), _real) for k in ("val_loss", "train_loss", "epoch_s", "lr", "w_shift", *THROUGHPUT))


def _rows(path: Path, name: str, ok) -> tuple[list[dict], str | None]:
    rows, problem = read_jsonl_checked(path / name)
    good = [r for r in rows if ok(r)]
    if len(good) < len(rows):
        extra = f"{len(rows) - len(good)} of {len(rows)} rows unusable"
        problem = f"{problem}; {extra}" if problem else f"{name}: {extra}"
    return good, problem


def attempt_rows(path: Path) -> tuple[list[dict], str | None]:
    return _rows(path, rundir.ATTEMPTS, _attempt_ok)


def metric_rows(path: Path) -> tuple[list[dict], str | None]:
    return _rows(path, rundir.METRICS, _metric_ok)
