"""`tla checkpoints`: every run's checkpoints in one table, and pruning them (tla_jobs/checkpoint_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from tla_jobs.cli.app import app, guard
from tla_jobs.cli.show import console, fmt, run_paths
from tla_jobs.errors import ChecksFailed

ckpt_app = typer.Typer(help="Every run's checkpoints in one table (or --run / --sweep), and pruning the periodic ones.",
                       no_args_is_help=False, invoke_without_command=True)
app.add_typer(ckpt_app, name="checkpoints")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _verified(row: dict) -> str:
    if not row["sidecar"]:
        return "no sidecar"
    return {True: "ok", False: "DAMAGED", None: "not checked"}[row["verified"]]


def _show(rows: list[dict], per_run: dict[str, dict], overall: dict) -> None:
    table = Table(show_lines=False)
    for col in ("run", "which", "epoch", "acc1", "acc5", "ema", "size", "sha256", "path"):
        table.add_column(col, justify="right" if col in ("epoch", "acc1", "acc5", "size") else "left")
    for r in rows:
        which = f"epoch {r['epoch']}" if r["which"] == "epoch" else r["which"]
        table.add_row(r["run"], which, fmt(r["epoch"], "d"), fmt(r["acc1"]), fmt(r["acc5"]),
                      "yes" if r["ema"] else "", _size(r["bytes"]), _verified(r), r["path"])
    console.print(table)
    for run, t in per_run.items():
        console.print(f"{run}: {t['count']} checkpoint(s), {_size(t['bytes'])}")
    console.print(f"total: {overall['count']} checkpoint(s) in {len(per_run)} run(s), {_size(overall['bytes'])}")


@ckpt_app.callback()
def checkpoints(
    ctx: typer.Context,
    runs: list[str] = typer.Option(None, "--run", "-r", help="Only this run (repeatable); default: every run."),
    sweep: str = typer.Option(None, "--sweep", help="Only the runs of this sweep (`tla submit sweep --name`)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every file against its sha256 sidecar (reads "
                                "them whole)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows and totals as JSON."),
) -> None:
    """Which checkpoints every run keeps: best / last / prev / epoch N (and whether EMA weights are
    inside), epoch, top-1/top-5 where logged, size, sha256 checked or not, path; totals per run."""
    if ctx.invoked_subcommand is not None:
        return
    _list(runs, sweep, verify, as_json)


@guard
def _list(runs, sweep, verify, as_json) -> None:
    from tla_jobs.checkpoint_files import list_checkpoints, totals
    from tla_jobs.jobs import records

    paths = run_paths(runs)
    if sweep is not None:
        paths = records.sweep_runs(sweep, paths)
    per_path = {p: list_checkpoints(p, verify=verify) for p in paths}
    rows = [r for rs in per_path.values() for r in rs]
    per_run = {p.name: totals(rs) for p, rs in per_path.items() if rs}
    overall = totals(rows)
    if as_json:
        typer.echo(json.dumps({"checkpoints": rows, "runs": per_run, "total": overall}))
    else:
        _show(rows, per_run, overall)
    if overall["damaged"]:
        raise ChecksFailed(f"{overall['damaged']} checkpoint(s) do not match their sha256 sidecar (marked DAMAGED)")


@ckpt_app.command("prune")
@guard
def prune(
    run: str = typer.Argument(..., help="The run (name or directory)."),
    keep_last: int = typer.Option(..., "--keep-last", min=1, help="Keep the newest N periodic checkpoint_epoch "
                                  "files."),
    keep_best: int = typer.Option(0, "--keep-best", min=0, help="Keep also the K periodic ones of highest top-1."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print what was (or would be) removed as JSON."),
) -> None:
    """Remove periodic checkpoints beyond a keep-last / keep-best policy (never the last, previous or
    best checkpoint, nor the one a new attempt would resume from)."""
    from tla_jobs.checkpoint_files import prune as do_prune
    from tla_jobs.jobs import records

    out = do_prune(records.resolve(run), keep_last, keep_best, dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps(out))
        return
    verb = "would remove" if dry_run else "removed"
    for r in out["removed"]:
        console.print(f"{verb} {Path(r['path']).name} (epoch {r['epoch']}, acc1 {fmt(r['acc1'])}, "
                      f"{_size(r['bytes'])})")
    console.print(f"{out['run']}: {verb} {len(out['removed'])} checkpoint(s), {_size(out['bytes'])}; "
                  f"kept {len(out['kept'])}" + (f" (resume from {out['resume']})" if out["resume"] else ""))
