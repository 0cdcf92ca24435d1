"""CutMix snapped to the patch grid, so that every token comes from exactly one image.

timm's Mixup cuts a pixel box, which leaves tokens that straddle two images and carry no single
label; TL-Align needs a box of whole patches (the reference's token-level CutMix), so the box is
drawn here, on the grid, with timm's rand_bbox formula.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch


class TokenCutMix(NamedTuple):
    images: torch.Tensor  # (B, C, H, W), mixed
    patch_weights: torch.Tensor  # (B, N_patches) in raster order: 1.0 = own image, 0.0 = partner
    partner: torch.Tensor  # (B,) index of the sample each one took its box from


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def numpy_rng(generator: torch.Generator | None) -> np.random.Generator:
    # λ needs a Beta draw, which torch cannot take from a Generator; seed numpy from the torch stream
    # instead, so that a seeded generator (or the global torch RNG a checkpoint restores) replays exactly.
    seed = torch.randint(0, 2**62, (1,), generator=generator).item()
    return np.random.default_rng(seed)


def _draw_lambda(rng: np.random.Generator, alpha: float) -> float:
    lam = 1.0
    while lam == 1.0:  # the reference resamples until the batch is really mixed
        lam = float(rng.beta(alpha, alpha))
    return lam


def _grid_box(rng: np.random.Generator, lam: float, gh: int, gw: int) -> tuple[int, int, int, int]:
    """timm's rand_bbox on a gh x gw grid: returns (y0, y1, x0, x1) in patches, possibly empty."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(gh * ratio), int(gw * ratio)
    cy, cx = int(rng.integers(0, gh)), int(rng.integers(0, gw))
    y0, y1 = np.clip(cy - cut_h // 2, 0, gh), np.clip(cy + cut_h // 2, 0, gh)
    x0, x1 = np.clip(cx - cut_w // 2, 0, gw), np.clip(cx + cut_w // 2, 0, gw)
    return int(y0), int(y1), int(x0), int(x1)


def token_cutmix(
    images: torch.Tensor,
    patch_size: int | tuple[int, int],
    alpha: float = 1.0,
    mode: str = "batch",
    generator: torch.Generator | None = None,
) -> TokenCutMix:
    """Mix a batch with CutMix boxes made of whole patches.

    Sample i takes the patches inside its box from sample B-1-i (the flipped batch, as the
    reference and timm do). ``mode="batch"`` draws one λ and one box for the whole batch (the
    reference); ``mode="elem"`` draws them per sample. The returned patch weights are the share of
    each patch that belongs to the sample's own label: 1.0 outside the box, 0.0 inside, so their mean
    is the area-corrected λ = 1 - box_area / N_patches.
    """
    if images.ndim != 4:
        raise ValueError(f"token_cutmix expects images of shape (B, C, H, W), got {tuple(images.shape)}")
    if alpha <= 0:
        raise ValueError(f"token_cutmix needs alpha > 0, got {alpha}")
    ph, pw = _pair(patch_size)
    b, _, h, w = images.shape
    if h % ph or w % pw:
        raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
    gh, gw = h // ph, w // pw
    rng = numpy_rng(generator)
    partner = torch.arange(b - 1, -1, -1, device=images.device)

    if mode == "batch":
        y0, y1, x0, x1 = _grid_box(rng, _draw_lambda(rng, alpha), gh, gw)
        grid = torch.ones(gh, gw, device=images.device)
        grid[y0:y1, x0:x1] = 0.0
        mixed = images.clone()
        mixed[:, :, y0 * ph : y1 * ph, x0 * pw : x1 * pw] = images.flip(0)[
            :, :, y0 * ph : y1 * ph, x0 * pw : x1 * pw
        ]
        weights = grid.flatten().unsqueeze(0).expand(b, -1).clone()
    elif mode == "elem":
        grid = torch.ones(b, gh, gw, device=images.device)
        for i in range(b):
            y0, y1, x0, x1 = _grid_box(rng, _draw_lambda(rng, alpha), gh, gw)
            grid[i, y0:y1, x0:x1] = 0.0
        own = grid.repeat_interleave(ph, dim=1).repeat_interleave(pw, dim=2).unsqueeze(1).bool()
        mixed = torch.where(own, images, images.flip(0))
        weights = grid.flatten(1)
    else:
        raise ValueError(f"token_cutmix mode must be 'batch' or 'elem', got {mode!r}")
    return TokenCutMix(mixed, weights.to(torch.float32), partner)
