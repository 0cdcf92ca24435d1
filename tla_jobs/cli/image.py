"""`tla image build` and `tla image convert`: the container image for clusters (see docker/README.md).

The commands are worked out by tla_jobs.jobs.image (argument lists, standard library only) and run
one after the other with the engine's output on the terminal, or printed one a line with --dry-run.
"""

from __future__ import annotations

from pathlib import Path

import typer

from tla_jobs.cli.root import app, guard

image_app = typer.Typer(help="Build the container image, and convert it for Pyxis/enroot or Apptainer.",
                        no_args_is_help=True)
app.add_typer(image_app, name="image")


def _run_or_print(plan, dry_run: bool, done: str) -> None:
    from tla_jobs.jobs.image import run_plan

    if dry_run:
        for line in plan.lines():
            typer.echo(line)
        return
    run_plan(plan, echo=lambda line: typer.echo(line, err=True))
    typer.echo(f"{done} {plan.result}")


@image_app.command("build")
@guard
def build(
    base: str = typer.Option(None, "--base", help="Base image (default: the Dockerfile's official PyTorch image)."),
    tag: str = typer.Option(None, "--tag", "-t", help="Image name:tag (default: tla:VERSION)."),
    engine: str = typer.Option(None, "--engine", help="docker, podman or buildah (default: the first installed)."),
    context: Path = typer.Option(Path("."), "--context", help="The tla source tree (build context)."),
    dockerfile: Path = typer.Option(None, "--file", "-f", help="Dockerfile (default: CONTEXT/Dockerfile)."),
    ca_bundle: Path = typer.Option(None, "--ca-bundle",
                                   help="CA bundle pip needs for its index, passed as a build secret (not stored)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the build command only."),
    engine_args: list[str] = typer.Argument(None, metavar="[-- ENGINE_ARGS...]",
                                            help="Passed to the engine as they are, e.g. -- --pull=never."),
) -> None:
    """Build the image with docker, podman or buildah; labels carry the version and git commit."""
    from tla_jobs.jobs.image import build_plan

    plan = build_plan(_engine(engine, dry_run), context=context, dockerfile=dockerfile, tag=tag, base=base,
                      ca_bundle=ca_bundle, engine_args=engine_args)
    _run_or_print(plan, dry_run, "built")


@image_app.command("convert")
@guard
def convert(
    image: str = typer.Argument(..., help="A local image (name:tag), or a registry image as docker://REF."),
    dest: Path = typer.Argument(None, help="The .sqsh/.sif file to write, or a folder on shared storage."),
    to: str = typer.Option(..., "--to", help="enroot (a .sqsh for Pyxis; or: sqsh) or apptainer (a .sif; or: sif)."),
    output: Path = typer.Option(None, "--output", "-o", help="DEST given as an option instead."),
    engine: str = typer.Option(None, "--engine", help="Where a local IMAGE lives: docker, podman or buildah."),
    force: bool = typer.Option(False, "--force", help="Replace DEST when it exists."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the commands only."),
) -> None:
    """Convert the image once onto shared storage, so that N nodes do not pull it N times."""
    from tla_jobs.errors import TlaError
    from tla_jobs.jobs.image import convert_plan

    if (dest is None) == (output is None):
        raise TlaError("give the destination once: DEST or --output DEST")
    dest = dest or output
    if engine is not None:
        engine = _engine(engine, dry_run)
    plan = convert_plan(to, image, dest, engine=engine, force=force)
    _run_or_print(plan, dry_run, "wrote")


def _engine(engine: str | None, dry_run: bool) -> str:
    """--engine as given (a dry run may name one that is not installed here), else the first found."""
    from tla_jobs.errors import TlaError
    from tla_jobs.jobs.image import ENGINES, find_engine

    if engine is not None and dry_run:
        if engine not in ENGINES:
            raise TlaError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
        return engine
    return find_engine(engine)

