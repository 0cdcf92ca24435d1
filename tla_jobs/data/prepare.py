"""`tla data prepare`: small real datasets that ship with packages, written as an ImageFolder.

- fashion-mnist: Debian's `dataset-fashion-mnist` (IDX files under /usr/share/datasets, MIT licence),
  60,000 train / 10,000 val 28x28 greyscale images of 10 clothing classes;
- digits: scikit-learn's bundled 8x8 digits (1,797 images), every 5th image of a class held out.

Nothing is downloaded. The folder is built beside its destination and renamed into place when
complete, so a crash leaves no half-written dataset. Several ranks (or jobs) asking for the same
folder at once take turns on a lock file beside it (.NAME.prepare.lock): one prepares, the others
wait and find the finished folder.

A prepared folder carries a marker (.tla-dataset: which dataset, how many images), which is how
`--dataset digits` on a Fashion-MNIST folder (or the other way round) is told apart from a folder
that holds what was asked for (check_prepared).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from tla_jobs.errors import DataError

MARKER = ".tla-dataset"
FMNIST_DIR = Path(os.environ.get("TLA_FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
FMNIST_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                  "ankle-boot")
NAMES = ("fashion-mnist", "digits")
# The class folders each bundled dataset is written with (the second signal, beside the marker).
CLASSES = {"fashion-mnist": [f"{i}-{name}" for i, name in enumerate(FMNIST_CLASSES)],
           "digits": [str(i) for i in range(10)]}
MARKER_MAX_BYTES = 4096  # the marker is one short JSON line; a larger file is not one

Sample = tuple[str, int, np.ndarray]  # split, label, HxW uint8 image


def _idx(path: Path, labels: bool = False) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format) with torchvision's MNIST reader, which takes only
    an uncompressed file: the file is unpacked into a temporary one first."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    with tempfile.NamedTemporaryFile(suffix=".idx") as tmp:
        try:
            with gzip.open(path, "rb") as f:
                shutil.copyfileobj(f, tmp)
            tmp.flush()
            return (read_label_file if labels else read_image_file)(tmp.name).numpy()
        except (OSError, EOFError, AssertionError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            kind = "labels" if labels else "images"
            raise DataError(f"{path} is not an IDX file of {kind} ({exc.__class__.__name__}: {exc})") from None


def _limited(labels: np.ndarray, limit: int | None) -> np.ndarray:
    """Indices keeping at most `limit` images per class, in the original order."""
    if limit is None:
        return np.arange(len(labels))
    keep, seen = [], {}
    for i, y in enumerate(labels.tolist()):
        if seen.get(y, 0) < limit:
            seen[y] = seen.get(y, 0) + 1
            keep.append(i)
    return np.asarray(keep)


def _fashion_mnist(limit: int | None) -> tuple[list[str], int, Iterator[Sample]]:
    files = {k: FMNIST_DIR / f"{k}-idx{n}-ubyte.gz" for k, n in
             [("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1)]}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"Fashion-MNIST not found ({missing[0]}): apt-get install dataset-fashion-mnist, "
                        "or use `digits`")
    parts = []
    for split, stem in (("train", "train"), ("val", "t10k")):
        images, labels = _idx(files[f"{stem}-images"]), _idx(files[f"{stem}-labels"], labels=True)
        keep = _limited(labels, limit)
        parts.append((split, images[keep], labels[keep]))

    def samples():
        for split, images, labels in parts:
            for img, y in zip(images, labels.tolist()):
                yield split, y, img

    return CLASSES["fashion-mnist"], sum(len(p[2]) for p in parts), samples()


def _digits(limit: int | None) -> tuple[list[str], int, Iterator[Sample]]:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits dataset needs scikit-learn: pip install 'tla-jobs[data]'") from None
    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    labels = d.target
    split = np.empty(len(labels), dtype=object)
    for y in np.unique(labels):
        idx = np.flatnonzero(labels == y)
        split[idx] = ["val" if k % 5 == 4 else "train" for k in range(len(idx))]
    keep = np.concatenate([np.flatnonzero(split == "train")[_limited(labels[split == "train"], limit)],
                           np.flatnonzero(split == "val")[_limited(labels[split == "val"], limit)]])
    keep.sort()
    return CLASSES["digits"], len(keep), ((split[i], int(labels[i]), images[i]) for i in keep)


def marker_name(dest: Path) -> str | None:
    """The dataset a prepared folder's marker names; None without a marker. A marker that is not
    one (not a small JSON object with a name) is a DataError."""
    marker = dest / MARKER
    try:
        if not marker.is_file():
            return None
        with open(marker, "rb") as f:
            raw = f.read(MARKER_MAX_BYTES + 1)
        data = json.loads(raw.decode("utf-8")) if len(raw) <= MARKER_MAX_BYTES else None
    except (OSError, UnicodeDecodeError, ValueError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        raise DataError(f"{marker} is not a dataset marker `tla data prepare` wrote: remove the folder and "
                        "prepare it again")
    return data["name"]


def check_prepared(name: str, dest: str | os.PathLike) -> None:
    """``dest`` holds the bundled dataset ``name``: its marker names it and its class folders are
    that dataset's. `--dataset fashion-mnist` on a digits folder is one line, not a run that trains
    on the wrong data under the wrong name."""
    dest = Path(dest).expanduser()
    found = marker_name(dest)
    if found is None:
        try:
            own = dest.is_dir() and any(e for e in os.scandir(dest) if not e.name.startswith("."))
        except OSError:
            own = False
        if own:  # prepare() would refuse it only once the job runs
            raise DataError(f"--dataset {name}: {dest} is not a folder `tla data prepare {name}` made (no "
                            f"{MARKER}): use --dataset imagefolder for your own images, or a new --data-path")
        return
    if found != name:
        raise DataError(f"--dataset {name}, but {dest} holds {found} (its {MARKER} says so): use --dataset "
                        f"{found}, or another --data-path for {name}")
    try:
        classes = sorted(e.name for e in os.scandir(dest / "train") if e.is_dir() and not e.name.startswith("."))
    except OSError:
        return  # the folder check names what is missing
    if name in CLASSES and classes != sorted(CLASSES[name]):
        raise DataError(f"--dataset {name}: {dest / 'train'} does not hold {name}'s class folders "
                        f"({', '.join(classes[:4])}{', ...' if len(classes) > 4 else ''}): prepare it again "
                        "into a new folder, or use --dataset imagefolder")


def prepare(name: str, dest: str | os.PathLike, limit: int | None = None,
            progress: Callable[[int, int], None] | None = None) -> Path:
    """Write dataset `name` to DEST/{train,val}/CLASS/N.png and return DEST (kept if already prepared).

    One process at a time prepares a given DEST (an flock on .DEST.prepare.lock beside it, which
    also holds across the nodes of a shared filesystem with lockd): ranks that start together wait
    for the first, then find its finished folder."""
    from tla_jobs.fsutil import locked

    if name not in NAMES:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(NAMES)}")
    dest = Path(dest).expanduser().absolute()
    if (dest / MARKER).is_file():
        check_prepared(name, dest)
        return dest
    if dest.is_symlink() and not dest.exists():
        raise DataError(f"{dest} is a broken link or a link loop: remove it or point it at a folder")
    with locked(dest.parent / f".{dest.name}.prepare"):
        if (dest / MARKER).is_file():  # another process prepared it while this one waited
            check_prepared(name, dest)
            return dest
        _prepare(name, dest, limit, progress)
    return dest


def _prepare(name: str, dest: Path, limit: int | None, progress: Callable[[int, int], None] | None) -> None:
    from PIL import Image

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DataError(f"{dest} exists and is not a prepared dataset; choose an empty or new folder")
    classes, total, samples = _fashion_mnist(limit) if name == "fashion-mnist" else _digits(limit)
    tmp = dest.parent / f".{dest.name}.preparing-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    counts = {"train": 0, "val": 0}
    try:
        for split in counts:
            for c in classes:
                (tmp / split / c).mkdir(parents=True)
        for n, (split, y, img) in enumerate(samples):
            Image.fromarray(img).save(tmp / split / classes[y] / f"{n:05d}.png")
            counts[split] += 1
            if progress and (n % 500 == 0 or n + 1 == total):
                progress(n + 1, total)
        (tmp / MARKER).write_text(json.dumps({"name": name, "limit": limit, **counts}) + "\n")
        os.rename(tmp, dest)  # atomic; replaces an empty folder at dest (checked above)
    except OSError as exc:
        raise DataError(f"cannot prepare {name} in {dest}: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
