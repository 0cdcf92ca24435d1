"""The loader workers' part of the batched data path: read, decode, draw the parameters, cut the box.

What stays on the CPU is what must (reading the file, decoding the JPEG) plus the crop box cut out of
the decoded image, which is a plain copy of the box's rows (measured with benchmarks/bench_data.py:
cutting costs ~0.05 ms against ~0.7 ms of decoding, and it sends ~half the bytes on average to the
device, against the whole image for decode-only). The bicubic resize to the model's size, the flip
and RandAugment run batched on the device (tla_jobs.data.gpu_augment).

JPEGs are decoded with torchvision.io.decode_jpeg (libjpeg-turbo, the same pixels as PIL's decode,
~20% faster on this project's machine) while torchvision still has it; other formats, and JPEGs it
refuses (CMYK, broken headers), through PIL as the CPU path does.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

try:  # torchvision 0.29 deprecates its decoders (for TorchCodec) and will drop them: PIL then decodes all
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:
    decode_jpeg = None

from tla_jobs.data.params import TrainParams
from tla_jobs.errors import DataError


def read_bytes(path: str) -> bytes:
    """ImageFolder's loader on the batched path: the file's bytes (decoded in the transform)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None


def decode(data: bytes) -> torch.Tensor:
    """The image as an (H, W, 3) uint8 tensor."""
    if decode_jpeg is not None and data[:2] == b"\xff\xd8":
        try:
            with warnings.catch_warnings():  # its deprecation, once per call
                warnings.simplefilter("ignore", DeprecationWarning)
                chw = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
            return chw.permute(1, 2, 0)  # decode_jpeg's CHW is a view of an HWC buffer
        except RuntimeError:
            pass
    try:
        with Image.open(io.BytesIO(data)) as img:
            return torch.from_numpy(np.array(img.convert("RGB")))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"unreadable image: {exc}") from None


class CropTransform:
    """bytes → ((h, w, 3) uint8 crop, parameter row), the row drawn from the sample's seeded RNGs."""

    def __init__(self, params: TrainParams):
        self.params = params

    def __call__(self, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
        img = decode(data)
        row = self.params.draw(img.shape[1], img.shape[0])
        top, left, h, w = (int(v) for v in row[:4])
        return img[top:top + h, left:left + w].contiguous(), row


def collate_crops(batch):
    """[((crop, row), target)] → ((crops end to end, their (h, w, 3) shapes, rows), targets): one
    buffer, so that pinning and the copy to the device are one transfer per batch."""
    crops = [sample[0][0] for sample in batch]
    flat = torch.cat([c.reshape(-1) for c in crops])
    shapes = torch.tensor([tuple(c.shape) for c in crops], dtype=torch.long)
    rows = torch.stack([sample[0][1] for sample in batch])
    targets = torch.tensor([sample[1] for sample in batch], dtype=torch.long)
    return (flat, shapes, rows), targets
