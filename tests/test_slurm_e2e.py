"""End to end against a real SLURM controller and two slurmd (tests/slurm_cluster), through the
`tla` CLI as a subprocess: submit, status from sacct, preemption, requeue, time limit, eval with a
dependency, cancel, failure, two-node DDP, accounting off, job arrays."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
from conftest import FAST, ROOT, run_tla

pytestmark = [pytest.mark.slurm]
CLUSTER = ROOT / "tests" / "slurm_cluster" / "cluster.sh"
PROFILES = ROOT / "tests" / "profiles"


def sh(*cmd, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} exited {proc.returncode}: {proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def cluster():
    sh("bash", CLUSTER, "up", timeout=900)
    yield
    # leave it up for the next module; `make test` brings it down at the end


@pytest.fixture
def env(tmp_path, cluster):
    runs = tmp_path / "runs"
    return {"TLA_RUNS": str(runs), "TLA_CLUSTER_CONFIGS": str(PROFILES), "runs": runs}


def tla(env, *args, **kw):
    return run_tla(*args, env={k: v for k, v in env.items() if k != "runs"}, **kw)


def status(env, run) -> dict:
    return json.loads(tla(env, "status", run, "--json", check=True).stdout)[0]


def wait_state(env, run, states, timeout=240) -> dict:
    deadline = time.time() + timeout
    seen = []
    while time.time() < deadline:
        st = status(env, run)
        if not seen or seen[-1] != st["state"]:
            seen.append(st["state"])
        if st["state"] in states:
            st["seen"] = seen
            return st
        time.sleep(1)
    raise AssertionError(f"{run} never reached {states}; seen {seen}; logs:\n"
                         + tla(env, "logs", run).stdout[-3000:])


def wait_step(env, run, step, timeout=240) -> dict:
    beat_path = env["runs"] / run / "heartbeat.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if beat_path.exists():
            beat = json.loads(beat_path.read_text())
            if beat.get("global_step", 0) >= step and beat.get("phase") == "training":
                return beat
        time.sleep(0.5)
    raise AssertionError(f"{run} never reached step {step}")


def submit(env, name, *extra, digits, epochs=2, cluster="testslurm"):
    out = tla(env, "submit", "train", "--name", name, "--cluster", cluster, *FAST, "--data-path", digits,
              "--epochs", str(epochs), "--json", *extra, check=True).stdout
    return json.loads(out)["job_id"]


def metrics_epochs(env, run) -> list[int]:
    return [json.loads(x)["epoch"] for x in (env["runs"] / run / "metrics.jsonl").read_text().splitlines()]


def test_submit_status_report_from_sacct(env, digits):
    job = submit(env, "s1", digits=digits, epochs=2)
    record = json.loads((env["runs"] / "s1" / "run.json").read_text())
    assert record["submissions"][0]["job_id"] == job and record["submissions"][0]["executor"] == "slurm"
    st = wait_state(env, "s1", {"COMPLETED", "FAILED"})
    assert st["state"] == "COMPLETED" and st["source"] == "sacct"
    assert set(st["seen"]) & {"PENDING", "RUNNING"}, st["seen"]
    assert any(j["state"] == "COMPLETED" and j["source"] == "sacct" for j in st["jobs"])
    report = json.loads(tla(env, "report", "s1", "--format", "json", check=True).stdout)[0]
    assert report["best_acc1"] > 10 and report["state"] == "COMPLETED"


def test_preemption_by_a_high_priority_job_requeues_and_resumes(env, digits):
    job = submit(env, "pre", "--partition", "low", "--step-delay", "0.15", "--checkpoint-every-min", "0",
                 digits=digits, epochs=2)
    wait_step(env, "pre", 5)
    # a job in the high-priority partition that needs every CPU of n1 preempts the training run
    hi = sh("sbatch", "--parsable", "-p", "high", "-N1", "-w", "n1", "-c", "4", "--wrap", "sleep 3").stdout.strip()
    st = wait_state(env, "pre", {"COMPLETED", "FAILED"}, timeout=400)
    assert st["state"] == "COMPLETED", st
    ends = [a["end"] for a in st["attempts"]]
    # the cluster sends the job's --signal (USR2) when it is picked for preemption, TERM at the end of GraceTime
    assert ends[0]["reason"] in ("signal:SIGUSR2", "signal:SIGTERM"), ends
    assert st["attempts"][1]["start"]["resumed_from"]["step"] == ends[0]["global_step"] > 0
    assert all(a["start"]["job_id"] == job for a in st["attempts"])
    assert metrics_epochs(env, "pre") == [0, 1]
    states = [j["state"] for j in st["jobs"]]
    assert "PREEMPTED" in states or "REQUEUED" in states, states
    detail = tla(env, "status", "pre", check=True).stdout
    assert ends[0]["reason"] in detail
    sh("scancel", hi, check=False)


@pytest.mark.parametrize("how", ["scontrol-requeue", "usr2"])
def test_requeue_and_usr2_checkpoint_and_resume(env, digits, how):
    name = f"rq-{how}"
    job = submit(env, name, "--step-delay", "0.15", "--checkpoint-every-min", "0", digits=digits, epochs=2)
    wait_step(env, name, 5)
    if how == "scontrol-requeue":
        sh("scontrol", "requeue", job)  # SIGTERM, then SIGKILL after KillWait: the handler saves in time
        reason = "signal:SIGTERM"
    else:
        tla(env, "signal", name, check=True)  # scancel --signal=USR2: submitit's preemption signal
        reason = "signal:SIGUSR2"
    st = wait_state(env, name, {"COMPLETED", "FAILED"}, timeout=400)
    assert st["state"] == "COMPLETED", st
    first = st["attempts"][0]["end"]
    assert first["reason"] == reason and first["global_step"] >= 5
    assert st["attempts"][1]["start"]["resumed_from"]["step"] == first["global_step"]
    assert st["attempts"][1]["start"]["restart_count"] >= 1
    assert metrics_epochs(env, name) == [0, 1]


def test_time_limit_checkpoints_requeues_and_finishes(env, digits):
    # two-minute attempts, USR2 30 s before the limit (SLURM may send it up to a minute earlier, so
    # an attempt trains for 20-80 s); 180 steps of at least 0.5 s each need two attempts or more
    st_job = submit(env, "tl", "--time", "2", "--step-delay", "0.5", "--checkpoint-every-min", "0",
                    digits=digits, epochs=4)
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
    out = tla(env, "submit", "train", "--name", "fx", "--cluster", "testslurm", *FAST, "--dataset", "imagefolder",
              "--data-path", data, "--epochs", "1", "--json", check=True).stdout
    job = json.loads(out)["job_id"]
    shutil.rmtree(data)  # removed after submission, before the job reads it
    st = wait_state(env, "fx", {"FAILED", "COMPLETED"}, timeout=180)
    assert st["state"] == "FAILED"
    errors = tla(env, "logs", "fx", "--errors", check=True).stdout
    assert "does not exist" in errors and "DataError" in errors
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
        assert done["state"] == "COMPLETED" and done["source"] == "squeue+heartbeat", done
    finally:
        sh("bash", CLUSTER, "up", timeout=300)
