"""A failed training step is retried (tla_jobs/jobs/retry.py): the SLURM batch shell's lines, run by
bash against stand-ins for srun/scontrol/sinfo that say what SLURM 22.05 says (the real cluster:
tests/test_slurm_e2e.py), and the local executor's rule on a real local job."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import FAST, runs_env, status, tla, wait_for

from tla_jobs.jobs import containers, retry
from tla_jobs.jobs.attempts import attempts_of

# srun's own words when a task dies (src/srun: "srun: error: NODE: task N: strsignal(sig)"), then those
# of the step kill --kill-on-bad-exit makes; measured on the test cluster
SRUN_KILLED = """srun: error: n2: task 1: Killed
srun: launch/slurm: _step_signal: Terminating StepId=7.0
srun: error: n1: task 0: Terminated
srun: Force Terminated StepId=7.0
"""


def _fake_slurm(bin_dir: Path, srun_err: str, srun_rc: int, nodes=("n1", "n2", "n3"), restarts=0) -> Path:
    calls = bin_dir / "calls"
    bin_dir.mkdir(parents=True)
    (bin_dir / "srun.err").write_text(srun_err)
    (bin_dir / "srun").write_text(f"#!/bin/bash\ncat {bin_dir / 'srun.err'} >&2\nexit {srun_rc}\n")
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        f'echo "scontrol $*" >> {calls}\n'
        'case "$1 $2" in\n'
        f'  "show job") echo "   JobState=RUNNING Reason=None"; echo "   Requeue=1 Restarts={restarts} BatchFlag=1";'
        ' echo "   ReqNodeList=(null) ExcNodeList=(null)";;\n'
        '  "show hostnames") echo "$3" | tr , "\\n";;\n'
        "esac\n")
    (bin_dir / "sinfo").write_text("#!/bin/bash\nprintf '%s\\n' " + " ".join(nodes) + "\n")
    for f in ("srun", "scontrol", "sinfo"):
        (bin_dir / f).chmod(0o755)
    return calls


def _batch_shell(run_dir: Path, srun_err: str, srun_rc: int, max_failures=2, restart=0, container=False,
                 **fake) -> tuple:
    """The batch shell's lines, then the step, in bash; stand-ins for SLURM's commands beside the run.
    ``restart``: SLURM_RESTART_COUNT of this shell (scontrol says ``restarts``, the same by default).
    ``container``: the lines of a container profile (its own srun wrapper forwards SLURM's signals)."""
    bin_dir = run_dir.parent / f"bin-{run_dir.name}"
    calls = _fake_slurm(bin_dir, srun_err, srun_rc, **{"restarts": restart, **fake})
    lines = [*retry.setup_lines(max_failures, [str(run_dir)], own_srun=False), *containers.host_requeue_setup(23)] \
        if container else retry.setup_lines(max_failures, [str(run_dir)])
    script = "\n".join([*lines, "srun python -m x", "echo step-rc=$?"])
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "7",
           "SLURM_JOB_PARTITION": "debug", "SLURM_JOB_NUM_NODES": "2", "SLURM_RESTART_COUNT": str(restart)}
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60)
    return proc, calls.read_text() if calls.exists() else ""


def _start(run_dir: Path, restart=0) -> None:
    run_dir.mkdir(exist_ok=True)
    with open(run_dir / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"event": "start", "attempt_id": f"a{restart}", "global_step": 3, "job_id": "7",
                            "restart_count": restart, "time": 1.0}) + "\n")


@pytest.mark.parametrize("container", [False, True], ids=["bare", "container"])
def test_a_rank_killed_is_recorded_and_requeued_without_its_node(tmp_path, container):
    run = tmp_path / "run"
    _start(run)
    proc, calls = _batch_shell(run, SRUN_KILLED, 143, container=container)
    assert proc.returncode == 0 and "step-rc" not in proc.stdout, proc  # requeued: the script ends there
    assert "srun: error: n2: task 1: Killed" in proc.stderr  # srun's words still reach the job's log
    assert "scontrol requeue 7" in calls and "scontrol update JobId=7 ExcNodeList=n2" in calls, calls
    (attempt,) = attempts_of(run)
    end = attempt["end"]
    assert (end["reason"], end["rank"], end["node"], end["signal"], end["requeue"], end["excluded"]) == \
        ("failed", 1, "n2", "SIGKILL", True, "n2"), end
    assert retry.describe(end) == "rank 1 on n2: signal SIGKILL; requeued without n2"


def test_an_exit_code_joins_rank_0s_own_end_and_a_node_short_partition_keeps_the_node(tmp_path):
    run = tmp_path / "run"
    _start(run)
    with open(run / "attempts.jsonl", "a") as f:  # rank 0's own record of its error comes first
        f.write(json.dumps({"event": "end", "attempt_id": "a0", "reason": "error", "error": "RuntimeError: boom",
                            "job_id": "7", "restart_count": 0}) + "\n")
    proc, calls = _batch_shell(run, "srun: error: n1: task 0: Exited with exit code 1\n", 1,
                               nodes=("n1", "n2"))
    assert "scontrol requeue 7" in calls and "ExcNodeList" not in calls.replace("show job", ""), calls
    end = attempts_of(run)[0]["end"]
    assert (end["reason"], end["error"], end["rank"], end["exit_code"], end["excluded"]) == \
        ("error", "RuntimeError: boom", 0, 1, None), end
    assert "n1 not excluded" in end["note"]


def test_no_requeue_past_the_limit_after_the_stall_guard_or_when_slurm_stops_the_job(tmp_path):
    run = tmp_path / "run"
    _start(run)
    with open(run / "attempts.jsonl", "a") as f:  # one failure of this job already
        f.write(json.dumps({"event": "end", "reason": "failed", "job_id": "7", "restart_count": 0}) + "\n")
    _start(run, restart=1)
    proc, calls = _batch_shell(run, SRUN_KILLED, 143, max_failures=1, restart=1)
    assert "requeue" not in calls and "step-rc=143" in proc.stdout, (proc, calls)
    assert attempts_of(run)[1]["end"]["requeue"] is False
    assert "max_requeue_failure is 1" in attempts_of(run)[1]["end"]["note"]

    stalled = tmp_path / "stalled"
    _start(stalled)
    with open(stalled / "attempts.jsonl", "a") as f:
        f.write(json.dumps({"event": "end", "attempt_id": "a0", "reason": "stalled", "job_id": "7"}) + "\n")
    proc, calls = _batch_shell(stalled, "srun: error: n1: task 0: Exited with exit code 1\n", 1)
    assert "requeue" not in calls and "step-rc=1" in proc.stdout

    # SLURM has requeued the job already (a node failure: the old batch shell may still run): not ours
    other = tmp_path / "other"
    _start(other)
    proc, calls = _batch_shell(other, SRUN_KILLED, 143, restarts=1)
    assert "requeue" not in calls and "step-rc=143" in proc.stdout
    assert attempts_of(other)[0]["end"] is None


@pytest.mark.slow
def test_local_job_retries_a_failure_then_fails_with_its_error(tmp_path, digits):
    """The local executor's rule: a run that fails at the same step every time (--fail-at-step, the
    trainer raising mid-epoch) is requeued once (max_requeue_failure 1), then FAILED with the error in its
    last event."""
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "retry1.yaml").write_text("executor: local\nlocal:\n  max_requeue_failure: 1\n")
    env = runs_env(tmp_path / "runs", profiles=profiles)
    tla(env, "submit", "train", "--name", "div", "--cluster", "retry1", *FAST, "--fail-at-step", "3", "--data-path",
        digits, "--epochs", "1", check=True)
    st = wait_for(lambda: (s := status(env, "div"))["state"] in ("FAILED", "COMPLETED") and s, timeout=240)
    assert st["state"] == "FAILED", st
    assert len(st["attempts"]) == 2, st["attempts"]
    first, last = (a["end"] for a in st["attempts"])
    assert first["requeue"] is True and last["requeue"] is False and last["rank"] == 0
    assert "injected failure at step 3" in last["error"]
    assert st["attempts"][1]["outcome"].startswith("error: rank 0 on ")
