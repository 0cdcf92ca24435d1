"""`tla status`: a table of runs (state from one sacct call, squeue, the process table or the
trainer's heartbeat), or one run's attempts, eval jobs and scheduler records; and the progress
display of `--follow`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from tla_jobs.cli.app import app, guard
from tla_jobs.cli.show import MARK, STYLE, console, eta, fmt, refuse_damage, run_paths, throughput
from tla_jobs.jobs.scheduler import FINAL

HIDE_AFTER_DAYS = 14  # `tla status` without --all leaves out runs that ended longer ago


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
                                f"{len(st.attempts)}/{st.max_attempts}", f"{st.epoch}/{st.spec.get('epochs', '?')}",
                                fmt(st.best_acc1), fmt(st.last_acc1), eta(st.eta_s()), evals,
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
        for col in ("eval", "job", "which", "checkpoint", "epoch", "sha256", "state", "top-1", "top-5", "error"):
            ev_table.add_column(col, no_wrap=col in ("eval", "which", "sha256"))
        for ev in st.evals:
            state = f"[{STYLE.get(ev.state, '')}]{ev.state}[/]" if STYLE.get(ev.state) else ev.state
            which = ev.which + (" (EMA)" if ev.weights == "ema" and ev.which != "ema" else "")
            ev_table.add_row(escape(ev.eval_id), ev.job_id, escape(which), escape(Path(ev.checkpoint).name),
                             "-" if ev.epoch is None else str(ev.epoch), (ev.sha256 or "-")[:12], state,
                             fmt(ev.acc1), fmt(ev.acc5), escape(ev.error or "-"))
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
                      f"{throughput(hb)}", highlight=False)
    last = st.metrics[-1] if st.metrics else None
    if last and last.get("images_per_s"):
        console.print(f"last epoch ({last.get('epoch', 0) + 1}): {throughput(last)}"
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

    paths = run_paths(runs)
    statuses = collect(paths)
    hidden = 0
    if not runs and not all_runs:
        cutoff = time.time() - HIDE_AFTER_DAYS * 86400
        shown = [st for st in statuses if st.state not in FINAL or st.problems or st.last_activity >= cutoff]
        hidden, statuses = len(statuses) - len(shown), shown
        paths = [st.path for st in statuses]
    if as_json:
        if not runs or len(statuses) != 1 or statuses[0].state != "DAMAGED":
            _ = [st.metrics for st in statuses if runs and st.state != "DAMAGED"]  # named runs: metrics checked too
        typer.echo(json.dumps([_status_json(s) for s in statuses], default=str, indent=2))
        refuse_damage(statuses)
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
        refuse_damage(statuses)
        return
    if runs and len(statuses) == 1:
        _detail(statuses[0])
    else:
        console.print(_table(statuses))
    if hidden:
        console.print(f"{hidden} run(s) that ended over {HIDE_AFTER_DAYS} days ago are not shown (--all shows them)")
    refuse_damage(statuses)


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
                           info=f"best top-1 {fmt(st.best_acc1)}  last {fmt(st.last_acc1)}")
                total = hb.get("steps_per_epoch")
                if hb.get("phase") == "training" and hb.get("step", 0) > 0:
                    info = (f"{hb.get('phase')} loss {hb.get('train_loss', 0):.3f}  "
                            f"{throughput(hb)}  [{st.state}]")
                else:  # evaluating, finished, stopped: no step-level figures to show
                    info = f"{hb.get('phase')}  [{st.state}]"
                done = total if hb.get("phase") == "finished" else hb.get("step", 0)
                bar.update(steps, completed=done, total=total, info=info)
            if st.state in FINAL:
                break
            time.sleep(1)
    color = STYLE.get(st.state, "")
    console.print(f"{st.name}: [{color}]{st.state}[/]  best top-1 {fmt(st.best_acc1)}  ({st.last_event})")
    return 0 if st.state == "COMPLETED" else 1


