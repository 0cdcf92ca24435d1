"""`tla checkpoints`: every run's checkpoints in one table, and pruning them (tla_jobs/checkpoint_files.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from tla_jobs.cli.root import app, guard
from tla_jobs.cli.show import console, fmt, run_paths
from tla_jobs.errors import ChecksFailed, TlaError


class _ListByDefault(typer.core.TyperGroup):
    """`tla checkpoints [RUNS] [--json]` lists (the `list` subcommand); `tla checkpoints prune ...`
    prunes. A click group cannot take positional run names and subcommands at once: anything that
    is not a subcommand's name (or --help) is handed to `list`."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


ckpt_app = typer.Typer(cls=_ListByDefault, no_args_is_help=False,
                       help="Every run's checkpoints in one table (`tla checkpoints [RUNS | --sweep NAME]`, the "
                            "`list` subcommand), and pruning the periodic ones (`tla checkpoints prune RUN`).")
app.add_typer(ckpt_app, name="checkpoints")


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def _verified(row: dict) -> str:
    if row.get("sidecar_problem"):
        return f"DAMAGED ({row['sidecar_problem']})"
    if not row["sidecar"]:
        return "no sidecar"
    return {True: "ok", False: "DAMAGED", None: "not checked"}[row["verified"]]


def _show(rows: list[dict], per_run: dict[str, dict], overall: dict) -> None:
    table = Table(show_lines=False)
    for col in ("run", "which", "epoch", "acc1", "acc5", "ema", "size", "sha256", "path"):
        table.add_column(col, justify="right" if col in ("epoch", "acc1", "acc5", "size") else "left")
    for r in rows:
        which = f"epoch {r['epoch']}" if r["which"] == "epoch" else r["which"]
        table.add_row(escape(r["run"]), which, fmt(r["epoch"], "d"), fmt(r["acc1"]), fmt(r["acc5"]),
                      "yes" if r["ema"] else "", _size(r["bytes"]), escape(_verified(r)), escape(r["path"]))
    console.print(table)
    for run, t in per_run.items():
        console.print(f"{run}: {t['count']} checkpoint(s), {_size(t['bytes'])}", markup=False)
    console.print(f"total: {overall['count']} checkpoint(s) in {len(per_run)} run(s), {_size(overall['bytes'])}")


@ckpt_app.command("list")
def checkpoints(
    names: list[str] = typer.Argument(None, metavar="[RUNS]...", help="Runs (names or directories, also a "
                                      "`tla train --output-dir` folder); default: every run."),
    runs: list[str] = typer.Option(None, "--run", "-r", help="Only this run (repeatable), as RUNS."),
    sweep: str = typer.Option(None, "--sweep", help="Only the runs of this sweep (`tla submit sweep --name`)."),
    verify: bool = typer.Option(False, "--verify", help="Re-hash every file against its sha256 sidecar (reads "
                                "them whole)."),
    as_json: bool = typer.Option(False, "--json", help="Print the rows and totals as JSON."),
) -> None:
    """Which checkpoints every run keeps: best / last / prev / epoch N (and whether EMA weights are
    inside), epoch, top-1/top-5 where logged, size, sha256 checked or not, path; totals per run."""
    _list([*(names or []), *(runs or [])], sweep, verify, as_json)


@guard
def _list(runs, sweep, verify, as_json) -> None:
    from tla_jobs.checkpoint_files import list_checkpoints, log_problem, totals
    from tla_jobs.jobs import records
    from tla_jobs.jobs.artifacts import as_run

    paths = [as_run(r) for r in runs] if runs else run_paths(None)
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
    logs = [f"{p.name}: {problem}" for p in paths if (problem := log_problem(p))]
    if overall["damaged"] or logs:
        said = [f"{overall['damaged']} checkpoint(s) do not match their sha256 sidecar, or their sidecar is damaged "
                "(marked DAMAGED)"] if overall["damaged"] else []
        raise ChecksFailed("; ".join(said + logs[:5]))


@ckpt_app.command("prune")
@guard
def prune(
    run: str = typer.Argument(..., help="The run (name or directory, also a `tla train --output-dir` folder)."),
    keep_last: int = typer.Option(0, "--keep-last", min=0, help="Keep the newest N periodic checkpoint_epoch "
                                  "files."),
    keep_best: int = typer.Option(0, "--keep-best", min=0, help="Keep the K periodic ones of highest top-1 (with "
                                  "--keep-last: as well)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List what would go; remove nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print what was (or would be) removed as JSON."),
) -> None:
    """Remove periodic checkpoints beyond a keep-last / keep-best policy (never the last, previous or
    best checkpoint, nor the one a new attempt would resume from, nor one a submitted eval job has yet
    to read)."""
    from tla_jobs.checkpoint_files import prune as do_prune
    from tla_jobs.jobs.artifacts import as_run

    if not keep_last and not keep_best:
        raise TlaError("say what to keep: --keep-last N and/or --keep-best K (last, prev and best always stay)")
    out = do_prune(as_run(run), keep_last, keep_best, dry_run=dry_run)
    if as_json:
        typer.echo(json.dumps(out))
        return
    verb = "would remove" if dry_run else "removed"
    for r in out["removed"]:
        console.print(f"{verb} {Path(r['path']).name} (epoch {r['epoch']}, acc1 {fmt(r['acc1'])}, "
                      f"{_size(r['bytes'])})")
    for name, eval_id in out["pinned"].items():
        console.print(f"kept {name}: eval {eval_id} has yet to read it", markup=False)
    console.print(f"{out['run']}: {verb} {len(out['removed'])} checkpoint(s), {_size(out['bytes'])}; "
                  f"kept {len(out['kept'])}" + (f" (resume from {out['resume']})" if out["resume"] else ""),
                  markup=False)
