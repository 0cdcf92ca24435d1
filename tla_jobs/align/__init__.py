"""Token-Label Alignment (TL-Align, ICCV 2023): token-grid CutMix and label propagation.

Public API: :func:`token_cutmix`, :func:`aligned_forward`, :func:`mixed_targets`, plus
:func:`propagate_labels` (full K-class labels, the reference's way) and :class:`AlignedModel`.
"""

from tla_jobs.align.cutmix import TokenCutMix, token_cutmix
from tla_jobs.align.models import (
    AlignedModel,
    UnsupportedModelError,
    aligned_forward,
    check_supported,
    propagate_labels,
)
from tla_jobs.align.targets import mixed_targets, smoothed_one_hot

__all__ = [
    "AlignedModel",
    "TokenCutMix",
    "UnsupportedModelError",
    "aligned_forward",
    "check_supported",
    "mixed_targets",
    "propagate_labels",
    "smoothed_one_hot",
    "token_cutmix",
]
