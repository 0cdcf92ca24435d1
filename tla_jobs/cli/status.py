"""`tla status`, `tla logs`, `tla report`, `tla cluster check`: read-only, fast, no torch."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from tla_jobs.cli.app import app, guard
from tla_jobs.errors import TlaError

# Piped output (scripts, CI logs) gets a wide table instead of rich's 80-column default.
console = Console(width=None if Console().is_terminal else 220)
cluster_app = typer.Typer(help="Check a cluster profile against the cluster.", no_args_is_help=True)
app.add_typer(cluster_app, name="cluster")
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "STOPPED",
         "UNKNOWN", "NOT SUBMITTED", "BOOT_FAIL", "DEADLINE", "DAMAGED"}
STYLE = {"COMPLETED": "green", "RUNNING": "cyan", "PENDING": "yellow", "REQUEUED": "yellow", "FAILED": "red",
         "CANCELLED": "magenta", "TIMEOUT": "red", "STOPPED": "magenta", "DAMAGED": "red"}
MARK = "!"  # after a run's name: one of its files is damaged (the last event says which)


HIDE_AFTER_DAYS = 14  # `tla status` without --all leaves out runs that ended longer ago


def _last_activity(st) -> float:
    return max((st.heartbeat or {}).get("time", 0), st.record.get("created", 0),
               *(s.get("submitted", 0) for s in st.record.get("submissions", [])))


def _paths(runs: list[str] | None, all_runs: bool) -> list[Path]:
    from tla_jobs.jobs import records

    if runs:
        return [records.resolve(r) for r in runs]
    root = records.runs_root()
    if root.exists() and not root.is_dir():
        raise TlaError(f"the runs root {root} is a file, not a directory (set $TLA_RUNS to a folder)")
    return records.all_runs()


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def _eta(seconds) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds > 1e9:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _max_attempts(st) -> str:
    prof = st.record.get("profile", {})
    if prof.get("executor") == "slurm":
        s = prof.get("slurm", {})
        return str(1 + s.get("max_requeue_timeout", 3) + s.get("max_requeue_preempt", 20))
    return "6"  # submitit's local controller restarts a requeued task up to 6 times


def _evals_cell(st) -> str:
    """The run's eval jobs in a few characters: '-' (none), '2 ok', '1 ok, 1 FAILED', '1 running'."""
    if not st.evals:
        return "-"
    counts: dict[str, int] = {}
    for ev in st.evals:
        key = "ok" if ev.state == "COMPLETED" else "running" if ev.state in ("RUNNING", "PENDING", "REQUEUED") \
            else ev.state
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {k}" for k, n in counts.items())


def _table(statuses) -> Table:
    t = Table(title=None, show_lines=False)
    narrow = console.width < 140  # a laptop terminal: the least needed columns go
    cols = ("run", "state", "attempt", "epoch", "best top-1", "last top-1", "ETA", "evals", "GPU-h", "source",
            "last event")
    keep = [c for c in cols if not (narrow and c in ("source", "last event", "GPU-h"))]
    for col in keep:
        t.add_column(col, no_wrap=col in ("run", "state", "epoch", "attempt"))
    for st in statuses:
        style = STYLE.get(st.state, "")
        _ = st.progress  # may read metrics.jsonl: its damage must be known before the name is marked
        event = st.last_event
        if st.problems and st.state != "DAMAGED":
            event = f"damaged: {'; '.join(st.problems)} | {event}"
        name = escape(st.name + (f" {MARK}" if st.problems else ""))
        state = st.state + (" (waiting for ranks)" if getattr(st, "waiting_for_ranks", False) else "")
        evals = _evals_cell(st)
        if any(ev.state not in ("COMPLETED", "RUNNING", "PENDING", "REQUEUED") for ev in st.evals):
            evals = f"[red]{escape(evals)}[/]"
        cells = dict(zip(cols, [name, f"[{style}]{state}[/]" if style else state,
                                f"{len(st.attempts)}/{_max_attempts(st)}", f"{st.epoch}/{st.spec.get('epochs', '?')}",
                                _fmt(st.best_acc1), _fmt(st.last_acc1), _eta(st.eta_s()), evals,
                                f"{st.gpu_hours:.2f}", st.source, escape(event)]))
        t.add_row(*(cells[c] for c in keep))
    return t


def _status_json(st) -> dict:
    return {
        "run": st.name, "path": str(st.path), "state": st.state, "source": st.source,
        "attempts": [{"start": a["start"], "end": a["end"], "outcome": a.get("outcome"), "job": a.get("job"),
                      "restart_count": a.get("restart_count")} for a in st.attempts],
        "evals": [vars(ev) for ev in st.evals], "waiting_for_ranks": st.waiting_for_ranks,
        "jobs": [vars(j) for j in st.jobs], "epoch": st.epoch, "epochs": st.spec.get("epochs"),
        "best_acc1": st.best_acc1, "last_acc1": st.last_acc1, "gpu_hours": st.gpu_hours, "eta_s": st.eta_s(),
        "heartbeat": st.heartbeat, "last_event": st.last_event,
        "job_ids": [s["job_id"] for s in st.record.get("submissions", [])],
        "problems": st.problems,
    }


def _damage_line(statuses) -> str | None:
    """One line naming every run with a damaged file (the caller exits non-zero after its output)."""
    bad = [st for st in statuses if st.problems]
    if not bad:
        return None
    shown = "; ".join(f"{st.name}: {', '.join(st.problems)}" for st in bad[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    return f"damaged files in {len(bad)} run(s) ({shown}{more}); the other runs are shown as usual"


def _throughput(figures: dict) -> str:
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


def _detail(st) -> None:
    if st.state != "DAMAGED":
        _ = st.metrics  # read now, so that a damaged metrics.jsonl is said too
    console.print(_table([st]))
    for problem in st.problems:
        console.print(f"[red]damaged[/]: {escape(problem)} (in {st.path})", highlight=False)
    if st.state == "DAMAGED":
        return
    t = Table(title=f"attempts of {st.name}")
    for col in ("#", "job", "restart", "host", "started", "checkpoint loaded", "ended because", "epoch reached",
                "step"):
        t.add_column(col)
    for i, a in enumerate(st.attempts, 1):
        s, e = a["start"], a["end"] or {}
        res = s.get("resumed_from") or {}
        loaded = f"{Path(res['path']).name} (epoch {res.get('epoch')}, step {res.get('step')})" if res else "-"
        t.add_row(str(i), str(s.get("job_id", "")), str(a.get("restart_count", s.get("restart_count", ""))),
                  str(s.get("host", "")), time.strftime("%m-%d %H:%M:%S", time.localtime(s.get("time", 0))), loaded,
                  escape(str(a.get("outcome") or e.get("reason", "-"))),
                  str(e.get("epoch", "-")), str(e.get("global_step", "-")))
    console.print(t)
    if st.evals:
        ev_table = Table(title=f"eval jobs of {st.name}")
        for col in ("eval", "job", "checkpoint", "state", "top-1", "top-5", "error"):
            ev_table.add_column(col)
        for ev in st.evals:
            state = f"[{STYLE.get(ev.state, '')}]{ev.state}[/]" if STYLE.get(ev.state) else ev.state
            ev_table.add_row(escape(ev.eval_id), ev.job_id, escape(Path(ev.checkpoint).name), state, _fmt(ev.acc1),
                             _fmt(ev.acc5), escape(ev.error or "-"))
        console.print(ev_table)
    if st.jobs:
        j = Table(title=f"scheduler records ({st.source})")
        for col in ("job", "state", "exit", "start", "end", "elapsed", "GPUs", "nodes", "reason"):
            j.add_column(col)
        for r in st.jobs:
            j.add_row(r.job_id, r.state, r.exit_code, r.start, r.end, str(r.elapsed_s), str(r.gpus), r.nodes,
                      r.reason)
        console.print(j)
    if st.heartbeat and st.heartbeat.get("phase") == "waiting for ranks":
        hb = st.heartbeat
        console.print(f"heartbeat {time.time() - hb.get('time', 0):.0f}s ago: rank 0 on {hb.get('host')} (job "
                      f"{hb.get('job_id')}) is waiting for ranks: {hb.get('world_size')} expected", highlight=False)
    elif st.heartbeat:
        hb = st.heartbeat
        age = time.time() - hb.get("time", 0)
        console.print(f"heartbeat {age:.0f}s ago: {hb.get('phase')} epoch {hb.get('epoch')}/{hb.get('epochs')} "
                      f"step {hb.get('step')}/{hb.get('steps_per_epoch')} on {hb.get('host')} "
                      f"(job {hb.get('job_id')}), loss {hb.get('train_loss', 0):.4f}, "
                      f"{_throughput(hb)}", highlight=False)
    last = st.metrics[-1] if st.metrics else None
    if last and last.get("images_per_s"):
        console.print(f"last epoch ({last.get('epoch', 0) + 1}): {_throughput(last)}"
                      + (f", mean |w - λ| {last['w_shift']:.3f}" if last.get("w_shift") is not None else ""),
                      highlight=False)


@app.command("status")
@guard
def status(
    runs: list[str] = typer.Argument(None, help="Runs to show (default: every run under the runs root)."),
    watch: bool = typer.Option(False, "--watch", help="Refresh every 2 s until every run shown has ended."),
    all_runs: bool = typer.Option(False, "--all", help=f"Also runs that ended over {HIDE_AFTER_DAYS} days ago."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """A table of runs (state from one sacct call, squeue or the trainer's heartbeat); one run: its attempts."""
    from tla_jobs.jobs.state import collect

    paths = _paths(runs, all_runs)
    statuses = collect(paths)
    hidden = 0
    if not runs and not all_runs:
        cutoff = time.time() - HIDE_AFTER_DAYS * 86400
        shown = [st for st in statuses if st.state not in FINAL or st.problems or _last_activity(st) >= cutoff]
        hidden, statuses = len(statuses) - len(shown), shown
        paths = [st.path for st in statuses]
    if as_json:
        if not runs or len(statuses) != 1 or statuses[0].state != "DAMAGED":
            _ = [st.metrics for st in statuses if runs and st.state != "DAMAGED"]  # named runs: metrics checked too
        typer.echo(json.dumps([_status_json(s) for s in statuses], default=str, indent=2))
        _refuse_damage(statuses)
        return
    if not statuses:
        from tla_jobs.jobs.records import runs_root

        console.print(f"no runs under {runs_root()}" + (f" but {hidden} that ended long ago (--all)" if hidden else ""))
        return
    if watch:
        with Live(_table(statuses), console=console, refresh_per_second=1) as live:
            while not all(s.state in FINAL for s in statuses):
                time.sleep(2)
                statuses = collect(paths)
                live.update(_table(statuses))
        _refuse_damage(statuses)
        return
    if runs and len(statuses) == 1:
        _detail(statuses[0])
    else:
        console.print(_table(statuses))
    if hidden:
        console.print(f"{hidden} run(s) that ended over {HIDE_AFTER_DAYS} days ago are not shown (--all shows them)")
    _refuse_damage(statuses)


def _refuse_damage(statuses) -> None:
    """After the output: exit non-zero with one line on stderr when a run shown has a damaged file."""
    line = _damage_line(statuses)
    if line:
        sys.stdout.flush()
        raise TlaError(line)


def follow_run(run_dir: Path) -> int:
    """Progress bars from the heartbeat until the run ends; returns 0 if it completed."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tla_jobs.jobs import damage
    from tla_jobs.jobs.state import collect

    st = collect([run_dir])[0]
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[info]}"), console=console, transient=False) as bar:
        epochs = bar.add_task("epochs", total=st.spec.get("epochs"), info="")
        steps = bar.add_task("steps ", total=None, info="waiting for the job to start")
        while True:
            st = collect([run_dir])[0]
            hb = damage.heartbeat(run_dir)[0] or {}
            if hb:
                bar.update(epochs, completed=st.epoch,
                           info=f"best top-1 {_fmt(st.best_acc1)}  last {_fmt(st.last_acc1)}")
                total = hb.get("steps_per_epoch")
                if hb.get("phase") == "training" and hb.get("step", 0) > 0:
                    info = (f"{hb.get('phase')} loss {hb.get('train_loss', 0):.3f}  "
                            f"{_throughput(hb)}  [{st.state}]")
                else:  # evaluating, finished, stopped: no step-level figures to show
                    info = f"{hb.get('phase')}  [{st.state}]"
                done = total if hb.get("phase") == "finished" else hb.get("step", 0)
                bar.update(steps, completed=done, total=total, info=info)
            if st.state in FINAL:
                break
            time.sleep(1)
    color = STYLE.get(st.state, "")
    console.print(f"{st.name}: [{color}]{st.state}[/]  best top-1 {_fmt(st.best_acc1)}  ({st.last_event})")
    return 0 if st.state == "COMPLETED" else 1


@app.command("logs")
@guard
def logs(
    run: str = typer.Argument(..., help="Run name or directory."),
    rank: int = typer.Option(None, "--rank", min=0, help="Only this rank (default: all ranks merged)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the run ends."),
    errors: bool = typer.Option(False, "--errors", help="Only the lines that explain a failure."),
) -> None:
    """The run's logs: the trainer's per-rank logs and submitit's per-task stdout/stderr."""
    from tla_jobs.jobs import damage, records
    from tla_jobs.jobs import logs as L

    run_dir = records.resolve(run)
    L.check_rank(run_dir, rank)
    problem = damage.record(run_dir)[1]
    if errors:
        lines = L.error_lines(run_dir, rank)
        if not lines:
            console.print("no error lines found", style="green")
        for line in lines:
            print(line)
        _refuse_damaged_record(run_dir, problem)
        return
    shown = 0
    while True:
        lines = L.merged(run_dir, rank)
        for line in lines[shown:]:
            print(line)
        shown = len(lines)
        sys.stdout.flush()
        if not follow or problem:
            _refuse_damaged_record(run_dir, problem)
            return
        from tla_jobs.jobs.state import collect

        if collect([run_dir])[0].state in FINAL:
            return
        time.sleep(1)


def _refuse_damaged_record(run_dir: Path, problem: str | None) -> None:
    if problem:
        sys.stdout.flush()
        raise TlaError(f"run {run_dir.name} is damaged: {problem}; only the trainer's own logs are shown")


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
    from tla_jobs.jobs import report as R
    from tla_jobs.jobs.state import collect

    if fmt not in ("table", "md", "csv", "json"):
        raise TlaError(f"--format must be table, md, csv or json, not {fmt!r}")
    for flag, path in (("--output", output), ("--plot", plot)):
        if path is not None and path.is_dir():
            raise TlaError(f"{flag} {path} is a directory: give a file name")
    if plot is not None and plot.suffix.lower() not in (".png", ".pdf", ".svg", ".jpg", ".jpeg"):
        raise TlaError(f"--plot {plot}: the file name must end in .png, .pdf, .svg or .jpg")
    statuses = collect(_paths(runs, True))
    if sweep is not None:
        statuses = [st for st in statuses if st.record.get("sweep") == sweep]
        if not statuses:
            raise TlaError(f"no runs of a sweep named {sweep!r}")
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
            t.add_row(*[R._fmt(r[c]) for c in cols])
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
    _refuse_damage(statuses)


@cluster_app.command("check")
@guard
def cluster_check(
    profile: str = typer.Argument("local", help="Profile name or YAML path."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Is the profile valid, and does the cluster answer (sinfo, sacct, partition limits, image,
    shared folders writable)?"""
    import os

    from tla_jobs.jobs import profiles, records
    from tla_jobs.jobs.submit import Check, slurm_checks

    prof = profiles.load(profile)
    checks = [Check("profile", True, f"{prof.name}: {prof.executor}")]
    root = records.runs_root(prof.runs_root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        ok = os.access(root, os.W_OK)
    except OSError:
        ok = False
    checks.append(Check("runs root", ok, f"{root} {'writable' if ok else 'not writable'}"))
    if prof.executor == "slurm":
        checks += slurm_checks(prof)
    if as_json:
        typer.echo(json.dumps([vars(c) for c in checks]))
    else:
        for c in checks:
            console.print(f"  {c.label}  {c.name}: {c.detail}", highlight=False)
    if not all(c.ok for c in checks):
        raise typer.Exit(1)
