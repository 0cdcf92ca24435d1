"""End to end against a real SLURM controller and two slurmd (tests/slurm_cluster), through the
`tla` CLI as a subprocess: submit, status from sacct, preemption, requeue, time limit, eval with a
dependency, cancel, failure (and its retry), two-node DDP, accounting off, job arrays."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
from conftest import CLUSTER, FAST, assert_clean_error, runs_env, sh, status, tla, wait_for

pytestmark = [pytest.mark.slurm]
STATE = os.environ.get("TLA_SLURM_STATE", "/var/tmp/tla-slurm")


@pytest.fixture(scope="module")
def cluster():
    sh("bash", CLUSTER, "up", timeout=900)
    yield
    # leave it up for the next module; `make test` brings it down at the end


@pytest.fixture
def env(tmp_path, cluster):
    return runs_env(tmp_path / "runs")


def wait_state(env, run, states, timeout=240) -> dict:
    seen = []

    def reached():
        st = status(env, run)
        if not seen or seen[-1] != st["state"]:
            seen.append(st["state"])
        return {**st, "seen": seen} if st["state"] in states else None

    def what() -> str:
        return f"{run} to reach {states}; seen {seen}; logs:\n" + tla(env, "logs", run).stdout[-3000:]

    return wait_for(reached, timeout, every=1, what=what)


def wait_step(env, run, step, timeout=240) -> dict:
    beat_path = env["runs"] / run / "heartbeat.json"

    def beat():
        b = json.loads(beat_path.read_text()) if beat_path.exists() else {}
        return b if b.get("global_step", 0) >= step and b.get("phase") == "training" else None

    return wait_for(beat, timeout, what=f"{run} to reach step {step}")


def submit(env, name, *extra, digits, epochs=2, cluster="testslurm"):
    out = tla(env, "submit", "train", "--name", name, "--cluster", cluster, *FAST, "--data-path", digits,
              "--epochs", str(epochs), "--json", *extra, check=True).stdout
    return json.loads(out)["job_id"]


def metrics_epochs(env, run) -> list[int]:
    return [json.loads(x)["epoch"] for x in (env["runs"] / run / "metrics.jsonl").read_text().splitlines()]


def test_submit_status_report_from_sacct(env, digits):
    # slow enough steps that a status poll sees it queued or running (a loaded machine polls slowly)
    job = submit(env, "s1", "--step-delay", "0.2", digits=digits, epochs=2)
    record = json.loads((env["runs"] / "s1" / "run.json").read_text())
    assert record["submissions"][0]["job_id"] == job and record["submissions"][0]["executor"] == "slurm"
    st = wait_state(env, "s1", {"COMPLETED", "FAILED"})
    # the trainer's completed record settles it at once, also while sacct still says RUNNING for a moment
    assert st["state"] == "COMPLETED" and st["source"] in ("sacct", "sacct+attempts"), st["source"]
    assert set(st["seen"]) & {"PENDING", "RUNNING"}, st["seen"]
    deadline = time.time() + 60  # then sacct follows, and status says where it comes from
    while time.time() < deadline and (st := status(env, "s1"))["source"] != "sacct":
        time.sleep(1)
    assert st["state"] == "COMPLETED" and st["source"] == "sacct", st["source"]
    assert any(j["state"] == "COMPLETED" and j["source"] == "sacct" for j in st["jobs"])
    report = json.loads(tla(env, "report", "s1", "--format", "json", check=True).stdout)[0]
    assert report["best_acc1"] > 10 and report["state"] == "COMPLETED"


@pytest.fixture
def user_signal(request, cluster):
    """The cluster as most sites run it (False: no preempt_send_user_signal, preempted tasks get
    SIGTERM) or with SlurmctldParameters=preempt_send_user_signal (True: they get the job's USR2)."""
    if request.param:
        _quiet()
        sh("bash", CLUSTER, "up", "--preempt-user-signal", timeout=300)
    try:
        yield request.param
    finally:
        if request.param:
            _quiet()
            sh("bash", CLUSTER, "up", timeout=300)


def _quiet(timeout: float = 90) -> None:
    """No job left, not even one completing: a mode switch restarts the slurmds, and a step being
    killed across a slurmd restart drains its node ("Kill task failed")."""
    deadline = time.time() + timeout
    while time.time() < deadline and sh("squeue", "-h", "-o", "%i", check=False).stdout.strip():
        time.sleep(1)


def _sacct_states(job) -> list[str]:
    out = sh("sacct", "-n", "-X", "-P", "-D", "-j", job, "-o", "State", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


@pytest.mark.parametrize("user_signal", [False, True], ids=["site-default", "preempt_send_user_signal"],
                         indirect=True)
def test_preemption_requeues_resumes_and_completes(env, digits, user_signal):
    """Two runs on n1, one in a partition with GraceTime and one without; a job of the high-priority
    partition takes every CPU of n1 and preempts both. Each must be requeued by SLURM, resume from
    its checkpoint and complete, with its epochs in order."""
    tag = "us" if user_signal else "site"
    runs = {f"pre-{tag}-grace": "low", f"pre-{tag}-nograce": "lownograce"}
    # long enough (2 epochs of 0.4 s steps, 35 s or more) that neither run can finish before the
    # preemption lands (the high job is queued as soon as both have made 5 steps), also on a loaded
    # machine; the attempt after the requeue runs at full speed (--step-delay-once)
    jobs = {name: submit(env, name, "--partition", part, "--step-delay", "0.4", "--step-delay-once",
                         "--checkpoint-every-min", "0", digits=digits, epochs=2) for name, part in runs.items()}
    for name in runs:
        wait_step(env, name, 5)
    hi = sh("sbatch", "--parsable", "-o", "/dev/null", "-p", "high", "-N1", "-w", "n1", "-c", "4", "--wrap",
            "sleep 3").stdout.strip()
    try:
        for name, part in runs.items():
            st = wait_state(env, name, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400)
            assert st["state"] == "COMPLETED", (name, st["state"], st["attempts"], st["jobs"])
            first, second = st["attempts"][0], st["attempts"][1]
            reason = first["end"]["reason"]
            if not user_signal:  # most sites: SIGTERM at preemption; the trainer checkpoints and waits
                assert reason == "signal:SIGTERM", (name, reason)
            elif part == "low":  # the job's own signal at preemption, submitit requeues
                assert reason == "signal:SIGUSR2", (name, reason)
            else:
                assert reason in ("signal:SIGTERM", "signal:SIGUSR2"), (name, reason)
            # the next attempt starts exactly where the signalled one checkpointed (in epoch 0 or 1: the
            # two runs start seconds apart and an epoch takes about 7 s)
            assert second["start"]["global_step"] == first["end"]["global_step"] > 0
            resumed = second["start"]["resumed_from"]
            assert (resumed["epoch"], resumed["step"]) == (first["end"]["epoch"], first["end"]["step"])
            assert second["start"]["restart_count"] >= 1 and second["start"]["job_id"] == jobs[name]
            assert metrics_epochs(env, name) == [0, 1]
            assert not any("killed" in str(a["outcome"]) for a in st["attempts"]), st["attempts"]
            deadline = time.time() + 60  # the trainer's record settles it first; sacct follows
            while time.time() < deadline and _sacct_states(jobs[name])[-1:] != ["COMPLETED"]:
                time.sleep(1)
            states = _sacct_states(jobs[name])
            assert "PREEMPTED" in states or "REQUEUED" in states, states
            assert states[-1] == "COMPLETED", states
    finally:
        sh("scancel", hi, *jobs.values(), check=False)


@pytest.mark.parametrize("how", ["scontrol-requeue", "usr2"])
def test_requeue_and_usr2_checkpoint_and_resume(env, digits, how, tmp_path):
    name, extra, base = f"rq-{how}", [], 0
    if how == "scontrol-requeue":
        # a run branched from another's checkpoint (--resume, as a fine-tune is): SLURM's own requeue
        # runs the job again with the same --resume, and it must go on from its own progress. Its
        # periodic checkpoints are pruned all the while, as a user's `tla checkpoints prune` may.
        base, seed = 2, tmp_path / "seed"  # the run it branches from: 2 steps of epoch 0
        tla(env, "train", *FAST, "--data-path", digits, "--epochs", "1", "--max-steps", str(base), "--output-dir",
            seed, check=True)
        extra = ["--resume", str(seed / "checkpoint_last.pth"), "--checkpoint-every-epochs", "1"]
    job = submit(env, name, "--step-delay", "0.15", "--step-delay-once", "--checkpoint-every-min", "0", *extra,
                 digits=digits, epochs=2)
    wait_step(env, name, base + 5)
    if how == "scontrol-requeue":
        sh("scontrol", "requeue", job)  # SIGTERM, then SIGKILL after KillWait: the handler saves in time
        reason = "signal:SIGTERM"
    else:
        tla(env, "signal", name, check=True)  # scancel --signal=USR2: submitit's preemption signal
        reason = "signal:SIGUSR2"
    pruned: list[str] = []
    last_prune = 0.0

    def ended():
        nonlocal last_prune
        if extra and time.time() - last_prune > 3:  # a `tla` process every 3 s, not every poll
            out = json.loads(tla(env, "checkpoints", "prune", name, "--keep-last", "1", "--json", check=True).stdout)
            pruned.extend(r["name"] for r in out["removed"])
            last_prune = time.time()
        st = status(env, name)
        return st if st["state"] in ("COMPLETED", "FAILED") else None

    st = wait_for(ended, 400, what=f"{name} to end")
    assert st["state"] == "COMPLETED", st
    first = st["attempts"][0]["end"]
    assert first["reason"] == reason and first["global_step"] >= base + 5
    resumed = st["attempts"][1]["start"]
    assert resumed["global_step"] == first["global_step"]
    assert (resumed["resumed_from"]["epoch"], resumed["resumed_from"]["step"]) == (first["epoch"], first["step"])
    assert st["attempts"][1]["start"]["restart_count"] >= 1
    assert metrics_epochs(env, name) == [0, 1]
    if extra:
        assert resumed["resumed_from"]["path"] == str(env["runs"] / name / "checkpoint_last.pth")
        assert all(re.fullmatch(r"checkpoint_epoch\d+\.pth", n) for n in pruned)
        left = {p.name for p in (env["runs"] / name).glob("*.pth")}
        assert {"checkpoint_last.pth", "checkpoint_prev.pth", "checkpoint_best.pth",
                "checkpoint_epoch2.pth"} <= left


def test_time_limit_checkpoints_requeues_and_finishes(env, digits):
    # two-minute attempts, USR2 30 s before the limit (SLURM may send it up to a minute earlier, so
    # an attempt trains for 20-80 s); 180 steps of at least 0.5 s each need two attempts or more (the
    # attempts after the first requeue run at full speed: --step-delay-once)
    st_job = submit(env, "tl", "--time", "2", "--step-delay", "0.5", "--step-delay-once", "--checkpoint-every-min",
                    "0", digits=digits, epochs=4)
    st = wait_state(env, "tl", {"COMPLETED", "FAILED", "TIMEOUT"}, timeout=900)
    assert st["state"] == "COMPLETED", st
    assert len(st["attempts"]) >= 2
    assert all(a["end"]["reason"] == "signal:SIGUSR2" for a in st["attempts"][:-1])
    steps = [a["start"]["global_step"] for a in st["attempts"]]
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps  # always forward
    assert st_job


def test_requeue_loop_without_progress_is_stopped(env, digits):
    job = submit(env, "stall", "--step-delay", "30", "--checkpoint-every-min", "0", digits=digits, epochs=1)
    for _ in range(3):  # requeue every attempt before it can finish a step
        beat = env["runs"] / "stall" / "attempts.jsonl"
        n = beat.read_text().count('"start"') if beat.exists() else 0
        deadline = time.time() + 120
        while time.time() < deadline and (not beat.exists() or beat.read_text().count('"start"') <= n):
            time.sleep(0.5)
        if status(env, "stall")["state"] in ("FAILED",):
            break
        sh("scontrol", "requeue", job, check=False)
    st = wait_state(env, "stall", {"FAILED", "COMPLETED"}, timeout=300)
    assert st["state"] == "FAILED"
    assert st["attempts"][-1]["end"]["reason"] == "stalled"
    errors = tla(env, "logs", "stall", "--errors", check=True).stdout
    assert "no progress in the last 2 attempts" in errors


def test_eval_job_waits_for_training_with_afterok(env, digits):
    job = submit(env, "ev", "--step-delay", "0.05", digits=digits, epochs=2)
    wait_state(env, "ev", {"RUNNING", "PENDING"})
    tla(env, "eval", "checkpoint", "ev", check=True)
    record = json.loads((env["runs"] / "ev" / "run.json").read_text())
    assert record["evals"][0]["dependency"] == f"afterok:{job}"
    wait_state(env, "ev", {"COMPLETED"}, timeout=300)
    deadline = time.time() + 180
    while time.time() < deadline:
        report = json.loads(tla(env, "report", "ev", "--format", "json", check=True).stdout)[0]
        if report["eval_acc1"] is not None:
            break
        time.sleep(2)
    assert report["eval_acc1"] == pytest.approx(report["last_acc1"]) and report["eval_acc5"] is not None


def test_cancel_leaves_nothing_running(env, digits):
    job = submit(env, "cx", "--step-delay", "0.2", digits=digits, epochs=20)
    wait_step(env, "cx", 2)
    tla(env, "cancel", "cx", check=True)
    st = wait_state(env, "cx", {"CANCELLED"}, timeout=120)
    assert st["state"] == "CANCELLED"
    deadline = time.time() + 60
    while time.time() < deadline and sh("squeue", "-h", "-j", job, check=False).stdout.strip():
        time.sleep(1)
    assert not sh("squeue", "-h", "-j", job, check=False).stdout.strip()


def test_failed_job_is_failed_and_logs_show_the_error(env, digits, tmp_path):
    data = tmp_path / "doomed"
    shutil.copytree(digits, data)
    profile = tmp_path / "noretry.yaml"  # max_requeue_failure 0: a failed step is the end of the run
    profile.write_text((Path(__file__).parent / "profiles" / "testslurm.yaml").read_text()
                       .replace("max_requeue_failure: 2", "max_requeue_failure: 0"))
    # slowed steps: on a loaded machine the job may start before the folder goes, but never finishes first
    out = tla(env, "submit", "train", "--name", "fx", "--cluster", profile, *FAST, "--dataset", "imagefolder",
              "--data-path", data, "--epochs", "1", "--step-delay", "0.3", "--json", check=True).stdout
    job = json.loads(out)["job_id"]
    # removed after submission, before the job reads it: renamed away first, so that the job sees the whole
    # folder or none of it (rmtree alone, mid-way, leaves classes missing from one split: another error)
    gone = data.rename(tmp_path / "gone")
    shutil.rmtree(gone)
    st = wait_state(env, "fx", {"FAILED", "COMPLETED"}, timeout=180)
    assert st["state"] == "FAILED"
    errors = tla(env, "logs", "fx", "--errors", check=True).stdout
    # the job finds the folder gone at its start ("does not exist") or, when it started first, mid-epoch
    assert "DataError" in errors and ("does not exist" in errors or "no readable image" in errors), errors[-2000:]
    assert job


def test_two_nodes_ddp_over_gloo(env, digits):
    submit(env, "ddp", "--nodes", "2", "--max-steps", "10", digits=digits, epochs=1)
    st = wait_state(env, "ddp", {"COMPLETED", "FAILED"}, timeout=300)
    assert st["state"] == "COMPLETED", tla(env, "logs", "ddp").stdout[-3000:]
    run = env["runs"] / "ddp"
    sums = [re.search(r"final weights checksum (\w+)", (run / f"log_rank{r}.txt").read_text()).group(1)
            for r in (0, 1)]
    assert sums[0] == sums[1]
    nodes = {json.loads(x)["host"] for x in (run / "attempts.jsonl").read_text().splitlines()}
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2 and nodes
    assert "2 process(es)" in (run / "log_rank1.txt").read_text()


def test_sweep_is_one_job_array(env, digits):
    out = tla(env, "submit", "sweep", "--name", "arr", "--cluster", "testslurm", "--models", "tla_vit_nano",
              "--arms", "tla,none", "--seeds", "0,1", *FAST, "--data-path", digits, "--epochs", "1",
              "--max-steps", "3", "--json", check=True).stdout
    subs = json.loads(out)
    array_ids = {s["job_id"].split("_")[0] for s in subs}
    assert len(subs) == 4 and len(array_ids) == 1
    for s in subs:
        st = wait_state(env, s["run"], {"COMPLETED", "FAILED"}, timeout=300)
        assert st["state"] == "COMPLETED"
        assert (env["runs"] / s["run"] / "checkpoint_last.pth").exists()


def test_without_accounting_status_uses_squeue_and_heartbeat(env, digits):
    sh("bash", CLUSTER, "up", "--no-accounting", timeout=300)
    try:
        submit(env, "na", "--step-delay", "0.1", digits=digits, epochs=2)
        wait_step(env, "na", 3)
        st = status(env, "na")
        assert st["state"] == "RUNNING" and st["source"].startswith("squeue"), st
        done = wait_state(env, "na", {"COMPLETED", "FAILED", "UNKNOWN"}, timeout=300)
        # squeue (for MinJobAge) or, once the job has left it, the trainer's own end record
        assert done["state"] == "COMPLETED" and done["source"] in ("squeue", "squeue+attempts"), done
    finally:
        sh("bash", CLUSTER, "up", timeout=300)


def _pid_of_rank(job: str, rank: int) -> int | None:
    """The trainer process of one rank of a job (by its SLURM environment)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            if b"submitit.core._submit" not in cmd:
                continue
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"SLURM_JOB_ID={job}".encode() in environ and f"SLURM_PROCID={rank}".encode() in environ:
            return int(d.name)
    return None


def test_a_dead_rank_is_retried_and_the_run_completes(env, digits):
    """A rank killed with SIGKILL: srun --kill-on-bad-exit ends the step at once (nothing waits in a
    collective until a timeout), the batch shell records which rank died, how and on which node, and
    requeues the job (jobs/retry.py), which continues from its checkpoint and completes. The test
    cluster's two nodes are all a 2-node job has: the node is not excluded, and the record says why."""
    job = submit(env, "deadrank", "--nodes", "2", "--step-delay", "0.2", "--step-delay-once", digits=digits, epochs=2)
    wait_step(env, "deadrank", 3)
    pid = _pid_of_rank(job, 1)
    assert pid, "rank 1 not found"
    os.kill(pid, signal.SIGKILL)
    st = wait_state(env, "deadrank", {"FAILED", "CANCELLED", "COMPLETED", "NODE_FAIL"}, timeout=300)
    assert st["state"] == "COMPLETED", (st["state"], st["attempts"], st["jobs"])
    assert len(st["attempts"]) == 2, st["attempts"]
    died = st["attempts"][0]["end"]
    # rank 0 may have written its own end first (the collective broke under it): the failure joins it
    assert died["reason"] in ("failed", "error") and (died["rank"], died["signal"]) == (1, "SIGKILL"), died
    assert died["node"] in ("n1", "n2") and died["requeue"] is True and died["excluded"] is None, died
    assert "not excluded" in died["note"]
    assert st["attempts"][1]["start"]["restart_count"] == 1 and st["attempts"][1]["start"]["job_id"] == job
    assert metrics_epochs(env, "deadrank") == [0, 1]
    assert "rank 1 on n" in " ".join(tla(env, "status", "deadrank", check=True).stdout.split())


def test_a_failure_at_the_same_step_every_time_ends_failed_with_its_error(env, digits):
    """A run that fails at the same step every time (--fail-at-step: the trainer raises mid-epoch) is
    requeued (max_requeue_failure 2), then ended FAILED by the stall guard or the failure limit, at most
    1 + 2 attempts, its error in the last event."""
    submit(env, "diverge", "--fail-at-step", "3", digits=digits, epochs=1)
    st = wait_state(env, "diverge", {"FAILED", "COMPLETED", "CANCELLED"}, timeout=300)
    assert st["state"] == "FAILED", st
    assert 2 <= len(st["attempts"]) <= 3, st["attempts"]
    assert all(a["end"]["requeue"] is True for a in st["attempts"][:-1]), st["attempts"]
    last = st["attempts"][-1]["end"]
    assert last["reason"] in ("stalled", "error") and "injected failure at step 3" in last["error"], last


def test_status_says_waiting_for_ranks(env, tmp_path):
    """Rank 0's heartbeat while the process group forms: status says so (a real running job, a real
    run directory)."""
    job = sh("sbatch", "--parsable", "-o", "/dev/null", "-p", "debug", "-c", "1", "--wrap", "sleep 900").stdout.strip()
    try:
        # Other tests of the session may hold both nodes for minutes: wait for SLURM to start the job
        # before the heartbeat is written, so the heartbeat is fresh when status reads it.
        wait_for(lambda: sh("squeue", "-h", "-o", "%T", "-j", job, check=False).stdout.strip() == "RUNNING", 600,
                 every=1, what=f"SLURM to start job {job}")
        run = env["runs"] / "waiting"
        run.mkdir(parents=True)
        now = time.time()
        (run / "run.json").write_text(json.dumps({
            "name": "waiting", "created": now, "kind": "train", "spec": {"epochs": 2, "model": "tla_vit_nano"},
            "profile": {"executor": "slurm"}, "submissions": [
                {"job_id": job, "executor": "slurm", "submitted": now, "reason": "submit", "nodes": 2,
                 "gpus_per_node": 0}], "evals": []}))
        (run / "heartbeat.json").write_text(json.dumps({"phase": "waiting for ranks", "world_size": 2, "time": now,
                                                       "job_id": job, "host": "n1", "pid": 1}))
        deadline = time.time() + 60
        while time.time() < deadline and status(env, "waiting")["state"] != "RUNNING":
            time.sleep(0.5)
        st = status(env, "waiting")
        assert st["state"] == "RUNNING" and st["waiting_for_ranks"], st
        assert "waiting for ranks" in st["last_event"] and "2 expected" in st["last_event"]
        assert "RUNNING (waiting for ranks)" in tla(env, "status", check=True).stdout
        assert "is waiting for ranks: 2 expected" in tla(env, "status", "waiting", check=True).stdout
        # once training runs, it says so no more
        (run / "heartbeat.json").write_text(json.dumps({"phase": "training", "time": time.time(), "job_id": job}))
        assert not status(env, "waiting")["waiting_for_ranks"]
    finally:
        sh("scancel", job, check=False)


def _slurmd_pid(node: str) -> int:
    return int((Path(STATE) / "run" / f"slurmd-{node}.pid").read_text().strip())


def test_node_failure_requeues_on_the_other_node_and_fences_the_old_attempt(env, digits):
    """The slurmd of the job's node dies (its trainer keeps running, as on a real node whose daemon
    crashed) and the node is marked DOWN: SLURM requeues the job on the other node. The old attempt
    must stop writing and exit once the new one owns the run; status pairs each attempt with the
    restart that ran it and calls the old one superseded, not killed."""
    job = submit(env, "nodefail", "--step-delay", "0.3", "--step-delay-once", "--checkpoint-every-min", "0",
                 digits=digits, epochs=2)
    wait_step(env, "nodefail", 5)
    node = sh("squeue", "-h", "-j", job, "-o", "%N").stdout.strip()
    assert node in ("n1", "n2"), node
    old_pid = _pid_of_rank(job, 0)
    assert old_pid
    try:
        os.kill(_slurmd_pid(node), signal.SIGKILL)
        sh("scontrol", "update", f"NodeName={node}", "State=DOWN", "Reason=tla-test-node-failure")
        st = wait_state(env, "nodefail", {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400)
    finally:
        sh("bash", CLUSTER, "up", timeout=300)  # the node's slurmd back, the node resumed
    assert st["state"] == "COMPLETED", (st["attempts"], st["jobs"])
    rows = [json.loads(x) for x in (env["runs"] / "nodefail" / "attempts.jsonl").read_text().splitlines()]
    assert [r["reason"] for r in rows if r["event"] == "end"].count("completed") == 1, rows
    assert metrics_epochs(env, "nodefail") == [0, 1]
    first, last = st["attempts"][0], st["attempts"][-1]
    assert first["start"]["restart_count"] == 0 and last["start"]["restart_count"] >= 1
    assert first["start"]["attempt_id"] != last["start"]["attempt_id"]
    assert "superseded" in first["outcome"] and "killed" not in first["outcome"], first["outcome"]
    assert last["outcome"] == "completed"
    owner = json.loads((env["runs"] / "nodefail" / "owner.json").read_text())
    assert owner["attempt_id"] == last["start"]["attempt_id"]
    deadline = time.time() + 120  # the old trainer stops at its next write
    while time.time() < deadline and Path(f"/proc/{old_pid}").exists():
        time.sleep(1)
    assert not Path(f"/proc/{old_pid}").exists() or b"submitit" not in Path(f"/proc/{old_pid}/cmdline").read_bytes()
    detail = tla(env, "status", "nodefail", check=True).stdout
    assert "superseded" in detail and "killed" not in detail


def _stop_dbd() -> None:
    pid = int((Path(STATE) / "run" / "slurmdbd.pid").read_text().strip())
    os.kill(pid, signal.SIGTERM)
    deadline = time.time() + 30
    while time.time() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.2)


def test_state_precedence_across_a_slurmdbd_restart(env, digits):
    """With slurmdbd down, status falls back to squeue (with elapsed time); a run that completed is
    COMPLETED and one stopped with a bare scancel is CANCELLED, also once squeue forgot it. When
    slurmdbd comes back, sacct's stale records never make a finished run look RUNNING."""
    done_job = submit(env, "prec-done", "--step-delay", "0.1", digits=digits, epochs=1)
    gone_job = submit(env, "prec-gone", "--step-delay", "0.2", digits=digits, epochs=20)
    wait_step(env, "prec-done", 2)
    wait_step(env, "prec-gone", 2)
    try:
        _stop_dbd()
        st = status(env, "prec-gone")
        assert st["state"] == "RUNNING" and st["source"].startswith("squeue"), st
        assert [j["elapsed_s"] for j in st["jobs"]][-1] > 0, st["jobs"]  # time used, from squeue
        sh("scancel", gone_job)
        seen = {"prec-done": [], "prec-gone": []}
        # until squeue has forgotten both (MinJobAge 30 s after the cancelled job has finished COMPLETING)
        deadline = time.time() + 300
        while time.time() < deadline:
            for run in seen:
                seen[run].append(status(env, run)["state"])
            if not sh("squeue", "-h", "-j", f"{done_job},{gone_job}", check=False).stdout.strip() \
                    and seen["prec-done"][-1] == "COMPLETED":
                break
            time.sleep(1)
        assert seen["prec-done"][-1] == "COMPLETED", seen
        assert seen["prec-gone"][-1] == "CANCELLED", seen
        assert status(env, "prec-done")["gpu_hours"] == 0.0  # CPU jobs; the figure is computed, not missing
    finally:
        sh("bash", CLUSTER, "up", timeout=300)
    # slurmdbd back: slurmctld replays what it queued; status never goes back to RUNNING
    after = {"prec-done": [], "prec-gone": []}
    deadline = time.time() + 30
    while time.time() < deadline:
        for run in after:
            after[run].append(status(env, run)["state"])
        time.sleep(1)
    assert set(after["prec-done"]) == {"COMPLETED"}, after
    assert set(after["prec-gone"]) == {"CANCELLED"}, after


def test_status_report_logs_cancel_answer_when_accounting_does_not(env, digits):
    """slurmdbd stopped with SIGSTOP (as an overloaded accounting daemon behaves: it takes connections and
    never answers): status, report, logs and cancel answer from squeue and the runs' own files after a
    short sacct timeout, and say that accounting did not answer. The seconds: docs/benchmarks.md."""
    from tla_jobs.jobs import slurm

    submit(env, "dbd-done", "--max-steps", "3", digits=digits, epochs=1)
    submit(env, "dbd-run", "--step-delay", "0.2", digits=digits, epochs=20)
    wait_state(env, "dbd-done", {"COMPLETED", "FAILED"})
    wait_step(env, "dbd-run", 2)
    pid = int((Path(STATE) / "run" / "slurmdbd.pid").read_text().strip())
    os.kill(pid, signal.SIGSTOP)
    try:
        running, done = status(env, "dbd-run"), status(env, "dbd-done")
        assert running["state"] == "RUNNING" and running["source"] == "squeue (sacct did not answer)", running
        assert done["state"] == "COMPLETED" and done["source"].startswith("squeue (sacct did not answer)"), done
        table = " ".join(tla(env, "status", check=True).stdout.split())
        assert "accounting (sacct) did not answer" in table and "dbd-run" in table, table
        report = json.loads(tla(env, "report", "dbd-done", "--format", "json", check=True).stdout)[0]
        assert report["state"] == "COMPLETED"
        assert tla(env, "logs", "dbd-run", "-n", "5", check=True).stdout
        tla(env, "cancel", "dbd-run", check=True)
        assert wait_state(env, "dbd-run", {"CANCELLED", "FAILED", "COMPLETED"})["state"] == "CANCELLED"
    finally:
        os.kill(pid, signal.SIGCONT)
        slurm._sacct_silent_until = 0.0  # this process asks sacct again at once (the next tests want it)


def test_hostile_values_reach_no_shell_and_control_characters_are_refused(env, digits, tmp_path):
    """Values with shell syntax in them go into the batch script as data: the job runs on the real
    cluster and nothing in them is executed. A control character (a newline that would start a new
    script line) is refused before anything is queued. With setup lines that activate an
    environment, the job runs `python` of that environment (and the dry run says so)."""
    marker = tmp_path / "pwned"
    data = tmp_path / f"data $(touch {marker}) `touch {marker}`;&"
    shutil.copytree(digits, data)
    venv = Path(sys.executable).parent
    profile = tmp_path / "hostile.yaml"
    profile.write_text(
        "executor: slurm\n"
        "slurm:\n  partition: debug\n  time_min: 15\n"
        f"  additional_parameters:\n    comment: 'x ; touch {marker} ; echo $(touch {marker}) `touch {marker}`'\n"
        f"  setup:\n    - 'source {venv}/activate'\n")
    dry = tla(env, "submit", "train", "--name", "hostile", "--cluster", profile, *FAST, "--data-path", data,
              "--epochs", "1", "--max-steps", "3", "--dry-run", check=True).stdout
    dry = " ".join(dry.split())  # rich wraps long lines at 80 columns in a pipe
    assert "python on the nodes: python (python on PATH after the profile's setup lines" in dry
    assert " python -u -m submitit.core._submit" in dry and sys.executable not in dry
    submit(env, "hostile", digits=data, epochs=1, cluster=str(profile))
    st = wait_state(env, "hostile", {"COMPLETED", "FAILED"}, timeout=300)
    assert st["state"] == "COMPLETED", tla(env, "logs", "hostile").stdout[-2000:]
    assert not marker.exists()

    queued = sh("squeue", "-h", "-o", "%i").stdout.split()
    bad_profile = tmp_path / "newline.yaml"
    for args, fragment in [
        (["--partition", f"debug\ntouch {marker}"], "--partition contains a control character"),
        (["--cluster", bad_profile], "additional_parameters.comment contains a control character"),
        (["--cluster", tmp_path / "quote.yaml"], "additional_parameters.comment contains a double quote"),
        (["--partition", "debug --wrap=x"], "not a SLURM name"),
    ]:
        bad_profile.write_text("executor: slurm\nslurm:\n  additional_parameters:\n"
                               f"    comment: \"x\\ntouch {marker}\"\n")
        (tmp_path / "quote.yaml").write_text("executor: slurm\nslurm:\n  additional_parameters:\n"
                                             f"    comment: 'x\" ; touch {marker} ; echo \"'\n")
        cluster = [] if "--cluster" in args else ["--cluster", "testslurm"]
        for dry_run in ([], ["--dry-run"]):
            proc = tla(env, "submit", "train", "--name", "nl", *cluster, *args, *FAST, "--data-path", digits,
                       "--epochs", "1", *dry_run)
            assert_clean_error(proc, fragment)
    assert not (env["runs"] / "nl").exists() and not marker.exists()
    assert set(sh("squeue", "-h", "-o", "%i").stdout.split()) <= set(queued)  # nothing new was queued


def test_a_job_sbatch_refuses_is_one_line_and_leaves_no_run(env, digits, tmp_path):
    """sbatch itself refuses the job (GPUs of a cluster that has none): one line, no run left."""
    proc = tla(env, "submit", "train", "--name", "gres", "--cluster", "testslurm", "--gpus-per-node", "1", *FAST,
               "--data-path", digits, "--epochs", "1")
    assert_clean_error(proc, "the job was not queued")
    assert "gres" in proc.stderr.lower() and not (env["runs"] / "gres").exists()
