"""Root Typer application, and the error boundary every command runs inside.

A user mistake (TlaError, or a config pydantic rejects) becomes one line on stderr and exit code
2 (3 for a failed check, ChecksFailed), with no traceback; anything else is a bug and keeps its
traceback. The exit codes are listed once, in tla_jobs/errors.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys

import typer
from typer.core import TyperGroup

from tla_jobs import __version__

# `tla --help` lists the commands in panels, in the order a user meets them in a run's life.
PANELS = {
    "Run": ("submit", "train", "eval", "resume", "cancel", "signal"),
    "Watch": ("status", "logs", "report", "checkpoints", "export"),
    "Set up": ("cluster", "image", "data"),
}
_PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}
_ORDER = {name: i for i, name in enumerate(_PANEL_OF)}


class LifeOrderGroup(TyperGroup):
    """The root group: its commands in PANELS' order, each in its panel. Set here rather than with
    rich_help_panel= in every module, since a module registers its commands only when `tla NAME`
    needs it (tla_jobs/cli/__init__.py) and typer lists commands in the order they were registered."""

    def list_commands(self, ctx) -> list[str]:
        names = super().list_commands(ctx)
        for name in names:
            command = self.commands[name]
            if name in _PANEL_OF and not getattr(command, "rich_help_panel", None):
                command.rich_help_panel = _PANEL_OF[name]
        return sorted(names, key=lambda n: _ORDER.get(n, len(_ORDER)))


app = typer.Typer(
    cls=LifeOrderGroup,
    name="tla",
    help="Train DeiTs with Token-Label Alignment, on this machine or on SLURM.\n\n"
         "Runs live in a run directory (./runs/NAME, or $TLA_RUNS/NAME) that holds everything about them.\n\n"
         "Exit codes: 0 done; 1 a followed run failed; 2 bad input; 3 a check found a problem (a damaged file, "
         "a cluster that does not answer); 75 the trainer checkpointed on a signal (resume continues).",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
EXIT_USAGE = 2  # tla_jobs.errors.EXIT_USAGE, without importing it before a command runs


def fail(message: str, code: int = EXIT_USAGE) -> typer.Exit:
    """Print one clear line on stderr; return the Exit to raise."""
    sys.stderr.write(f"tla: error: {message}\n")
    sys.stderr.flush()
    return typer.Exit(code)


# Where a config field's name is not the flag a user types (`--time` sets a profile's slurm.time_min).
PROFILE_FLAGS = {"time_min": "--time", "tasks": "--tasks-per-node"}


def flag_name(loc: tuple, model: str = "TrainConfig") -> str:
    """The command-line flag of a pydantic error location: ('min_lr',) -> --min-lr,
    ('slurm', 'time_min') of a profile override -> --time."""
    parts = [str(x) for x in loc if not isinstance(x, int)]
    if not parts:
        return "options"
    if model == "TrainConfig":
        return "--" + parts[0].replace("_", "-")
    if model == "Profile" and parts[0] in ("slurm", "local") and len(parts) > 1:
        return PROFILE_FLAGS.get(parts[-1], "--" + parts[-1].replace("_", "-"))
    return ".".join(parts)


def _one_line(exc: BaseException) -> str:
    try:
        from pydantic import ValidationError
    except ImportError:  # pragma: no cover
        ValidationError = ()  # noqa: N806
    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors():
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown option"
            parts.append(f"{flag_name(err['loc'], exc.title)}: {msg}")
        return " ".join("; ".join(parts).split())
    return " ".join(str(exc).split())


def os_error_line(exc: OSError) -> str:
    """One line for a failed file operation: which file, what happened, what to do."""
    import errno

    name = exc.filename or "a file"
    if exc.filename2:
        name = f"{exc.filename} -> {exc.filename2}"
    hints = {
        errno.ENOSPC: f"no space left on the device holding {name}: free space there and run the command again",
        errno.EDQUOT: f"disk quota exceeded writing {name}: free space there and run the command again",
        errno.EROFS: f"{name} is on a read-only filesystem: use a writable location",
        errno.EACCES: f"permission denied: {name}",
        errno.EPERM: f"operation not permitted: {name}",
        errno.EISDIR: f"{name} is a directory, not a file: give a file path",
        errno.ENOTDIR: f"{name}: a part of this path is a file, not a directory",
        errno.ENOENT: f"{name} does not exist",
        errno.EEXIST: f"{name} already exists",
        errno.ENAMETOOLONG: f"file name too long: {str(name)[:120]}...",
    }
    line = hints.get(exc.errno) or f"{name}: {exc.strerror or type(exc).__name__}"
    return " ".join(line.split())


def guard(fn):
    """Turn user errors raised by a command into one line on stderr and exit code 2: TlaError,
    configs pydantic rejects, failed file operations (disk full, read-only, permissions), images
    PIL refuses to open."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from pydantic import ValidationError

        from tla_jobs.errors import TlaError

        try:
            return fn(*args, **kwargs)
        except (TlaError, ValidationError) as exc:
            raise fail(_one_line(exc), getattr(exc, "exit_code", EXIT_USAGE)) from None
        except BrokenPipeError:  # `tla status | head`: the reader left; nothing to say
            with contextlib.suppress(OSError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        except OSError as exc:
            raise fail(os_error_line(exc)) from None
        except KeyboardInterrupt:
            raise fail("interrupted", 130) from None
        except Exception as exc:
            if type(exc).__name__ == "DecompressionBombError":  # PIL: an image claims billions of pixels
                raise fail(_one_line(exc)) from None
            raise

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
    """`tla`'s own options (the app's help above is what `tla --help` shows)."""


def main() -> None:
    """`tla`: click's usage errors (a bad option value, an unknown option) as one line too."""
    try:  # typer >= 0.22 carries its own copy of click
        from typer._click import exceptions as click_exc
    except ImportError:  # pragma: no cover
        from click import exceptions as click_exc

    try:
        rv = app(standalone_mode=False)
    except click_exc.NoArgsIsHelpError as exc:
        typer.echo(exc.ctx.get_help())
        sys.exit(0)
    except click_exc.UsageError as exc:
        where = exc.ctx.command_path if exc.ctx else "tla"
        message = " ".join(exc.format_message().split())
        sys.stderr.write(f"tla: error: {message} (`{where} --help` lists the options)\n")
        sys.exit(EXIT_USAGE)
    except click_exc.ClickException as exc:
        sys.stderr.write(f"tla: error: {' '.join(exc.format_message().split())}\n")
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("tla: error: interrupted\n")
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) and not isinstance(rv, bool) else 0)
