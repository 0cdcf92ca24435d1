"""What the loader workers cost per image, today's PIL path against the batched path's CPU side.

Makes ImageNet-sized JPEG photos (random crops of scikit-learn's two bundled sample photos, about
425 x 405 pixels, quality 90: nothing is downloaded), then, in one process on one thread, times each
CPU stage of
  - today's path (--data-device cpu): PIL decode, RandomResizedCrop to 224 (bicubic), flip,
    RandAugment rand-m9-mstd0.5-inc1, to a uint8 tensor, and timm's whole DeiT train transform
    from the file, decode included, as a loader worker runs it;
  - the batched path's CPU side (--data-device cuda): the file's bytes, decode (torchvision's
    libjpeg-turbo and PIL's), the parameter draw, cutting the crop box, and the whole worker part;
and, for reference, the device-side batch ops (resize, flip, RandAugment) run on this CPU.

Prints ms per image and images/s per core with the CPU model, and the ratio the issue asks for: the
worker's ms per image on the batched path against today's whole transform (target >= 3x).

    python benchmarks/bench_data.py [--images 300] [--repeat 3] [--batch 64]
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_photos(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """n JPEGs (quality 90) cut from scikit-learn's sample photos (427 x 640), ImageNet-sized."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    paths = []
    for k in range(n):
        src = photos[k % len(photos)]
        h, w = int(rng.integers(380, 428)), int(rng.integers(350, 501))
        y, x = int(rng.integers(0, src.shape[0] - h + 1)), int(rng.integers(0, src.shape[1] - w + 1))
        path = folder / f"{k:04d}.jpg"
        Image.fromarray(src[y:y + h, x:x + w]).save(path, quality=90)
        paths.append(path)
    return paths


def timed(fn, items, repeat: int) -> float:
    """Best of ``repeat`` passes over ``items``, in ms per item (the best: the machine is shared)."""
    return timed_pair(fn, fn, items, repeat)[0]


def timed_pair(fn_a, fn_b, items, repeat: int) -> tuple[float, float]:
    """Best of ``repeat`` passes of each, in ms per item, the passes of the two alternating, so that a
    change of the machine's load during the run falls on both alike (the ratio is the figure)."""
    best = [float("inf"), float("inf")]
    for r in range(repeat):
        for which, fn in enumerate((fn_a, fn_b) if fn_b is not fn_a else (fn_a,)):
            t0 = time.perf_counter()
            for i, item in enumerate(items):
                seed = r * 100_003 + i
                random.seed(seed)
                np.random.seed(seed)
                torch.default_generator.manual_seed(seed)
                fn(item)
            best[which] = min(best[which], (time.perf_counter() - t0) / len(items) * 1e3)
    return best[0], best[1]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64, help="batch of the device-side ops timed on this CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from tla_jobs.config import TrainConfig
    from tla_jobs.data import crops as worker
    from tla_jobs.data.gpu_augment import DeviceAugment, resize_crops
    from tla_jobs.data.loaders import _loader, build_transforms
    from tla_jobs.data.params import TrainParams

    cfg = TrainConfig()
    pil_tf = build_transforms(cfg, 224)[0]
    rrc, flip, ra, to_tensor = pil_tf.transforms
    params = TrainParams(pil_tf)
    crop_tf = worker.CropTransform(params)

    with tempfile.TemporaryDirectory() as tmp:
        paths = make_photos(Path(tmp), args.images)
        sizes = [Image.open(p).size for p in paths]
        blobs = [p.read_bytes() for p in paths]
        decoded = [_loader(str(p)) for p in paths]
        cropped = [rrc(img) for img in decoded]
        rows: list[tuple[str, str, float]] = []

        def stage(path_name: str, name: str, fn, items) -> float:
            ms = timed(fn, items, args.repeat)
            rows.append((path_name, name, ms))
            print(f"  {path_name:8s} {name:48s} {ms:7.3f} ms  {1000 / ms:7.0f} images/s per core", flush=True)
            return ms

        print(f"CPU: {cpu_model()} ({os.cpu_count()} cores here; one process, one thread)")
        print(f"{args.images} JPEGs, quality 90, mean {np.mean([s[0] for s in sizes]):.0f} x "
              f"{np.mean([s[1] for s in sizes]):.0f} pixels, {np.mean([len(b) for b in blobs]) / 1024:.0f} KiB")
        # today's path, stage by stage and whole
        stage("cpu", "PIL decode (open, convert RGB)", lambda p: _loader(str(p)), paths)
        stage("cpu", "RandomResizedCrop 224, bicubic", rrc, decoded)
        stage("cpu", "flip", flip, cropped)
        stage("cpu", "RandAugment rand-m9-mstd0.5-inc1", ra, cropped)
        stage("cpu", "to uint8 tensor", to_tensor, cropped)
        # the two wholes, timed in alternating passes (the ratio the issue asks for)
        today, batched = timed_pair(lambda p: pil_tf(_loader(str(p))),
                                    lambda p: crop_tf(worker.read_bytes(str(p))), paths, args.repeat)
        rows.append(("cpu", "WHOLE: file -> augmented uint8 tensor", today))
        print(f"  {'cpu':8s} {'WHOLE: file -> augmented uint8 tensor':48s} {today:7.3f} ms  {1000 / today:7.0f} "
              "images/s per core", flush=True)
        # the batched path's CPU side
        stage("batched", "read the file's bytes", lambda p: worker.read_bytes(str(p)), paths)
        if worker.decode_jpeg is not None:
            stage("batched", "decode: torchvision decode_jpeg (CPU)", worker.decode, blobs)
        stage("batched", "decode: PIL", lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB")), blobs)
        stage("batched", "parameter draw (timm's objects)", lambda s: params.draw(*s), sizes)
        imgs = [worker.decode(b) for b in blobs]
        stage("batched", "cut the crop box (copy of its rows)",
              lambda im: im[10:10 + im.shape[0] // 2, 20:20 + im.shape[1] // 2].contiguous(), imgs)
        # decode-only worker (the device would crop) against decode + crop, alternating passes
        only, cut = timed_pair(lambda b: (worker.decode(b), params.draw(400, 400)), crop_tf, blobs, args.repeat)
        for name, ms in (("worker: decode + draw (decode-only design)", only),
                         ("worker: decode + draw + cut (this design)", cut)):
            rows.append(("batched", name, ms))
            print(f"  {'batched':8s} {name:48s} {ms:7.3f} ms  {1000 / ms:7.0f} images/s per core", flush=True)
        rows.append(("batched", "WHOLE: file -> crop + parameters", batched))
        print(f"  {'batched':8s} {'WHOLE: file -> crop + parameters':48s} {batched:7.3f} ms  {1000 / batched:7.0f} "
              "images/s per core (timed with the PIL whole, alternating)", flush=True)

        # the device-side ops, on this CPU, for reference (on a GPU: bench_gpu.py's data section)
        samples = []
        for i, p in enumerate(paths[:args.batch]):
            random.seed(i)
            np.random.seed(i)
            torch.default_generator.manual_seed(i)
            samples.append((crop_tf(p.read_bytes()), 0))
        (flat, shapes, prow), _ = worker.collate_crops(samples)
        augment = DeviceAugment(params)
        shape_list = [tuple(s) for s in shapes.tolist()]
        t0 = time.perf_counter()
        resized = resize_crops(flat, shape_list, params.size)
        t_resize = (time.perf_counter() - t0) / len(samples) * 1e3
        t0 = time.perf_counter()
        augment.augment(resized, prow)
        t_aug = (time.perf_counter() - t0) / len(samples) * 1e3
        print(f"  device ops on this CPU, batch {len(samples)}: resize {t_resize:.2f} ms/image, "
              f"flip + RandAugment {t_aug:.2f} ms/image (reference only: they run on the GPU)")
        ratio = today / batched
        print(f"\nloader worker per image: today's whole transform {today:.3f} ms ({1000 / today:.0f} images/s per "
              f"core), the batched path's CPU side {batched:.3f} ms ({1000 / batched:.0f} images/s per core): "
              f"{ratio:.2f}x fewer ms (target >= 3x)")
        return {"cpu": cpu_model(), "rows": rows, "today_ms": today, "batched_ms": batched, "ratio": ratio,
                "device_resize_ms": t_resize, "device_augment_ms": t_aug}


if __name__ == "__main__":
    main()
