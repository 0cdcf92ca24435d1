"""Checkpoints that survive being killed mid-write and are verified when loaded.

Each checkpoint ``X.pth`` has ``X.pth.sha256`` beside it. Writes go to a temporary file (fsynced)
and are renamed into place; ``checkpoint_last.pth`` keeps its predecessor as ``checkpoint_prev.pth``
so a damaged last one still leaves a good one to resume from. Loading checks the hash and uses
``torch.load(weights_only=True)``: a checkpoint is data, never code. Every file written gets a line
in checkpoints.jsonl (its sha256, where training stood, the top-1/top-5 of those weights); the
listing, the hashing and the retention policy are torch-free, in tla_jobs/checkpoint_files.py.

The trainer's side is at the end: :func:`save` (every rank's RNG, rank 0 writes) and
:func:`resume` / :func:`find` (the checkpoint to continue from or evaluate, checked to be this model).
timm's CheckpointSaver is not used: it writes with a plain torch.save (no sha256, no fsync, no
atomic rename of the hash with the data) and keeps its own history naming, not rundir's.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tla_jobs import __version__, rundir
from tla_jobs import checkpoint_files as listing
from tla_jobs.checkpoint_files import candidates, file_sha256
from tla_jobs.errors import CheckpointError
from tla_jobs.fsutil import _fsync_dir, read_jsonl, write_temp
from tla_jobs.train import distributed as tdist
from tla_jobs.train import recipe, rng
from tla_jobs.train.progress import Progress
from tla_jobs.train.step import Models, Optimization

FORMAT = "tla-checkpoint/1"
LAST, PREV, BEST = rundir.CHECKPOINT_LAST, rundir.CHECKPOINT_PREV, rundir.CHECKPOINT_BEST
log = logging.getLogger("tla.checkpoint")

if TYPE_CHECKING:
    from tla_jobs.train.setup import Run


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
        if listing.sidecar(path).exists():
            os.replace(listing.sidecar(path), listing.sidecar(prev))
        os.replace(path, prev)
    os.replace(tmp_hash, listing.sidecar(path))
    os.replace(tmp_data, path)
    _fsync_dir(folder)
    return path


def verify(path: Path) -> str:
    """Return the file's sha256 if it matches its sidecar; raise CheckpointError otherwise."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    side = listing.sidecar(path)
    if not side.is_file():
        raise CheckpointError(f"checkpoint {path} has no {side.name} (incomplete write?)")
    expected = listing.read_sidecar(path) or ""  # an empty sidecar matches nothing: damaged
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


# ---- what a checkpoint holds: identity, every stateful piece, progress, RNG of all ranks ---------


def payload(meta: dict, models: Models, opt: Optimization, progress: dict, rng_states: list) -> dict:
    return {
        "format": FORMAT,
        **meta,
        "model": models.model.state_dict(),
        "optimizer": opt.optimizer.state_dict(),
        "scheduler": opt.scheduler.state_dict(),
        "scaler": opt.backward.state_dict(),  # None without fp16's loss scaling
        "ema": models.ema.module.state_dict() if models.ema is not None else None,
        **progress,
        "rng": rng_states,
        "time": time.time(),
    }


def restore(payload: dict, path: Path, models: Models, opt: Optimization, extend: bool = False) -> None:
    """Load every stateful piece; a checkpoint of another shape is one clear error. ``extend`` (--extend,
    a run continued with other --epochs): the schedule is the one built for the new length (timm's
    schedulers compute the lr from the epoch and step they are given; their state holds the old length)."""
    try:
        models.model.load_state_dict(payload["model"])
        opt.optimizer.load_state_dict(payload["optimizer"])
        if not extend:
            opt.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            opt.backward.load_state_dict(payload["scaler"])
        if models.ema is not None and payload.get("ema"):
            models.ema.module.load_state_dict(payload["ema"])
    except (RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}") from None


def weights_checksum(model: torch.nn.Module) -> str:
    """A short hash of the weights, which every rank logs at the end: replicas that drifted apart show."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---- the trainer's side ---------------------------------------------------------------------------


def save(run: Run, p: Progress, extra_names=()) -> None:
    """Gather every rank's RNG; rank 0 (while it still owns the run) writes checkpoint_last.pth,
    keeping its predecessor, and the same bytes under ``extra_names`` (best, epoch N), with one line
    per file in checkpoints.jsonl; then --keep-last/--keep-best prune the periodic ones."""
    states = tdist.gather_objects(rng.rank_state(run.mix_gen), run.info)
    # The epoch's running sums of all ranks (each rank holds its own share until the epoch's end), so
    # that a run resumed on another number of ranks reports the same epoch mean (:func:`resume`).
    sums = torch.tensor([p.loss_sum, p.loss_count, p.shift_sum, p.shift_count], dtype=torch.float64,
                        device=run.info.device)
    totals = tdist.all_reduce_sum(sums, run.info).tolist()
    if run.info.is_main:
        run.runlog.check_owner()
        cfg = run.cfg
        meta = {"version": __version__, "model_name": cfg.model, "num_classes": run.num_classes,
                "config": cfg.model_dump()}
        progress = {**p.as_payload(), "train_loss_sum": totals[0], "train_loss_count": int(totals[1]),
                    "shift_sum": totals[2], "shift_count": int(totals[3])}
        data, digest = serialize(payload(meta, run.models, run.opt, progress, states))
        # the metrics row of exactly these weights: the epoch just finished, when no step came since
        row = p.history[-1] if p.step_in_epoch == 0 and p.history and p.history[-1]["epoch"] == p.epoch - 1 else None
        for name in (LAST, *extra_names):
            write(run.out, name, data, digest, keep_previous=name == LAST)
            rundir.append_event(run.out / rundir.CHECKPOINT_LOG, listing.log_line(
                name, digest, len(data), progress, row, ema=run.models.ema is not None))
        if cfg.keep_last or cfg.keep_best:
            gone = listing.prune(run.out, cfg.keep_last, cfg.keep_best, trust_last=True)["removed"]
            if gone:
                log.info("removed %s (--keep-last %d, --keep-best %d)", ", ".join(r["name"] for r in gone),
                         cfg.keep_last, cfg.keep_best)
    tdist.barrier(run.info)


def resume_consumed(resume: Path, out: Path) -> bool:
    """This SLURM job (or local job) already started from ``resume`` once: it is being requeued by
    SLURM itself (a node failure, `scontrol requeue`, a preemption that requeues), with the same
    --resume it was submitted with. Its own checkpoints in ``out`` then hold its progress; going back
    to ``resume`` would throw that away (and ``resume`` may since have been pruned from its run)."""
    job_id = rundir.job_identity()["job_id"]
    if not job_id:
        return False  # a shell: every `tla train --resume X` is a deliberate start from X
    return any(e.get("event") == "start" and e.get("job_id") == job_id
               and (e.get("resumed_from") or {}).get("path") == str(resume)
               for e in read_jsonl(out / rundir.ATTEMPTS))


def find(cfg, num_classes: int, out: Path | None) -> tuple[dict, str, Path] | None:
    """The checkpoint to continue from (or evaluate): --resume, else the newest good one in ``out``
    (also when --resume was already used by an earlier attempt of this job: :func:`resume_consumed`).
    One of another model or class count is refused."""
    found = None
    here = out is not None and out.is_dir()
    if cfg.resume:
        path = Path(cfg.resume).expanduser()
        if not cfg.eval_only and here and resume_consumed(path, out):
            found = load_latest(out)
        if found is None:
            found = (*load(path), path)
    elif here:
        found = load_latest(out)
    else:
        return None
    if found is not None:
        data, _, path = found
        check_fits(f"checkpoint {path}", data.get("model_name"), data.get("num_classes"), cfg, num_classes)
        if not cfg.eval_only and out is not None and path.parent == out and isinstance(data.get("config"), dict):
            # continuing this folder's own run: only under the recipe its checkpoint was made with
            recipe.refuse_other_recipe(cfg.model_dump(), data["config"], out, path.name)
    return found


def check_fits(what: str, model_name, classes, cfg, num_classes: int) -> None:
    """A checkpoint (or export) of another model or class count is one clear error, not a shape error."""
    if model_name != cfg.model or classes != num_classes:
        raise CheckpointError(f"{what} is a {model_name} with {classes} classes; "
                              f"this run is a {cfg.model} with {num_classes} classes")


def resume(run: Run) -> tuple[Progress, dict | None]:
    """Where training stands: restored from the checkpoint :func:`find` names, or a fresh start.
    Returns the progress and what attempts.jsonl records as ``resumed_from``."""
    found = find(run.cfg, run.num_classes, run.out)
    if found is None:
        return Progress(), None
    data, digest, path = found
    restore(data, path, run.models, run.opt, extend=run.cfg.extend)
    p = Progress.from_payload(data)
    states, info = data["rng"], run.info
    if not info.is_main:  # the epoch's running sums are all ranks' together: rank 0 carries them on
        p.loss_sum, p.loss_count, p.shift_sum, p.shift_count = 0.0, 0, 0.0, 0
    if len(states) == info.world_size:
        rng.set_rank_state(states[info.rank], run.mix_gen)
    else:  # training draws from per-micro-batch seeds (tla_jobs.data.order), not from these streams
        log.info("checkpoint has RNG states of %d ranks, this run has %d: reseeding", len(states), info.world_size)
    log.info("resumed from %s (sha256 %s…): epoch %d, step %d", path, digest[:12], p.epoch, p.step_in_epoch)
    return p, {"path": str(path), "sha256": digest, "epoch": p.epoch, "step": p.step_in_epoch}
