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

# What the data check verifies, per split: every image when the split has at most VERIFY_ALL_UP_TO
# (Fashion-MNIST's 60k in a few seconds), else an evenly spaced sample of VERIFY_SAMPLE (ImageNet's
# 1.28M: seconds, not the hour a full pass takes). For each image checked: PIL recognises the
# header, the size is at least 1x1 and at most PIL's MAX_IMAGE_PIXELS (a "decompression bomb"
# claiming 30000x30000 pixels is refused, not decoded), and the file is whole: a PNG ends with
# its IEND chunk and a JPEG with its end-of-image marker (two small reads), anything else, or a
# file whose ending looks wrong, is decoded in full. A file cut short is named here, before any
# process group or job step, instead of stopping training at step N.
VERIFY_ALL_UP_TO = 100_000
VERIFY_SAMPLE = 5_000
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
JPEG_END = b"\xff\xd9"


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
    try:
        return _scan_classes(root)
    except OSError as e:  # moved or removed while it was read (seen: a job starting as its data was deleted)
        what = "does not exist" if isinstance(e, FileNotFoundError) else f"cannot be read ({e.strerror})"
        raise DataError(f"{e.filename or root} {what}: the data folder changed while it was read") from None


def _scan_classes(root: Path) -> Split:
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class folders (expected {root}/CLASS/*.jpg)")
    counts, files = {}, []
    for c in classes:
        imgs = []
        for e in os.scandir(root / c):
            if not e.name.lower().endswith(IMG_EXTENSIONS):
                continue
            if not e.is_file():
                if e.is_symlink():  # the loader would list it and fail on it mid-epoch
                    raise DataError(f"{e.path} is a broken link: remove it or restore its target")
                continue
            imgs.append(Path(e.path))
        if not imgs:
            raise DataError(f"class folder {root / c} has no images ({', '.join(IMG_EXTENSIONS)})")
        counts[c] = len(imgs)
        files += imgs
    return Split(root, classes, counts, files)


def _whole(fd: int, fmt: str | None) -> bool:
    """Does the file end the way a complete file of its format does (read without moving PIL's position)?"""
    size = os.fstat(fd).st_size
    if fmt == "PNG":
        return size >= 12 and os.pread(fd, 12, size - 12) == PNG_END
    if fmt == "JPEG":
        tail = os.pread(fd, 64, max(0, size - 64)).rstrip(b"\x00\r\n ")  # some writers pad after EOI
        return tail.endswith(JPEG_END)
    return False


def verify_image(path: Path) -> None:
    """Raise DataError (one line naming the file and what to do) unless ``path`` is a whole image."""
    import warnings

    from PIL import Image

    try:
        with open(path, "rb") as fh, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DecompressionBombWarning: judged below, by the size
            with Image.open(fh) as im:  # reads the header only
                w, h = im.size
                if w < 1 or h < 1:
                    raise DataError(f"image {path} is {w}x{h} pixels: remove or replace it")
                if Image.MAX_IMAGE_PIXELS and w * h > Image.MAX_IMAGE_PIXELS:
                    raise DataError(f"image {path} claims {w}x{h} pixels, over PIL's limit of "
                                    f"{Image.MAX_IMAGE_PIXELS} (a decompression bomb?): remove or shrink it")
                if not _whole(fh.fileno(), im.format):
                    im.load()  # decode it all: a file cut short fails here
    except DataError:
        raise
    except Exception as exc:  # OSError, SyntaxError, DecompressionBombError, struct.error, ...: all "unreadable"
        what = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise DataError(f"unreadable image {path} ({what}): remove or replace it") from None


def _verify(split: Split) -> None:
    files = sorted(split.files)
    if len(files) > VERIFY_ALL_UP_TO:
        files = files[:: len(files) // VERIFY_SAMPLE]
    for f in files:
        verify_image(f)


def check_image_folder(data: str | os.PathLike, verify_images: bool = True) -> tuple[Split, Split]:
    """Both splits, with the same classes; raises DataError with one line for anything else.
    A packed folder (`tla data pack`, detected by its manifest) gets the same checks from its index."""
    data = Path(data).expanduser()
    if not data.is_dir():
        raise DataError(f"data folder {data} does not exist")
    from tla_jobs.data.shards import check_packed, is_packed

    if is_packed(data):
        return check_packed(data, verify_images)
    train, val = _scan(data / "train", "train"), _scan(data / "val", "val")
    if train.classes != val.classes:
        only_t = sorted(set(train.classes) - set(val.classes))
        only_v = sorted(set(val.classes) - set(train.classes))
        raise DataError(f"train and val classes differ in {data}: only in train {only_t[:5]}, only in val {only_v[:5]}")
    if len(train.classes) < 2:
        raise DataError(f"{data / 'train'} has one class folder ({train.classes[0]}): a classifier needs at least "
                        "two (DATA/train/CLASS/*.jpg, one folder per class)")
    if verify_images:
        _verify(train)
        _verify(val)
    return train, val
