"""`tla eval checkpoint`: evaluate a checkpoint as a job."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tla_jobs.cli.root import app, guard
from tla_jobs.cli.show import console
from tla_jobs.cli.submit import PROFILE_HELP

eval_app = typer.Typer(help="Evaluate checkpoints as jobs.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("checkpoint")
@guard
def eval_checkpoint(
    target: str = typer.Argument(..., help="A run (name or directory), one of its checkpoint files, or an export "
                                 "of one (`tla export`)."),
    which: str = typer.Option(None, "--which", help="Of a run: last (default), best, prev, ema (the EMA weights of "
                              "the last checkpoint) or epoch:N. Of a checkpoint file: ema for its EMA weights."),
    cluster: str = typer.Option(None, "--cluster", help=PROFILE_HELP + " Default: the run's own profile."),
    data_path: Path = typer.Option(None, "--data-path", help="Dataset root (default: the run's)."),
    as_json: bool = typer.Option(False, "--json", help="Print the eval job's submission as JSON."),
) -> None:
    """Evaluate a checkpoint as a job; top-1/top-5 land in the run it belongs to, with the checkpoint
    used (path, sha256, which): `tla status RUN` lists every eval.

    When the run's training job is still queued or running on SLURM, the eval job waits for it
    (--dependency afterok) and evaluates the checkpoint training ends with.
    """
    from tla_jobs.jobs import evals

    run_dir, entry = evals.submit(target, cluster, data_path, which)
    if as_json:
        typer.echo(json.dumps(entry))
    else:
        dep = f" after job {entry['dependency'].split(':')[1]}" if entry["dependency"] else ""
        console.print(f"submitted eval of {entry['which']} ({Path(entry['checkpoint']).name}, {entry['weights']} "
                      f"weights) for run {run_dir.name} as job {entry['job_id']}{dep}", markup=False)
