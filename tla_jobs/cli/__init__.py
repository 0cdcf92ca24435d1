"""The `tla` command line (Typer only: every command delegates to a module of tla_jobs).

Only the stdlib, typer, rich and pydantic are imported at module level, so `tla --help`,
`tla status`, `tla report` and `tla logs` start without torch or timm.
"""

from tla_jobs.cli import image, jobs, status, train  # noqa: F401  (they register their commands)
from tla_jobs.cli.app import app, main

__all__ = ["app", "main"]
