"""`tla logs`: the trainer's per-rank logs and submitit's per-task output of a run, merged; of a
sweep, each run's last lines under a header."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from tla_jobs.cli.root import app, guard
from tla_jobs.cli.show import console
from tla_jobs.errors import TlaError
from tla_jobs.jobs.scheduler import FINAL

SWEEP_LINES = 20  # a sweep's runs: this many last lines of each unless --lines says otherwise


@app.command("logs")
@guard
def logs(
    run: str = typer.Argument(..., help="Run name or directory, or a sweep's name: each of its runs under a header "
                                        "(a run of that name wins)."),
    rank: int = typer.Option(None, "--rank", min=0, help="Only this rank (default: all ranks merged)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the run ends (a sweep: "
                                                              "until all its runs end, each new line after its run's "
                                                              "header)."),
    errors: bool = typer.Option(False, "--errors", help="Only the lines that explain a failure."),
    lines: int = typer.Option(None, "--lines", "-n", min=1, help=f"Only the last N lines (default: every line of a "
                                                                 f"run; {SWEEP_LINES} of each run of a sweep)."),
) -> None:
    """The run's logs: the trainer's per-rank logs and submitit's per-task stdout/stderr; of a sweep,
    each run's last lines under a header."""
    from tla_jobs.jobs import damage, records
    from tla_jobs.jobs import logs as L

    found, is_sweep = records.run_or_sweep(run)
    if is_sweep:
        _sweep_logs(found, rank, follow, errors, lines or SWEEP_LINES)
        return
    run_dir = found[0]
    L.check_rank(run_dir, rank)
    problem = damage.record(run_dir)[1]
    if errors:
        found_lines = L.error_lines(run_dir, rank)
        if not found_lines:
            console.print("no error lines found", style="green")
        for line in L.last(found_lines, lines):
            print(line)
        _refuse_damaged_record(run_dir, problem)
        return
    shown = None
    while True:
        # the state before the lines are read: a run that has ended has written its last line
        ended = follow and not problem and _ended(run_dir)
        merged = L.merged(run_dir, rank)
        for line in L.last(merged, lines) if shown is None else merged[shown:]:
            print(line)
        shown = len(merged)
        sys.stdout.flush()
        if not follow or problem:
            _refuse_damaged_record(run_dir, problem)
            return
        if ended:
            return
        time.sleep(1)


def _ended(run_dir: Path) -> bool:
    from tla_jobs.jobs.state import collect

    return collect([run_dir])[0].state in FINAL


def _sweep_logs(paths: list[Path], rank: int | None, follow: bool, errors: bool, lines: int) -> None:
    """Each run's last ``lines`` lines (or its error lines) under a header `==> RUN (STATE) <==`; with
    --follow, then every new line of any run, after a header whenever the run changes, until every
    run has ended (one status query for all of them a second)."""
    from tla_jobs.jobs import logs as L
    from tla_jobs.jobs.state import collect

    if rank is not None:
        for p in paths:
            L.check_rank(p, rank)
    states = {st.path: st.state for st in collect(paths)}
    shown: dict[Path, int] = {}
    for p in paths:
        print(f"==> {p.name} ({states.get(p, 'DAMAGED')}) <==")
        if errors:
            found = L.error_lines(p, rank)
            for line in L.last(found, lines) if found else ["no error lines found"]:
                print(line)
        else:
            merged = L.merged(p, rank)
            for line in L.last(merged, lines):
                print(line)
            shown[p] = len(merged)
        print()
    sys.stdout.flush()
    if not follow or errors:
        return
    current = None
    while True:
        states = {st.path: st.state for st in collect(paths)}  # before reading: no last line is missed
        for p in paths:
            merged = L.merged(p, rank)
            new = merged[shown.get(p, 0):]
            if new:
                if current != p:
                    print(f"==> {p.name} <==")
                    current = p
                for line in new:
                    print(line)
                shown[p] = len(merged)
        sys.stdout.flush()
        if all(s in FINAL for s in states.values()):
            return
        time.sleep(1)


def _refuse_damaged_record(run_dir: Path, problem: str | None) -> None:
    if problem:
        sys.stdout.flush()
        raise TlaError(f"run {run_dir.name} is damaged: {problem}; only the trainer's own logs are shown")
