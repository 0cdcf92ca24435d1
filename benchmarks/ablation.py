"""TL-Align ablation on this machine's CPUs, through `tla` itself: a paired comparison.

Arms with the same model, data, schedule, seeds and (where they apply) CutMix boxes:
  grid-cutmix   CutMix snapped to the token grid, area labels λ (the control)
  tl-align      the same CutMix, TL-Align's aligned labels
  mixup+cutmix  DeiT's baseline (context arm)
  none          no mixing, label smoothing only (context arm)
run as ONE `tla submit sweep` on the local profile; every seed trains one run per arm, so each arm is
compared with the control seed by seed (`tla report --by-arm`: per-seed differences, mean with a 95%
confidence interval, paired t-test, exact sign-flip test). For the TL-Align runs it also measures how
far the aligned labels moved from λ (benchmarks/label_shift.py on mixed val images, and the trainer's
own per-epoch log of mean |w_cls − λ| on its training batches).

Writes docs/NAME.json (every run's numbers, the per-arm table and the paired comparison),
docs/results-NAME.md and docs/NAME.png. `--recompute docs/NAME.json` recomputes the paired statistics
and the label-shift summary from the per-run numbers in that file alone.

    python benchmarks/ablation.py                      # `make ablation`: the regime of docs/results.md
    python benchmarks/ablation.py --recompute docs/paired-h1.json
    python benchmarks/ablation.py --name paired --model tla_swin_micro     # the three-head Swin

Not part of the test suite (about 35 minutes on 2 cores with the defaults).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TLA = [sys.executable, "-m", "tla_jobs"]
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "UNKNOWN", "STOPPED")


def tla(*args: str) -> str:
    proc = subprocess.run([*TLA, *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"tla {shlex.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def recompute(path: Path) -> dict:
    """The paired statistics and the label-shift summary, from the per-run numbers of a results JSON."""
    sys.path.insert(0, str(ROOT))
    from tla_jobs.jobs.stats import paired

    data = json.loads(path.read_text())
    runs, control, metric = data["runs"], data["control"], data["metric"]
    by = {(r["model"], r["mixing"], r["seed"]): r for r in runs}
    out = {"paired": {}, "label_shift": {}}
    for model, mixing in sorted({(r["model"], r["mixing"]) for r in runs if r["mixing"] != control}):
        seeds = sorted(s for m, x, s in by if (m, x) == (model, mixing) and (model, control, s) in by)
        res = paired([by[(model, mixing, s)][metric] - by[(model, control, s)][metric] for s in seeds])
        out["paired"][f"{model} {mixing} - {control}"] = {
            k: res[k] for k in ("n", "diffs", "mean", "ci95_low", "ci95_high", "p_t", "p_sign_flip")}
    for model in sorted({r["model"] for r in runs}):
        shifts = [r["label_shift"]["trained"]["mean_abs_shift"] for r in runs
                  if r["model"] == model and r.get("label_shift")]
        if shifts:
            out["label_shift"][model] = {"runs": len(shifts), "mean_abs_shift_mean": statistics.fmean(shifts),
                                         "min": min(shifts), "max": max(shifts)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default="paired-h1")
    p.add_argument("--dataset", default="fashion-mnist", choices=("digits", "fashion-mnist"))
    p.add_argument("--per-class", type=int, default=300, help="fashion-mnist: train and val images per class")
    p.add_argument("--model", default="tla_swin_micro_h1", help="one model, or several, comma-separated")
    p.add_argument("--img-size", default="32")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--arms", default="grid-cutmix,tl-align")
    p.add_argument("--batch-size", default="64")
    p.add_argument("--lr", default="1e-3")
    p.add_argument("--recipe", default="--crop-scale 0.35 --warmup-epochs 1",
                   help="further trainer options, one string (the DeiT recipe otherwise: RandAugment, random "
                        "erasing 0.25, drop-path 0.1, label smoothing 0.1)")
    p.add_argument("--metric", default="best_acc1", choices=("best_acc1", "last_acc1"))
    p.add_argument("--parallel", default="2", help="runs at once (`tla submit sweep --parallel`)")
    p.add_argument("--workers", default="0", help="data-loading workers per run")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--recompute", type=Path, help="only recompute the statistics of this results JSON")
    args = p.parse_args()
    if args.recompute:
        print(json.dumps(recompute(args.recompute), indent=2))
        return

    if args.dataset == "digits":
        data = Path("data") / "digits"  # relative to ROOT (tla's cwd), as the docs show it
        tla("data", "prepare", "digits", str(data))
    else:
        data = Path("data") / f"fmnist-{args.per_class}"
        tla("data", "prepare", "fashion-mnist", str(data), "--limit", str(args.per_class))
    sweep = ["submit", "sweep", "--name", args.name, "--cluster", "local", "--models", args.model,
             "--arms", args.arms, "--seeds", args.seeds, "--dataset", args.dataset, "--data-path", str(data),
             "--img-size", args.img_size, "--epochs", str(args.epochs), "--batch-size", args.batch_size,
             "--lr", args.lr, "--workers", args.workers, "--no-repeated-aug", *shlex.split(args.recipe),
             "--checkpoint-every-min", "5", "--checkpoint-every-epochs", "0", "--parallel", args.parallel, "--json"]
    t0 = time.time()
    runs = [r["run"] for r in json.loads(tla(*sweep))]
    print(f"submitted {len(runs)} runs: {', '.join(runs)}", flush=True)
    while True:
        states = json.loads(tla("status", *runs, "--json"))
        done = [s for s in states if s["state"] in FINAL]
        epochs = sum(s["epoch"] or 0 for s in states)
        print(f"[{(time.time() - t0) / 60:5.1f} min] {len(done)}/{len(runs)} finished, "
              f"{epochs}/{len(runs) * args.epochs} epochs", flush=True)
        if len(done) == len(runs):
            break
        time.sleep(30)
    minutes = (time.time() - t0) / 60

    # every run's numbers: the report's row, the trainer's per-epoch label shift, and for TL-Align runs
    # the shift of the trained model's labels on mixed val images
    rows = json.loads(tla("report", *runs, "--format", "json"))
    root = Path(os.environ.get("TLA_RUNS", ROOT / "runs"))
    for row in rows:
        metrics = [json.loads(x) for x in (root / row["run"] / "metrics.jsonl").read_text().splitlines() if x]
        row["per_epoch"] = [{k: m.get(k) for k in ("epoch", "acc1", "val_loss", "train_loss", "w_shift")}
                            for m in metrics]
        if row["mixing"] == "tl-align":
            ckpt = root / row["run"] / "checkpoint_last.pth"
            proc = subprocess.run([sys.executable, "benchmarks/label_shift.py", str(ckpt), "--data", str(data),
                                   "--json"], capture_output=True, text=True, cwd=ROOT, check=True)
            row["label_shift"] = json.loads(proc.stdout)[0]
    args.out.mkdir(parents=True, exist_ok=True)
    plot = args.out / f"{args.name}.png"
    by_arm = ["report", *runs, "--by-arm", "--metric", args.metric]
    arms_md = tla(*by_arm, "--format", "md", "--plot", str(plot)).split("plot:")[0].rstrip() + "\n"
    arms = json.loads(tla(*by_arm, "--format", "json"))
    command = "python benchmarks/ablation.py " + shlex.join(sys.argv[1:])
    results = {"minutes": minutes, "command": command.strip(), "sweep": "tla " + shlex.join(sweep),
               "metric": args.metric, "control": "grid-cutmix", "runs": rows, "arms": arms}
    out_json = args.out / f"{args.name}.json"
    out_json.write_text(json.dumps(results, indent=2) + "\n")
    check = recompute(out_json)

    shift_rows = ["| run | epoch | mean \\|w_cls − λ\\| (val, mixed) | max | majority label flipped | corr(w_cls, λ) "
                  "| at initialisation | trainer's last-epoch mean (train) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("label_shift"):
            t, i = r["label_shift"]["trained"], r["label_shift"]["init"]
            shift_rows.append(f"| {r['run']} | {r['label_shift']['epoch']} | {t['mean_abs_shift']:.3f} | "
                              f"{t['max_abs_shift']:.3f} | {100 * t['majority_flips']:.1f}% | {t['corr']:.3f} | "
                              f"{i['mean_abs_shift']:.3f} | {r['per_epoch'][-1]['w_shift']:.3f} |")
    per_run = tla("report", *runs, "--format", "md")
    text = (f"## Measured ({time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPU cores, {minutes:.0f} min)\n\n"
            f"Reproduce: `{command.strip()}`, which ran:\n\n```\ntla {shlex.join(sweep)}\n```\n\n"
            f"Per arm (mean ± sample std over seeds {args.seeds}) and each arm paired with grid-cutmix seed "
            f"by seed ({args.metric}):\n\n{arms_md}\n"
            f"How far TL-Align's labels moved (benchmarks/label_shift.py on each TL-Align run's last checkpoint):"
            f"\n\n" + "\n".join(shift_rows) + "\n\n"
            f"Recomputed from the per-run numbers in {out_json.name}:\n\n```\n{json.dumps(check, indent=2)}\n```\n\n"
            f"Per run:\n\n{per_run}\n![val top-1, val loss and mean |w_cls − λ| per epoch]({plot.name})\n")
    (args.out / f"results-{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
