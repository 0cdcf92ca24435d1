"""Which weights a command means: `tla export` and `tla eval checkpoint` name a run (with --which
best|last|ema|epoch:N), a checkpoint file, or (eval) an export; this turns that into one file, the
weights inside it to use (the model's or its EMA's) and the sha256 that identifies it.

Torch-free: a checkpoint's digest comes from its sidecar (tla_jobs/checkpoint_files.py), a
safetensors export's metadata from its JSON header; only a .pth export needs torch to be read.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from tla_jobs import checkpoint_files as checkpoints
from tla_jobs import rundir
from tla_jobs.errors import TlaError
from tla_jobs.fsutil import read_jsonl
from tla_jobs.jobs import records

EXPORT_FORMAT = "tla-export/1"  # tla_jobs.train.export.FORMAT, without importing torch


@dataclass
class Weights:
    """One set of weights: ``path`` (a checkpoint or an export), ``weights`` inside it (model or ema),
    ``which`` as records and tables show it (best, last, ema, epoch:N, prev, file, export), the run
    directory it belongs to (None when it lies outside any run), its sha256 (None when unknown) and,
    for an export, its metadata."""

    path: Path
    weights: str
    which: str
    run_dir: Path | None
    sha256: str | None
    export: dict | None = None


def label(name: str) -> str:
    """A checkpoint's file name as --which spells it: last, prev, best, epoch:N; file for another name."""
    kind = checkpoints.which(name)
    return f"epoch:{checkpoints.epoch_number(name)}" if kind == "epoch" else ("file" if kind == "other" else kind)


def run_of(path: Path) -> Path | None:
    """The run a file lies in: its folder, when that folder holds run.json."""
    folder = path.parent
    return folder if (folder / rundir.RUN_JSON).is_file() else None


def _holds_run(path: Path) -> bool:
    """A folder that holds a run: a submitted one (run.json) or a `tla train --output-dir` (its config.yaml,
    written at the start, or its checkpoints)."""
    return path.is_dir() and any((path / n).exists() for n in (rundir.RUN_JSON, rundir.CONFIG_YAML,
                                                                rundir.CHECKPOINT_LAST))


def as_run(target: str) -> Path:
    """A run by name (under a runs root, submitted or trained there with `tla train --output-dir`), or a
    folder that holds one."""
    path = Path(target).expanduser()
    if _holds_run(path):
        return path.resolve()
    if records.NAME_RE.fullmatch(target) and ".." not in target:
        for root in records.roots():
            if _holds_run(root / target) and not (root / target / rundir.RUN_JSON).exists():
                return root / target  # a `tla train` folder by its name (a submitted run: records.resolve below)
    return records.resolve(target)


def safetensors_metadata(path: Path) -> dict:
    """The metadata of a safetensors file from its header (8 bytes of length, then JSON)."""
    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100_000_000:
                raise ValueError("header too large")
            meta = json.loads(f.read(size)).get("__metadata__") or {}
    except (OSError, ValueError, struct.error, AttributeError) as exc:
        raise TlaError(f"{path} is not a readable safetensors export ({exc.__class__.__name__})") from None
    if meta.get("format") != EXPORT_FORMAT:
        raise TlaError(f"{path} is not a tla export (`tla export` writes them)")
    return meta


def _export(path: Path, in_run: bool) -> dict | None:
    """An export's metadata; None for a file to hand to the trainer as a checkpoint: a .pth inside a
    run (the trainer tells a sidecar-less export from a damaged checkpoint there)."""
    if path.suffix == ".safetensors":
        return safetensors_metadata(path)
    if in_run or checkpoints.sidecar(path).exists():
        return None
    from tla_jobs.train.export import read_metadata  # a .pth export is a torch file

    return read_metadata(path)


def _file(path: Path, which: str | None, exports: bool) -> Weights:
    if not path.is_file():
        raise TlaError(f"checkpoint {path} does not exist")
    if which not in (None, "ema"):
        raise TlaError(f"--which {which} names a checkpoint of a run: give the run instead of the file {path.name} "
                       "(with a file, only --which ema means something: its EMA weights)")
    path = path.resolve()
    meta = _export(path, run_of(path) is not None) if exports else None
    if meta is None:
        return Weights(path, which or "model", which or label(path.name), run_of(path), checkpoints.read_sidecar(path))
    if which == "ema" and meta.get("weights") != "ema":
        raise TlaError(f"{path.name} holds the model's weights, not EMA ones (`tla export --which ema` writes those)")
    return Weights(path, "model", "export", _source_run(meta), checkpoints.file_sha256(path), meta)


def _source_run(meta: dict) -> Path | None:
    """The run an export was made from, only as far as the run's own records show it: the metadata
    names a checkpoint of a run directory and the sha256 it was made from, and that run logged a
    checkpoint with that sha256 (checkpoints.jsonl). Metadata anyone can write into a file must not
    file an eval's result in another run's record. None when it cannot be shown."""
    source, digest = meta.get("source_checkpoint"), meta.get("source_sha256")
    if not isinstance(source, str) or not source or not isinstance(digest, str):
        return None
    run = run_of(Path(source))
    if run is None:
        return None
    logged = {row.get("sha256") for row in read_jsonl(run / rundir.CHECKPOINT_LOG)}
    return run if digest in logged else None


def locate(target: str, which: str | None, exports: bool = False, default: str = "last",
           missing_ok: bool = False) -> Weights:
    """The weights ``target`` and ``which`` name (see the module docstring). ``which`` None means
    ``default`` for a run and the file itself for a file; with a file, only ema changes anything
    (its EMA weights). ``exports``: an export file is accepted too (eval). ``missing_ok``: best,
    last and ema of a run whose checkpoint is not written yet (an eval that waits for training)."""
    path = Path(target).expanduser()
    if path.is_file() or path.suffix in (".pth", ".safetensors"):
        return _file(path, which, exports)
    run_dir = as_run(target)
    which = which or default
    try:
        ckpt, weights = checkpoints.select(run_dir, which)
    except TlaError:
        if not (missing_ok and which in ("best", "last", "ema")):
            raise
        ckpt = run_dir / (rundir.CHECKPOINT_BEST if which == "best" else rundir.CHECKPOINT_LAST)
        weights = "ema" if which == "ema" else "model"
    return Weights(ckpt, weights, which, run_dir, checkpoints.read_sidecar(ckpt))
