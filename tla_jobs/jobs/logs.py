"""A run's logs: the trainer's per-rank files and submitit's per-task stdout/stderr, merged, and
the lines that explain a failure."""

from __future__ import annotations

import re
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.fsutil import read_json

ERROR_PATTERNS = re.compile(
    r"(Traceback \(most recent call last\)|CUDA out of memory|OutOfMemoryError|NCCL (WARN|error|Error)|"
    r"ncclInternalError|ncclSystemError|DataError|CheckpointError|TlaError|RuntimeError|Error:|"
    r"srun: error|slurmstepd: error|CANCELLED AT|DUE TO TIME LIMIT|Killed|Segmentation fault|No progress|"
    r"no progress in the last)"
)
STAMP = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})")


def files(run: Path, rank: int | None = None) -> list[Path]:
    out = sorted(run.glob("log_rank*.txt")) if rank is None else [run / rundir.LOG_PATTERN.format(rank=rank)]
    record = read_json(run / rundir.RUN_JSON) or {}
    jobs = record.get("submissions", []) + record.get("evals", [])
    folders = {run / rundir.SUBMITIT_DIR} | {Path(s["submitit_folder"]) for s in jobs if s.get("submitit_folder")}
    for folder in sorted(folders):
        if not folder.is_dir():
            continue
        for sub in jobs:  # only this run's jobs: a sweep's folder holds every element's logs
            if folder == run / rundir.SUBMITIT_DIR and not sub.get("submitit_folder") or \
                    str(folder) == sub.get("submitit_folder"):
                task = "*" if rank is None else str(rank)
                out += sorted(folder.glob(f"{sub['job_id']}_{task}_log.*"))
    seen: set[Path] = set()
    return [p for p in out if p.is_file() and not (p in seen or seen.add(p))]


def merged(run: Path, rank: int | None = None) -> list[str]:
    """Trainer lines in time order (they carry timestamps and rank tags), then scheduler/submitit output."""
    stamped, other = [], []
    for p in files(run, rank):
        for line in p.read_text(errors="replace").splitlines():
            m = STAMP.match(line)
            if m and p.name.startswith("log_rank"):
                stamped.append((m.group(1), line))
            elif not p.name.startswith("log_rank"):
                other.append(f"[{p.name}] {line}")
    return [line for _, line in sorted(stamped, key=lambda x: x[0])] + other


def error_lines(run: Path, rank: int | None = None) -> list[str]:
    """Tracebacks (whole) and lines naming known failure causes, from submitit's logs and ours."""
    out: list[str] = []
    for p in files(run, rank):
        lines = p.read_text(errors="replace").splitlines()
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
