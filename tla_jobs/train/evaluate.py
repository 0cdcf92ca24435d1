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

from tla_jobs import __version__, rundir
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
    if path.suffix == ".safetensors" or (path.is_file() and not ckpt._sidecar(path).exists() and _is_export(path)):
        return _export_weights(cfg, num_classes, path)
    payload, digest, path = ckpt.find(cfg, num_classes, None)
    state = payload.get(cfg.eval_weights)
    if not state:
        raise CheckpointError(f"{path} has no {cfg.eval_weights} weights (EMA is saved only by runs with "
                              "--model-ema)")
    return state, {"checkpoint": str(path.resolve()), "checkpoint_sha256": digest, "epoch": payload["epoch"],
                   "weights": cfg.eval_weights}


def _is_export(path: Path) -> bool:
    from tla_jobs.train.export import read_metadata

    try:
        read_metadata(path)
    except CheckpointError:
        return False  # then ckpt.find says what is wrong with it as a checkpoint
    return True


def _export_weights(cfg: TrainConfig, num_classes: int, path: Path) -> tuple[dict, dict]:
    from tla_jobs.train.export import read_metadata

    if not path.is_file():
        raise CheckpointError(f"export {path} does not exist")
    meta = read_metadata(path)
    if meta["model_name"] != cfg.model or int(meta["num_classes"]) != num_classes:
        raise CheckpointError(f"export {path} is a {meta['model_name']} with {meta['num_classes']} classes; "
                              f"this run is a {cfg.model} with {num_classes} classes")
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
