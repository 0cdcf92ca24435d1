"""Soft targets from aligned label weights: w·y_a + (1-w)·y_b with label-smoothed one-hots."""

from __future__ import annotations

import torch


def smoothed_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float = 0.1) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((targets.shape[0], num_classes), off, device=targets.device, dtype=torch.float32)
    return out.scatter_(1, targets.long().view(-1, 1), 1.0 - smoothing + off)


def mixed_targets(
    targets: torch.Tensor,
    partner: torch.Tensor,
    weights: torch.Tensor,
    num_classes: int,
    smoothing: float = 0.1,
) -> torch.Tensor:
    """Soft targets for a mixed batch.

    ``weights`` is the weight of each sample's own label: shape (B,) gives (B, K) targets; shape
    (B, T) (one weight per supervised token, e.g. cls and distillation) gives (B, T, K). Any
    weights in [0, 1] are allowed, so a mixup batch (uniform weights = λ) works too. Smoothing is
    affine, so smoothing the one-hots and then mixing equals mixing and then smoothing.
    """
    if targets.ndim != 1:
        raise ValueError(f"targets must be class indices of shape (B,), got {tuple(targets.shape)}")
    y_a = smoothed_one_hot(targets, num_classes, smoothing)
    y_b = y_a[partner]
    w = weights.detach().to(torch.float32)
    if w.ndim == 1:
        return w[:, None] * y_a + (1.0 - w[:, None]) * y_b
    if w.ndim == 2:
        return w[:, :, None] * y_a[:, None] + (1.0 - w[:, :, None]) * y_b[:, None]
    raise ValueError(f"weights must have shape (B,) or (B, T), got {tuple(w.shape)}")
