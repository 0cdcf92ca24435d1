"""What the trainer's bookkeeping costs: `tla train` against a bare PyTorch loop.

Both train the same model with TL-Align on the same data (prepared Fashion-MNIST or digits), same
batch, transforms, AdamW and loss, for one epoch; the bare loop has no checkpoints, heartbeat,
metrics, signal checks or seeded per-sample augmentation. Prints images/s of both.
Usage: python benchmarks/bench_trainer.py [--data data/fashion-mnist] [--model tla_vit_micro] [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def bare(args) -> float:
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    from tla_jobs.align import aligned_forward, mixed_targets, token_cutmix
    from tla_jobs.data.loaders import build_transforms
    from tla_jobs.train.config import TrainConfig
    from tla_jobs.train.models import build_model

    cfg = TrainConfig(model=args.model, dataset=args.dataset, batch_size=args.batch, repeated_aug=False,
                      crop_scale=0.35)
    torch.manual_seed(0)
    model = build_model(args.model, 10, cfg.drop_path)
    size = model.patch_embed.img_size[0]
    tf, _ = build_transforms(cfg, size)
    loader = DataLoader(ImageFolder(str(Path(args.data) / "train"), tf), batch_size=args.batch, shuffle=True,
                        drop_last=True, num_workers=args.workers)
    opt = create_optimizer_v2(model, opt="adamw", lr=1e-3, weight_decay=0.05)
    crit = SoftTargetCrossEntropy()
    model.train()
    n, t0 = 0, time.perf_counter()
    for images, targets in loader:
        mix = token_cutmix(images, model.patch_embed.patch_size[0])
        logits, w = aligned_forward(model, mix.images, mix.patch_weights)
        loss = crit(logits, mixed_targets(targets, mix.partner, w, 10))
        opt.zero_grad()
        loss.backward()
        opt.step()
        n += images.shape[0]
    return n / (time.perf_counter() - t0)


def trainer(args) -> float:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, "-m", "tla_jobs", "train", "--model", args.model, "--dataset", args.dataset,
                        "--data-path", args.data, "--output-dir", out, "--epochs", "1", "--batch-size",
                        str(args.batch), "--workers", str(args.workers), "--no-repeated-aug", "--crop-scale", "0.35",
                        "--warmup-epochs", "0"], check=True, capture_output=True)
        return json.loads((Path(out) / "metrics.jsonl").read_text().splitlines()[-1])["images_per_s"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="data/fashion-mnist")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--model", default="tla_vit_micro")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--limit", type=int, default=1000, help="images per class when the data must be prepared")
    args = p.parse_args()
    from tla_jobs.data.prepare import prepare

    prepare(args.dataset, args.data, limit=args.limit)  # kept as is when already prepared
    b = bare(args)
    t = trainer(args)
    print(f"{args.model} on {args.dataset}, batch {args.batch}, {torch.get_num_threads()} threads: "
          f"bare loop {b:.0f} img/s, tla train {t:.0f} img/s ({t / b:.2f}x)")


if __name__ == "__main__":
    main()
