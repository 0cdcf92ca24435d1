"""`tla report`: one row per run (or per model and arm) as a table, Markdown, CSV or JSON, and a plot."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.table import Table

from tla_jobs.cli.app import app, guard
from tla_jobs.cli.show import MARK, console, refuse_damage, run_paths
from tla_jobs.errors import TlaError


@app.command("report")
@guard
def report(
    runs: list[str] = typer.Argument(None, help="Runs (default: all)."),
    fmt: str = typer.Option("table", "--format", help="table, md, csv or json."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of val top-1 per epoch for these runs."),
    paper: bool = typer.Option(False, "--paper", help="Add the paper's ImageNet top-1 for the model and arm."),
    output: Path = typer.Option(None, "--output", "-o", help="Write the report to this file too."),
    sweep: str = typer.Option(None, "--sweep", help="Only the runs of this sweep (`tla submit sweep --name`)."),
    by_arm: bool = typer.Option(False, "--by-arm", help="One row per model and mixing arm: mean ± std over its "
                                "runs (seeds); the plot shows each arm's mean curve."),
) -> None:
    """One row per run: model, mixing, epochs, best/last top-1/top-5, eval-job results, GPU-hours."""
    from tla_jobs.jobs import records
    from tla_jobs.jobs import report as R
    from tla_jobs.jobs.state import collect

    if fmt not in ("table", "md", "csv", "json"):
        raise TlaError(f"--format must be table, md, csv or json, not {fmt!r}")
    for flag, path in (("--output", output), ("--plot", plot)):
        if path is not None and path.is_dir():
            raise TlaError(f"{flag} {path} is a directory: give a file name")
    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise TlaError(f"--plot {plot}: the file name must end in .png, .pdf, .svg or .jpg")
    paths = run_paths(runs)
    if sweep is not None:
        paths = records.sweep_runs(sweep, paths)
    statuses = collect(paths)
    table = R.rows(statuses, paper=paper)
    if fmt in ("table", "md"):  # for people: the damaged runs marked (stderr says what is wrong)
        for row, st in zip(table, statuses):
            if st.problems:
                row["run"] = f"{row['run']} {MARK}"
    if by_arm:
        table = R.grouped(table)
        if fmt in ("table", "md"):
            table = R.with_std(table)
    if fmt == "table":
        t = Table()
        cols = list(table[0].keys()) if table else R.COLUMNS
        for c in cols:
            t.add_column(c)
        for r in table:
            t.add_row(*[R.fmt(r[c]) for c in cols])
        console.print(t)
        text = R.as_markdown(table)
    else:
        text = {"md": R.as_markdown, "csv": R.as_csv, "json": R.as_json}[fmt](table)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if output:
        from tla_jobs.fsutil import atomic_write_text

        atomic_write_text(output, text)
    if plot:
        out = R.plot(statuses, plot, by_arm=by_arm)
        console.print(f"plot: {out.resolve()}")
    refuse_damage(statuses)


