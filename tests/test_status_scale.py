"""`tla status` over many runs: the most recent N in the table and how many more, --all, --since and
--state; the status cache of finished runs (used while their files are unchanged, never after a
change); sweeps by name in `tla status` and `tla logs`; `--watch` into a pipe. Synthetic run
directories as a finished local run leaves them (its job's process long gone), and one real run."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import FAST, TLA, assert_clean_error, runs_env, tla

from tla_jobs import rundir
from tla_jobs.rundir import metrics_summary

JOB = "4999999"  # above the largest PID Linux hands out: a local job whose process has ended
STAMP = r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}"


def make_run(root: Path, name: str, *, ago: float = 3600.0, failed: bool = False, sweep: str | None = None,
             epochs: int = 3, settle: bool = True) -> Path:
    """A finished local run whose last activity was ``ago`` seconds ago; ``settle``: its files dated
    then too (as a run that ended then has them), else written just now."""
    d = root / name
    d.mkdir(parents=True)
    end = time.time() - ago
    record = {"name": name, "created": end - 100, "spec": {"model": "tla_vit_nano", "epochs": epochs},
              "profile": {"executor": "local"}, "evals": [],
              "submissions": [{"job_id": JOB, "executor": "local", "submitted": end - 90}],
              **({"sweep": sweep} if sweep else {})}
    (d / rundir.RUN_JSON).write_text(json.dumps(record))
    done = epochs - 1 if failed else epochs
    rows = [{"epoch": e, "acc1": 50.0 + e, "acc5": 90.0, "epoch_s": 10.0} for e in range(done)]
    (d / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / rundir.HEARTBEAT).write_text(json.dumps({"phase": "stopped" if failed else "finished", "epoch": done,
                                                  "epochs": epochs, "time": end, "progress": metrics_summary(rows)}))
    who = {"job_id": JOB, "restart_count": 0, "executor": "local"}
    (d / rundir.ATTEMPTS).write_text(
        json.dumps({"event": "start", "epoch": 0, "global_step": 0, "time": end - 80, **who}) + "\n"
        + json.dumps({"event": "end", "reason": "error" if failed else "completed", "epoch": done, "time": end,
                      **who}) + "\n")
    if not failed:
        (d / rundir.SUMMARY).write_text(json.dumps({"state": "completed", "best_acc1": rows[-1]["acc1"]}))
    if settle:
        for f in d.iterdir():
            os.utime(f, (end, end))
    return d


def listed(env, *args) -> list[dict]:
    return json.loads(tla(env, "status", "--json", *args, check=True).stdout)


def names(env, *args) -> list[str]:
    return [r["run"] for r in listed(env, *args)]


# --------------------------------------------------------------------------- the table's limit, --all


@pytest.mark.slow
def test_table_shows_the_most_recent_runs_and_says_how_many_more(tmp_path):
    env = runs_env(tmp_path / "runs")
    for i in range(53):  # run52 is the most recent
        make_run(env["runs"], f"run{i:02d}", ago=3600.0 * (53 - i))
    table = tla(env, "status", check=True).stdout
    assert "run52" in table and "run03" in table and "run02" not in table and "run00" not in table
    assert "showing the 50 most recent of 53 runs; 3 more not shown (--limit N shows N, --all every run)" in table
    assert table.index("run52") < table.index("run51") < table.index("run03")  # most recent first
    small = tla(env, "status", "--limit", "2", check=True).stdout
    assert "run52" in small and "run51" in small and "run50" not in small and "51 more not shown" in small
    everything = tla(env, "status", "--all", check=True).stdout
    assert "run00" in everything and "more not shown" not in everything
    assert len(listed(env)) == 53  # --json: every run, unless --limit says otherwise
    assert names(env, "--limit", "2") == ["run52", "run51"]


# ------------------------------------------------------------------------------------ --since, --state


@pytest.fixture
def world(tmp_path):
    env = runs_env(tmp_path / "runs")
    make_run(env["runs"], "fresh", ago=3600)
    make_run(env["runs"], "broke", ago=3 * 86400, failed=True)
    make_run(env["runs"], "older", ago=5 * 86400)
    make_run(env["runs"], "ancient", ago=20 * 86400, failed=True)  # hidden by the 14-day rule unless --all
    return env


@pytest.mark.slow
def test_since_and_state_filter(world):
    env = world
    assert names(env) == ["fresh", "broke", "older"]
    assert names(env, "--state", "FAILED") == ["broke"]
    assert names(env, "--state", "failed", "--all") == ["broke", "ancient"]
    assert names(env, "--state", "completed,failed", "--since", "2d") == ["fresh"]
    assert names(env, "--state", "COMPLETED", "--state", "FAILED", "--since", "4d") == ["fresh", "broke"]
    assert names(env, "--since", "90m") == ["fresh"]
    month_ago = datetime.fromtimestamp(time.time() - 30 * 86400).strftime("%Y-%m-%d")
    assert names(env, "--since", month_ago) == ["fresh", "broke", "older", "ancient"]  # instead of the 14 days
    table = tla(env, "status", "--state", "COMPLETED", "--limit", "1", check=True).stdout
    assert "fresh" in table and "older" not in table
    assert "showing the 1 most recent of 2 runs that match --state COMPLETED; 1 more not shown" in table
    none = tla(env, "status", "--state", "RUNNING", check=True).stdout
    assert "no runs match --state RUNNING among 4 run(s)" in none


def test_bad_state_or_since_is_one_line(world):
    assert_clean_error(tla(world, "status", "--state", "RUNING"), "--state 'RUNING' is not a state")
    assert_clean_error(tla(world, "status", "--state", "FAILED,bogus", "--json"), "'bogus' is not a state")
    assert_clean_error(tla(world, "status", "--since", "yesterday"), "--since 'yesterday'")


# ------------------------------------------------------------------------------------ the status cache


def _cached_form(run: Path) -> dict:
    return json.loads((run / rundir.STATUS_CACHE).read_text().splitlines()[2])  # signature, header, form, rest


def _mark_cache(run: Path, sign: bool = True) -> None:
    """Change what the cache says of the run (only there), to see whether `tla status` used it; signed
    again with this user's key (as tla itself would write it) unless ``sign`` is False (a forgery)."""
    from tla_jobs.jobs import signing

    lines = (run / rundir.STATUS_CACHE).read_text().splitlines()
    form = json.loads(lines[2])
    form["last_event"] = "told by the cache"
    lines[2] = json.dumps(form)
    rest = ("\n".join(lines[1:]) + "\n").encode()
    lines[0] = signing.sign(rest) if sign else lines[0]
    (run / rundir.STATUS_CACHE).write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_finished_run_s_status_is_cached_until_one_of_its_files_changes(tmp_path):
    env = runs_env(tmp_path / "runs")
    run = make_run(env["runs"], "done", ago=7200)
    computed = listed(env, "done")
    assert computed[0]["state"] == "COMPLETED"
    assert (run / rundir.STATUS_CACHE).is_file() and _cached_form(run)["state"] == "COMPLETED"
    assert listed(env, "done") == computed  # from the cache: the same status, field for field
    _mark_cache(run, sign=False)  # edited by hand: not believed
    assert listed(env, "done") == computed
    _mark_cache(run)
    assert listed(env, "done")[0]["last_event"] == "told by the cache"  # the cache is what was used

    # an attempt more, which failed: the cache is stale, the run's files say FAILED
    who = {"job_id": JOB, "restart_count": 0, "executor": "local"}
    with open(run / rundir.ATTEMPTS, "a") as f:
        f.write(json.dumps({"event": "start", "epoch": 3, "global_step": 9, "time": time.time(), **who}) + "\n")
        f.write(json.dumps({"event": "end", "reason": "error", "epoch": 3, "time": time.time(), **who}) + "\n")
    now = listed(env, "done")[0]
    assert now["state"] == "FAILED" and len(now["attempts"]) == 2 and now["last_event"] != "told by the cache"
    table = tla(env, "status", check=True).stdout
    assert "FAILED" in table and "told by the cache" not in table

    # a rewrite that keeps the size and puts the old mtime back still shows (its ctime changed)
    other = make_run(env["runs"], "other", ago=7200)
    listed(env, "other")
    _mark_cache(other)
    assert listed(env, "other")[0]["last_event"] == "told by the cache"
    summary = other / rundir.SUMMARY
    before = summary.stat()
    text = summary.read_text()
    summary.write_text(text.replace("52.0", "42.0"))
    os.utime(summary, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert summary.stat().st_size == before.st_size and summary.stat().st_mtime_ns == before.st_mtime_ns
    assert listed(env, "other")[0]["last_event"] == "attempt ended: completed at epoch 3"


def test_no_cache_for_files_changed_moments_ago_nor_for_a_damaged_run(tmp_path):
    env = runs_env(tmp_path / "runs")
    fresh = make_run(env["runs"], "fresh", ago=1, settle=False)
    # its files changed as `tla status` reads them: dated a minute ahead (as a client with a fast clock
    # writes them on a shared filesystem), so that a slow start of the command on a loaded machine
    # cannot make them look settled (written "just now" and read 3 s later, they were cached)
    soon = time.time() + 60
    for f in fresh.iterdir():
        os.utime(f, (soon, soon))
    damaged = make_run(env["runs"], "damaged", ago=7200)
    (damaged / rundir.HEARTBEAT).write_text('{"phase": "finished", "time": ')
    os.utime(damaged / rundir.HEARTBEAT, (time.time() - 7200, time.time() - 7200))  # only its damage is new
    proc = tla(env, "status", "--json")
    assert proc.returncode != 0 and "damaged" in proc.stderr
    assert {r["run"]: r["state"] for r in json.loads(proc.stdout)}["fresh"] == "COMPLETED"
    assert not (fresh / rundir.STATUS_CACHE).exists() and not (damaged / rundir.STATUS_CACHE).exists()


# ------------------------------------------------------------------------------------ sweeps by name


@pytest.fixture
def sweeps(tmp_path):
    env = runs_env(tmp_path / "runs")
    for i, name in enumerate(("sw-a", "sw-b")):
        run = make_run(env["runs"], name, sweep="sw", ago=600 * (i + 1), failed=name == "sw-b")
        lines = [f"2026-11-26 10:00:{s:02d} [rank 0] {name} line {s}" for s in range(30)]
        if name == "sw-b":
            lines.append("2026-11-26 10:00:59 [rank 0] RuntimeError: boom")
        (run / rundir.LOG_PATTERN.format(rank=0)).write_text("\n".join(lines) + "\n")
    make_run(env["runs"], "other", sweep="other")
    make_run(env["runs"], "abl")  # a run named as a sweep: the run wins
    make_run(env["runs"], "abl-1", sweep="abl")
    return env


def test_status_and_logs_take_a_sweep_s_name(sweeps):
    env = sweeps
    assert names(env, "sw") == ["sw-a", "sw-b"]
    table = tla(env, "status", "sw", check=True).stdout
    assert "sw-a" in table and "sw-b" in table and "other" not in table and "attempts of" not in table
    assert names(env, "sw", "--state", "FAILED") == ["sw-b"]
    assert names(env, "abl") == ["abl"]  # a run's name wins over a sweep's
    assert names(env, "abl-1", "sw") == ["abl-1", "sw-a", "sw-b"]
    assert_clean_error(tla(env, "status", "nope"), "and no sweep has that name")

    out = tla(env, "logs", "sw", check=True).stdout
    assert "==> sw-a (COMPLETED) <==" in out and "==> sw-b (FAILED) <==" in out
    assert out.index("==> sw-a") < out.index("sw-a line 29") < out.index("==> sw-b")
    assert "sw-a line 10" in out and "sw-a line 9\n" not in out  # the last 20 lines of each run
    two = tla(env, "logs", "sw", "-n", "2", check=True).stdout
    assert "sw-b line 29" in two and "RuntimeError: boom" in two and "sw-b line 28" not in two
    errors = tla(env, "logs", "sw", "--errors", check=True).stdout
    assert "no error lines found" in errors.split("==> sw-b")[0] and "RuntimeError: boom" in errors
    followed = tla(env, "logs", "sw", "--follow", check=True, timeout=60).stdout  # every run has ended: returns
    assert "==> sw-b (FAILED) <==" in followed
    assert "line" not in tla(env, "logs", "abl", check=True).stdout  # the run abl: it has no log lines
    assert_clean_error(tla(env, "logs", "nope"), "no sweep has that name")


def test_watch_into_a_pipe_prints_a_line_per_run_and_stops_when_all_have_ended(sweeps):
    proc = tla(sweeps, "status", "sw", "--watch", check=True, timeout=60)
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert re.fullmatch(rf"{STAMP} sw-a COMPLETED epoch 3/3 best_acc1 52\.00 \(attempt ended: completed at epoch 3\)",
                        lines[0]), lines
    assert re.match(rf"{STAMP} sw-b FAILED epoch 2/3", lines[1]), lines


@pytest.mark.slow
def test_watch_of_a_live_run_into_a_pipe(tmp_path, digits):
    env = runs_env(tmp_path / "runs")
    tla(env, "submit", "train", "--name", "live", *FAST, "--data-path", digits, "--epochs", "2", "--step-delay",
        "0.02", check=True)
    watch = subprocess.Popen([*TLA, "status", "live", "--watch"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=tmp_path, env={**os.environ, "TLA_RUNS": str(env["runs"])})
    try:
        ready, _, _ = select.select([watch.stdout], [], [], 120)
        assert ready, "no line from `tla status --watch` into a pipe"
        first = watch.stdout.readline()
        assert re.match(rf"{STAMP} live (PENDING|RUNNING|COMPLETED) epoch \d/2", first), first
        if " COMPLETED " not in first:  # the line came while the watch went on: flushed at once
            assert watch.poll() is None
            assert not (env["runs"] / "live" / rundir.STATUS_CACHE).exists()  # a live run is never cached
        rest, err = watch.communicate(timeout=300)
    finally:
        watch.kill()
    assert watch.returncode == 0, err
    lines = [first.rstrip("\n"), *rest.splitlines()]
    assert all(re.match(rf"{STAMP} live [A-Z]", line) for line in lines), lines
    assert " COMPLETED epoch 2/2 " in lines[-1], lines
    assert len(set(lines)) == len(lines) and all(a.split(" ", 2)[2] != b.split(" ", 2)[2]
                                                 for a, b in zip(lines, lines[1:])), lines  # only changes
