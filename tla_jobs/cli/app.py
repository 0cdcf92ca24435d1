"""Root Typer application and the error boundary every command runs inside."""

from __future__ import annotations

import typer

from tla_jobs import __version__

app = typer.Typer(
    name="tla",
    help="Train DeiTs with Token-Label Alignment, on this machine or on SLURM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tla {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Train DeiTs with Token-Label Alignment, on this machine or on SLURM."""


def main() -> None:
    app()
