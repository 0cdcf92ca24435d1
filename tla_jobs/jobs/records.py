"""run.json: what was asked for (spec, profile, code version) and every job submitted for a run.

Attempts are recorded by the trainer itself (attempts.jsonl) and by SLURM (sacct); run.json holds
the submissions. Updates take the run's lock and replace the file atomically, so two `tla`
processes updating one run never lose each other's change or leave half a file.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tla_jobs import __version__, rundir
from tla_jobs.errors import TlaError
from tla_jobs.fsutil import atomic_write_json, locked
from tla_jobs.jobs import damage

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def runs_root(override: str | None = None) -> Path:
    """Where runs live: a profile's runs_root, else $TLA_RUNS, else ./runs."""
    return Path(override or os.environ.get("TLA_RUNS") or "runs").expanduser().resolve()


def roots() -> list[Path]:
    """Every runs root `tla` looks in: the default one, then the runs_root of each profile it can
    find (a run submitted with such a profile lives there)."""
    out = [runs_root()]
    try:
        from tla_jobs.jobs import profiles

        for name in profiles.available():
            try:
                prof = profiles.load(name)
            except Exception:  # a broken profile is reported when it is used, not here
                continue
            if prof.runs_root:
                root = runs_root(prof.runs_root)
                if root not in out:
                    out.append(root)
    except Exception:
        pass
    return out


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name) or ".." in name:
        raise TlaError(f"run name {name!r} is not a safe file name (letters, digits, '.', '_', '-'; at most 100)")
    return name


def run_dir(name: str, root: Path | None = None) -> Path:
    return (root or runs_root()) / check_name(name)


def git_commit() -> str:
    from tla_jobs.jobs.commands import run

    out = run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short=12", "HEAD"], timeout=5)
    return out.stdout.strip() if out is not None and out.returncode == 0 else ""


def create(path: Path, record: dict) -> None:
    """Create a new run directory with its run.json; refuses an existing run."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir()
    except FileExistsError:
        raise TlaError(f"run {path.name} already exists in {path.parent}; use `tla resume {path.name}` "
                       "or another --name") from None
    record = {"name": path.name, "created": time.time(), "version": __version__, "git_commit": git_commit(),
              "submissions": [], "evals": [], **record}
    try:
        with locked(path / rundir.RUN_JSON):
            atomic_write_json(path / rundir.RUN_JSON, record)
    except BaseException:  # a full or read-only disk: leave no half-made run that blocks the name
        shutil.rmtree(path, ignore_errors=True)
        raise


def adopt(path: Path, profile: dict) -> dict:
    """A `tla train --output-dir` folder becomes a run tla can keep records of (an eval job's result,
    `tla status`): its run.json is written from its config.yaml (the recipe the trainer resolved),
    with no submissions (it was trained outside tla's jobs) and ``profile`` for the jobs to come.
    Never replaces a run.json (one written meanwhile wins)."""
    from tla_jobs.config import TrainConfig

    spec = rundir.read_config(path)
    if spec is None:
        raise TlaError(f"{path} has no {rundir.CONFIG_YAML}: cannot tell which recipe trained it")
    try:
        spec = TrainConfig(**{k: v for k, v in spec.items() if k in TrainConfig.model_fields}).model_dump()
    except ValueError as exc:  # pydantic's ValidationError: values no TrainConfig takes
        raise TlaError(f"{path / rundir.CONFIG_YAML} is damaged ({exc.__class__.__name__}): cannot tell which "
                       f"recipe trained {path.name}") from None
    record = {"name": path.name, "created": time.time(), "version": __version__, "git_commit": git_commit(),
              "kind": "train", "adopted": True, "spec": {**spec, "output_dir": str(path)}, "profile": profile,
              "submissions": [], "evals": []}
    with locked(path / rundir.RUN_JSON):
        try:
            atomic_write_json(path / rundir.RUN_JSON, record, replace=False)
        except FileExistsError:
            pass
    return load(path)


def load(path: Path) -> dict:
    record, problem = damage.record(path)
    if problem:
        raise TlaError(f"run {path.name} is damaged: {problem} ({path / rundir.RUN_JSON})")
    if record is None:
        raise TlaError(f"run {path.name} does not exist in {path.parent}")
    return record


def update(path: Path, change: Callable[[dict], None]) -> dict:
    with locked(path / rundir.RUN_JSON):
        record = load(path)
        change(record)
        atomic_write_json(path / rundir.RUN_JSON, record)
    return record


def resolve(name_or_path: str) -> Path:
    """A run by name under a runs root (roots()), or a path to a run directory."""
    candidate = Path(name_or_path).expanduser()
    if (candidate / rundir.RUN_JSON).exists() and (os.sep in name_or_path or not NAME_RE.fullmatch(name_or_path)):
        return candidate.resolve()
    path = run_dir(name_or_path)
    if (path / rundir.RUN_JSON).exists():  # a damaged run.json (even a directory) is still a run
        return path
    for root in roots()[1:]:
        if (root / name_or_path / rundir.RUN_JSON).exists():
            return root / name_or_path
    raise TlaError(f"run {name_or_path} does not exist in {path.parent}")


def run_or_sweep(name: str) -> tuple[list[Path], bool]:
    """What a positional name of `tla status`/`tla logs` means: a run (by name or directory; a run's
    name wins), else every run of the sweep of that name. Returns (paths, True when it is a sweep)."""
    try:
        return [resolve(name)], False
    except TlaError as exc:
        if not NAME_RE.fullmatch(name) or ".." in name:
            raise
        try:
            return sweep_runs(name), True
        except TlaError:
            raise TlaError(f"{exc}, and no sweep has that name") from None


def sweep_runs(name: str, paths: list[Path] | None = None) -> list[Path]:
    """The runs of the sweep ``name`` (run.json's "sweep"), among ``paths`` or every run."""
    out = [p for p in (all_runs() if paths is None else paths) if (damage.record(p)[0] or {}).get("sweep") == name]
    if not out:
        raise TlaError(f"no runs of a sweep named {name!r}")
    return out


def all_runs(root: Path | None = None) -> list[Path]:
    """Every run under ``root``, or under every runs root (roots())."""
    out: list[Path] = []
    for r in [root] if root else roots():
        try:
            names = os.listdir(r)
        except OSError:  # no runs root (yet), or not a folder
            continue
        # one stat a run: a listing of 10,000 runs is in `tla status`'s time (a damaged run.json,
        # even a directory, still marks a run)
        base = f"{r}{os.sep}"
        out += [r / n for n in sorted(names) if n != "lost+found" and _is_run(f"{base}{n}")]  # a mount's own
    return out


def _is_run(folder: str) -> bool:
    """The folder holds a run.json (a damaged one, even a directory, still marks a run), or cannot be
    looked into at all: such a folder is listed, as unreadable, rather than silently left out."""
    try:
        os.stat(f"{folder}{os.sep}{rundir.RUN_JSON}")
        return True
    except PermissionError:
        return os.path.isdir(folder)
    except OSError:
        return False
