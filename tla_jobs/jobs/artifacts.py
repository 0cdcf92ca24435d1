"""Which weights a command means: `tla export` and `tla eval checkpoint` name a run (with --which
best|last|ema|epoch:N), a checkpoint file, or (eval) an export; this turns that into one file, the
weights inside it to use (the model's or its EMA's) and the sha256 that identifies it.

Torch-free: a checkpoint's digest comes from its sidecar (tla_jobs/jobs/checkpoints.py), a
safetensors export's metadata from its JSON header; only a .pth export needs torch to be read.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.errors import TlaError
from tla_jobs.jobs import checkpoints, records

WHICH_HELP = ("best, last, ema (the EMA weights of the last checkpoint) or epoch:N (checkpoint_epoch{N}.pth, "
              "written after N epochs).")
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


def parse_which(which: str) -> tuple[str, int | None]:
    """'best' -> ('best', None), 'epoch:3' -> ('epoch', 3); anything else is refused."""
    m = re.fullmatch(r"epoch:(\d+)", which or "")
    if m:
        return "epoch", int(m.group(1))
    if which in ("best", "last", "ema"):
        return which, None
    raise TlaError(f"--which must be best, last, ema or epoch:N (a number of epochs), not {which!r}")


def label(name: str) -> str:
    """A checkpoint's file name as --which spells it: last, prev, best, epoch:N; file for another name."""
    kind = checkpoints.which(name)
    return f"epoch:{checkpoints.epoch_number(name)}" if kind == "epoch" else ("file" if kind == "other" else kind)


def _checkpoint_name(run_dir: Path, which: str) -> str:
    kind, n = parse_which(which)
    if kind == "epoch":
        name = rundir.CHECKPOINT_EPOCH.format(epoch=n)
        if not (run_dir / name).is_file():
            kept = sorted(e for p in run_dir.glob("checkpoint_epoch*.pth")
                          if (e := checkpoints.epoch_number(p.name)) is not None)
            have = f"epoch:{', epoch:'.join(map(str, kept))}" if kept else "none (see --checkpoint-every-epochs)"
            raise TlaError(f"run {run_dir.name} has no {name}; periodic checkpoints kept: {have}")
        return name
    return rundir.CHECKPOINT_BEST if kind == "best" else rundir.CHECKPOINT_LAST


def _run_of(path: Path) -> Path | None:
    """The run a file lies in: its folder, when that folder holds run.json."""
    folder = path.parent
    return folder if (folder / rundir.RUN_JSON).is_file() else None


def _as_run(target: str) -> Path | None:
    """A run by name, or a folder that holds a run (run.json) or a `tla train --output-dir` (checkpoints)."""
    path = Path(target).expanduser()
    if path.is_dir() and ((path / rundir.RUN_JSON).is_file() or (path / rundir.CHECKPOINT_LAST).exists()):
        return path.resolve()
    return records.resolve(target)


def is_export(path: Path) -> bool:
    """A .safetensors file, or a .pth without the sidecar every tla checkpoint has."""
    return path.suffix == ".safetensors" or (path.suffix == ".pth" and not checkpoints.sidecar(path).exists())


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


def export_metadata(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return safetensors_metadata(path)
    from tla_jobs.train.export import read_metadata  # a .pth export is a torch file

    return read_metadata(path)


def locate(target: str, which: str | None, exports: bool = False, default: str = "last") -> Weights:
    """The weights ``target`` and ``which`` name (see the module docstring). ``which`` None means
    ``default`` for a run and the file itself for a file; with a file, only ema changes anything
    (its EMA weights). ``exports``: an export file is accepted too (eval)."""
    kind = parse_which(which)[0] if which else None
    path = Path(target).expanduser()
    if path.is_file() or path.suffix in (".pth", ".safetensors"):
        if not path.is_file():
            raise TlaError(f"checkpoint {path} does not exist")
        path = path.resolve()
        if exports and is_export(path):
            if kind not in (None, "ema"):
                raise TlaError(f"--which {which} names a checkpoint of a run; {path.name} is an export (one set of "
                               "weights): leave --which out")
            meta = export_metadata(path)
            if kind == "ema" and meta.get("weights") != "ema":
                raise TlaError(f"{path.name} holds the model's weights, not EMA ones (`tla export --which ema`)")
            return Weights(path, "model", "export", _run_of(Path(meta.get("source_checkpoint", ""))),
                           checkpoints.file_sha256(path), meta)
        if kind in ("best", "last", "epoch"):
            raise TlaError(f"--which {which} names a checkpoint of a run; give the run instead of the file {path.name}")
        return Weights(path, "ema" if kind == "ema" else "model", "ema" if kind == "ema" else label(path.name),
                       _run_of(path), checkpoints.read_sidecar(path))
    run_dir = _as_run(target)
    which = which or default
    ckpt = run_dir / _checkpoint_name(run_dir, which)
    return Weights(ckpt, "ema" if which == "ema" else "model", which, run_dir,
                   checkpoints.read_sidecar(ckpt))
