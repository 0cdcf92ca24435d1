"""`tla train` (the trainer in this process), `tla data prepare` and `tla data pack`."""

from __future__ import annotations

from pathlib import Path

import typer

from tla_jobs.cli.options import with_train_options
from tla_jobs.cli.root import app, guard
from tla_jobs.errors import TlaError

data_app = typer.Typer(help="Prepare the small datasets that ship with packages; pack an ImageFolder into shards.",
                        no_args_is_help=True)
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


SIZE_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
              "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """'1GB', '500M', '65536' -> bytes (binary units: a shard size, not a marketing figure)."""
    import re

    from tla_jobs.errors import TlaError

    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise TlaError(f"--shard-size {text!r} is not a size (e.g. 1GB, 256MB, 65536)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])


@data_app.command("pack")
@guard
def pack_command(
    src: Path = typer.Argument(..., help="An ImageFolder: SRC/train/CLASS/*.jpg and SRC/val/CLASS/*.jpg."),
    dst: Path = typer.Argument(..., help="Folder for the shards (created; a packing killed there resumes)."),
    shard_size: str = typer.Option("1GB", "--shard-size", help="About this many bytes per shard (1GB, 256MB, ...)."),
) -> None:
    """Pack an ImageFolder into tar shards (webdataset's layout) with an index, for --data-path.

    Each shard is renamed into place only when whole; running the same command again after a kill
    keeps the finished shards (verified) and writes the rest. Every shard is read back at the end
    (sha256) and the samples per class are compared with the source."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from tla_jobs.data.shards import pack

    size = parse_size(shard_size)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  transient=True) as bar:
        tasks: dict[str, int] = {}

        def progress(what: str, done: int, total: int) -> None:
            if what not in tasks:
                unit = "images" if what == "packing" else "shards"
                tasks[what] = bar.add_task(f"{what} {unit}", total=total)
            bar.update(tasks[what], completed=done, total=total)

        report = pack(src, dst, size, progress)
    table = Table(title=f"packed {src} into {report.dst}")
    for col in ("split", "samples", "classes", "shards", "kept from before", "GB"):
        table.add_column(col, justify="left" if col == "split" else "right")
    for split, r in report.splits.items():
        table.add_row(split, str(r["samples"]), str(len(r["counts"])), str(len(r["shards"])), str(r["kept"]),
                      f"{r['bytes'] / 1e9:.3f}")
    Console().print(table)
    typer.echo(f"verified: every shard's sha256 and the samples per class; use --data-path {report.dst}")
