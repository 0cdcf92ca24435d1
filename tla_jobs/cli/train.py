"""`tla train` (the trainer in this process) and `tla data prepare`."""

from __future__ import annotations

from pathlib import Path

import typer

from tla_jobs.cli.options import with_train_options
from tla_jobs.cli.root import app, guard
from tla_jobs.errors import TlaError

data_app = typer.Typer(help="Prepare the small datasets that ship with packages.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@app.command("train")
@guard
@with_train_options
def train_command(train_kwargs: dict) -> None:
    """Train (or with --eval-only, evaluate) in this process.

    This is what every job runs: on a laptop, in a container, in each SLURM task or under torchrun
    (rank and world size come from the environment). Re-running the same command with the same
    --output-dir resumes from its newest good checkpoint. SIGUSR2/SIGTERM checkpoint and stop
    (exit code 75).
    """
    from tla_jobs import envvars
    from tla_jobs.config import TrainConfig
    from tla_jobs.train.preflight import check_config

    cfg = TrainConfig(**train_kwargs)
    envvars.check_trainer_env()  # before torch is imported: TLA_CPU_THREADS=abc is one line, at once
    problem = cfg.schedule_error(envvars.world_size())  # torchrun's WORLD_SIZE (the trainer checks it again)
    if problem:
        raise TlaError(problem)
    check_config(cfg)  # the model checks (meta device) before any data, process group or file
    from tla_jobs.train.loop import train

    result = train(cfg)
    if cfg.eval_only:
        typer.echo(f"top-1 {result['acc1']:.2f}  top-5 {result['acc5']:.2f}  loss {result['loss']:.4f}  "
                   f"({result['images']} images)")


@data_app.command("prepare")
@guard
def prepare_command(
    name: str = typer.Argument(..., help="fashion-mnist (Debian's dataset-fashion-mnist) or digits (scikit-learn)."),
    dest: Path = typer.Argument(..., help="Folder to create, with train/ and val/ inside."),
    limit: int = typer.Option(None, min=1, help="At most this many training images per class."),
) -> None:
    """Write a bundled dataset into the ImageFolder layout (nothing is downloaded)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from tla_jobs.data.prepare import prepare

    with Progress(TextColumn(f"preparing {name}"), BarColumn(), MofNCompleteColumn(), transient=True) as bar:
        task = bar.add_task("prepare", total=None)
        out = prepare(name, dest, limit=limit, progress=lambda done, total: bar.update(task, completed=done,
                                                                                        total=total))
    typer.echo(f"{name} ready in {out}")
