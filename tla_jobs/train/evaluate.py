"""Evaluation on the val split: loss, top-1, top-5, counted on the device with one read at the end."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from tla_jobs.train import distributed as tdist


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
                k = min(5, logits.shape[1])
                hit = logits.topk(k, dim=1).indices.eq(targets.view(-1, 1))
                sums += torch.stack([
                    crit(logits, targets).double(),
                    hit[:, :1].any(dim=1).sum().double(),
                    hit.any(dim=1).sum().double(),
                    torch.tensor(float(len(targets)), dtype=torch.float64, device=info.device),
                ])
    finally:
        model.train(was_training)
    if reduce:
        tdist.all_reduce_sum(sums, info)
    loss, c1, c5, n = sums.tolist()
    n = max(n, 1.0)
    return {"loss": loss / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "images": int(n)}
