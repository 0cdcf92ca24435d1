"""Job control on the local executor, through the `tla` CLI as a subprocess, with real runs: cancel
stops every live job of a run (training, evals; --train/--eval; --sweep) and never touches a
finished run or a process that merely reuses a job's PID; failed eval jobs show up in status; a
profile's runs_root is where the run goes; the requeue limit is enforced by the job itself; values
that would break a batch script are refused."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import FAST, PROFILES, assert_clean_error, runs_env, status, tla, wait_for

pytestmark = pytest.mark.xdist_group("jobs-control")  # `finished` (module scope) is trained once


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return runs_env(tmp_path_factory.mktemp("ctl") / "runs")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.fixture(scope="module")
def finished(env, digits) -> str:
    """A real local run that completed."""
    tla(env, "submit", "train", "--name", "done", *FAST, "--data-path", digits, "--epochs", "1", "--max-steps", "6",
        check=True)
    wait_for(lambda: status(env, "done")["state"] in ("COMPLETED", "FAILED"), 300, what="run done to complete")
    assert status(env, "done")["state"] == "COMPLETED"
    return "done"


@pytest.fixture
def stranger():
    """An unrelated live process (its own session), as a PID that wrapped around would name."""
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    yield proc
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_cancel_of_a_finished_run_changes_nothing(env, finished):
    before = (env["runs"] / finished / "run.json").read_text()
    proc = tla(env, "cancel", finished, check=True)
    assert "nothing to cancel" in proc.stdout and "COMPLETED" in proc.stdout
    assert status(env, finished)["state"] == "COMPLETED"
    assert (env["runs"] / finished / "run.json").read_text() == before


def _rename_job(env, run, old: str, new: str, drop_identity: bool) -> None:
    """Make the run's job id `new` everywhere it is written (run.json, attempts, submitit's files),
    as if the controller had had that PID."""
    path = env["runs"] / run
    record = json.loads((path / "run.json").read_text())
    sub = record["submissions"][-1]
    sub["job_id"] = new
    if drop_identity:  # a record written before start times were kept
        sub.pop("pid_start", None)
        sub.pop("boot_id", None)
    (path / "run.json").write_text(json.dumps(record))
    rows = [json.loads(x) for x in (path / "attempts.jsonl").read_text().splitlines()]
    for r in rows:
        if str(r.get("job_id")) == old:
            r["job_id"] = new
    (path / "attempts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for f in (path / "submitit").glob(f"{old}_*"):
        f.rename(f.with_name(f.name.replace(old, new, 1)))


@pytest.mark.parametrize("record", ["with-start-time", "old-record-without-start-time"])
@pytest.mark.slow
def test_a_reused_pid_is_neither_running_nor_signalled(env, finished, stranger, record):
    """The finished run's job id (its controller's PID) now names an unrelated live process."""
    run_json = (env["runs"] / finished / "run.json").read_text()
    original = json.loads(run_json)["submissions"][-1]["job_id"]
    try:
        _rename_job(env, finished, original, str(stranger.pid), record != "with-start-time")
        st = status(env, finished)
        assert st["state"] == "COMPLETED", st["state"]
        assert all(j["state"] != "RUNNING" for j in st["jobs"]), st["jobs"]
        proc = tla(env, "cancel", finished, check=True)
        assert "nothing to cancel" in proc.stdout
        time.sleep(0.5)
        assert stranger.poll() is None and alive(stranger.pid)
        assert status(env, finished)["state"] == "COMPLETED"
    finally:
        _rename_job(env, finished, str(stranger.pid), original, False)
        (env["runs"] / finished / "run.json").write_text(run_json)


@pytest.mark.slow
def test_a_failed_eval_job_shows_in_status(env, finished):
    run = env["runs"] / finished
    truncated = run / "cut.pth"
    data = (run / "checkpoint_last.pth").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    proc = tla(env, "eval", "checkpoint", truncated, "--json", check=True)
    eval_job = json.loads(proc.stdout)["job_id"]

    def failed():
        evs = status(env, finished)["evals"]
        return evs if evs and evs[0]["state"] not in ("RUNNING", "PENDING", "UNKNOWN") else None

    evs = wait_for(failed, 240, what="the eval job to end")
    assert evs[0]["state"] == "FAILED" and evs[0]["job_id"] == eval_job, evs
    assert evs[0]["error"], evs
    st = status(env, finished)
    assert st["state"] == "COMPLETED"  # the run itself is still what it was
    table = tla(env, "status", check=True).stdout
    assert "1 FAILED" in table
    detail = tla(env, "status", finished, check=True).stdout
    assert "eval jobs of" in detail and "FAILED" in detail and "cut.pth" in detail


@pytest.mark.slow
def test_cancel_stops_training_and_eval_jobs_and_says_which(env, digits, tmp_path):
    # the run goes where its profile's runs_root says, and every command finds it there
    root = tmp_path / "elsewhere"
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "rooted.yaml").write_text(f"executor: local\nruns_root: {root}\n")
    e = {**env, "TLA_CLUSTER_CONFIGS": f"{tmp_path / 'profiles'}{os.pathsep}{PROFILES}"}
    out = tla(e, "submit", "train", "--name", "long", "--cluster", "rooted", *FAST, "--data-path", digits,
              "--epochs", "30", "--step-delay", "0.1", "--checkpoint-every-min", "0", "--json", check=True).stdout
    train_job = json.loads(out)["job_id"]
    assert json.loads(out)["run_dir"] == str(root / "long") and (root / "long" / "run.json").is_file()
    assert not (env["runs"] / "long").exists()
    wait_for(lambda: (root / "long" / "checkpoint_last.pth").exists(), 240, what="the first checkpoint")
    eval_job = json.loads(tla(e, "eval", "checkpoint", "long", "--json", check=True).stdout)["job_id"]
    assert alive(int(train_job)) and alive(int(eval_job))

    # --eval: only the eval job (at once: evaluating digits takes a few seconds)
    proc = tla(e, "cancel", "long", "--eval", check=True)
    assert train_job not in proc.stdout and alive(int(train_job))
    if f"eval job {eval_job}" in proc.stdout:
        wait_for(lambda: not alive(int(eval_job)), 60, what="the eval job to stop")
        st = json.loads(tla(e, "status", "long", "--json", check=True).stdout)[0]
        # stopped, unless it wrote its result in the meantime (then it did complete)
        assert st["evals"][0]["state"] in ("CANCELLED", "COMPLETED") and st["state"] == "RUNNING", st["evals"]
    else:  # it had finished already
        assert "nothing to cancel" in proc.stdout
    # no flag: the training job and every live eval job (the old bug: only the newest job, an eval, was)
    eval_job = json.loads(tla(e, "eval", "checkpoint", "long", "--json", check=True).stdout)["job_id"]
    proc = tla(e, "cancel", "long", check=True)
    assert f"training job {train_job}" in proc.stdout
    # the eval job may have finished already (seconds on digits); if it was live it was stopped too
    wait_for(lambda: not alive(int(train_job)) and not alive(int(eval_job)), 60, what="both jobs to stop")
    st = json.loads(tla(e, "status", "long", "--json", check=True).stdout)[0]
    assert st["state"] == "CANCELLED"
    # an eval that wrote its result before the signal took effect did complete
    assert st["evals"][1]["state"] in ("CANCELLED", "COMPLETED"), st["evals"]
    proc = tla(e, "cancel", "long", check=True)
    assert "nothing to cancel" in proc.stdout
    assert json.loads(tla(e, "status", "long", "--json", check=True).stdout)[0]["state"] == "CANCELLED"


@pytest.mark.slow
def test_cancel_sweep_stops_every_run_of_it(env, digits):
    out = tla(env, "submit", "sweep", "--name", "sw", "--arms", "tla,none", *FAST, "--data-path", digits,
              "--epochs", "30", "--step-delay", "0.1", "--json", check=True).stdout
    runs = [s["run"] for s in json.loads(out)]
    jobs = [s["job_id"] for s in json.loads(out)]
    wait_for(lambda: all(status(env, r)["state"] == "RUNNING" for r in runs), 120, what="the sweep's runs to start")
    proc = tla(env, "cancel", "sw", "--train", check=True)  # a sweep's name, as `tla status sw` takes it
    for r in runs:
        assert f"cancelled {r}" in proc.stdout, proc.stdout
    wait_for(lambda: not any(alive(int(j)) for j in jobs), 60, what="the sweep's jobs to stop")
    assert [status(env, r)["state"] for r in runs] == ["CANCELLED", "CANCELLED"]
    assert_clean_error(tla(env, "cancel", "--sweep", "no-such-sweep"), "no runs of a sweep")
    assert_clean_error(tla(env, "cancel", "no-such-sweep"), "no sweep has that name")
    assert_clean_error(tla(env, "cancel"), "give one run")


def test_submit_train_refuses_output_dir(env, digits, tmp_path):
    proc = tla(env, "submit", "train", "--name", "od", *FAST, "--data-path", digits, "--output-dir", tmp_path / "x")
    assert_clean_error(proc, "--output-dir")
    assert not (env["runs"] / "od").exists() and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------ requeue limit


def _attempt_rows(job: str, n: int, seconds: float) -> str:
    rows, t = [], 1_000_000.0
    for i in range(n):
        rows.append({"event": "start", "attempt_id": f"a{i}", "job_id": job, "restart_count": i, "time": t})
        rows.append({"event": "end", "attempt_id": f"a{i}", "job_id": job, "restart_count": i,
                     "reason": "signal:SIGTERM", "time": t + seconds})
        t += seconds + 30
    return "".join(json.dumps(r) + "\n" for r in rows)


REFUSE = """
import sys
from pathlib import Path
from tla_jobs.jobs.entry import TrainJob, refuse_past_requeue_limit
try:
    if sys.argv[3] == "job":  # what submitit runs in the job
        TrainJob(max_requeue_preempt=int(sys.argv[2]), time_min=60)({"output_dir": sys.argv[1], "model": "x"})
    else:
        refuse_past_requeue_limit(Path(sys.argv[1]), int(sys.argv[2]), 60)
        print("goes on")
except Exception as exc:
    print(type(exc).__name__, exc)
    sys.exit(3)
"""


@pytest.mark.parametrize("seconds,limited", [(60.0, True), (3000.0, False)], ids=["preempted", "timed-out"])
@pytest.mark.slow
def test_a_job_refuses_to_start_past_max_requeue_preempt(tmp_path, seconds, limited):
    """SLURM requeued job 4242 twice (two attempts that ended on SIGTERM); with max_requeue_preempt 1
    the third attempt refuses to train. Attempts that ran to their time limit do not count."""
    (tmp_path / "attempts.jsonl").write_text(_attempt_rows("4242", 2, seconds))
    env = {**os.environ, "SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "2", "SLURM_PROCID": "0"}
    env.pop("SLURM_ARRAY_JOB_ID", None)
    proc = subprocess.run([sys.executable, "-c", REFUSE, str(tmp_path), "1", "job" if limited else "direct"],
                          capture_output=True, text=True, env=env, timeout=120)
    rows = [json.loads(x) for x in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    if limited:
        assert proc.returncode == 3 and "max_requeue_preempt" in proc.stdout, proc.stdout + proc.stderr
        assert rows[-1]["event"] == "end" and rows[-1]["reason"] == "requeue limit"
        assert rows[-2]["event"] == "start" and rows[-2]["attempt_id"] == rows[-1]["attempt_id"]
    else:
        assert proc.returncode == 0 and "goes on" in proc.stdout, proc.stdout + proc.stderr
        assert len(rows) == 4  # nothing written by the limit


# ------------------------------------------------------------------ batch scripts and mount lists


@pytest.mark.parametrize("profile", ["pyxis", "apptainer", "podman"])
@pytest.mark.parametrize("sep", [",", ":"])
def test_mount_list_separators_in_a_data_path_are_refused(env, digits, tmp_path, profile, sep):
    data = tmp_path / f"imagenet{sep}v2"  # refused before the data is even looked at
    dry = [] if (profile, sep) == ("pyxis", ",") else ["--dry-run"]  # a submission and dry runs alike
    proc = tla(env, "submit", "train", "--name", "mnt", "--cluster", profile, "--model", "deit_tiny_patch16_224",
               "--data-path", data, *dry)
    assert_clean_error(proc, f"contains {sep}")
    assert not (env["runs"] / "mnt").exists()


def test_a_separator_in_a_data_path_is_fine_without_a_container(env, digits, tmp_path):
    data = tmp_path / "imagenet,v2:x"
    shutil.copytree(digits, data)
    proc = tla(env, "submit", "train", "--name", "plain", "--cluster", "testslurm", *FAST, "--data-path", data,
               "--dry-run")
    assert "contains" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("where", ["runs-root", "data-path", "setup", "image"])
def test_control_characters_never_reach_a_batch_script(env, digits, tmp_path, where):
    prof = tmp_path / "p.yaml"
    prof.write_text("executor: slurm\nslurm:\n  partition: debug\n")
    e, data = dict(env), str(digits)
    if where == "runs-root":
        e["TLA_RUNS"] = str(tmp_path / "runs\n#SBATCH --wrap=x")
    elif where == "data-path":
        data = str(tmp_path / "d\ntouch x")
    elif where == "setup":
        prof.write_text("executor: slurm\nslurm:\n  setup:\n    - \"echo a\\rb\"\n")
    else:
        prof.write_text("executor: slurm\ncontainer:\n  runtime: pyxis\n  image: \"img\\nx\"\n")
    proc = tla(e, "submit", "train", "--name", "cc", "--cluster", prof, *FAST, "--data-path", data, "--dry-run")
    assert_clean_error(proc, "control character")
