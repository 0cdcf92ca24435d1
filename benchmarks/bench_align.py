"""Train-step time of TL-Align against plain token-grid CutMix (forward + backward + AdamW step).

Arms, same model, batch and data:
  plain      token-grid CutMix with area labels (λ), timm's fused attention
  second     TL-Align, Ā·w from a second, no-grad SDPA call with w as the values (default on GPUs)
  fused      TL-Align, Ā·w carried through the same SDPA call as extra channels (default on CPUs)
  explicit   TL-Align, softmax matrix built explicitly, scalar w
  reference  the reference implementation's way: unfused attention and 1000-class labels through Ā

Usage: python benchmarks/bench_align.py [--models deit_tiny_patch16_224 ...] [--batch 32] [--steps 5]
Prints a table and, with --record, appends it to docs/benchmarks.md. Not a test: it asserts nothing.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import timm
import torch
from timm.loss import SoftTargetCrossEntropy

from tla_jobs.align import aligned_forward, mixed_targets, propagate_labels, smoothed_one_hot, token_cutmix
from tla_jobs.train import models as _registers_tla_models  # noqa: F401 (tla_vit_nano etc. for timm)


def make_step(arm: str, model, opt, num_classes: int, patch: int):
    crit = SoftTargetCrossEntropy()

    def step(images, targets):
        mix = token_cutmix(images, patch)
        if arm == "plain":
            logits = model(mix.images)
            soft = mixed_targets(targets, mix.partner, mix.patch_weights.mean(1), num_classes)
        elif arm in ("second", "fused", "explicit"):
            logits, w = aligned_forward(model, mix.images, mix.patch_weights, path=arm)
            soft = mixed_targets(targets, mix.partner, w, num_classes)
        else:  # reference: full label distributions, unfused attention
            y_a = smoothed_one_hot(targets, num_classes)
            own = mix.patch_weights.unsqueeze(-1)
            labels = own * y_a[:, None] + (1 - own) * y_a[mix.partner][:, None]
            logits, out = propagate_labels(model, mix.images, labels, path="explicit")
            soft = out[:, 0]
        loss = crit(logits, soft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_model(model_name: str, arms: list[str], batch: int, steps: int, device: str, amp: bool) -> dict:
    """Median step time per arm; arms run interleaved (one step each per round, rotating order) so
    that drift in the machine's speed hits every arm alike."""
    states = {}
    for arm in arms:
        torch.manual_seed(0)
        model = timm.create_model(model_name, num_classes=1000).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, **({"fused": True} if device == "cuda" else {}))
        states[arm] = make_step(arm, model, opt, 1000, model.patch_embed.patch_size[0])
    size = timm.create_model(model_name).patch_embed.img_size[0]
    images = torch.randn(batch, 3, size, size, device=device)
    targets = torch.randint(0, 1000, (batch,), device=device)
    times = {arm: [] for arm in arms}
    for r in range(steps + 2):
        order = arms[r % len(arms):] + arms[: r % len(arms)]
        for arm in order:
            ctx = torch.autocast(device, dtype=torch.bfloat16) if amp else torch.autocast(device, enabled=False)
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with ctx:
                states[arm](images, targets)
            if device == "cuda":
                torch.cuda.synchronize()
            if r >= 2:  # two warm-up rounds
                times[arm].append(time.perf_counter() - t0)
    return {arm: statistics.median(t) for arm, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast")
    p.add_argument("--record", action="store_true", help="append the table to docs/benchmarks.md")
    p.add_argument("--arms", nargs="+", default=["plain", "second", "fused", "explicit", "reference"])
    args = p.parse_args()
    arms = args.arms
    rows = []
    for name in args.models:
        t = bench_model(name, arms, args.batch, args.steps, args.device, args.amp)
        rows.append((name, t))
        cells = " | ".join(f"{t[a]*1000:8.0f} ms ({t[a] / t['plain']:.3f}x)" for a in arms)
        print(f"{name:26s} | {cells}", flush=True)
    machine = (torch.cuda.get_device_name() if args.device == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    lines = [
        f"\n### TL-Align train step, {datetime.date.today()}, {args.device} ({machine}), batch {args.batch}, "
        f"{'bf16 autocast' if args.amp else 'fp32'}, torch {torch.__version__}, timm {timm.__version__}\n",
        "| model | " + " | ".join(arms) + " |", "|---|" + "---|" * len(arms),
    ]
    for name, t in rows:
        lines.append(f"| {name} | " + " | ".join(f"{t[a]*1000:.0f} ms ({t[a]/t['plain']:.3f}x)" for a in arms) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.record:
        out = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
        if not out.exists():
            out.write_text("# Benchmarks\n\nFigures measured with the scripts in benchmarks/ (not tests).\n")
        with out.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
