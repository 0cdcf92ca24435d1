"""Evaluation on the val split: loss, top-1, top-5, counted on the device with one read at the end;
and ``--eval-only``, which evaluates one checkpoint (its model or EMA weights) or one export into
eval.json."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from timm.utils import accuracy

from tla_jobs import __version__, checkpoint_files, rundir
from tla_jobs.config import TrainConfig
from tla_jobs.errors import CheckpointError
from tla_jobs.fsutil import atomic_write_json
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train import distributed as tdist
from tla_jobs.train.setup import amp, val_batches

log = logging.getLogger("tla.train")


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    autocast,
    info: tdist.DistInfo,
    reduce: bool = False,
    should_abort: Callable[[], bool] | None = None,
) -> dict | None:
    """Mean loss and top-1/top-5 (%) over ``batches`` (normalised images on the device).

    Sums stay on the device (no host read per batch); ``reduce`` sums them over ranks (--dist-eval).
    ``should_abort`` is asked between batches (a stop signal): then None is returned.
    """
    crit = torch.nn.CrossEntropyLoss(reduction="sum")
    sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top-1, top-5, images
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for images, targets in batches:
                if should_abort is not None and should_abort():
                    return None
                with autocast():
                    logits = model(images)
                logits = logits.float()
                n = len(targets)
                # timm's accuracy is a percentage of this batch; back to a count (exact after rounding)
                top1, top5 = (acc.double().mul(n / 100).round() for acc in accuracy(logits, targets, topk=(1, 5)))
                n_images = torch.tensor(float(n), dtype=torch.float64, device=info.device)
                sums += torch.stack([crit(logits, targets).double(), top1, top5, n_images])
    finally:
        model.train(was_training)
    if reduce:
        tdist.all_reduce_sum(sums, info)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "images": int(n)}


def load_weights(cfg: TrainConfig, num_classes: int) -> tuple[dict, dict]:
    """--eval-only's weights: (state dict, what eval.json records of them: checkpoint, checkpoint_sha256,
    epoch, weights). --resume is a training checkpoint (its model or, with --eval-weights ema, its
    EMA weights) or an export of `tla export` (its one set of weights; no sidecar, hashed here)."""
    path = Path(cfg.resume).expanduser()
    meta = None  # a .pth without a sidecar may be an export; None: it is not (ckpt.find says what is wrong)
    if path.suffix != ".safetensors" and path.is_file() and not checkpoint_files.sidecar(path).exists():
        meta = _export_meta(path)
    if path.suffix == ".safetensors" or meta is not None:
        return _export_weights(cfg, num_classes, path, meta)
    payload, digest, path = ckpt.find(cfg, num_classes, None)
    state = payload.get(cfg.eval_weights)
    if not state:
        raise CheckpointError(f"{path} has no {cfg.eval_weights} weights (EMA is saved only by runs with "
                              "--model-ema)")
    return state, {"checkpoint": str(path.resolve()), "checkpoint_sha256": digest, "epoch": payload["epoch"],
                   "weights": cfg.eval_weights}


def _export_meta(path: Path) -> dict | None:
    from tla_jobs.train.export import read_metadata

    try:
        return read_metadata(path)
    except CheckpointError:
        return None


def _export_weights(cfg: TrainConfig, num_classes: int, path: Path, meta: dict | None) -> tuple[dict, dict]:
    from tla_jobs.train.export import read_metadata

    if not path.is_file():
        raise CheckpointError(f"export {path} does not exist")
    meta = meta or read_metadata(path)  # a .safetensors name not read yet: its error is the one to show
    ckpt.check_fits(f"export {path}", meta["model_name"], int(meta["num_classes"]), cfg, num_classes)
    if cfg.eval_weights == "ema" and meta["weights"] != "ema":
        raise CheckpointError(f"export {path} holds the model's weights, not the EMA's")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return state, {"checkpoint": str(path.resolve()), "checkpoint_sha256": ckpt.file_sha256(path),
                   "epoch": int(meta["epoch"]) if meta.get("epoch") else None, "weights": meta["weights"],
                   "export": True}


def evaluate_checkpoint(cfg: TrainConfig, model, data: Path | None, num_classes: int, out: Path,
                        info: tdist.DistInfo) -> dict:
    """--eval-only: the --resume checkpoint's (or export's) top-1/top-5/loss on the val split, into eval.json."""
    state, source = load_weights(cfg, num_classes)
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in state.items()})
    model.to(info.device)
    autocast, _, _ = amp(cfg, info.device)
    res = evaluate(model, val_batches(cfg, model, data, num_classes, info), autocast, info, reduce=cfg.dist_eval)
    result = {**res, **source, "model": cfg.model, "time": time.time(), "version": __version__}
    if info.is_main:
        atomic_write_json(out / rundir.EVAL, result)
    log.info("eval of %s (%s weights): top-1 %.2f top-5 %.2f loss %.4f on %d images",
             source["checkpoint"], source["weights"], res["acc1"], res["acc5"], res["loss"], res["images"])
    return result
