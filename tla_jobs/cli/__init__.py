"""The `tla` command line (Typer only: every command delegates to a module of tla_jobs).

Only the stdlib, typer, rich and pydantic are imported at module level, so `tla --help`,
`tla status`, `tla report` and `tla logs` start without torch or timm.
"""

# They register their commands; the order here is the order of `tla --help`.
from tla_jobs.cli import image, submit, evals, export, checkpoints, control, cluster, status, logs, report, train  # noqa: F401, I001
from tla_jobs.cli.app import app, main

__all__ = ["app", "main"]
