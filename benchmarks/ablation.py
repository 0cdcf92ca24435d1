"""TL-Align ablation on Fashion-MNIST, on this machine's CPUs, through `tla` itself.

Four arms with the same model, data, schedule and CutMix boxes where they apply:
  grid  (a) token-grid CutMix with area labels λ          --arms grid
  tla   (b) the same CutMix with TL-Align's aligned labels --arms tla
  base  (c) DeiT's baseline: mixup 0.8 / CutMix 1.0, EMA  --arms base
  none  (d) no mixing (label smoothing only)               --arms none
each with several seeds, submitted as ONE `tla submit sweep` on the local profile, gathered with
`tla report --by-arm`, written to docs/results-NAME.md, docs/NAME.png and docs/NAME.json (summarised
by hand in docs/results.md).

    python benchmarks/ablation.py [--per-class 500] [--epochs 8] [--seeds 0,1,2] [--name ablation]
    python benchmarks/ablation.py --name ablation-swin --model tla_swin_micro --img-size 32 --arms grid,tla

Not part of the test suite: about 45 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TLA = [sys.executable, "-m", "tla_jobs"]


def tla(*args: str, capture: bool = True) -> str:
    proc = subprocess.run([*TLA, *args], capture_output=capture, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"tla {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout if capture else ""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="ablation")
    p.add_argument("--model", default="tla_vit_micro")
    p.add_argument("--img-size", default="28")
    p.add_argument("--per-class", type=int, default=500, help="train and val images per class")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--arms", default="grid,tla,base,none")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()

    data = Path("data") / f"fmnist-{args.per_class}"  # relative to ROOT (tla's cwd), as the docs show it
    tla("data", "prepare", "fashion-mnist", str(data), "--limit", str(args.per_class))
    sweep = ["submit", "sweep", "--name", args.name, "--cluster", "local", "--models", args.model,
             "--arms", args.arms, "--seeds", args.seeds, "--dataset", "fashion-mnist", "--data-path", str(data),
             "--img-size", args.img_size, "--epochs", str(args.epochs), "--warmup-epochs", "1",
             "--batch-size", "64", "--lr", "1e-3", "--workers", "0", "--no-repeated-aug", "--crop-scale", "0.35",
             "--checkpoint-every-min", "5", "--checkpoint-every-epochs", "0", "--json"]
    t0 = time.time()
    runs = [r["run"] for r in json.loads(tla(*sweep))]
    print(f"submitted {len(runs)} runs: {', '.join(runs)}", flush=True)
    while True:
        states = json.loads(tla("status", *runs, "--json"))
        done = [s for s in states if s["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "UNKNOWN")]
        epochs = sum(s["epoch"] or 0 for s in states)
        print(f"[{(time.time() - t0) / 60:5.1f} min] {len(done)}/{len(runs)} finished, "
              f"{epochs}/{len(runs) * args.epochs} epochs", flush=True)
        if len(done) == len(runs):
            break
        time.sleep(30)
    minutes = (time.time() - t0) / 60
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / f"{args.name}.png"
    grouped = tla("report", *runs, "--by-arm", "--format", "md", "--plot", str(plot))
    grouped = grouped.split("plot:")[0].rstrip() + "\n"
    per_run = tla("report", *runs, "--format", "md")
    raw = json.loads(tla("report", *runs, "--by-arm", "--format", "json"))
    (args.out / f"{args.name}.json").write_text(json.dumps({"minutes": minutes, "arms": raw}, indent=2) + "\n")
    command = "python benchmarks/ablation.py " + shlex.join(a for a in sys.argv[1:])
    text = (f"## Measured ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {minutes:.0f} min)\n\n"
            f"Reproduce: `{command.strip()}`, which ran:\n\n```\ntla {shlex.join(sweep)}\n```\n\n"
            f"Mean ± sample std over seeds {args.seeds} ({args.per_class} train and {args.per_class} val "
            f"images per class, {args.epochs} epochs):\n\n{grouped}\nPer run:\n\n{per_run}\n"
            f"![val top-1 per epoch]({plot.name})\n")
    (args.out / f"results-{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
