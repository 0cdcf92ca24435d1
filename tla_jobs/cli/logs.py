"""`tla logs`: the trainer's per-rank logs and submitit's per-task output of a run, merged."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from tla_jobs.cli.app import app, guard
from tla_jobs.cli.show import console
from tla_jobs.errors import TlaError
from tla_jobs.jobs.scheduler import FINAL


@app.command("logs")
@guard
def logs(
    run: str = typer.Argument(..., help="Run name or directory."),
    rank: int = typer.Option(None, "--rank", min=0, help="Only this rank (default: all ranks merged)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the run ends."),
    errors: bool = typer.Option(False, "--errors", help="Only the lines that explain a failure."),
) -> None:
    """The run's logs: the trainer's per-rank logs and submitit's per-task stdout/stderr."""
    from tla_jobs.jobs import damage, records
    from tla_jobs.jobs import logs as L

    run_dir = records.resolve(run)
    L.check_rank(run_dir, rank)
    problem = damage.record(run_dir)[1]
    if errors:
        lines = L.error_lines(run_dir, rank)
        if not lines:
            console.print("no error lines found", style="green")
        for line in lines:
            print(line)
        _refuse_damaged_record(run_dir, problem)
        return
    shown = 0
    while True:
        lines = L.merged(run_dir, rank)
        for line in lines[shown:]:
            print(line)
        shown = len(lines)
        sys.stdout.flush()
        if not follow or problem:
            _refuse_damaged_record(run_dir, problem)
            return
        from tla_jobs.jobs.state import collect

        if collect([run_dir])[0].state in FINAL:
            return
        time.sleep(1)


def _refuse_damaged_record(run_dir: Path, problem: str | None) -> None:
    if problem:
        sys.stdout.flush()
        raise TlaError(f"run {run_dir.name} is damaged: {problem}; only the trainer's own logs are shown")


