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
import random
import re
import time
from pathlib import Path

import numpy as np
import torch

from tla_jobs import rundir
from tla_jobs.errors import CheckpointError
from tla_jobs.fsutil import _fsync_dir, write_temp

FORMAT = "tla-checkpoint/1"
LAST, PREV, BEST = rundir.CHECKPOINT_LAST, rundir.CHECKPOINT_PREV, rundir.CHECKPOINT_BEST
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
        *(p for p in folder.glob("checkpoint_epoch*.pth") if re.fullmatch(rundir.CHECKPOINT_EPOCH_RE, p.name)),
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


def remove_orphans(folder: Path) -> list[Path]:
    """Delete temporary files that a killed write left behind (``.checkpoint_*.tmp``)."""
    gone = []
    for tmp in folder.glob(".checkpoint_*.tmp"):
        try:
            tmp.unlink()
            gone.append(tmp)
        except OSError:
            pass
    if gone:
        log.info("removed %d unfinished checkpoint file(s) left by a killed attempt", len(gone))
    return gone


# ---- what a checkpoint holds besides weights: RNG streams, and the whole training state ----------


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def payload(meta: dict, model, optimizer, scheduler, scaler, ema, progress: dict, rng: list) -> dict:
    """A checkpoint's contents: identity (``meta``), every stateful piece, progress and RNG of all ranks."""
    return {
        "format": FORMAT,
        **meta,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "ema": ema.module.state_dict() if ema is not None else None,
        **progress,
        "rng": rng,
        "time": time.time(),
    }


def restore(payload: dict, path: Path, model, optimizer, scheduler, scaler, ema) -> None:
    """Load every stateful piece; a checkpoint of another shape is one clear error."""
    try:
        model.load_state_dict(payload["model"])
        optimizer.load_state_dict(payload["optimizer"])
        scheduler.load_state_dict(payload["scheduler"])
        if scaler is not None and payload.get("scaler"):
            scaler.load_state_dict(payload["scaler"])
        if ema is not None and payload.get("ema"):
            ema.module.load_state_dict(payload["ema"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None
