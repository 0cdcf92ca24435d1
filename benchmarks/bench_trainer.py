"""What the trainer's bookkeeping costs: `tla train` against a bare PyTorch loop, in steady state.

Both train the same model with TL-Align on the same prepared data, with the same transforms (uint8
from the loader workers, normalised and erased on the device), loader settings (workers, pinned
memory, persistent workers), AdamW (fused on CUDA), autocast (bf16 on CUDA) and label path. The
bare loop has no checkpoints, heartbeat, metrics, signal checks, per-sample seeding or exact
resume. Images/s are taken in steady state: over the last epoch, after its first few steps
(`tla train` reports the same window as images_per_s_steady in metrics.jsonl).

Usage: python benchmarks/bench_trainer.py [--data data/fashion-mnist] [--model tla_vit_micro] [--batch 64]
Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch


def warm_steps(steps_per_epoch: int) -> int:
    return min(10, max(1, steps_per_epoch // 4))  # as tla_jobs.train.progress.EpochClock


def bare(args, device: torch.device) -> float:
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from tla_jobs.align import AlignedModel, mixed_targets, token_cutmix
    from tla_jobs.align.attention import resolve_path
    from tla_jobs.config import TrainConfig
    from tla_jobs.data.loaders import build_transforms
    from tla_jobs.train.models import build_model, model_input_size, model_patch_size
    from tla_jobs.train.setup import normalise

    cfg = TrainConfig(**common_config(args))
    train_dir = Path(args.data) / "train"
    classes = len([d for d in train_dir.iterdir() if d.is_dir()])
    torch.manual_seed(0)
    model = build_model(args.model, classes, cfg.drop_path, args.img_size).to(device).train()
    size, patch = model_input_size(model), model_patch_size(model)
    tf, _ = build_transforms(cfg, size)
    loader = DataLoader(ImageFolder(str(train_dir), tf), batch_size=args.batch, shuffle=True, drop_last=True,
                        num_workers=args.workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.workers > 0, prefetch_factor=4 if args.workers else None)
    transform = normalise(model, device, cfg.reprob)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05,
                              **({"fused": True} if device.type == "cuda" else {}))
    net = AlignedModel(model, path=resolve_path("auto", device))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    crit = SoftTargetCrossEntropy()
    warm = warm_steps(len(loader))
    t0 = t1 = None
    for epoch in range(args.epochs):
        last = epoch == args.epochs - 1
        for i, (images, targets) in enumerate(loader):
            if last and i == warm:
                sync(device)
                t0 = time.perf_counter()
            x = transform(images, seed=i)
            y = targets.to(device, non_blocking=True)
            mix = token_cutmix(x, patch)
            with autocast():
                logits, w = net(mix.images, mix.patch_weights)
                loss = crit(logits, mixed_targets(y, mix.partner, w, classes))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        t1 = time.perf_counter()
    return (len(loader) - warm) * args.batch / (t1 - t0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def common_config(args) -> dict:
    return dict(model=args.model, batch_size=args.batch, repeated_aug=False, crop_scale=args.crop_scale,
                aa=args.aa, reprob=args.reprob, workers=args.workers, img_size=args.img_size)


def trainer(args, extra: tuple[str, ...] = (), keep: Path | None = None) -> dict:
    """Runs `tla train` in a subprocess; returns its last metrics.jsonl row (plus the first epoch's
    seconds). The run directory is temporary, or ``keep``."""
    c = common_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(keep or tmp)
        cmd = [sys.executable, "-m", "tla_jobs", "train", "--model", args.model, "--dataset", "imagefolder",
               "--data-path", args.data, "--output-dir", out, "--epochs", str(args.epochs), "--batch-size",
               str(args.batch), "--workers", str(args.workers), "--no-repeated-aug", "--crop-scale",
               str(c["crop_scale"]), "--aa", str(c["aa"] or "none"), "--reprob", str(c["reprob"]),
               "--warmup-epochs", "0", "--checkpoint-every-epochs", "0", *extra]
        if args.img_size:
            cmd += ["--img-size", str(args.img_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"tla train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return {**rows[-1], "first_epoch_s": rows[0]["epoch_s"]}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--dataset", default="fashion-mnist", help="what to prepare into --data if it is missing")
    p.add_argument("--model", default="tla_vit_micro")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--epochs", type=int, default=2, help="the last one is measured")
    p.add_argument("--aa", default="none")
    p.add_argument("--reprob", type=float, default=0.25)
    p.add_argument("--crop-scale", type=float, default=0.35)
    p.add_argument("--limit", type=int, default=1000, help="images per class when the data must be prepared")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    args = p.parse_args()
    from tla_jobs.data.prepare import prepare

    prepare(args.dataset, args.data, limit=args.limit)  # kept as is when already prepared
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    b = bare(args, device)
    t = trainer(args)["images_per_s_steady"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    print(f"{args.model} on {args.data}, batch {args.batch}, {args.workers} workers, {where}: "
          f"bare loop {b:.0f} img/s, tla train {t:.0f} img/s ({t / b:.3f}x), steady state")


if __name__ == "__main__":
    main()
