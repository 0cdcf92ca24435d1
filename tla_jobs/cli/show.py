"""What the read-only commands share: the console, state colours, number formats, the runs to show,
and the one line that ends a listing with a damaged run in it."""

from __future__ import annotations

import math
import sys
from pathlib import Path

from rich.console import Console

from tla_jobs.errors import ChecksFailed, TlaError

# Piped output (scripts, CI logs) gets a wide table instead of rich's 80-column default.
console = Console(width=None if Console().is_terminal else 220)
STYLE = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "REQUEUED": "yellow", "FAILED": "red",
         "CANCELLED": "magenta", "TIMEOUT": "red", "STOPPED": "magenta", "DAMAGED": "red"}
MARK = "!"  # after a run's name: one of its files is damaged (the last event says which)


def run_paths(runs: list[str] | None) -> list[Path]:
    """The runs named, or every run under the runs roots."""
    from tla_jobs.jobs import records

    if runs:
        return [records.resolve(r) for r in runs]
    root = records.runs_root()
    if root.exists() and not root.is_dir():
        raise TlaError(f"the runs root {root} is a file, not a directory (set $TLA_RUNS to a folder)")
    return records.all_runs()


def fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def eta(seconds) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds > 1e9:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def throughput(figures: dict) -> str:
    """images/s (per device when several), TFLOP/s and MFU per device, as the trainer reports them."""
    ips = figures.get("images_per_s") or 0
    text = f"{ips:.0f} img/s"
    per = figures.get("images_per_s_per_device")
    if per and abs(per - ips) > 0.5:
        text += f" ({per:.0f} per device)"
    if figures.get("tflops_per_device"):
        text += f", {figures['tflops_per_device']:.1f} TFLOP/s per device"
    if figures.get("mfu"):
        text += f", MFU {100 * figures['mfu']:.1f}%"
    return text


def _damage_line(statuses) -> str | None:
    """One line naming every run with a damaged file (the caller exits non-zero after its output)."""
    bad = [st for st in statuses if st.problems]
    if not bad:
        return None
    shown = "; ".join(f"{st.name}: {', '.join(st.problems)}" for st in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"damaged files in {len(bad)} run(s) ({shown}{more}); the other runs are shown as usual"


def refuse_damage(statuses) -> None:
    """After the output: exit non-zero with one line on stderr when a run shown has a damaged file."""
    line = _damage_line(statuses)
    if line:
        sys.stdout.flush()
        raise ChecksFailed(line)


