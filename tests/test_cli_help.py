"""`tla --help`: the commands in panels, in the order a user meets them in a run's life."""

from __future__ import annotations

import re

from conftest import run_tla

from tla_jobs.cli import MODULES
from tla_jobs.cli.root import PANELS


def test_help_lists_every_command_in_its_panel_in_a_runs_order():
    out = run_tla("--help", check=True, env={"COLUMNS": "100"}).stdout
    # the panels' titles and the commands under each, as the help shows them
    shown: dict[str, list[str]] = {}
    panel = None
    for line in out.splitlines():
        title = re.match(r"╭─ (.+?) ─", line)
        if title:
            panel = title.group(1)
            shown[panel] = []
        elif panel and (row := re.match(r"│ ([a-z][a-z-]*)\s{2,}\S", line)):
            shown[panel].append(row.group(1))
    shown.pop("Options", None)
    assert list(shown) == ["Run", "Watch", "Set up"], out
    assert shown == {panel: list(names) for panel, names in PANELS.items()}, out
    assert sorted(sum(shown.values(), [])) == sorted(MODULES), "every command is in a panel"
