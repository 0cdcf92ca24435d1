"""Evaluation on the val split: loss, top-1, top-5, counted on the device with one read at the end;
and ``--eval-only``, which evaluates one checkpoint into eval.json."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from timm.utils import accuracy

from tla_jobs import __version__, rundir
from tla_jobs.config import TrainConfig
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


def evaluate_checkpoint(cfg: TrainConfig, model, data: Path | None, num_classes: int, out: Path,
                        info: tdist.DistInfo) -> dict:
    """--eval-only: the --resume checkpoint's top-1/top-5/loss on the val split, into eval.json."""
    payload, digest, path = ckpt.find(cfg, num_classes, None)
    model.load_state_dict(payload["model"])
    model.to(info.device)
    autocast, _, _ = amp(cfg, info.device)
    res = evaluate(model, val_batches(cfg, model, data, num_classes, info), autocast, info, reduce=cfg.dist_eval)
    result = {
        **res,
        "checkpoint": str(path.resolve()),
        "checkpoint_sha256": digest,
        "epoch": payload["epoch"],
        "model": cfg.model,
        "time": time.time(),
        "version": __version__,
    }
    if info.is_main:
        atomic_write_json(out / rundir.EVAL, result)
    log.info("eval of %s: top-1 %.2f top-5 %.2f loss %.4f on %d images",
             path, res["acc1"], res["acc5"], res["loss"], res["images"])
    return result
