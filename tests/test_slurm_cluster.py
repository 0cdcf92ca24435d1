"""End-to-end checks of the one-machine SLURM cluster in tests/slurm_cluster (real slurmctld/slurmd/slurmdbd).

The module fixture runs ``cluster.sh up`` (cheap when the cluster is already up, e.g. after the Makefile
brought it up; it also switches a ``--no-accounting`` cluster back to accounting). The cluster is left up.
Every wait is a bounded poll; the whole module takes about a minute, most of it the preemption GraceTime.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import CLUSTER, cluster_env

pytestmark = pytest.mark.slurm

GRACE_TIME_S = 20  # GraceTime of the `low` partition in cluster.sh


def _clean_env(slurm_conf: str | None = None) -> dict[str, str]:
    # Drop SLURM_* inherited from an enclosing job (sbatch would pick them up), keep/force SLURM_CONF.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    if slurm_conf:
        env["SLURM_CONF"] = slurm_conf
    return env


@dataclass
class Cluster:
    env: dict[str, str]
    jobs: list[str] = field(default_factory=list)

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} -> rc {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc.stdout

    def sbatch(self, workdir: Path, *args: str) -> str:
        out = self.run("sbatch", "--parsable", f"--chdir={workdir}", f"--output={workdir}/%j.out", *args)
        job = out.strip().split(";")[0]
        assert job.isdigit(), out
        self.jobs.append(job)
        return job

    def sacct(self, job: str, duplicates: bool = False) -> list[tuple[str, str]]:
        """(State, ExitCode) of the job allocation; with duplicates, one row per run of a requeued job."""
        args = ["sacct", "-n", "-X", "-P", "-j", job, "-o", "State,ExitCode"]
        if duplicates:
            args.append("-D")
        rows = [line.split("|") for line in self.run(*args).splitlines() if line.strip()]
        return [(r[0], r[1]) for r in rows]

    def job_field(self, job: str, key: str) -> str | None:
        out = self.run("scontrol", "show", "job", "-o", job, check=False)
        m = re.search(rf"\b{key}=(\S*)", out)
        return m.group(1) if m else None

    def diagnostics(self) -> str:
        parts = []
        for args in (["squeue", "-a"], ["sinfo"], ["sacct", "-a", "-D", "-S", "now-10minutes"]):
            proc = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=30)
            parts.append(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}")
        proc = subprocess.run(["bash", str(CLUSTER), "logs", "15"], capture_output=True, text=True, timeout=30)
        parts.append(proc.stdout)
        return "\n".join(parts)

    def wait_for(self, what: str, predicate: Callable[[], object], timeout: float, interval: float = 0.2):
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{self.diagnostics()}")
            time.sleep(interval)

    # bounds generous enough for a job that waits for CPUs an earlier test's job still holds
    def wait_state(self, job: str, states: set[str], timeout: float = 120) -> tuple[str, str]:
        def done():
            rows = self.sacct(job)
            return rows[-1] if rows and rows[-1][0] in states else None

        return self.wait_for(f"job {job} to reach {states} in sacct", done, timeout)

    def wait_running(self, job: str, timeout: float = 120) -> None:
        self.wait_for(f"job {job} RUNNING", lambda: self.job_field(job, "JobState") == "RUNNING", timeout)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    proc = subprocess.run(["bash", str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        logs = subprocess.run(["bash", str(CLUSTER), "logs"], capture_output=True, text=True).stdout
        pytest.fail(f"cluster.sh up failed (rc {proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{logs}")
    c = Cluster(env=_clean_env(cluster_env().get("SLURM_CONF")))
    yield c
    if c.jobs:
        subprocess.run(["scancel", *c.jobs], env=c.env, capture_output=True, timeout=30)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def _marker_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_trivial_job_completes_in_sacct(cluster: Cluster, tmp_path: Path):
    job = cluster.sbatch(tmp_path, "--wrap", "echo hello from $SLURMD_NODENAME")
    state, exit_code = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    assert (state, exit_code) == ("COMPLETED", "0:0")
    out = (tmp_path / f"{job}.out").read_text()
    assert re.search(r"hello from n[12]\b", out), out


def test_two_node_job_runs_one_task_per_node(cluster: Cluster, tmp_path: Path):
    body = "srun --label bash -c 'echo \"task $SLURM_PROCID on $SLURMD_NODENAME\"'\ngetent hosts n1\n"
    job = cluster.sbatch(tmp_path, "-N", "2", "--ntasks-per-node=1", _script(tmp_path / "two.sh", body).as_posix())
    state, exit_code = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    out = (tmp_path / f"{job}.out").read_text()
    assert (state, exit_code) == ("COMPLETED", "0:0"), out
    nodes = sorted(re.findall(r"task \d on (n\d)", out))
    assert nodes == ["n1", "n2"], out
    # torch.distributed uses the first node's name as MASTER_ADDR: it must resolve to loopback.
    assert re.search(r"^127\.0\.0\.1\s+.*\bn1\b", out, re.M), out


def test_failing_job_is_failed_in_sacct(cluster: Cluster, tmp_path: Path):
    job = cluster.sbatch(tmp_path, "--wrap", "exit 3")
    state, exit_code = cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"})
    assert (state, exit_code) == ("FAILED", "3:0")


def test_scontrol_requeue_sends_sigterm_and_reruns(cluster: Cluster, tmp_path: Path):
    marker = tmp_path / "marker"
    body = f"""M={marker}
echo "start ${{SLURM_RESTART_COUNT:-0}}" >> $M
trap 'echo TERM >> $M; exit 0' TERM
while true; do sleep 0.2 & wait $!; done
"""
    job = cluster.sbatch(tmp_path, "-p", "debug", "-c", "1", _script(tmp_path / "loop.sh", body).as_posix())
    cluster.wait_for("first start", lambda: "start 0" in _marker_lines(marker), 120)
    cluster.run("scontrol", "requeue", job)
    cluster.wait_for("SIGTERM in the batch shell", lambda: "TERM" in _marker_lines(marker), 15)
    # A requeued job waits ~AuthInfo cred_expire (5 s) before it may start again.
    cluster.wait_for("second start", lambda: "start 1" in _marker_lines(marker), 120)
    assert cluster.job_field(job, "Restarts") == "1"
    assert cluster.job_field(job, "JobState") == "RUNNING"
    states = [s for s, _ in cluster.sacct(job, duplicates=True)]
    assert "REQUEUED" in states, states
    cluster.run("scancel", job)


@pytest.fixture
def user_signal(cluster: Cluster, request) -> Iterator[bool]:
    """The cluster with (True) or without (False, as most sites) SlurmctldParameters=preempt_send_user_signal;
    back to the default afterwards."""
    on = request.param
    if on:
        cluster.wait_for("no job left", lambda: not cluster.run("squeue", "-h", "-o", "%i").strip(), 90)
        subprocess.run(["bash", str(CLUSTER), "up", "--preempt-user-signal"], check=True, capture_output=True,
                       timeout=300)
    try:
        yield on
    finally:
        if on:
            cluster.wait_for("no job left", lambda: not cluster.run("squeue", "-h", "-o", "%i").strip(), 90)
            subprocess.run(["bash", str(CLUSTER), "up"], check=True, capture_output=True, timeout=300)


# preempt_send_user_signal (USR2 to the tasks at preemption) is covered with a real trainer by
# tests/test_slurm_e2e.py; switching the cluster's mode costs a restart of slurmctld and the slurmds.
@pytest.mark.parametrize("user_signal", [False], ids=["site-default"], indirect=True)
def test_high_partition_preempts_and_requeues_low(cluster: Cluster, tmp_path: Path, user_signal: bool):
    marker = tmp_path / "marker"
    # One srun step with submitit's kind of --signal (USR2 to the steps, long before the time limit). The
    # task neither exits on USR2 nor on TERM: it runs until SLURM kills it, as the trainer does.
    step = f"""trap 'echo "USR2 $(date +%s.%N)" >> {marker}' USR2
trap 'echo "TERM $(date +%s.%N)" >> {marker}' TERM
while true; do sleep 0.2 & wait $!; done"""
    (tmp_path / "step.sh").write_text(step)
    body = f"""echo "start ${{SLURM_RESTART_COUNT:-0}} $(date +%s.%N)" >> {marker}
srun bash {tmp_path / "step.sh"}
"""
    low = cluster.sbatch(tmp_path, "-p", "low", "-c", "4", "--time=30", "--signal=USR2@600",
                         _script(tmp_path / "low.sh", body).as_posix())
    cluster.wait_running(low)
    cluster.wait_for("low job start", lambda: any(x.startswith("start 0") for x in _marker_lines(marker)), 30)
    time.sleep(1)  # the step is up
    t0 = time.time()
    high = cluster.sbatch(tmp_path, "-p", "high", "-c", "4", "--wrap", "sleep 1")

    def stamps(sig: str) -> list[float]:
        return [float(line.split()[1]) for line in _marker_lines(marker) if line.startswith(sig + " ")]

    # At preemption the step's tasks get the job's own signal (only with preempt_send_user_signal) or
    # SIGTERM (most sites); the second SIGTERM comes when GraceTime runs out.
    first = "USR2" if user_signal else "TERM"
    # (a freshly restarted slurmctld may take a few scheduling passes to pick the high job)
    early = cluster.wait_for(f"{first} at preemption", lambda: stamps(first), 45)[0]
    assert early >= t0, (early - t0, _marker_lines(marker))
    if user_signal:
        assert not [t for t in stamps("TERM") if t < early + GRACE_TIME_S / 2], _marker_lines(marker)
    else:
        assert not stamps("USR2"), _marker_lines(marker)
    cluster.wait_for("SIGTERM at the end of GraceTime",
                     lambda: [t for t in stamps("TERM") if t - early >= GRACE_TIME_S - 5], GRACE_TIME_S + 20)

    assert cluster.wait_state(high, {"COMPLETED", "FAILED", "CANCELLED"}, 30) == ("COMPLETED", "0:0")
    cluster.wait_for("low job Restarts>=1", lambda: int(cluster.job_field(low, "Restarts") or 0) >= 1, 15)
    states = [s for s, _ in cluster.sacct(low, duplicates=True)]
    assert "PREEMPTED" in states, states
    # The requeued job runs again once n1 is free and its BeginTime (cred_expire) has passed.
    cluster.wait_for("low job second start", lambda: any(x.startswith("start 1") for x in _marker_lines(marker)), 45)
    cluster.run("scancel", low)


def _snapshot() -> dict:
    """/etc/hosts and every file under /etc/slurm: bytes, mode, link targets."""
    out = {"/etc/hosts": (Path("/etc/hosts").read_bytes(), Path("/etc/hosts").stat().st_mode)}
    root = Path("/etc/slurm")
    out["/etc/slurm exists"] = root.is_dir()
    if root.is_dir():
        for p in sorted(root.rglob("*")):
            st = p.lstat()
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p)] = ("dir", st.st_mode)
            else:
                out[str(p)] = (p.read_bytes(), st.st_mode)
    return out


def _resolves(host: str) -> bool:
    return subprocess.run(["getent", "hosts", host], capture_output=True).returncode == 0


def test_down_puts_etc_hosts_and_etc_slurm_back_as_found(cluster: Cluster):
    subprocess.run(["bash", str(CLUSTER), "down"], check=True, capture_output=True, timeout=300)
    original_hosts = Path("/etc/hosts").read_bytes()
    had_slurm = Path("/etc/slurm").is_dir()
    sentinel = Path("/etc/slurm/tla-test-site.conf")
    try:
        # A machine of its own: /etc/hosts without a final newline, a site file in /etc/slurm.
        Path("/etc/hosts").write_bytes(original_hosts.rstrip(b"\n") + b"\n10.254.0.9 tla-sentinel-host")
        sentinel.parent.mkdir(exist_ok=True)
        sentinel.write_text("# a site's own file\n")
        sentinel.chmod(0o640)
        found = _snapshot()
        assert not _resolves("n1")
        subprocess.run(["bash", str(CLUSTER), "up"], check=True, capture_output=True, timeout=300)
        assert _resolves("n1") and _resolves("tla-sentinel-host")
        assert "cluster.sh" in Path("/etc/slurm/slurm.conf").read_text()
        subprocess.run(["bash", str(CLUSTER), "down"], check=True, capture_output=True, timeout=300)
        assert _snapshot() == found
        assert not _resolves("n1")
    finally:
        Path("/etc/hosts").write_bytes(original_hosts)
        sentinel.unlink(missing_ok=True)
        if not had_slurm:
            shutil.rmtree("/etc/slurm", ignore_errors=True)
        subprocess.run(["bash", str(CLUSTER), "up"], check=True, capture_output=True, timeout=300)


def test_host_shell_requeue_stops_at_the_profile_limit(cluster: Cluster, tmp_path: Path):
    """The batch-shell lines of the container runtimes (tla_jobs.jobs.containers) requeue a step that
    stopped after its checkpoint (exit 75), at most max_requeue_timeout + max_requeue_preempt times;
    here 1: the job runs twice, then fails instead of coming back forever."""
    from tla_jobs.jobs.containers import host_requeue_setup

    marker = tmp_path / "marker"
    body = "\n".join(host_requeue_setup(1)) + f"""
echo "start ${{SLURM_RESTART_COUNT:-0}}" >> {marker}
srun bash -c 'exit 75'
"""
    job = cluster.sbatch(tmp_path, "-p", "debug", "-c", "1", "--requeue", _script(tmp_path / "hs.sh", body).as_posix())
    cluster.wait_for("two runs and a final state", lambda: _marker_lines(marker) == ["start 0", "start 1"] and
                     cluster.sacct(job)[-1][0] in ("FAILED", "COMPLETED", "CANCELLED"), 180)
    states = [s for s, _ in cluster.sacct(job, duplicates=True)]
    assert states == ["REQUEUED", "FAILED"], states
    out = (tmp_path / f"{job}.out").read_text()
    assert "requeueing" in out and "not requeueing" in out, out
