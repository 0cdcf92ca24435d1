"""The `tla` command line (Typer only: every command delegates to a module of tla_jobs).

Only the stdlib, typer, rich and pydantic are imported at module level, so `tla --help`,
`tla status`, `tla report` and `tla logs` start without torch or timm.

`tla NAME ...` imports only the module of NAME (:data:`MODULES`): `tla status` does not pay for
the trainer options of `tla submit` (pydantic models, about a fifth of a second a call, and
scripts and the tests call `tla status` in loops). ``from tla_jobs.cli import app`` gives the whole
application, every command registered.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> the module that registers it (`tla --help` orders and groups them: cli/root.py PANELS)
MODULES = {
    "image": "image", "submit": "submit", "resume": "submit", "eval": "evals", "export": "export",
    "checkpoints": "checkpoints", "cancel": "control", "signal": "control", "cluster": "cluster",
    "status": "status", "logs": "logs", "report": "report", "train": "train", "data": "train",
}


def load(command: str | None = None) -> None:
    """Register the command ``command`` (its module), or every command (None, or a name that is
    not one: click then lists them all in its error)."""
    names = [MODULES[command]] if command in MODULES else dict.fromkeys(MODULES.values())
    for name in names:
        importlib.import_module(f"tla_jobs.cli.{name}")


def main() -> None:
    """The `tla` entry point: the command named first on the command line, then run."""
    from tla_jobs.cli.root import main as run

    args = sys.argv[1:]
    completing = any(k.startswith("_") and k.endswith("_COMPLETE") for k in os.environ)  # shell completion
    load(None if completing or not args or args[0].startswith("-") else args[0])
    run()


def __getattr__(name: str):
    if name == "app":
        load()
        from tla_jobs.cli.root import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["app", "main"]
