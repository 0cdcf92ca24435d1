"""`tla report`: one row per run (or per model and arm) as a table, Markdown, CSV or JSON, and a plot."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from tla_jobs.cli.root import app, guard
from tla_jobs.cli.show import MARK, console, refuse_damage, run_paths
from tla_jobs.config import CONTROL_MIXING
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
                                "runs (seeds), and each arm paired seed by seed against --against; the plot "
                                "shows each arm's mean curve."),
    against: str = typer.Option(CONTROL_MIXING, "--against", help="With --by-arm: the control arm (a mixing name) the "
                                "other arms are compared with, seed by seed."),
    metric: str = typer.Option("best_acc1", "--metric", help="With --by-arm: what the paired comparison compares: "
                               "best_acc1, last_acc1 or eval_acc1."),
) -> None:
    """One row per run: model, mixing, epochs, best/last top-1/top-5, eval-job results, GPU-hours.

    With --by-arm, one row per (model, mixing) with mean ± sample std over its seeds, then the paired
    comparison of every arm with the control arm on the seeds both ran: per-seed differences, their
    mean with a 95% confidence interval, a paired t-test and an exact sign-flip test."""
    from tla_jobs.jobs import records
    from tla_jobs.jobs import report as R
    from tla_jobs.jobs.state import collect

    if metric not in ("best_acc1", "last_acc1", "eval_acc1"):
        raise TlaError(f"--metric must be best_acc1, last_acc1 or eval_acc1, not {metric!r}")
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
    pairs: list[dict] = []
    if by_arm:
        pairs = R.paired(table, metric, against)
        table = R.grouped(table)
        table = R.with_std(table) if fmt in ("table", "md") else R.with_paired(table, pairs)
    if fmt in ("table", "md"):
        tables = [R.for_people(table)] + ([R.paired_for_people(pairs)] if pairs else [])
        text = "\n".join(R.as_markdown(t) for t in tables)
        if fmt == "table":
            for i, rows in enumerate(tables):
                t = Table(title=None if i == 0 else escape(f"paired against {against} (same model and seed), {metric}"))
                cols = list(rows[0].keys()) if rows else R.COLUMNS
                for c in cols:
                    t.add_column(escape(c))
                for r in rows:
                    t.add_row(*[escape(R.fmt(r[c])) for c in cols])  # run names, models, arms: text, not markup
                console.print(t)
        else:
            sys.stdout.write(text)
    else:
        text = {"csv": R.as_csv, "json": R.as_json}[fmt](table)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    if output:
        from tla_jobs.fsutil import atomic_write_text

        atomic_write_text(output, text)
    if plot:
        out = R.plot(statuses, plot, by_arm=by_arm)
        console.print(f"plot: {escape(str(out.resolve()))}", highlight=False)
    refuse_damage(statuses)


