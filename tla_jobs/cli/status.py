"""`tla status`: a table of runs (state from one sacct call, squeue, the process table or the
trainer's heartbeat), or one run's attempts, eval jobs and scheduler records; and the progress
display of `--follow`."""

from __future__ import annotations

import gc
import re
import time
from datetime import datetime
from pathlib import Path

import typer
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from tla_jobs.cli.root import app, guard
from tla_jobs.cli.show import MARK, STYLE, console, eta, fmt, refuse_damage, run_paths, throughput
from tla_jobs.errors import TlaError
from tla_jobs.jobs.scheduler import ACTIVE, FINAL

HIDE_AFTER_DAYS = 14  # `tla status` without --all leaves out runs that ended longer ago
MAX_ATTEMPT_ROWS = 50  # `tla status RUN` shows the newest attempts (--json: all of them)
DEFAULT_LIMIT = 50  # the table shows this many of the most recent runs (and says how many more there are)


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
    cols = ("run", "state", "attempt", "epoch", "best_acc1", "last_acc1", "ETA", "evals", "GPU-h", "source",
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
                                f"{st.gpu_hours:.2f}", escape(st.source), escape(event)]))
        t.add_row(*(cells[c] for c in keep))
    return t


def _detail(st) -> None:
    if st.state != "DAMAGED":
        _ = st.metrics  # read now, so that a damaged metrics.jsonl is said too
    console.print(_table([st]))
    ema = st.progress.get("best_ema") if st.state != "DAMAGED" else None
    if ema:  # runs with --model-ema: DeiT reports the EMA weights' accuracy beside the model's
        last = (st.progress.get("last") or {}).get("ema_acc1")
        console.print(f"EMA weights: best_acc1 {fmt(ema.get('ema_acc1'))} (epoch {ema.get('epoch')}), "
                      f"last_acc1 {fmt(last)}", highlight=False)
    for problem in st.problems:
        console.print(f"[red]damaged[/]: {escape(problem)} (in {escape(str(st.path))})", highlight=False)
    if st.state == "DAMAGED":
        return
    t = Table(title=f"attempts of {escape(st.name)}")
    for col in ("#", "job", "restart", "host", "ranks", "started", "checkpoint loaded", "ended because",
                "epoch reached", "step"):
        t.add_column(col)
    first = max(0, len(st.attempts) - MAX_ATTEMPT_ROWS)  # a requeue loop can leave thousands: the newest
    for i, a in enumerate(st.attempts[first:], first + 1):
        s, e = a["start"], a["end"] or {}
        res = s.get("resumed_from") or {}
        loaded = f"{Path(res['path']).name} (epoch {res.get('epoch')}, step {res.get('step')})" if res else "-"
        t.add_row(*(escape(str(v)) for v in (  # every cell from attempts.jsonl is text, never markup
            i, s.get("job_id", ""), a.get("restart_count", s.get("restart_count", "")), s.get("host", ""),
            s.get("world_size", "-"), time.strftime("%m-%d %H:%M:%S", time.localtime(s.get("time", 0))), loaded,
            a.get("outcome") or e.get("reason", "-"), e.get("epoch", "-"), e.get("global_step", "-"))))
    console.print(t)
    if first:
        console.print(f"({first} earlier attempt(s) not shown; `tla status {escape(st.name)} --json` has every one)",
                      highlight=False)
    if st.evals:
        ev_table = Table(title=f"eval jobs of {escape(st.name)}")
        for col in ("eval", "job", "which", "checkpoint", "epoch", "sha256", "state", "acc1", "acc5", "error"):
            ev_table.add_column(col, no_wrap=col in ("eval", "which", "sha256"))
        for ev in st.evals:
            state = f"[{STYLE.get(ev.state, '')}]{ev.state}[/]" if STYLE.get(ev.state) else ev.state
            which = ev.which + (" (EMA)" if ev.weights == "ema" and ev.which != "ema" else "")
            ev_table.add_row(escape(ev.eval_id), escape(ev.job_id), escape(which), escape(Path(ev.checkpoint).name),
                             "-" if ev.epoch is None else str(ev.epoch), (ev.sha256 or "-")[:12], state,
                             fmt(ev.acc1), fmt(ev.acc5), escape(ev.error or "-"))
        console.print(ev_table)
    if st.jobs:
        j = Table(title=f"scheduler records ({escape(st.source)})")
        for col in ("job", "state", "exit", "start", "end", "elapsed", "GPUs", "nodes", "reason"):
            j.add_column(col)
        for r in st.jobs:
            j.add_row(*(escape(str(v)) for v in (r.job_id, r.state, r.exit_code, r.start, r.end, r.elapsed_s, r.gpus,
                                                 r.nodes, r.reason)))
        console.print(j)
    if st.heartbeat and st.heartbeat.get("phase") == "waiting for ranks":
        hb = st.heartbeat
        console.print(f"heartbeat {time.time() - hb.get('time', 0):.0f}s ago: rank 0 on {hb.get('host')} (job "
                      f"{hb.get('job_id')}) is waiting for ranks: {hb.get('world_size')} expected", highlight=False,
                      markup=False)
    elif st.heartbeat and st.heartbeat.get("phase") == "staging":  # --stage-data (last_event says how far)
        hb = st.heartbeat
        console.print(f"heartbeat {time.time() - hb.get('time', 0):.0f}s ago: rank 0 on {hb.get('host')} (job "
                      f"{hb.get('job_id')}): {st.last_event}", highlight=False, markup=False)
    elif st.heartbeat:
        hb = st.heartbeat
        age = time.time() - hb.get("time", 0)
        console.print(f"heartbeat {age:.0f}s ago: {hb.get('phase')} epoch {hb.get('epoch')}/{hb.get('epochs')} "
                      f"step {hb.get('step')}/{hb.get('steps_per_epoch')} on {hb.get('host')} "
                      f"(job {hb.get('job_id')}), loss {hb.get('train_loss', 0):.4f}, "
                      f"{throughput(hb)}", highlight=False, markup=False)
    last = st.metrics[-1] if st.metrics else None
    if isinstance(wait := (st.heartbeat or {}).get("data_wait", (last or {}).get("data_wait")), float) and wait >= 0.1:
        console.print(f"waiting for data {wait:.0%} of the time: more --workers or --data-device cuda")
    if last and last.get("images_per_s"):
        console.print(f"last epoch ({last.get('epoch', 0) + 1}): {throughput(last)}"
                      + (f", mean |w - λ| {last['w_shift']:.3f}" if last.get("w_shift") is not None else ""),
                      highlight=False, markup=False)


@app.command("status")
@guard
def status(
    runs: list[str] = typer.Argument(
        None, help="Runs to show, by name or directory; a sweep's name shows every run of the sweep (a run of "
                   "that name wins). Default: every run under the runs roots."),
    watch: bool = typer.Option(
        False, "--watch", help="Refresh every 2 s until every run shown has ended; into a pipe or a file: one "
                               "timestamped line per run whenever its state or epoch changes."),
    all_runs: bool = typer.Option(
        False, "--all", help=f"Every run: also those that ended over {HIDE_AFTER_DAYS} days ago, and the table "
                             "without a --limit."),
    limit: int = typer.Option(
        None, "--limit", min=0, help=f"Only the N most recent runs (default: {DEFAULT_LIMIT} in the table, every run "
                                     "with --json or runs named); 0: no limit."),
    since: str = typer.Option(
        None, "--since", help="Only runs active since then (created, submitted or heartbeat): an age (30m, 2h, 3d, "
                              "1w) or a date (2026-11-20, 2026-11-20T14:00, local time); instead of the "
                              f"{HIDE_AFTER_DAYS}-day rule."),
    states: list[str] = typer.Option(
        None, "--state", help="Only runs in these states, comma-separated (RUNNING,FAILED; any case; may be "
                              "repeated)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output: a JSON list, one run a line."),
) -> None:
    """A table of runs (state from one sacct call, squeue or the trainer's heartbeat), most recent first;
    one run: its attempts."""
    # Thousands of runs are hundreds of thousands of small dicts and lists without cycles: the cyclic
    # collector would only scan them again and again (a third of the time of 10,000 runs).
    gc.disable()
    try:
        _status(runs, watch, all_runs, limit, since, states, as_json)
    finally:
        gc.enable()


def _status(runs, watch, all_runs, limit, since, states, as_json) -> None:
    from tla_jobs.jobs import records
    from tla_jobs.jobs.slurm import silent_note
    from tla_jobs.jobs.state import collect

    wanted = parse_states(states)  # a typo fails before any run is read
    after = parse_since(since) if since else None
    one_run = bool(runs) and len(runs) == 1
    if runs:
        paths: list[Path] = []
        for name in runs:
            found, is_sweep = records.run_or_sweep(name)
            one_run = one_run and not is_sweep
            paths += [p for p in found if p not in paths]
    else:
        paths = run_paths(None)
    statuses = collect(paths, cache=True)  # finished runs from their status cache (jobs/state.py)
    if after is not None:
        statuses = [st for st in statuses if st.last_activity >= after]
    if wanted:
        statuses = [st for st in statuses if st.state in wanted]
    hidden = 0
    if not runs and not all_runs and after is None:  # --since says which runs are recent enough instead
        cutoff = time.time() - HIDE_AFTER_DAYS * 86400
        shown = [st for st in statuses if st.state not in FINAL or st.problems or st.last_activity >= cutoff]
        hidden, statuses = len(statuses) - len(shown), shown
    if not runs:  # runs with a damaged file first (they need a look), then the most recent
        statuses.sort(key=lambda st: (bool(st.problems), st.last_activity), reverse=True)
    if limit is None:
        limit = 0 if as_json or runs or all_runs else DEFAULT_LIMIT
    listed = statuses[:limit] if limit else statuses
    more = len(statuses) - len(listed)
    if as_json:
        _ = [st.metrics for st in listed if runs and st.state != "DAMAGED"]  # named runs: metrics checked too
        typer.echo(json_lines([st.json_text() for st in listed]))
        refuse_damage(statuses)
        return
    filters = " ".join([f"--state {','.join(sorted(wanted))}"] * bool(wanted) + [f"--since {since}"] * bool(since))
    if not listed:
        root = records.runs_root()
        if filters:
            console.print(f"no runs match {filters} among {len(paths)} run(s)" + ("" if runs else f" under {root}"),
                          highlight=False)
        else:
            console.print(f"no runs under {root}" + (f" but {hidden} that ended long ago (--all)" if hidden else ""))
        refuse_damage(statuses)
        return
    if watch:
        paths = [st.path for st in listed]
        if console.is_terminal:
            with Live(_table(listed), console=console, refresh_per_second=1) as live:
                while not all(s.state in FINAL for s in listed):
                    time.sleep(2)
                    listed = collect(paths, cache=True)
                    live.update(_table(listed))
        else:  # a pipe or a file: rich's live display would leave nothing useful there
            listed = watch_lines(paths, listed)
        refuse_damage(listed)
        return
    if one_run and len(listed) == 1:
        _detail(listed[0])
    else:
        console.print(_table(listed))
    if note := silent_note([st.source for st in listed]):  # accounting did not answer: say so, always
        console.print(note, highlight=False)
    if more:
        which = f" that match {filters}" if filters else ""
        console.print(f"showing the {len(listed)} most recent of {len(statuses)} runs{which}; {more} more not shown "
                      "(--limit N shows N, --all every run)", highlight=False)
    if hidden:
        console.print(f"{hidden} run(s) that ended over {HIDE_AFTER_DAYS} days ago are not shown (--all shows them)")
    refuse_damage(statuses)


def json_lines(lines: list[str]) -> str:
    """A JSON list with one run a line (RunStatus.json_text): as valid as an indented one, greppable,
    and written by json's C encoder (indent= takes its pure-Python one: 0.8 s instead of 0.15 s for
    10,000 runs), or copied from a finished run's status cache as it is."""
    return "[\n" + ",\n".join(lines) + "\n]" if lines else "[]"


def parse_states(values: list[str] | None) -> set[str]:
    """--state RUNNING,FAILED (any case; NOT_SUBMITTED or not-submitted for NOT SUBMITTED) -> state names."""
    known = ACTIVE | FINAL
    out = set()
    for value in values or []:
        for part in value.split(","):
            if not part.strip():
                continue
            name = part.strip().upper()
            forms = {name, name.replace("_", " ").replace("-", " "), name.replace("-", "_").replace(" ", "_")}
            match = forms & known
            if not match:
                raise TlaError(f"--state {part.strip()!r} is not a state; one of: {', '.join(sorted(known))}")
            out |= match
    return out


SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> float:
    """--since 2h / 3d / 1w / 30m / 90s, or an ISO date or time (local time unless it says otherwise)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.strip().lower())
    if m:
        return time.time() - float(m.group(1)) * SINCE_UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise TlaError(f"--since {text!r}: give an age (30m, 2h, 3d, 1w) or a date (2026-11-20 or "
                       "2026-11-20T14:00)") from None


def watch_lines(paths: list[Path], statuses) -> list:
    """`--watch` into a pipe: one line per run at the start and whenever its state or epoch changes,
    each with the time and flushed at once; until every run has ended (the live table's rule)."""
    from tla_jobs.jobs.state import collect

    seen: dict[Path, tuple] = {}
    while True:
        for st in statuses:
            epoch = "-" if st.state == "DAMAGED" else st.epoch
            now = (st.state, epoch, st.waiting_for_ranks)
            if seen.get(st.path) != now:
                seen[st.path] = now
                state = st.state + (" (waiting for ranks)" if st.waiting_for_ranks else "")
                best = "-" if st.state == "DAMAGED" else fmt(st.best_acc1)
                print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {st.name} {state} epoch {epoch}/"
                      f"{st.spec.get('epochs', '?')} best_acc1 {best} ({st.last_event})", flush=True)
        if all(st.state in FINAL for st in statuses):
            return statuses
        time.sleep(2)
        statuses = collect(paths, cache=True)


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
                           info=f"best_acc1 {fmt(st.best_acc1)}  last_acc1 {fmt(st.last_acc1)}")
                total = hb.get("steps_per_epoch")
                if hb.get("phase") == "training" and hb.get("step", 0) > 0:
                    info = escape(f"{hb.get('phase')} loss {hb.get('train_loss', 0):.3f}  "
                                  f"{throughput(hb)}  [{st.state}]")
                else:  # evaluating, finished, stopped: no step-level figures to show
                    info = escape(f"{hb.get('phase')}  [{st.state}]")
                done = total if hb.get("phase") == "finished" else hb.get("step", 0)
                bar.update(steps, completed=done, total=total, info=info)
            if st.state in FINAL:
                break
            time.sleep(1)
    color = STYLE.get(st.state, "")
    console.print(f"{escape(st.name)}: [{color}]{st.state}[/]  best_acc1 {fmt(st.best_acc1)}  "
                  f"({escape(st.last_event)})")
    return 0 if st.state == "COMPLETED" else 1


