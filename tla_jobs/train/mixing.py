"""Per-batch label mixing for every arm the trainer offers.

- TL-Align: grid CutMix (tla_jobs.align), targets from the aligned cls weight; with --mixup > 0 a
  batch may instead be mixup (uniform weights λ, which propagation leaves unchanged).
- grid CutMix without alignment: the same boxes, area labels λ (the ablation's arm a).
- DeiT's baseline: timm's Mixup (mixup 0.8 / pixel CutMix 1.0, switched per batch).
- none: label-smoothed one-hots.

Randomness comes from a dedicated torch.Generator (checkpointed) and, for timm's Mixup, numpy's
global RNG (checkpointed with the others), so a resumed run draws the same boxes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.data import Mixup

from tla_jobs.align import mixed_targets, smoothed_one_hot, token_cutmix
from tla_jobs.align.cutmix import numpy_rng
from tla_jobs.config import TrainConfig


@dataclass
class MixedBatch:
    images: torch.Tensor
    patch_weights: torch.Tensor | None  # set when labels should be aligned per token
    targets: torch.Tensor | None  # soft targets, when known without the forward pass
    partner: torch.Tensor | None


class BatchMixer:
    def __init__(self, cfg: TrainConfig, num_classes: int, patch_size: int, generator: torch.Generator):
        self.cfg, self.k, self.patch, self.gen = cfg, num_classes, patch_size, generator
        self.timm_mixup = None
        if not cfg.cutmix_grid and (cfg.mixup > 0 or cfg.cutmix > 0):
            self.timm_mixup = Mixup(
                mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=1.0, switch_prob=cfg.mixup_switch_prob,
                mode=cfg.mix_mode, label_smoothing=cfg.smoothing, num_classes=num_classes,
            )

    def _mixup(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lam = float(numpy_rng(self.gen).beta(self.cfg.mixup, self.cfg.mixup))
        partner = torch.arange(images.shape[0] - 1, -1, -1, device=images.device)
        mixed = images * lam + images.flip(0) * (1 - lam)
        n = (images.shape[-2] // self.patch) * (images.shape[-1] // self.patch)
        return mixed, torch.full((images.shape[0], n), lam, device=images.device), partner

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> MixedBatch:
        cfg = self.cfg
        if self.timm_mixup is not None:
            if images.shape[0] % 2:
                raise ValueError("timm's Mixup needs an even batch size")
            mixed, soft = self.timm_mixup(images, targets)
            return MixedBatch(mixed, None, soft, None)
        use_mixup = cfg.mixup > 0 and (cfg.cutmix == 0 or torch.rand((), generator=self.gen) < cfg.mixup_switch_prob)
        if use_mixup:
            mixed, weights, partner = self._mixup(images)
        elif cfg.cutmix > 0:
            mix = token_cutmix(images, self.patch, alpha=cfg.cutmix, mode=cfg.mix_mode, generator=self.gen)
            mixed, weights, partner = mix.images, mix.patch_weights.to(images.device), mix.partner
        else:
            return MixedBatch(images, None, smoothed_one_hot(targets, self.k, cfg.smoothing), None)
        if cfg.tl_align:
            return MixedBatch(mixed, weights, None, partner)
        # plain grid CutMix / mixup: area labels
        return MixedBatch(mixed, None, mixed_targets(targets, partner, weights.mean(1), self.k, cfg.smoothing), None)
