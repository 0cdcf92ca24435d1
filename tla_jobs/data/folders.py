"""Checks of the ImageFolder layout (DATA/train/CLASS/*, DATA/val/CLASS/*) before any process group.

A bad data folder found by a rank after `init_process_group` leaves the other ranks waiting in a
collective until the job's time limit; found here, it is one line on stderr. This module imports
neither torch nor torchvision, so `tla submit`'s preflight stays fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tla_jobs.errors import DataError

# torchvision.datasets.folder.IMG_EXTENSIONS (kept here so the check needs no torchvision import)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Every image's header is opened when a split has at most this many images (Fashion-MNIST: 60k,
# about a second); larger sets (ImageNet) get an evenly spaced sample so the check stays seconds.
VERIFY_ALL_UP_TO = 100_000
VERIFY_SAMPLE = 5_000


@dataclass
class Split:
    root: Path
    classes: list[str]
    counts: dict[str, int]
    files: list[Path]

    @property
    def size(self) -> int:
        return sum(self.counts.values())


def _scan(root: Path, name: str) -> Split:
    if not root.is_dir():
        raise DataError(f"data folder {root} does not exist (expected DATA/{name}/CLASS/*.jpg)")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders (expected {root}/CLASS/*.jpg)")
    counts, files = {}, []
    for c in classes:
        imgs = [Path(e.path) for e in os.scandir(root / c) if e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS)]
        if not imgs:
            raise DataError(f"class folder {root / c} has no images ({', '.join(IMG_EXTENSIONS)})")
        counts[c] = len(imgs)
        files += imgs
    return Split(root, classes, counts, files)


def _verify(split: Split) -> None:
    from PIL import Image, UnidentifiedImageError

    files = sorted(split.files)
    if len(files) > VERIFY_ALL_UP_TO:
        files = files[:: len(files) // VERIFY_SAMPLE]
    for f in files:
        try:
            with Image.open(f) as im:  # reads the header only
                im.size  # noqa: B018
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise DataError(f"unreadable image {f}: {type(exc).__name__}") from None


def check_image_folder(data: str | os.PathLike, verify_images: bool = True) -> tuple[Split, Split]:
    """Both splits, with the same classes; raises DataError with one line for anything else."""
    data = Path(data).expanduser()
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist")
    train, val = _scan(data / "train", "train"), _scan(data / "val", "val")
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"train and val classes differ in {data}: only in train {only_t[:5]}, only in val {only_v[:5]}")
    if verify_images:
        _verify(train)
        _verify(val)
    return train, val
