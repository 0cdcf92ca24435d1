"""Checkpoints that survive being killed mid-write and are verified when loaded.

Each checkpoint ``X.pth`` has ``X.pth.sha256`` beside it. Writes go to a temporary file (fsynced)
and are renamed into place; ``checkpoint_last.pth`` keeps its predecessor as ``checkpoint_prev.pth``
so a damaged last one still leaves a good one to resume from. Loading checks the hash and uses
``torch.load(weights_only=True)``: a checkpoint is data, never code.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from pathlib import Path

import torch

from tla_jobs.errors import CheckpointError
from tla_jobs.fsutil import _fsync_dir, write_temp

FORMAT = "tla-checkpoint/1"
LAST, PREV, BEST = "checkpoint_last.pth", "checkpoint_prev.pth", "checkpoint_best.pth"
log = logging.getLogger("tla.checkpoint")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def serialize(payload: dict) -> tuple[bytes, str]:
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    return data, hashlib.sha256(data).hexdigest()


def write(folder: Path, name: str, data: bytes, digest: str, keep_previous: bool = False) -> Path:
    """Put ``data`` at folder/name atomically, with its sha256 sidecar.

    Order matters: both temporary files are complete before anything is renamed, and the hash lands
    before the data, so at every instant each present .pth either matches its sidecar or has none
    (and is then skipped by :func:`load`)."""
    path = folder / name
    tmp_data = write_temp(folder, data, f".{name}.")
    tmp_hash = write_temp(folder, f"{digest}  {name}\n".encode(), f".{name}.sha256.")
    if keep_previous and path.exists():
        prev = folder / PREV
        if _sidecar(path).exists():
            os.replace(_sidecar(path), _sidecar(prev))
        os.replace(path, prev)
    os.replace(tmp_hash, _sidecar(path))
    os.replace(tmp_data, path)
    _fsync_dir(folder)
    return path


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path) -> str:
    """Return the file's sha256 if it matches its sidecar; raise CheckpointError otherwise."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    side = _sidecar(path)
    if not side.is_file():
        raise CheckpointError(f"checkpoint {path} has no {side.name} (incomplete write?)")
    expected = side.read_text().split()[0] if side.read_text().strip() else ""
    actual = file_sha256(path)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: sha256 {actual[:12]}… != recorded {expected[:12]}…")
    return actual


def load(path: str | Path) -> tuple[dict, str]:
    """Verify and load one checkpoint; returns (payload, sha256)."""
    path = Path(path)
    digest = verify(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a verified file that still fails to unpickle is not ours
        raise CheckpointError(f"checkpoint {path} cannot be read: {exc.__class__.__name__}: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a tla checkpoint (format {payload.get('format') if isinstance(payload, dict) else '?'})"
        )
    return payload, digest


def candidates(folder: Path) -> list[Path]:
    """Resumable checkpoints of a run, newest first: the last one, then the others by write time."""
    others = [
        folder / PREV,
        *(p for p in folder.glob("checkpoint_epoch*.pth") if re.fullmatch(r"checkpoint_epoch\d+\.pth", p.name)),
    ]
    others = sorted((p for p in others if p.exists()), key=lambda p: p.stat().st_mtime, reverse=True)
    return [p for p in [folder / LAST] if p.exists()] + others


def load_latest(folder: str | Path) -> tuple[dict, str, Path] | None:
    """The newest good checkpoint in ``folder``; damaged ones are reported and skipped."""
    for path in candidates(Path(folder)):
        try:
            payload, digest = load(path)
        except CheckpointError as exc:
            log.warning("%s; trying the previous checkpoint", exc)
            continue
        return payload, digest, path
    return None
