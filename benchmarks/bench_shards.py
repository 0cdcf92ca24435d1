"""A split of small JPEGs read as files (an ImageFolder) against as packed shards (`tla data pack`).

Makes N small JPEGs (default 50,000 of 96x96, 100 classes) in a temporary ImageFolder, packs it, then
reads every image once in one epoch's random order, one process, four ways: files and shards, each from
a cold page cache (as root: sync, then echo 3 > /proc/sys/vm/drop_caches; without root the cold rows are
left out) and a warm one. Two figures each: reading only (open + read of a file, or one pread at the
index's offset: files opened per second and samples per second) and reading + decoding to RGB
(PIL, what a loader worker does before its transforms: images per second per core, from the process's
CPU time).
Usage: python benchmarks/bench_shards.py [--images 50000] [--size 96] [--dir /scratch] (the folder to
put the data in: the filesystem to measure; default: the system's temp folder).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from tla_jobs.data.shards import PackedDataset, ShardReader, load_split, pack


def make_folder(root: Path, n: int, size: int, classes: int = 100) -> int:
    """n JPEGs (q90) of smooth random content, so that they compress as photos do, not as noise."""
    rng = np.random.default_rng(0)
    total = 0
    for split, count in (("train", n), ("val", classes)):
        for c in range(classes):
            (root / split / f"c{c:03d}").mkdir(parents=True)
        for i in range(count):
            small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
            path = root / split / f"c{i % classes:03d}" / f"{i:06d}.jpg"
            path.write_bytes(buf.getvalue())
            total += len(buf.getvalue())
    return total


def drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=64 << 20)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="tla-bench-shards-", dir=args.dir))
    try:
        folder, packed = base / "folder", base / "packed"
        t = time.perf_counter()
        nbytes = make_folder(folder, args.images, args.size)
        print(f"made {args.images} JPEGs of {args.size}x{args.size} ({nbytes / args.images / 1e3:.1f} kB each) "
              f"in {time.perf_counter() - t:.0f} s under {base}")
        t = time.perf_counter()
        report = pack(folder, packed, args.shard_size)
        print(f"packed into {len(report.splits['train']['shards'])} train shards in {time.perf_counter() - t:.0f} s")

        ds = PackedDataset(packed, "train")  # the index; its sample i is ImageFolder's sample i
        split = load_split(packed, "train")
        files = sorted((folder / "train").glob("*/*.jpg"), key=lambda p: (p.parent.name, p.name))
        assert len(files) == len(split)
        order = list(range(len(files)))
        random.Random(1).shuffle(order)  # one epoch's random order, as a sampler gives it

        def files_read():
            for i in order:
                with open(files[i], "rb") as f:
                    f.read()

        def files_decode():
            for i in order:
                with open(files[i], "rb") as f:
                    Image.open(f).convert("RGB")

        def shards_read():
            reader = ShardReader(split)
            for i in order:
                reader.read(i)
            reader.close()

        def shards_decode():
            for i in order:
                ds.reader.image(i)

        cold = drop_caches()
        rows = []
        for name, fn, opens in (("files", files_read, len(order)), ("shards", shards_read, len(split.shards))):
            for cache in (["cold"] if cold else []) + ["warm"]:
                if cache == "cold":
                    drop_caches()
                else:
                    fn()  # warm the page cache
                wall, cpu = timed(fn)
                rows.append((name, "read", cache, len(order) / wall, opens, opens / wall, len(order) / max(cpu, 1e-9)))
            for cache in (["cold"] if cold else []) + ["warm"]:
                if cache == "cold":
                    drop_caches()
                wall, cpu = timed(files_decode if name == "files" else shards_decode)
                rows.append((name, "read+decode", cache, len(order) / wall, opens, None, len(order) / max(cpu, 1e-9)))
        if not cold:
            print("(not root: no cold-cache rows)")
        print(f"\n{'data':7} {'what':12} {'cache':5} {'images/s':>10} {'opens':>7} {'files opened/s':>15} "
              f"{'images/s per core':>18}")
        for name, what, cache, ips, opens, ops, per_core in rows:
            print(f"{name:7} {what:12} {cache:5} {ips:10,.0f} {opens:7,} {'' if ops is None else f'{ops:,.0f}':>15} "
                  f"{per_core:18,.0f}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
