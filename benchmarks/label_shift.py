"""How far TL-Align's aligned labels move from CutMix's area labels, on a trained checkpoint.

For mixed val batches (token-grid CutMix, mode elem, fixed seed) it compares the aligned cls weight
w_cls with the area share λ of each sample: mean |w - λ|, the share of samples whose majority label
flips (w and λ on different sides of 1/2), and the correlation. If w ≈ λ, TL-Align trains on the same
targets as plain grid CutMix and the two arms cannot differ; the larger the shift, the more the
method changes. Run on the checkpoints of an ablation (benchmarks/ablation.py) and at initialisation.

    python benchmarks/label_shift.py CKPT [CKPT ...] --data data/fmnist-500 [--batches 20] [--json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tla_jobs.align import aligned_forward, token_cutmix
from tla_jobs.config import TrainConfig
from tla_jobs.data.loaders import eval_loader
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train.models import build_model, model_input_size, model_patch_size
from tla_jobs.train.setup import normalise


def shift(model, loader, batches: int, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    transform = normalise(model, torch.device("cpu"))  # the loader's batches are uint8
    w_all, lam_all = [], []
    model.eval()
    with torch.no_grad():
        for i, (images, _) in enumerate(loader):
            if i == batches:
                break
            mix = token_cutmix(transform(images), model_patch_size(model), mode="elem", generator=gen)
            _, w = aligned_forward(model, mix.images, mix.patch_weights)
            w_all.append(w.reshape(len(images), -1)[:, 0])
            lam_all.append(mix.patch_weights.mean(dim=1))
    w, lam = torch.cat(w_all), torch.cat(lam_all)
    return {
        "samples": len(w),
        "mean_abs_shift": float((w - lam).abs().mean()),
        "max_abs_shift": float((w - lam).abs().max()),
        "majority_flips": float(((w > 0.5) != (lam > 0.5)).float().mean()),
        "corr": float(torch.corrcoef(torch.stack([w, lam]))[0, 1]),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data", required=True)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--json", action="store_true", help="One JSON object per checkpoint: init and trained figures.")
    args = p.parse_args()
    torch.set_num_threads(2)
    out = []
    for path in args.checkpoints:
        payload, _ = ckpt.load(path)
        cfg = TrainConfig(**{**payload["config"], "batch_size": 64, "workers": 0})
        model = build_model(cfg.model, payload["num_classes"], 0.0, cfg.img_size)
        _, loader = eval_loader(cfg, Path(args.data), model_input_size(model), 0, 1)
        init = shift(model, loader, args.batches)
        model.load_state_dict(payload["model"])
        trained = shift(model, loader, args.batches)
        out.append({"checkpoint": str(path), "epoch": payload["epoch"], "init": init, "trained": trained})
        if args.json:
            continue
        for name, r in (("at initialisation", init), (f"trained, epoch {payload['epoch']}", trained)):
            print(f"{path} {name}: {r['samples']} mixed samples, mean |w_cls - λ| {r['mean_abs_shift']:.3f} "
                  f"(max {r['max_abs_shift']:.3f}), majority label flipped {100 * r['majority_flips']:.1f}%, "
                  f"corr(w_cls, λ) {r['corr']:.3f}")
    if args.json:
        print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
