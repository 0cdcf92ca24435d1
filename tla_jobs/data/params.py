"""Each training sample's augmentation parameters, drawn by timm's own transform objects.

The batched device path (tla_jobs.data.gpu_augment) needs, per sample, what timm's PIL train
transform would have done: the RandomResizedCrop box, the flip, and RandAugment's ops with their
level arguments. Rather than re-implement timm's sampling (and drift from it), `TrainParams` walks
the very Compose that `build_transforms` makes and *calls* its objects:

- the crop box from ``RandomResizedCropAndInterpolation.get_params`` (Python's `random`);
- the flip as ``RandomHorizontalFlip`` draws it (``torch.rand(1) < p``);
- RandAugment by running a copy of timm's ``RandAugment`` whose ops record ``(name, level args)``
  instead of touching pixels: the op choice (``np.random.choice``), each op's probability, the
  magnitude noise (``random.gauss``), the level functions and their random negation are timm's code.

Run under the sample's seed (``SeededSamples`` seeds `random`, numpy and torch exactly as for the
PIL path), the draws are the same numbers in the same order as the PIL path's, so the choice of
path changes no parameter and a resumed run replays them.

A row of parameters is a float64 vector: ``[top, left, height, width, flip, op_1, arg_1, ..., op_n,
arg_n]``, op = index into the policy's op names or -1 where the op's probability skipped it.
"""

from __future__ import annotations

import copy

import torch
from timm.data.auto_augment import RandAugment
from timm.data.transforms import MaybePILToTensor, MaybeToTensor, RandomResizedCropAndInterpolation, ToNumpy
from torchvision import transforms as tvt

from tla_jobs.errors import TlaError

# The RandAugment ops the device path implements (timm's _RAND_INCREASING_TRANSFORMS and the
# non-increasing variants share these pixel ops; the level functions are timm's either way).
DEVICE_OPS = frozenset({
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
    "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing",
    "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
})
HEAD = 5  # top, left, height, width, flip


class _Size:
    """Stands in for the PIL image RandAugment would get: its ops note what they were asked to do."""

    def __init__(self, width: int, height: int):
        self.size = (width, height)
        self.ops: list[tuple[str, tuple]] = []


class _Record:
    """An op's pixel function replaced by one that notes what it was asked to do."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, img: _Size, *args, **_kwargs) -> _Size:
        img.ops.append((self.name, args))
        return img


class TrainParams:
    """Draws a sample's parameters with the objects of timm's train transform ``compose``."""

    def __init__(self, compose):
        steps = list(getattr(compose, "transforms", [compose]))
        self.crop = self.flip = self.ra = None
        for t in steps:
            if isinstance(t, RandomResizedCropAndInterpolation) and self.crop is None:
                if isinstance(t.interpolation, (list, tuple)):
                    raise TlaError("the batched data path needs one --interpolation, not random")
                self.crop = t
            elif isinstance(t, tvt.RandomHorizontalFlip) and self.flip is None:
                self.flip = t
            elif isinstance(t, RandAugment) and self.ra is None:
                self.ra = copy.deepcopy(t)
            elif not isinstance(t, (MaybePILToTensor, MaybeToTensor, ToNumpy)):
                raise TlaError(f"the batched data path has no device version of {type(t).__name__} "
                               "(it runs DeiT's crop, flip and RandAugment)")
        if self.crop is None:
            raise TlaError("the batched data path needs timm's RandomResizedCrop in the train transform")
        self.size = tuple(self.crop.size)
        self.op_names: list[str] = []
        self.fill: tuple[int, int, int] = (128, 128, 128)
        if self.ra is not None:
            for op in self.ra.ops:
                if op.name not in DEVICE_OPS:
                    raise TlaError(f"the batched data path has no device version of RandAugment's {op.name}")
                if isinstance(op.kwargs.get("resample"), (list, tuple)):
                    raise TlaError("the batched data path needs one --interpolation, not random")
                self.fill = tuple(op.kwargs.get("fillcolor", self.fill))
                self.op_names.append(op.name)
                op.aug_fn = _Record(op.name)
        self.layers = self.ra.num_layers if self.ra is not None else 0
        self.width = HEAD + 2 * self.layers

    def draw(self, width: int, height: int) -> torch.Tensor:
        """The parameter row of one image of this size, drawn from the current `random`, numpy and torch
        states (seeded per sample by the caller), in the PIL path's order."""
        row = torch.full((self.width,), -1.0, dtype=torch.float64)
        # get_params reads only the size: a (1, height, width) view of one byte stands in for the image
        img = torch.empty((1, 1, 1), dtype=torch.uint8).expand(1, height, width)
        row[:4] = torch.tensor(self.crop.get_params(img, self.crop.scale, self.crop.ratio), dtype=torch.float64)
        row[4] = float(bool(torch.rand(1) < self.flip.p)) if self.flip is not None else 0.0
        if self.ra is not None:
            canvas = _Size(*self.size)  # RandAugment sees the cropped, resized image
            self.ra(canvas)
            for k, (name, args) in enumerate(canvas.ops):
                row[HEAD + 2 * k] = self.op_names.index(name)
                row[HEAD + 2 * k + 1] = float(args[0]) if args else 0.0
        return row


def ops_of(row: torch.Tensor, params: TrainParams) -> list[tuple[str, float | None]]:
    """(op name, level argument) of each applied RandAugment op of a parameter row (tests, logs)."""
    out = []
    for k in range(params.layers):
        op = int(row[HEAD + 2 * k])
        if op >= 0:
            out.append((params.op_names[op], float(row[HEAD + 2 * k + 1])))
    return out
