"""Train and eval loaders: timm's transforms and samplers, made exactly resumable.

Workers produce uint8 tensors (timm's prefetcher-style transforms); normalisation and random
erasing run on the training device (tla_jobs.data.device). Workers persist across epochs. On the
batched path (--data-device cuda/batch) workers only decode and cut each sample's crop box
(tla_jobs.data.crops) and the resize, flip and RandAugment run batched on the device
(tla_jobs.data.gpu_augment), with parameters drawn by timm's objects under the same seeds
(tla_jobs.data.params).

Two things timm and torch lack, written here:
- `ResumableSampler` gives this rank's share of the run's one global order (tla_jobs.data.order),
  from any step of an epoch on, so a run resumed mid-epoch, on the same or another number of ranks,
  sees the same remaining samples in the same order as one never stopped.
- `SeededSamples` draws each sample's augmentation from a seed of (run seed, epoch, position in the
  epoch's global order) instead of from the loader workers' RNG, so augmentations depend neither on
  the rank nor on how many workers ran or when the loader was (re)started.
"""

from __future__ import annotations

import collections
import logging
import os
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment as _aa
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.datasets import ImageFolder

from tla_jobs.config import TrainConfig
from tla_jobs.data.crops import CropTransform, collate_crops, read_bytes
from tla_jobs.data.device import SAMPLE_LOG, DeviceTransform, LoaderBatches
from tla_jobs.data.gpu_augment import DeviceAugment
from tla_jobs.data.order import GlobalOrder
from tla_jobs.data.params import TrainParams
from tla_jobs.data.shards import PackedDataset, is_packed
from tla_jobs.errors import DataError, TlaError

log = logging.getLogger("tla.data")


def _posterize(img, bits_to_keep, **__):
    # timm's RandAugment asks for 0 bits at high magnitudes ('inc1'); Pillow >= 12.1 rejects
    # bits < 1. Keeping 0 bits used to give a black image, so give that.
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    from PIL import ImageOps

    return ImageOps.posterize(img, bits_to_keep)


for _name, _op in list(_aa.NAME_TO_OP.items()):
    if _op is _aa.posterize:
        _aa.NAME_TO_OP[_name] = _posterize


def build_transforms(cfg: TrainConfig, size: int):
    """DeiT's train transform (RandomResizedCrop, flip, RandAugment; random erasing follows on the
    device) and eval transform (resize to size/0.875, centre crop), both from timm, to uint8."""
    train = create_transform(
        size,
        is_training=True,
        scale=(cfg.crop_scale, 1.0),
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa,
        interpolation=cfg.interpolation,
        use_prefetcher=True,
    )
    evaluate = create_transform(size, is_training=False, interpolation=cfg.interpolation, crop_pct=0.875,
                                use_prefetcher=True)
    return train, evaluate


def batched_params(cfg: TrainConfig, size: int, device: torch.device) -> TrainParams | None:
    """The parameter sampler of the batched data path when --data-device picks it on ``device``, else None
    (the PIL transform in the workers). auto takes the batched path on CUDA when the recipe's
    transform has a device version, and says why not when it has none."""
    choice = cfg.data_device
    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return None
    if choice == "cuda" and device.type != "cuda":
        raise TlaError(f"--data-device cuda needs a CUDA device (training runs on {device.type}); "
                       "--data-device batch runs the same batched path on any device")
    try:
        return TrainParams(build_transforms(cfg, size)[0])
    except TlaError as exc:
        if choice != "auto":
            raise TlaError(f"{exc}: use --data-device cpu") from None
        log.info("augmenting in the loader workers: %s", exc)
        return None


def _loader(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"unreadable image {path}: {exc}") from None


class SeededSamples(Dataset):
    """Wraps a dataset; an item is (index, seed) and its transform runs under that seed."""

    def __init__(self, base: ImageFolder):
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, item: tuple[int, int]):
        index, seed = item
        random.seed(seed)
        np.random.seed(seed % 2**32)
        # The CPU generator only: torch.manual_seed also queues a lazy CUDA seeding that records a
        # formatted stack trace each call, which cost ~5 ms per sample, more than the transforms.
        torch.default_generator.manual_seed(seed)
        # The data check reads every image of a split up to 100,000 and a sample above; an unreadable
        # image it did not see is skipped (logged, and replaced by the next readable one, so the
        # batch and the run's exact resume stay as they are) instead of stopping the run at step N.
        for offset in range(len(self.base)):
            try:
                return self.base[(index + offset) % len(self.base)]
            except DataError as exc:
                log.warning("skipping %s", exc)
        raise DataError(f"no readable image in {self.base.root}")


class ResumableSampler(Sampler):
    """(index, seed) of this rank's samples of one epoch from a given step on, in the run's one global
    order (tla_jobs.data.order): the same samples, order and seeds on any number of ranks."""

    def __init__(self, order: GlobalOrder):
        self.order = order
        self.epoch, self.start = 0, 0
        # TLA_SAMPLE_LOG (tests): the indices handed to the loader, in order, for LoaderBatches to log
        # per micro-batch as its batches come out (a DataLoader returns batches in sampler order)
        self.record: collections.deque | None = collections.deque() if os.environ.get(SAMPLE_LOG) else None

    def set_global_batch(self, global_batch: int) -> None:
        """The run's global batch (from its checkpoint): the accumulation steps follow from it."""
        o = self.order
        self.order = GlobalOrder(o.num_samples, o.seed, o.repeated, o.batch_size, o.world_size, o.rank, global_batch)

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    @property
    def steps_per_epoch(self) -> int:
        return self.order.steps_per_epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for item in self.order.samples(self.epoch, self.start):
            if self.record is not None:
                self.record.append(item[0])
            yield item

    def __len__(self) -> int:
        o = self.order
        return max(o.steps_per_epoch - self.start, 0) * o.accumulation * o.batch_size


class _Shard(Sampler):
    """Every world_size-th sample from `rank`: an exact partition (DistributedSampler pads)."""

    def __init__(self, n: int, rank: int, world_size: int):
        self.indices = list(range(rank, n, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _folder(data: Path, split: str, transform, loader=_loader) -> ImageFolder | PackedDataset:
    """The split as torchvision's ImageFolder, or from the shards of a packed folder (`tla data pack`):
    the same samples under the same indices, so samplers, seeds and exact resume do not change.
    ``loader`` read_bytes (the batched data path): each sample's bytes, decoded in its transform."""
    if is_packed(data):
        return PackedDataset(data, split, transform, raw=loader is read_bytes)
    try:
        return ImageFolder(str(data / split), transform=transform, loader=loader)
    except FileNotFoundError:  # checked at start, gone since (a shared filesystem, a cleaned scratch)
        raise DataError(f"data folder {data / split} does not exist (any more)") from None


def train_loader(cfg: TrainConfig, data: Path, img_size: int, rank: int, world_size: int,
                 params: TrainParams | None = None, global_batch: int | None = None):
    """(dataset, ResumableSampler, DataLoader) of this rank's share of the training split: uint8 images
    augmented in the workers, or with ``params`` (the batched path) each sample's crop and parameters."""
    global_batch = global_batch or cfg.batch_size * world_size
    if params is None:
        ds = _folder(data, "train", build_transforms(cfg, img_size)[0])
    else:
        ds = _folder(data, "train", CropTransform(params), loader=read_bytes)
    if len(ds) < global_batch:
        raise DataError(f"{data / 'train'} has {len(ds)} images, fewer than one global batch ({global_batch})")
    sampler = ResumableSampler(GlobalOrder(len(ds), cfg.seed, cfg.repeated_aug, cfg.batch_size, world_size, rank,
                                           global_batch))
    loader = DataLoader(
        SeededSamples(ds),
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=torch.cuda.is_available(),
        drop_last=True,
        collate_fn=collate_crops if params is not None else None,
        # Workers live across epochs: the sampler (in this process) decides where an epoch starts.
        persistent_workers=cfg.workers > 0,
        prefetch_factor=4 if cfg.workers > 0 else None,
    )
    return ds, sampler, loader


def train_batches(cfg: TrainConfig, data: Path, img_size: int, rank: int, world_size: int,
                  transform: DeviceTransform, global_batch: int | None = None) -> tuple[int, LoaderBatches]:
    """(dataset size, batches on the device) of this rank's share of the training split."""
    params = batched_params(cfg, img_size, transform.device)
    ds, sampler, loader = train_loader(cfg, data, img_size, rank, world_size, params, global_batch)
    augment = DeviceAugment(params) if params is not None else None
    return len(ds), LoaderBatches(loader, sampler, transform, cfg.batch_size, cfg.seed, rank, augment)


def eval_loader(cfg: TrainConfig, data: Path, img_size: int, rank: int, world_size: int):
    """(dataset, DataLoader) of the val split: all of it, or this rank's shard with --dist-eval."""
    _, eval_tf = build_transforms(cfg, img_size)
    ds = _folder(data, "val", eval_tf)
    sampler = _Shard(len(ds), rank, world_size) if cfg.dist_eval and world_size > 1 else None
    loader = DataLoader(ds, batch_size=max(cfg.batch_size, 64), sampler=sampler, shuffle=False,
                        num_workers=cfg.workers, pin_memory=torch.cuda.is_available(),
                        persistent_workers=cfg.workers > 0)
    return ds, loader
