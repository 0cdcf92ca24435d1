"""Batches on the training device: uint8 images travel, normalisation and random erasing run there.

Loader workers decode and augment to uint8 (a quarter of float32's bytes over PCIe and through
pinned memory); the device turns them into normalised floats and applies DeiT's random erasing
(pixel mode, one box, probability ``reprob``), as timm's ``PrefetchLoader`` does.

Written here rather than taken from timm because timm's prefetcher erases with the device's global
RNG one batch ahead of the step, which a run resumed mid-epoch cannot replay. Here each batch's
boxes and noise come from generators seeded with (run seed, epoch, step, rank), so a resumed run
erases exactly the same pixels, and the boxes of a whole batch are drawn at once (no per-sample
Python loop on the host).

``SyntheticBatches`` is the same interface without files: random uint8 images and labels made on
the device (a cluster smoke test of throughput that no loader can slow down).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import torch

ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing's defaults, which DeiT uses
ERASE_LOG_RATIO = (math.log(0.3), math.log(1 / 0.3))
ERASE_ATTEMPTS = 10


def batch_seed(seed: int, epoch: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_033 + step) * 10_007 + rank


class DeviceTransform:
    """uint8 (B, C, H, W) on any device → normalised float on ``device``, randomly erased in training."""

    def __init__(self, device: torch.device, mean, std, reprob: float = 0.0):
        self.device, self.reprob = device, reprob
        self.mean = torch.tensor([x * 255 for x in mean], device=device).view(1, -1, 1, 1)
        self.std = torch.tensor([x * 255 for x in std], device=device).view(1, -1, 1, 1)
        self.noise_gen = torch.Generator(device=device)

    def __call__(self, images: torch.Tensor, seed: int | None = None) -> torch.Tensor:
        x = images.to(self.device, non_blocking=True).float().sub_(self.mean).div_(self.std)
        if seed is not None and self.reprob > 0:
            x = self._erase(x, seed)
        return x

    def _erase(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        b, c, h, w = x.shape
        gen = torch.Generator().manual_seed(seed)
        # Box parameters for the whole batch on the host (a few hundred numbers), as timm draws them:
        # area share and log aspect ratio, the first of ten attempts that fits, then its position.
        erase = torch.rand(b, generator=gen) < self.reprob
        area = torch.empty(b, ERASE_ATTEMPTS).uniform_(*ERASE_AREA, generator=gen) * (h * w)
        ratio = torch.empty(b, ERASE_ATTEMPTS).uniform_(*ERASE_LOG_RATIO, generator=gen).exp()
        bh, bw = (area * ratio).sqrt().round().long(), (area / ratio).sqrt().round().long()
        fits = (bh < h) & (bw < w)
        first = fits.float().argmax(dim=1, keepdim=True)
        erase &= fits.any(dim=1)
        bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
        top = (torch.rand(b, generator=gen) * (h - bh + 1)).long()
        left = (torch.rand(b, generator=gen) * (w - bw + 1)).long()
        top, bh = torch.where(erase, top, 0), torch.where(erase, bh, 0)  # bh = 0: nothing erased
        box = torch.stack([top, top + bh, left, left + bw], dim=1)
        if self.device.type == "cuda":  # a copy from pageable memory could wait for the GPU's queue
            box = box.pin_memory()
        box = box.to(self.device, non_blocking=True)
        ys = torch.arange(h, device=self.device).view(1, h, 1)
        xs = torch.arange(w, device=self.device).view(1, 1, w)
        inside = ((ys >= box[:, 0, None, None]) & (ys < box[:, 1, None, None])
                  & (xs >= box[:, 2, None, None]) & (xs < box[:, 3, None, None]))
        self.noise_gen.manual_seed(seed)
        noise = torch.randn(x.shape, generator=self.noise_gen, device=self.device, dtype=x.dtype)
        return torch.where(inside.unsqueeze(1), noise, x)


SAMPLE_LOG = "TLA_SAMPLE_LOG"


def log_samples(rank: int, epoch: int, step: int, k: int, indices: list[int]) -> None:
    """With TLA_SAMPLE_LOG=PREFIX (tests of the global order): one JSON line per micro-batch handed to
    the step, in PREFIX.rankR.jsonl."""
    import json
    import os

    with open(f"{os.environ[SAMPLE_LOG]}.rank{rank}.jsonl", "a") as f:
        f.write(json.dumps({"epoch": epoch, "step": step, "k": k, "indices": indices}) + "\n")


class LoaderBatches:
    """A DataLoader of uint8 batches (persistent workers) and its resumable sampler, on the device.
    Each step is a list of micro-batches (images, targets, seed): A of them when this rank
    accumulates A per optimizer step (tla_jobs.data.order); the seed is of (run seed, epoch, step,
    the micro-batch's index k in the global batch), never of the rank."""

    def __init__(self, loader, sampler, transform: DeviceTransform, batch_size: int, seed: int, rank: int,
                 augment=None):
        self.loader, self.sampler, self.transform, self.augment = loader, sampler, transform, augment
        self.batch_size, self.seed, self.rank = batch_size, seed, rank
        # Seconds the host waited for the loader's next batch (read and reset by the training loop):
        # host time only, so measuring it adds no host-device synchronisation.
        self.waited = 0.0

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def set_global_batch(self, global_batch: int) -> None:
        self.sampler.set_global_batch(global_batch)

    def epoch(self, epoch: int, start_step: int) -> Iterator[list[tuple[torch.Tensor, torch.Tensor, int]]]:
        if start_step >= self.steps_per_epoch:
            return
        self.sampler.set_epoch(epoch, start_step)
        order = self.sampler.order
        record = getattr(self.sampler, "record", None)
        if record is not None:
            record.clear()  # what an earlier, unfinished epoch's iterator took ahead
        batches = iter(self.loader)
        for step in range(start_step, self.steps_per_epoch):
            micro = []
            for a in range(order.accumulation):
                t0 = time.perf_counter()
                try:
                    images, targets = next(batches)
                finally:
                    self.waited += time.perf_counter() - t0
                seed = batch_seed(self.seed, epoch, step, order.micro_index(a))
                if record is not None:
                    log_samples(self.rank, epoch, step, order.micro_index(a),
                                [record.popleft() for _ in range(len(targets))])
                if self.augment is not None:  # the batched path: crops + parameter rows → augmented uint8
                    images = self.augment(*images, device=self.transform.device)
                micro.append((self.transform(images, seed), targets.to(self.transform.device, non_blocking=True),
                              seed))
            yield micro


class EvalBatches:
    """A DataLoader of uint8 eval batches, normalised on the device; iterable once per evaluation."""

    def __init__(self, loader, transform: DeviceTransform):
        self.loader, self.transform = loader, transform

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, targets in self.loader:
            yield self.transform(images), targets.to(self.transform.device, non_blocking=True)


class SyntheticBatches:
    """Random uint8 images and labels, generated on the device per (seed, epoch, step, rank)."""

    def __init__(self, transform: DeviceTransform, batch_size: int, img_size: int, num_classes: int,
                 steps_per_epoch: int, seed: int, rank: int, train: bool = True):
        self.transform, self.batch_size, self.img_size = transform, batch_size, img_size
        self.num_classes, self.steps_per_epoch, self.seed, self.rank = num_classes, steps_per_epoch, seed, rank
        self.train = train
        self.accumulation = 1  # micro-batches per step (a run whose global batch needs more than this rank's batch)
        self.gen = torch.Generator(device=transform.device)
        self.waited = 0.0  # made on the device: never waits for a loader

    def epoch(self, epoch: int, start_step: int = 0):
        """Training: each step a list of one micro-batch (images, targets, seed); evaluation
        (``train=False``, iterated): (images, targets) batches."""
        for step in range(start_step, self.steps_per_epoch):
            if self.train:
                yield [self._batch(epoch, step * self.accumulation + a) for a in range(self.accumulation)]
            else:
                yield self._batch(-1, step)[:2]

    def _batch(self, epoch: int, step: int):
        dev, b, s = self.transform.device, self.batch_size, self.img_size
        seed = batch_seed(self.seed, epoch, step, self.rank)
        self.gen.manual_seed(seed)
        images = torch.randint(0, 256, (b, 3, s, s), generator=self.gen, device=dev, dtype=torch.uint8)
        targets = torch.randint(0, self.num_classes, (b,), generator=self.gen, device=dev)
        return self.transform(images, seed if self.train else None), targets, seed

    def __iter__(self):
        return self.epoch(0)
