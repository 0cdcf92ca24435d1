"""The one way `tla` runs a command and reads its answer (sinfo, sacct, squeue, scancel, podman, git)."""

from __future__ import annotations

import shutil
import subprocess

TIMED_OUT = 124  # the exit status of coreutils' `timeout`: with say_timeout, a command that did not answer


def run(cmd: list[str], timeout: float = 30, say_timeout: bool = False) -> subprocess.CompletedProcess | None:
    """The finished command (text output captured); None when the program is not installed, cannot
    start, or does not answer within ``timeout`` seconds (with ``say_timeout``, that last one is a
    result with returncode TIMED_OUT). A non-zero exit is the caller's to judge."""
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, TIMED_OUT, "", f"no answer within {timeout:g} s") \
            if say_timeout else None
    except (OSError, subprocess.SubprocessError):
        return None

