"""The GPU benchmark: every speed figure of docs/benchmarks.md's GPU section, in one run of a few minutes.

  1. TL-Align train step against plain token-grid CutMix: deit_tiny/small/base, batch 256, bf16
     (arms of bench_align.py: plain, second, fused, explicit, reference).
  2. `tla train` against a bare loop (bench_trainer.py) in steady state: deit_small at 224 on
     Fashion-MNIST, batch 256, DeiT's augmentation, as many loader workers as the machine has cores.
  3. Eager against --compile, and 4. --dataset synthetic throughput (images/s, TFLOP/s, MFU per
     GPU) through `tla train`.
  5. How far TL-Align's weights under bf16 autocast are from a float64 run of the checkpoint of 2.
  6. data: the batched data path (issue 23) on ImageNet-sized JPEGs made from scikit-learn's sample
     photos: the device-side ops (resize, flip, RandAugment, normalise + erase) per batch against a
     DeiT-S train step, the loader alone with N workers (batched and PIL paths), and `tla train` on the
     JPEGs against --dataset synthetic, eager and compiled.

Runs from a plain checkout (no install): python benchmarks/bench_gpu.py
On a GPU machine without network whose Python has torch, timm and typer but not pydantic, submitit,
etc., bring their wheels along and name the folder (how: docs/benchmarks.md):
    python benchmarks/bench_gpu.py --wheels .gpu/whl --fmnist .gpu/fmnist
Prints one table and, unless --no-record or --quick, appends a dated section to docs/benchmarks.md.
--quick runs every section at toy sizes (a check of the script itself, also on a CPU).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NEEDED = ("pydantic", "submitit", "typer", "rich", "yaml", "timm")


def bootstrap(wheels: str | None) -> None:
    """Make tla_jobs importable here and in subprocesses, installing missing wheels from ``wheels``."""
    paths = [str(ROOT), str(ROOT / "benchmarks")]
    missing = [m for m in NEEDED if importlib.util.find_spec(m) is None]
    if missing:
        if not wheels or not Path(wheels).is_dir():
            raise SystemExit(f"missing Python packages {', '.join(missing)}: install them, or pass --wheels DIR "
                             "with their wheels (docs/benchmarks.md says how to collect them)")
        site = Path(tempfile.gettempdir()) / "tla-bench-site"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                        str(site), *map(str, Path(wheels).glob("*.whl"))], check=True)
        paths.append(str(site))
    sys.path[:0] = paths
    os.environ["PYTHONPATH"] = os.pathsep.join([*paths, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def section_align(args, rows: list) -> None:
    import bench_align

    arms = ["plain", "second", "fused", "explicit", "reference"]
    for name in args.align_models:
        t0 = time.perf_counter()
        t = bench_align.bench_model(name, arms, args.align_batch, args.align_steps, args.device, amp=True)
        cells = {a: f"{t[a] * 1000:.1f} ms ({t[a] / t['plain']:.3f}x)" for a in arms}
        rows.append(("align step", f"{name}, batch {args.align_batch}, bf16", cells))
        print(f"[align] {name}: {cells} ({time.perf_counter() - t0:.0f} s)", flush=True)


def section_trainer(args, rows: list, out: Path) -> Path | None:
    import bench_trainer
    import torch

    from tla_jobs.data.prepare import prepare

    try:
        prepare("fashion-mnist", args.data, limit=args.limit)
    except Exception as exc:  # no Fashion-MNIST on this machine: say so and go on
        print(f"[trainer] skipped: {exc}", flush=True)
        rows.append(("trainer vs bare loop", "skipped", {"why": str(exc)[:80]}))
        return None
    ns = argparse.Namespace(data=args.data, model=args.trainer_model, img_size=args.img_size, batch=args.batch,
                            workers=args.workers, epochs=2, aa=args.aa, reprob=0.25, crop_scale=0.08)
    t0 = time.perf_counter()
    bare = bench_trainer.bare(ns, torch.device(args.device))
    row = bench_trainer.trainer(ns, keep=out)
    tla = row["images_per_s_steady"]
    cells = {"bare loop": f"{bare:.0f} img/s", "tla train": f"{tla:.0f} img/s", "ratio": f"{tla / bare:.3f}x",
             "tla train, whole epoch": f"{row['images_per_s']:.0f} img/s"}
    rows.append(("trainer vs bare loop", f"{args.trainer_model}, batch {args.batch}, {args.workers} workers, "
                 f"aa {args.aa}, steady state", cells))
    print(f"[trainer] {cells} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return out


def _synthetic(args, model: str, extra=(), images=None) -> dict:
    import bench_trainer

    ns = argparse.Namespace(data="-", model=model, img_size=args.img_size, batch=args.batch, workers=0,
                            epochs=2, aa="none", reprob=0.25, crop_scale=0.08)
    n = images or args.synthetic_images
    return bench_trainer.trainer(ns, ("--dataset", "synthetic", "--num-classes", "1000", "--synthetic-images",
                                      str(n), *extra))


def section_compile(args, rows: list) -> None:
    t0 = time.perf_counter()
    eager = _synthetic(args, args.trainer_model)
    compiled = _synthetic(args, args.trainer_model, ("--compile",))
    e, c = eager["images_per_s_steady"], compiled["images_per_s_steady"]
    cells = {"eager": f"{e:.0f} img/s", "--compile": f"{c:.0f} img/s", "speed-up": f"{c / e:.3f}x",
             "first epoch, eager / compiling": f"{eager['first_epoch_s']:.0f} s / {compiled['first_epoch_s']:.0f} s"}
    rows.append(("eager vs --compile", f"{args.trainer_model}, synthetic, batch {args.batch}", cells))
    print(f"[compile] {cells} ({time.perf_counter() - t0:.0f} s)", flush=True)


def section_synthetic(args, rows: list) -> None:
    for model in args.align_models:
        t0 = time.perf_counter()
        r = _synthetic(args, model)
        cells = {"img/s per GPU": f"{r['images_per_s_per_device']:.0f}",
                 "steady img/s": f"{r['images_per_s_steady']:.0f}",
                 "TFLOP/s per GPU": f"{r.get('tflops_per_device', 0):.1f}",
                 "MFU": f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "n/a"}
        rows.append(("synthetic data, tla train", f"{model}, batch {args.batch}, bf16", cells))
        print(f"[synthetic] {model}: {cells} ({time.perf_counter() - t0:.0f} s)", flush=True)


def section_precision(args, rows: list, run: Path | None) -> None:
    import torch

    from tla_jobs.align import aligned_forward, token_cutmix
    from tla_jobs.config import TrainConfig
    from tla_jobs.data.loaders import eval_loader
    from tla_jobs.train import checkpoint as ckpt
    from tla_jobs.train.models import build_model, model_input_size, model_patch_size
    from tla_jobs.train.setup import normalise

    if run is None or not (run / ckpt.LAST).exists():
        rows.append(("bf16 vs float64 weights", "skipped", {"why": "no trained checkpoint"}))
        return
    payload, _ = ckpt.load(run / ckpt.LAST)
    dev = torch.device(args.device)
    model = build_model(payload["model_name"], payload["num_classes"], 0.0, args.img_size)
    model.load_state_dict(payload["model"])
    model.to(dev).eval()
    size, patch = model_input_size(model), model_patch_size(model)
    cfg = TrainConfig(model=payload["model_name"], batch_size=args.batch, workers=min(args.workers, 4))
    _, loader = eval_loader(cfg, Path(args.data), size, 0, 1)
    transform = normalise(model, dev)
    diffs, shifts, n = [], [], 0
    with torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i >= 4:
                break
            x = transform(images)
            mix = token_cutmix(x, patch, mode="elem", generator=torch.Generator().manual_seed(i))
            with torch.autocast(dev.type, dtype=torch.bfloat16):
                _, w16 = aligned_forward(model, mix.images, mix.patch_weights)
            _, w64 = aligned_forward(model.double(), mix.images.double(), mix.patch_weights.double(),
                                     path="explicit")
            model.float()
            diffs.append((w16.double() - w64).abs())
            shifts.append((w64 - mix.patch_weights.double().mean(1)).abs())
            n += len(w16)
    d, s = torch.cat(diffs), torch.cat(shifts)
    cells = {"max |w_bf16 - w_fp64|": f"{d.max():.2e}", "mean": f"{d.mean():.2e}",
             "mean |w - λ| (fp64)": f"{s.mean():.2e}", "images": str(n)}
    rows.append(("bf16 vs float64 weights", f"{payload['model_name']}, trained checkpoint, epoch "
                 f"{payload['epoch']}, mixed val images", cells))
    print(f"[precision] {cells}", flush=True)


def _jpeg_folder(root: Path, images: int, classes: int = 10) -> Path:
    """An imagefolder of ImageNet-sized JPEGs (bench_data.make_photos), train/ and a small val/."""
    import bench_data

    if (root / "train").is_dir():
        return root
    for split, n in (("train", images), ("val", max(classes, images // 20))):
        flat = root / f"{split}-flat"
        flat.mkdir(parents=True)
        for k, path in enumerate(bench_data.make_photos(flat, n, seed=len(split))):
            (root / split / f"c{k % classes}").mkdir(parents=True, exist_ok=True)
            path.rename(root / split / f"c{k % classes}" / path.name)
        flat.rmdir()
    return root


def section_data(args, rows: list) -> None:
    """Issue 23's GPU figures: device-side ops vs a DeiT-S step, the loader alone, tla train on JPEGs."""
    import random

    import numpy as np
    import timm
    import torch

    from tla_jobs.config import TrainConfig
    from tla_jobs.data import crops as worker
    from tla_jobs.data.device import DeviceTransform
    from tla_jobs.data.gpu_augment import DeviceAugment
    from tla_jobs.data.loaders import batched_params, train_loader

    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    root = _jpeg_folder(Path(args.data_jpegs), args.data_images)
    size = args.data_size
    cfg = TrainConfig(batch_size=args.batch, workers=args.workers, repeated_aug=False, data_device="batch")
    params = batched_params(cfg, size, dev)
    # 1. the device-side ops on one batch of crops, against a train step of the model at that batch
    paths = sorted((root / "train").rglob("*.jpg"))[:args.batch]
    samples = []
    for i, path in enumerate(paths):
        random.seed(i)
        np.random.seed(i)
        torch.default_generator.manual_seed(i)
        samples.append((worker.CropTransform(params)(path.read_bytes()), 0))
    (flat, shapes, prow), _ = worker.collate_crops(samples)
    flat = flat.pin_memory() if dev.type == "cuda" else flat
    augment, norm = DeviceAugment(params), DeviceTransform(dev, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 0.25)

    def ops():
        return norm(augment(flat, shapes, prow, device=dev), seed=1)

    def timed(fn) -> float:
        """Seconds per call of ``fn`` after two warm-up calls, the device synchronised around the timing."""
        for _ in range(2):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.data_steps):
            fn()
        sync()
        return (time.perf_counter() - t0) / args.data_steps

    t_ops = timed(ops)
    model = timm.create_model(args.trainer_model if not args.quick else "vit_tiny_patch16_224",
                              num_classes=1000, img_size=size).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(len(paths), 3, size, size, device=dev)
    y = torch.randint(0, 1000, (len(paths),), device=dev)

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t_step = timed(step)
    rows.append(("data: device-side ops", f"batch {len(paths)}, {size}px, rand-m9-mstd0.5-inc1 + erasing",
                 {"ops": f"{t_ops * 1000:.1f} ms/batch", "train step": f"{t_step * 1000:.1f} ms",
                  "share of the step": f"{100 * t_ops / t_step:.1f}% (target <= 10%)"}))
    print(f"[data] device ops {t_ops * 1000:.1f} ms, step {t_step * 1000:.1f} ms", flush=True)
    # 2. the loader alone, N workers: batches per second out of the DataLoader (the batched path's CPU side
    # and today's PIL transform)
    cells = {}
    for label, choice in (("batched", "batch"), ("PIL", "cpu")):
        c = cfg.model_copy(update={"data_device": choice})
        _, sampler, loader = train_loader(c, root, size, 0, 1, batched_params(c, size, dev))
        sampler.set_epoch(0)
        it = iter(loader)
        next(it)  # workers started
        t0, n = time.perf_counter(), 0
        for _ in range(min(args.data_steps * 2, len(loader) - 1)):
            next(it)
            n += args.batch
        cells[f"{label} loader, {args.workers} workers"] = f"{n / (time.perf_counter() - t0):.0f} img/s"
        del it, loader
    rows.append(("data: loader alone", f"{args.data_images} JPEGs, batch {args.batch}", cells))
    print(f"[data] {cells}", flush=True)
    # 3. tla train on the JPEGs against synthetic data, eager and compiled
    import bench_trainer

    for extra in ((), ("--compile",)):
        ns = argparse.Namespace(data=str(root), model=args.trainer_model, img_size=args.img_size, batch=args.batch,
                                workers=args.workers, epochs=2, aa=args.aa, reprob=0.25, crop_scale=0.08)
        jpeg = bench_trainer.trainer(ns, ("--data-device", "auto", *extra))
        synth = _synthetic(args, args.trainer_model, extra, images=args.data_images)
        j, s_ = jpeg["images_per_s_steady"], synth["images_per_s_steady"]
        cells = {"JPEGs": f"{j:.0f} img/s", "synthetic": f"{s_:.0f} img/s", "ratio": f"{j / s_:.3f}x (target >= 0.9)",
                 "data_wait": f"{100 * jpeg.get('data_wait', 0):.0f}%"}
        rows.append(("data: tla train, JPEGs vs synthetic", f"{args.trainer_model}, batch {args.batch}, "
                     f"{args.workers} workers{', --compile' if extra else ', eager'}", cells))
        print(f"[data] {cells}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", default=str(ROOT / ".gpu" / "whl"), help="wheels of missing packages")
    p.add_argument("--fmnist", default=None, help="folder with Fashion-MNIST's *-ubyte.gz (TLA_FMNIST_DIR)")
    p.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "tla-bench-fmnist"))
    p.add_argument("--limit", type=int, default=2000, help="Fashion-MNIST images per class")
    p.add_argument("--sections", nargs="+", default=["align", "trainer", "compile", "synthetic", "precision", "data"])
    p.add_argument("--data-jpegs", default=str(Path(tempfile.gettempdir()) / "tla-bench-jpegs"),
                   help="the data section's ImageNet-sized JPEGs (made here from scikit-learn's sample photos)")
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the script, measures nothing")
    p.add_argument("--no-record", action="store_true", help="do not append to docs/benchmarks.md")
    args = p.parse_args()
    if args.fmnist:
        os.environ["TLA_FMNIST_DIR"] = str(Path(args.fmnist).resolve())
    bootstrap(args.wheels)
    import timm
    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if args.quick:
        args.align_models, args.align_batch, args.align_steps = ["tla_vit_nano"], 8, 2
        args.trainer_model, args.img_size, args.batch, args.workers = "tla_vit_nano", None, 32, 1
        args.aa, args.synthetic_images, args.limit = "none", 256, 60
        args.data_images, args.data_size, args.data_steps = 96, 32, 2
    else:
        args.align_models = ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
        args.align_batch, args.align_steps = 256, 10
        args.trainer_model, args.img_size, args.batch = "deit_small_patch16_224", None, 256
        args.workers, args.aa, args.synthetic_images = max(1, cores - 1), "rand-m9-mstd0.5-inc1", 256 * 30
        args.data_images, args.data_size, args.data_steps = 256 * 24, 224, 10
    start = time.perf_counter()
    rows: list = []
    with tempfile.TemporaryDirectory() as tmp:
        run = None
        for section in args.sections:
            try:  # one section failing (a missing compiler for --compile, say) leaves the others' figures
                if section == "align":
                    section_align(args, rows)
                elif section == "trainer":
                    run = section_trainer(args, rows, Path(tmp) / "run")
                elif section == "compile":
                    section_compile(args, rows)
                elif section == "synthetic":
                    section_synthetic(args, rows)
                elif section == "precision":
                    section_precision(args, rows, run)
                elif section == "data":
                    section_data(args, rows)
            except (Exception, SystemExit) as exc:
                print(f"[{section}] FAILED: {exc}", flush=True)
                rows.append((section, "failed", {"error": " ".join(str(exc).split())[-300:]}))
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    head = (f"\n### GPU benchmark, {datetime.date.today()}: {gpu}, {cores} CPU cores, torch {torch.__version__}, "
            f"timm {timm.__version__}{' (--quick: toy sizes, not figures)' if args.quick else ''}\n\n"
            f"`python benchmarks/bench_gpu.py` ({time.perf_counter() - start:.0f} s)\n")
    lines = [head, "| what | setting | figures |", "|---|---|---|"]
    for what, setting, cells in rows:
        lines.append(f"| {what} | {setting} | " + "; ".join(f"{k}: {v}" for k, v in cells.items()) + " |")
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if not args.no_record and not args.quick:  # toy sizes are a check of the script, never figures to keep
        with (ROOT / "docs" / "benchmarks.md").open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
