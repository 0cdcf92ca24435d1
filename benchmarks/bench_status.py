"""`tla status` over many synthetic run directories (target: under 1.5 s for 10,000 runs here).

Creates N runs as finished local runs leave them (run.json, heartbeat with progress, attempts, 300-epoch
metrics, summary; 1 in 10 failed; the job's process long gone), their files dated over the last 10 days,
in a temporary runs root; then times each command as a fresh subprocess (Python start and imports
included): once "cold", with no run's status cache (as after creating the runs or upgrading tla: that
call computes every run and writes its cache), then --repeat times "warm".
Usage: python benchmarks/bench_status.py [--runs 1000] [--repeat 3] [--code DIR]
(--code: time the tla_jobs of another checkout instead, e.g. `git archive OLD | tar -x -C DIR`.)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.rundir import metrics_summary

COMMANDS = (["status", "--json"], ["status"], ["status", "--state", "FAILED"], ["report", "--format", "csv"])


def make_runs(root: Path, n: int) -> None:
    now = time.time()
    for i in range(n):
        d = root / f"run{i:05d}"
        d.mkdir(parents=True)
        job = str(4_000_000 + i)  # a local job whose process has ended (no such pid)
        end = now - 600 - (n - i) * 10 * 86400 / n  # finished over the last 10 days, the last one 10 min ago
        start = end - 300 * 60.0
        failed = i % 10 == 7
        epochs = 120 if failed else 300
        (d / rundir.RUN_JSON).write_text(json.dumps({
            "name": d.name, "created": start - 30, "spec": {"model": "deit_tiny_patch16_224", "epochs": 300,
                                                            "tl_align": True, "seed": i % 3},
            "profile": {"executor": "local"}, "evals": [],
            "submissions": [{"job_id": job, "executor": "local", "submitted": start - 20}]}))
        rows = [{"epoch": e, "acc1": 50 + e / 10, "acc5": 90.0, "epoch_s": 60.0} for e in range(epochs)]
        (d / rundir.HEARTBEAT).write_text(json.dumps({"phase": "stopped" if failed else "finished",
                                                      "epoch": epochs, "epochs": 300, "time": end,
                                                      "progress": metrics_summary(rows)}))
        who = {"job_id": job, "restart_count": 0, "executor": "local"}
        (d / rundir.ATTEMPTS).write_text(
            json.dumps({"event": "start", "epoch": 0, "global_step": 0, "time": start, **who}) + "\n"
            + json.dumps({"event": "end", "reason": "error" if failed else "completed", "epoch": epochs,
                          "time": end, **who}) + "\n")
        (d / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
        if not failed:
            (d / rundir.SUMMARY).write_text(json.dumps({"state": "completed", "best_acc1": rows[-1]["acc1"]}))
        for f in d.iterdir():
            os.utime(f, (end, end))


def drop_caches(root: Path) -> None:
    for d in root.iterdir():
        (d / rundir.STATUS_CACHE).unlink(missing_ok=True)


def timed(cmd: list[str], env: dict) -> tuple[float, float] | str:
    """Seconds the command took (wall, and CPU: user + system, which a loaded machine changes less);
    what it said when it failed (an option an older checkout does not have)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    # from the runs root's folder: `-m` puts the working directory first on sys.path, before --code's
    proc = subprocess.run([sys.executable, "-m", "tla_jobs", *cmd], env=env, capture_output=True,
                          cwd=Path(env["TLA_RUNS"]).parent)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    if proc.returncode != 0:
        return f"exit {proc.returncode}: {(proc.stderr.decode(errors='replace').strip().splitlines() or [''])[-1]}"
    return wall, cpu


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--code", type=Path, help="a checkout whose tla_jobs is timed (default: this one)")
    args = p.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "runs"
        make_runs(root, args.runs)
        env = {**os.environ, "TLA_RUNS": str(root)}
        if args.code:
            env["PYTHONPATH"] = str(args.code.resolve())
        for cmd in COMMANDS:
            drop_caches(root)
            cold = timed(cmd, env)
            if isinstance(cold, str):
                print(f"tla {' '.join(cmd):24s} failed: {cold}", flush=True)
                continue
            warm = [t for _ in range(args.repeat) if not isinstance(t := timed(cmd, env), str)]
            walls, cpus = [w for w, _ in warm], [c for _, c in warm]
            print(f"tla {' '.join(cmd):24s} over {args.runs} runs: cold {cold[0]:.2f} s (CPU {cold[1]:.2f} s), "
                  f"warm median {statistics.median(walls):.2f} s (min {min(walls):.2f} s; CPU median "
                  f"{statistics.median(cpus):.2f} s), load {os.getloadavg()[0]:.2f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
