"""Root Typer application, and the error boundary every command runs inside.

A user mistake (TlaError, or a config pydantic rejects) becomes one line on stderr and exit code
2, with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import os
import sys

import typer

from tla_jobs import __version__

app = typer.Typer(
    name="tla",
    help="Train DeiTs with Token-Label Alignment, on this machine or on SLURM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
EXIT_USAGE = 2


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print one clear line on stderr; return the Exit to raise."""
    sys.stderr.write(f"tla: error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


def _one_line(exc: BaseException) -> str:
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover
        ValidationError = ()  # noqa: N806
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "config"
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"{loc.replace('_', '-')}: {msg}")
        return "; ".join(parts)
    return " ".join(str(exc).split())


def guard(fn):
    """Turn user errors raised by a command into one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from tla_jobs.errors import TlaError

        try:
            return fn(*args, **kwargs)
        except (TlaError, ValidationError) as exc:
            raise fail(_one_line(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        # Inside the image, also the commit it was built from (the same value as its revision label).
        revision = os.environ.get("TLA_IMAGE_REVISION", "unknown")
        typer.echo(f"tla {__version__}" + (f" (image of commit {revision})" if revision != "unknown" else ""))
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Train DeiTs with Token-Label Alignment (TL-Align), on this machine or on SLURM.

    Runs live in a run directory (./runs/NAME, or $TLA_RUNS/NAME) that holds everything about them.
    """


def main() -> None:
    app()
