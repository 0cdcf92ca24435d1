"""`tla cancel` and `tla signal`: acting on a run's live jobs."""

from __future__ import annotations

import typer
from rich.console import Console

from tla_jobs.cli.root import app, guard

console = Console()


@app.command("cancel")
@guard
def cancel(
    run: str = typer.Argument(None, help="Run name or directory; a sweep's name cancels every run of it."),
    sweep: str = typer.Option(None, "--sweep", help="Cancel every run of this sweep (`tla submit sweep --name`)."),
    train_only: bool = typer.Option(False, "--train", help="Only the training job, not the eval jobs."),
    eval_only: bool = typer.Option(False, "--eval", help="Only the eval jobs, not the training job."),
) -> None:
    """Cancel a run's live jobs: its training job and its eval jobs (or a whole sweep's).

    Only jobs that are queued or running are signalled; a finished run keeps its state.
    """
    from tla_jobs.jobs import control

    for line in control.cancel(run, sweep, train_only, eval_only):
        console.print(line, highlight=False, markup=False)


@app.command("signal")
@guard
def send_signal(
    run: str = typer.Argument(..., help="Run name or directory."),
    sig: str = typer.Option("USR2", "--signal", "-s", help="USR2 (what SLURM sends before the time limit or a "
                            "preemption: checkpoint, stop, requeue), TERM (a site's preemption or scancel: "
                            "checkpoint and stop). The trainer checkpoints on these two only."),
) -> None:
    """Send the preemption signal to a running run, to test its checkpoint-and-requeue path."""
    from tla_jobs.jobs import control

    run_dir, job = control.signal(run, sig)
    console.print(f"sent SIG{sig} to {run_dir.name} (job {job})", markup=False)
