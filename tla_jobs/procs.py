"""Processes told apart without trusting a PID: a PID is only a number, and the kernel hands it to a
later process once the first is gone. A process is the one tla recorded only when its start time
(field 22 of /proc/PID/stat, clock ticks since boot) and the boot match what was recorded with the
PID; a process named by a file anyone can write (a heartbeat) must also show, in its command line,
that it is the run's job. Torch-free, Linux's /proc only."""

from __future__ import annotations

import os
from pathlib import Path


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (whose parentheses may hold spaces): field 3 onwards."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError, ValueError):
        return None


def process_start(pid: int) -> int | None:
    """When the process started (clock ticks since boot); None when gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def running(pid: int) -> bool:
    """The PID names a process that has not exited (a zombie has)."""
    fields = _stat_fields(pid)
    return bool(fields) and fields[0] not in ("Z", "X")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def identity(pid: int) -> dict:
    """What tells this process apart from a later one that gets the same PID: its start time and
    the boot. Stored with every PID tla may act on later."""
    return {"pid_start": process_start(pid), "boot_id": boot_id()}


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def same_process(pid: int, recorded: dict) -> bool:
    """``pid`` is still the process whose identity() was ``recorded`` (start time and boot both match)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or not running(pid):
        return False
    start, boot = recorded.get("pid_start"), recorded.get("boot_id")
    if not isinstance(start, int) or isinstance(start, bool) or not isinstance(boot, str):
        return False
    return process_start(pid) == start and (not boot or boot == boot_id())


def names_folder(pid: int, module: str, folder: Path) -> bool:
    """The process runs ``python -m module`` on ``folder`` (submitit's controller and task processes
    name their job folder on the command line)."""
    args = cmdline(pid)
    if module not in args:
        return False
    want = os.path.realpath(folder)
    return any(os.path.realpath(a) == want for a in args if a.startswith(os.sep))


def holds_open(pid: int, folder: Path) -> bool:
    """The process has a file inside ``folder`` open (a trainer keeps its run's log_rank{N}.txt open for
    its whole life): what ties a process to one run where its command line names only a shared folder."""
    want = os.path.realpath(folder) + os.sep
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}").startswith(want):
                return True
        except OSError:
            continue
    return False
