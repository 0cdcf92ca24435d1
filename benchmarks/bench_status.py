"""`tla status` over many synthetic run directories (target: under 1 s for 1,000 runs here).

Creates N runs with run.json, heartbeat, attempts and metrics (as a finished local run leaves
them) in a temporary runs root, then times `tla status --json` and `tla status` as subprocesses.
Usage: python benchmarks/bench_status.py [--runs 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tla_jobs.rundir import metrics_summary


def make_runs(root: Path, n: int) -> None:
    for i in range(n):
        d = root / f"run{i:04d}"
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({
            "name": d.name, "spec": {"model": "deit_tiny_patch16_224", "epochs": 300, "tl_align": True},
            "profile": {"executor": "local"}, "submissions": [{"job_id": str(4_000_000 + i), "executor": "local"}],
            "evals": []}))
        rows = [{"epoch": e, "acc1": 50 + e / 10, "acc5": 90.0, "epoch_s": 60.0} for e in range(300)]
        (d / "heartbeat.json").write_text(json.dumps({"phase": "finished", "epoch": 300, "time": time.time(),
                                                      "progress": metrics_summary(rows)}))
        (d / "attempts.jsonl").write_text(json.dumps({"event": "start", "epoch": 0, "global_step": 0}) + "\n"
                                          + json.dumps({"event": "end", "reason": "completed", "epoch": 300}) + "\n")
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "summary.json").write_text(json.dumps({"best_acc1": 80.0}))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        make_runs(root, args.runs)
        env = {**os.environ, "TLA_RUNS": str(root)}
        for cmd in (["status", "--json"], ["status"], ["report", "--format", "csv"]):
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-m", "tla_jobs", *cmd], env=env, capture_output=True, check=True)
                times.append(time.perf_counter() - t0)
            print(f"tla {' '.join(cmd):22s} over {args.runs} runs: median {statistics.median(times):.2f} s "
                  f"(min {min(times):.2f} s)")


if __name__ == "__main__":
    main()
