"""A sweep's array parallelism: on the local executor (which starts every element at once) the runs
take turns through N slots; on SLURM it is the job array's %N."""

from __future__ import annotations

import json

import pytest
from conftest import FAST, tla, wait_for

from tla_jobs.jobs import sbatch
from tla_jobs.jobs.profiles import Profile


@pytest.mark.slow
def test_a_local_sweep_trains_at_most_n_runs_at_once(tmp_path, digits):
    env = {"TLA_RUNS": str(tmp_path / "runs"), "runs": tmp_path / "runs"}
    out = tla(env, "submit", "sweep", "--name", "turns", "--arms", "tla,grid,none", *FAST, "--data-path", digits,
              "--epochs", "1", "--max-steps", "4", "--step-delay", "0.3", "--parallel", "1", "--json",
              check=True).stdout
    runs = [s["run"] for s in json.loads(out)]
    seen_waiting, states_seen = set(), set()

    def done() -> bool:
        for r in runs:
            beat = env["runs"] / r / "heartbeat.json"
            try:
                if json.loads(beat.read_text()).get("phase") == "waiting for a slot":
                    seen_waiting.add(r)
            except (OSError, ValueError):
                pass
        states = json.loads(tla(env, "status", *runs, "--json", check=True).stdout)
        states_seen.update(s["state"] for s in states)
        return all(s["state"] == "COMPLETED" for s in states)

    wait_for(done, 300, every=0.5, what="the sweep to complete")
    spans = []
    for r in runs:
        rows = [json.loads(x) for x in (env["runs"] / r / "attempts.jsonl").read_text().splitlines()]
        start = next(x["time"] for x in rows if x["event"] == "start")
        end = [x for x in rows if x["event"] == "end"][-1]
        assert end["reason"] == "max_steps"
        spans.append((start, end["time"]))
    spans.sort()
    for (_, end), (start, _) in zip(spans, spans[1:]):
        assert start >= end - 0.5, spans  # one after the other: no two trained at once
    assert seen_waiting, "no run was seen waiting for a slot"
    assert "PENDING" in states_seen, states_seen  # status says a waiting run is queued, not running


def test_slurm_sweep_array_parallelism_is_the_arrays_percent_n():
    profile = Profile(executor="slurm")
    assert sbatch.parameters(profile, "s", None, [], 6, 2)["array_parallelism"] == 2
    assert sbatch.parameters(profile, "s", None, [], 6)["array_parallelism"] == 6  # default: all at once
    assert sbatch.parameters(profile, "s", None, [], 3, 10)["array_parallelism"] == 3


def test_a_local_sweep_shares_the_cores_unless_the_user_said_how_many_threads(monkeypatch, tmp_path):
    from tla_jobs.jobs import local

    monkeypatch.setattr(local.os, "cpu_count", lambda: 8)
    monkeypatch.delenv("TLA_CPU_THREADS", raising=False)
    assert local.sweep_env(6, 1, 2, tmp_path)["TLA_CPU_THREADS"] == "4"  # two runs at once on 8 cores
    assert local.sweep_env(1, 2, 4, tmp_path)["TLA_CPU_THREADS"] == "4"  # one run of two ranks
    assert local.sweep_env(20, 1, 16, tmp_path)["TLA_CPU_THREADS"] == "1"
    monkeypatch.setenv("TLA_CPU_THREADS", "3")
    env = local.sweep_env(6, 1, 2, tmp_path)
    assert env["TLA_CPU_THREADS"] == "3" and env[local.SLOTS_ENV] == f"2:{tmp_path / 'slots'}"
