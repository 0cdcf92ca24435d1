"""The one way `tla` runs a command and reads its answer (sinfo, sacct, squeue, scancel, podman, git)."""

from __future__ import annotations

import shutil
import subprocess


def run(cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess | None:
    """The finished command (text output captured); None when the program is not installed, cannot
    start, or does not answer within ``timeout`` seconds. A non-zero exit is the caller's to judge."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None

