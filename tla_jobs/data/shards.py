"""Packed shards: an ImageFolder as a few large tar files, read map-style through an index.

On a shared filesystem (Lustre, GPFS, NFS) an ImageFolder costs an open and a stat per image per epoch
on every rank: the metadata storm cluster administrators ask users to stop. `tla data pack SRC DST`
writes each split as tar shards of about ``--shard-size`` bytes in webdataset's layout, so that
webdataset, wids and timm's ``wds/`` reader read them as they are:

    DST/train-000000.tar      KEY.jpg (the file's bytes as stored; .png, ... likewise) + KEY.cls (label)
    DST/train-000000.idx.json that shard's index: every sample's key, label, data offset and length
    DST/val-000000.tar ...
    DST/classes.json          the class names, in label order (ImageFolder's: sorted folder names)
    DST/train.wids.json       the shard list as wids (webdataset's indexed reader) expects it
    DST/index.json            the manifest, written last: a folder without it is not (yet) packed

The training split is written in a fixed shuffled order (so a streaming reader such as webdataset's
does not see one class per shard), val in ImageFolder's order; the index numbers every sample as
ImageFolder numbers it (``order``), so a packed folder and the ImageFolder it came from are the same
dataset sample by sample: same indices, same labels, same bytes.

Why tarfile and not webdataset's ShardWriter: the index needs each member's data offset (ShardWriter
does not report it), packing must resume after a kill and rename only finished shards into place
(ShardWriter writes in place), and the trainer then needs no webdataset at run time: reading a sample
is one ``os.pread`` at the offset the index gives. webdataset is used only by the test that proves the
shards are standard.

Each shard is written to a temporary file, fsynced and renamed; its index (with the shard's sha256) is
written after it, the same way. A shard counts as finished only when its index is there, lists the
planned samples and its sha256 matches: a packing resumed after a kill keeps those and writes the rest.

This module imports neither torch nor torchvision (the data checks of `tla submit` use it).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import random
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tla_jobs.errors import ChecksFailed, DataError
from tla_jobs.fsutil import _fsync_dir, atomic_write_json

FORMAT = "tla-shards/1"
MANIFEST = "index.json"
CLASSES = "classes.json"
PLAN = ".pack.json"  # what a packing in progress was asked (a resumed one must ask the same)
SPLITS = ("train", "val")
DEFAULT_SHARD_SIZE = 1 << 30
SHUFFLE_SEED = 0
BLOCK = tarfile.BLOCKSIZE
# torchvision.datasets.folder.IMG_EXTENSIONS (as tla_jobs.data.folders keeps them)
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
HASH_CHUNK = 8 << 20


def is_packed(path: str | os.PathLike) -> bool:
    """Is ``path`` a packed folder (its manifest says so)? Detection for --data-path."""
    return (Path(path) / MANIFEST).is_file()


# ------------------------------------------------------------------ the source: ImageFolder's samples


@dataclass
class Source:
    """One split of an ImageFolder, in ImageFolder's order (its sample i is torchvision's sample i)."""

    classes: list[str]
    files: list[Path]
    labels: list[int]
    keys: list[str]
    sizes: list[int]
    counts: dict[str, int] = field(default_factory=dict)


def _key(rel: str) -> str:
    """webdataset's key of a file (its path in the split, without extension). webdataset splits a
    member's name at the first dot of its base name, so dots inside become underscores."""
    stem = rel.rsplit(".", 1)[0]
    return stem.replace(".", "_")


def _ext(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    return "jpg" if ext == "jpeg" else ext  # webdataset's decoders know .jpg; the bytes are kept as stored


def scan_source(root: Path, classes: list[str]) -> Source:
    """The images of ``root`` (one split) exactly as torchvision's ImageFolder lists them: classes
    sorted, each walked with sorted folders and sorted file names, extensions case-insensitive."""
    src = Source(classes, [], [], [], [])
    seen: dict[str, Path] = {}
    for label, c in enumerate(classes):
        n = 0
        for dirpath, _, fnames in sorted(os.walk(root / c, followlinks=True)):
            for fname in sorted(fnames):
                if not fname.lower().endswith(IMG_EXTENSIONS):
                    continue
                path = Path(dirpath) / fname
                key = _key(path.relative_to(root).as_posix())
                if key in seen:
                    raise DataError(f"duplicate key {key!r}: {seen[key]} and {path} would be the same sample in "
                                    "a shard (webdataset keys drop the extension and turn dots into _): rename one")
                seen[key] = path
                try:
                    size = path.stat().st_size
                except OSError as exc:
                    raise DataError(f"unreadable image {path} ({exc.strerror}): remove or replace it") from None
                src.files.append(path)
                src.labels.append(label)
                src.keys.append(key)
                src.sizes.append(size)
                n += 1
        if n == 0:
            raise DataError(f"class folder {root / c} has no images ({', '.join(IMG_EXTENSIONS)})")
        src.counts[c] = n
    return src


# ------------------------------------------------------------------ planning and writing shards


def _member_bytes(name: str, size: int) -> int:
    """What one member takes in a tar: its header (a PAX header more for long names), data, padding."""
    header = BLOCK if len(name.encode()) <= 100 else 3 * BLOCK
    return header + -(-size // BLOCK) * BLOCK


def plan_shards(src: Source, split: str, shard_size: int) -> list[list[int]]:
    """The samples of each shard (positions in ImageFolder order): train in a fixed shuffled order,
    val in order, cut where a shard would pass ``shard_size``. A function of the source alone, so
    that a resumed packing plans the same shards."""
    order = list(range(len(src.files)))
    if split == "train":
        random.Random(SHUFFLE_SEED).shuffle(order)
    # the end of a tar: two zero blocks, then padding to tarfile's record size
    budget = max(shard_size - 2 * BLOCK - tarfile.RECORDSIZE, BLOCK)
    shards, cur, cur_bytes = [], [], 0
    for i in order:
        ext = _ext(src.files[i])
        n = _member_bytes(f"{src.keys[i]}.{ext}", src.sizes[i]) + _member_bytes(f"{src.keys[i]}.cls", 8)
        if cur and cur_bytes + n > budget:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += n
    if cur:
        shards.append(cur)
    return shards


class _HashingFile(io.RawIOBase):
    """A write-only file that hashes what passes through (the shard's sha256 without reading it back)."""

    def __init__(self, f):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _read_image(path: Path) -> bytes:
    """The file's bytes, after the same check as the data check (header, size, a whole file)."""
    from tla_jobs.data.folders import verify_image

    verify_image(path)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise DataError(f"unreadable image {path} ({exc.strerror}): remove or replace it") from None


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0  # mtime 0: the same images give the same shard
    return info


def write_shard(dst: Path, name: str, src: Source, members: list[int], on_sample: Callable[[], None]) -> dict:
    """Write one shard atomically (temporary file, fsync, rename) and then its index; returns the index."""
    tmp = dst / f".{name}.tmp-{os.getpid()}"
    index = {"shard": name, "keys": [], "labels": [], "exts": [], "offsets": [], "sizes": [], "order": []}
    try:
        with open(tmp, "wb") as raw:
            out = _HashingFile(raw)
            with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for i in members:
                    data = _read_image(src.files[i])
                    key, ext = src.keys[i], _ext(src.files[i])
                    tar.addfile(_tarinfo(f"{key}.{ext}", len(data)), io.BytesIO(data))
                    # addfile wrote header, data and padding: the data starts that far before the end
                    index["offsets"].append(tar.offset - -(-len(data) // BLOCK) * BLOCK)
                    cls = str(src.labels[i]).encode()
                    tar.addfile(_tarinfo(f"{key}.cls", len(cls)), io.BytesIO(cls))
                    index["keys"].append(key)
                    index["labels"].append(src.labels[i])
                    index["exts"].append(ext)
                    index["sizes"].append(len(data))
                    index["order"].append(i)
                    on_sample()
            raw.flush()
            os.fsync(raw.fileno())
        index["sha256"], index["bytes"] = out.sha.hexdigest(), out.pos
        os.replace(tmp, dst / name)
        try:
            atomic_write_json(dst / _index_name(name), index)
        except BaseException:  # a shard without its index is not finished: do not leave it looking whole
            (dst / name).unlink(missing_ok=True)
            raise
        _fsync_dir(dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return index


def _index_name(shard: str) -> str:
    return shard.removesuffix(".tar") + ".idx.json"


def _finished(dst: Path, name: str, src: Source, members: list[int]) -> dict | None:
    """The shard's index when the shard is finished: index present, same samples, sha256 matching."""
    try:
        index = json.loads((dst / _index_name(name)).read_text())
        if index.get("order") != members or index.get("keys") != [src.keys[i] for i in members]:
            return None
        if (dst / name).stat().st_size != index["bytes"] or file_sha256(dst / name) != index["sha256"]:
            return None
        return index
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


@dataclass
class PackReport:
    dst: Path
    splits: dict[str, dict]  # split -> {"shards", "samples", "bytes", "kept", "counts"}


def pack(src: str | os.PathLike, dst: str | os.PathLike, shard_size: int = DEFAULT_SHARD_SIZE,
         progress: Callable[[str, int, int], None] | None = None) -> PackReport:
    """Pack the ImageFolder ``src`` (train/, val/) into shards in ``dst``; resumable, atomic, verified.
    ``progress(what, done, total)`` is called as samples are written and shards verified."""
    from tla_jobs.data.folders import check_image_folder

    src, dst = Path(src).expanduser().absolute(), Path(dst).expanduser().absolute()
    if shard_size < 1 << 16:
        raise DataError(f"--shard-size {shard_size} is too small (at least 64 KiB)")
    if dst == src or src in dst.parents:
        raise DataError(f"{dst} is inside the source folder {src}: choose a folder outside it")
    train, _ = check_image_folder(src, verify_images=False)  # layout, class folders, the same classes
    classes = train.classes
    plan = {"format": FORMAT, "source": str(src), "shard_size": shard_size, "classes": classes}
    if dst.exists() and not dst.is_dir():
        raise DataError(f"{dst} exists and is not a folder")
    if dst.is_dir() and any(dst.iterdir()) and not (dst / PLAN).is_file() and not is_packed(dst):
        raise DataError(f"{dst} exists and is not a packed dataset; choose an empty or new folder")
    try:
        return _pack(src, dst, shard_size, classes, plan, progress or (lambda *_: None))
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DataError(f"no space left on the device of {dst} ({exc.strerror}): free some and run the same "
                            "command again (finished shards are kept)") from None
        raise DataError(f"cannot write shards in {dst}: {exc.strerror or exc}") from None


def _pack(src: Path, dst: Path, shard_size: int, classes: list[str], plan: dict, progress) -> PackReport:
    dst.mkdir(parents=True, exist_ok=True)
    old = _read_json(dst / PLAN) or _read_json(dst / MANIFEST) or {}
    if old and (old.get("source"), old.get("shard_size")) != (plan["source"], plan["shard_size"]):
        raise DataError(f"{dst} holds a packing of {old.get('source')} with --shard-size {old.get('shard_size')}: "
                        "use the same source and size to resume, or a new folder")
    (dst / MANIFEST).unlink(missing_ok=True)  # not packed until the new manifest is written
    atomic_write_json(dst / PLAN, plan)
    for tmp in dst.glob(".*.tmp-*"):  # what a killed packing left half-written
        tmp.unlink(missing_ok=True)
    sources = {split: scan_source(src / split, classes) for split in SPLITS}
    plans = {split: plan_shards(sources[split], split, shard_size) for split in SPLITS}
    total = sum(len(s.files) for s in sources.values())
    done, report = 0, PackReport(dst, {})
    kept: set[str] = set()  # shards kept from before: their sha256 was read back from the disk just now
    progress("packing", 0, total)
    for split in SPLITS:
        s = sources[split]
        names, nbytes = [], 0
        for n, members in enumerate(plans[split]):
            name = f"{split}-{n:06d}.tar"
            names.append(name)
            index = _finished(dst, name, s, members)
            if index is not None:
                kept.add(name)
                done += len(members)
                progress("packing", done, total)
            else:
                def step():
                    nonlocal done
                    done += 1
                    if done % 64 == 0 or done == total:
                        progress("packing", done, total)

                index = write_shard(dst, name, s, members, step)
            nbytes += index["bytes"]
        for stale in dst.glob(f"{split}-*"):  # shards of an earlier plan beyond this one
            if stale.name.split(".")[0] not in {x.removesuffix(".tar") for x in names}:
                stale.unlink()
        report.splits[split] = {"shards": names, "samples": len(s.files), "bytes": nbytes,
                                "kept": len(kept.intersection(names)),
                                "counts": s.counts}
    atomic_write_json(dst / CLASSES, classes)
    shard_meta = verify(dst, {split: report.splits[split]["shards"] for split in SPLITS}, sources, progress,
                        read_back=kept)
    for split in SPLITS:
        atomic_write_json(dst / f"{split}.wids.json", {
            "__kind__": "wids-shard-index-v1", "name": split,
            "shardlist": [{"url": m["name"], "nsamples": m["samples"]} for m in shard_meta[split]]})
    manifest = {**plan, "splits": {split: {"samples": report.splits[split]["samples"],
                                           "counts": report.splits[split]["counts"],
                                           "shards": shard_meta[split]} for split in SPLITS}}
    atomic_write_json(dst / MANIFEST, manifest)
    (dst / PLAN).unlink(missing_ok=True)
    _fsync_dir(dst)
    return report


def verify(dst: Path, shards: dict[str, list[str]], sources: dict[str, Source], progress,
           read_back: set[str] = frozenset()) -> dict[str, list[dict]]:
    """Read every shard back (but those in ``read_back``, hashed from the disk already): its sha256
    against its index, and the samples per class against the source's. Raises ChecksFailed naming
    the first difference."""
    total = sum(len(v) for v in shards.values())
    done, meta = 0, {}
    progress("verifying", 0, total)
    for split, names in shards.items():
        counts = np.zeros(len(sources[split].classes), dtype=np.int64)
        meta[split] = []
        for name in names:
            index = json.loads((dst / _index_name(name)).read_text())
            digest = index["sha256"] if name in read_back else file_sha256(dst / name)
            if digest != index["sha256"]:
                raise ChecksFailed(f"shard {dst / name} does not match its index (sha256 {digest[:12]}… != "
                                   f"{index['sha256'][:12]}…): delete it and pack again")
            counts += np.bincount(index["labels"], minlength=len(counts))
            meta[split].append({"name": name, "sha256": digest, "bytes": index["bytes"],
                                "samples": len(index["keys"])})
            done += 1
            progress("verifying", done, total)
        want = [sources[split].counts[c] for c in sources[split].classes]
        for c, got, exp in zip(sources[split].classes, counts.tolist(), want):
            if got != exp:
                raise ChecksFailed(f"{split} class {c}: {got} samples in the shards, {exp} images in the source")
    return meta


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ reading: checks, the index, samples


@dataclass
class PackedSplit:
    """One split's index, in ImageFolder order: shard number, data offset and length of each sample.
    numpy arrays, not lists: loader workers share them copy-on-write without touching their pages
    (Python lists' reference counts would copy them into every worker)."""

    root: Path
    split: str
    classes: list[str]
    shards: list[dict]  # the manifest's entries: name, sha256, bytes, samples
    shard: np.ndarray
    offsets: np.ndarray
    sizes: np.ndarray
    labels: np.ndarray
    keys: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)


def read_manifest(path: str | os.PathLike) -> dict:
    path = Path(path).expanduser()
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path / MANIFEST} is not a tla shard manifest ({FORMAT}): pack the data again with "
                        "`tla data pack`")
    return manifest


def load_split(path: str | os.PathLike, split: str, with_keys: bool = False) -> PackedSplit:
    """The split's index (from the shards' .idx.json files), checked against the manifest."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    shards = manifest["splits"][split]["shards"]
    n = manifest["splits"][split]["samples"]
    shard, offsets, sizes = np.zeros(n, np.int32), np.zeros(n, np.int64), np.zeros(n, np.int64)
    labels = np.zeros(n, np.int64)
    keys = [""] * n if with_keys else None
    for s, meta in enumerate(shards):
        index = _read_json(path / _index_name(meta["name"]))
        if not isinstance(index, dict) or index.get("sha256") != meta["sha256"]:
            raise DataError(f"{path / _index_name(meta['name'])} is missing or does not match {path / MANIFEST}: "
                            "pack the data again")
        order = np.asarray(index["order"], dtype=np.int64)
        shard[order], offsets[order] = s, index["offsets"]
        sizes[order], labels[order] = index["sizes"], index["labels"]
        if keys is not None:
            for i, k in zip(index["order"], index["keys"]):
                keys[i] = k
    return PackedSplit(path, split, manifest["classes"], shards, shard, offsets, sizes, labels, keys)


@dataclass
class SplitSummary:
    """What the data check reports of a split (tla_jobs.data.folders.Split without the file list)."""

    root: Path
    classes: list[str]
    counts: dict[str, int]
    files: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return sum(self.counts.values())


VERIFY_SAMPLE = 200  # images decoded per split by the data check (they were all verified when packed)


def check_packed(path: str | os.PathLike, verify_images: bool = True) -> tuple[SplitSummary, SplitSummary]:
    """The data check of a packed folder: the manifest, every shard there with its recorded size, each
    index matching, at least two classes, and a spaced sample of images decoded. One DataError line
    for anything else. The shards' sha256 is not recomputed here (a full read; `tla data pack` and
    --stage-data do it)."""
    path = Path(path).expanduser()
    manifest = read_manifest(path)
    classes = manifest.get("classes") or []
    if len(classes) < 2:
        raise DataError(f"{path} has {len(classes)} class(es): a classifier needs at least two")
    out = []
    for split in SPLITS:
        if split not in manifest.get("splits", {}):
            raise DataError(f"{path / MANIFEST} has no {split} split: pack the data again")
        for meta in manifest["splits"][split]["shards"]:
            try:
                size = (path / meta["name"]).stat().st_size
            except OSError as exc:
                raise DataError(f"shard {path / meta['name']} cannot be read ({exc.strerror})") from None
            if size != meta["bytes"]:
                raise DataError(f"shard {path / meta['name']} has {size} bytes, {meta['bytes']} when packed: "
                                "copy it again or pack again")
        idx = load_split(path, split)
        if verify_images and len(idx):
            reader = ShardReader(idx)
            for i in range(0, len(idx), max(1, len(idx) // VERIFY_SAMPLE)):
                reader.image(i)
            reader.close()
        out.append(SplitSummary(path / split, classes, manifest["splits"][split]["counts"]))
    return out[0], out[1]


class ShardReader:
    """Samples of one split by index: one ``os.pread`` at the index's offset. One open file per shard
    per process, opened on first use; a forked loader worker opens its own (the descriptors of the
    parent are dropped when the process id changes or the reader is pickled), so no file offset or
    descriptor is ever shared between processes."""

    def __init__(self, split: PackedSplit):
        self.split = split
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self):
        return {"split": self.split, "_fds": {}, "_pid": None}

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(s)
        if fd is None:
            path = self.split.root / self.split.shards[s]["name"]
            try:
                fd = self._fds[s] = os.open(path, os.O_RDONLY)
            except OSError as exc:
                raise DataError(f"shard {path} cannot be opened ({exc.strerror})") from None
        return fd

    def read(self, i: int) -> bytes:
        s = int(self.split.shard[i])
        size = int(self.split.sizes[i])
        data = os.pread(self._fd(s), size, int(self.split.offsets[i]))
        if len(data) != size:
            raise DataError(f"shard {self.split.root / self.split.shards[s]['name']} is shorter than its index "
                            f"(sample {i}): copy it again or pack again")
        return data

    def image(self, i: int):
        """Sample ``i`` decoded to an RGB PIL image (DataError, naming shard and sample, if it cannot be)."""
        from PIL import Image

        try:
            img = Image.open(io.BytesIO(self.read(i)))
            return img.convert("RGB")
        except DataError:
            raise
        except Exception as exc:  # OSError, SyntaxError, DecompressionBombError, ...: all "unreadable"
            name = self.split.shards[int(self.split.shard[i])]["name"]
            raise DataError(f"unreadable image {i} of {self.split.root / name}: {exc}") from None

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}


class PackedDataset:
    """A map-style dataset of one packed split, as torchvision's ImageFolder is: (transform(image),
    label), with ``classes``, ``targets`` and ``root``; index i is ImageFolder's sample i."""

    def __init__(self, path: str | os.PathLike, split: str, transform=None, raw: bool = False):
        self.split = load_split(path, split)
        self.reader = ShardReader(self.split)
        self.transform, self.raw = transform, raw  # raw: the sample's bytes (the batched data path decodes them)
        self.root = Path(path) / split
        self.classes = self.split.classes

    @property
    def targets(self) -> list[int]:
        return self.split.labels.tolist()

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, i: int):
        img = self.reader.read(i) if self.raw else self.reader.image(i)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.split.labels[i])
