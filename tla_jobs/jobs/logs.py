"""A run's logs: the trainer's per-rank files and submitit's per-task stdout/stderr, merged, and
the lines that explain a failure."""

from __future__ import annotations

import re
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.errors import TlaError
from tla_jobs.jobs import damage, local

ERROR_PATTERNS = re.compile(
    r"(Traceback \(most recent call last\)|CUDA out of memory|OutOfMemoryError|NCCL (WARN|error|Error)|"
    r"ncclInternalError|ncclSystemError|DataError|CheckpointError|TlaError|RuntimeError|Error:|"
    r"srun: error|slurmstepd: error|CANCELLED AT|DUE TO TIME LIMIT|Killed|Segmentation fault|No progress|"
    r"no progress in the last)"
)
STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")


def files(run: Path, rank: int | None = None) -> list[Path]:
    out = sorted(rundir.rank_logs(run).values()) if rank is None else [run / rundir.LOG_PATTERN.format(rank=rank)]
    record = damage.record(run)[0] or {}  # a damaged run.json: the trainer's own logs still show
    jobs = record.get("submissions", []) + record.get("evals", [])
    for sub in jobs:  # only this run's jobs: a sweep's folder holds every element's logs
        folder = local.folder_of(sub, run)
        if folder.is_dir():
            out += _submitit_logs(folder, str(sub["job_id"]), rank)
    seen: set[Path] = set()
    return [p for p in out if p.is_file() and not (p in seen or seen.add(p))]


def _submitit_logs(folder: Path, job_id: str, rank: int | None) -> list[Path]:
    """submitit's stdout and stderr of the job's task ``rank`` (None: every task), named by its JobPaths."""
    from submitit.core.utils import JobPaths

    paths = JobPaths(folder, job_id, "*" if rank is None else rank)  # a task id of "*" names them all, as a glob
    return sorted({*folder.glob(paths.stdout.name), *folder.glob(paths.stderr.name)})


def world_size(run: Path) -> int | None:
    """How many ranks the run has: its heartbeat, its latest submission, or its per-rank logs say so."""
    known = []
    beat = damage.heartbeat(run)[0] or {}
    if isinstance(beat.get("world_size"), int):
        known.append(beat["world_size"])
    subs = (damage.record(run)[0] or {}).get("submissions") or []
    if subs and isinstance(subs[-1].get("nodes", 1), int) and isinstance(subs[-1].get("tasks_per_node", 1), int):
        known.append(subs[-1].get("nodes", 1) * subs[-1].get("tasks_per_node", 1))
    ranks = list(rundir.rank_logs(run))
    if ranks:
        known.append(max(ranks) + 1)
    return max(known) if known else None


def check_rank(run: Path, rank: int | None) -> None:
    """Refuse a --rank the run does not have (instead of printing nothing)."""
    if rank is None:
        return
    n = world_size(run)
    if n is not None and rank >= n:
        raise TlaError(f"--rank {rank}: run {run.name} has {n} rank{'s' if n > 1 else ''} (0 to {n - 1})")


MAX_LOG_BYTES = 64 << 20  # of each log, its last 64 MB (a year of epochs of a trainer's log is a few MB)


def _read(p: Path) -> list[str]:
    from tla_jobs.fsutil import UnsafeFile, read_tail

    try:
        return read_tail(p, MAX_LOG_BYTES).decode(errors="replace").splitlines()
    except (OSError, UnsafeFile):  # a log vanished, cannot be read, or is no file (a FIFO): the others still show
        return []


def merged(run: Path, rank: int | None = None) -> list[str]:
    """Trainer lines in time order (they carry timestamps and rank tags), then scheduler/submitit output.

    The trainer writes each line both to its rank's log (rundir.LOG_PATTERN) and to stderr, which submitit keeps in
    its task's .err file: such a line is shown once, from the trainer's log."""
    paths = files(run, rank)
    trainer_logs = set(rundir.rank_logs(run).values())
    stamped = []
    for p in paths:
        if p in trainer_logs:
            stamped += [(m.group(1), line) for line in _read(p) if (m := STAMP.match(line))]
    trainer = {line for _, line in stamped}
    other = [f"[{p.name}] {line}" for p in paths if p not in trainer_logs
             for line in _read(p) if line not in trainer]
    return [line for _, line in sorted(stamped, key=lambda x: x[0])] + other


def last(lines: list[str], n: int | None) -> list[str]:
    """The last ``n`` lines (all of them when ``n`` is None)."""
    return lines[-n:] if n else lines


def error_lines(run: Path, rank: int | None = None) -> list[str]:
    """Tracebacks (whole) and lines naming known failure causes, from submitit's logs and ours."""
    out: list[str] = []
    for p in files(run, rank):
        lines = _read(p)
        i = 0
        while i < len(lines):
            line = lines[i]
            if line.startswith("Traceback (most recent call last)"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
                    j += 1
                block = lines[i : j + 1]
                out.append(f"[{p.name}] " + "\n".join(block))
                i = j + 1
                continue
            if ERROR_PATTERNS.search(line):
                out.append(f"[{p.name}] {line}")
            i += 1
    seen, unique = set(), []
    for line in out:
        key = line.split("] ", 1)[-1]
        if key not in seen:
            seen.add(key)
            unique.append(line)
    return unique
