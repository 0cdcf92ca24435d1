"""tla_jobs.jobs.executors against every submitit release pyproject allows (>=1.5,<1.6): the oldest,
1.5.0, installed from PyPI into a temporary folder and put first on PYTHONPATH, and the one in this
environment. For each: a dry run renders exactly the sbatch script that a real submission through
submitit writes (a stand-in `sbatch` on PATH records it, a stand-in `srun` makes this a "cluster"),
for one job and for a job array; and the detached local executor runs a job in its own session,
without holding the submitting process's stdout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import PROFILES, fake_sbatch

OLDEST = "1.5.0"


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> dict[str, str]:
    """submitit version -> PYTHONPATH entry that selects it ('' for the installed one)."""
    import submitit

    target = tmp_path_factory.mktemp("submitit-" + OLDEST)
    # submitit before 1.5.4 imports pkg_resources when a job starts (without declaring it), which
    # setuptools 81 and later no longer have: it comes along, as an environment holding 1.5.0 needs it
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target),
                           f"submitit=={OLDEST}", "setuptools<81"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.skip(f"submitit {OLDEST} could not be installed from PyPI: {proc.stderr.strip()[-300:]}")
    return {OLDEST: str(target), submitit.__version__: ""}


def python(versions: dict[str, str], version: str, code: str, *args, env=None, **kw) -> subprocess.CompletedProcess:
    paths = [p for p in (versions[version], os.environ.get("PYTHONPATH", "")) if p]
    full = {**os.environ, **(env or {}), "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, env=full,
                          **kw)


SLURM = r"""
import json, sys
from pathlib import Path
import submitit
from submitit.core.utils import JobPaths
from tla_jobs.jobs import profiles, submit
from tla_jobs.jobs.plan import Plan

out = {"version": submitit.__version__}
root = Path(sys.argv[1])
for profile in ("slurm-gpu", "pyxis"):
    prof = profiles.load(profile)
    run_dir = root / profile / "run"
    spec = {"model": "deit_small_patch16_224", "data_path": str(root / "data"), "output_dir": str(run_dir)}
    plan = Plan("one", run_dir, prof, [spec])
    rendered = submit.render(plan)
    ex = submit.executor_for(prof, run_dir / "submitit", "one", run_dir, [spec["data_path"]], retry_dirs=[run_dir])
    job = ex.submit(print, "never runs")
    out[f"{profile} job"] = [rendered, JobPaths(ex.folder, job.job_id).submission_file.read_text()]
    sweep = Plan("sw", root / profile / ".sweep-sw", prof, [spec, {**spec, "seed": 1}], kind="sweep")
    rendered = submit.render(sweep)
    ex = submit.executor_for(prof, sweep.run_dir, "sw", run_dir, [spec["data_path"]] * 2, array_size=2,
                             retry_dirs=[run_dir] * 2)
    jobs = ex.map_array(print, ["a", "b"])
    out[f"{profile} array"] = [rendered, JobPaths(ex.folder, jobs[0].job_id).submission_file.read_text()]
print(json.dumps(out))
"""


def test_a_dry_run_renders_what_a_submission_writes(versions, tmp_path):
    """submitit renders the script in both; only SlurmScriptExecutor's command is written by tla."""
    env = {"PATH": f"{fake_sbatch(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
           "TLA_CLUSTER_CONFIGS": str(PROFILES)}
    scripts = {}
    for version in versions:
        proc = python(versions, version, SLURM, tmp_path / version, env=env, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out = json.loads(proc.stdout.splitlines()[-1])
        assert out.pop("version") == version
        for what, (rendered, submitted) in out.items():
            assert rendered == submitted, (version, what)
            assert "#SBATCH --requeue" in rendered and "-u -m submitit.core._submit" in rendered
            if what.endswith("array"):
                assert "#SBATCH --array=0-1%2" in rendered
        scripts[version] = {k: v[0].replace(str(tmp_path / version), "<ROOT>") for k, v in out.items()}
    first, *others = scripts.values()
    assert all(o == first for o in others)  # every release renders the same scripts


LOCAL = r"""
import os, sys, time
from pathlib import Path
import submitit
from tla_jobs.jobs.executors import DetachedLocalExecutor

folder = Path(sys.argv[1])
ex = DetachedLocalExecutor(folder, log=folder / "controller.log", env={"TLA_PROBE": "seen"})
ex.update_parameters(timeout_min=5, tasks_per_node=1, nodes=1, name="probe")
job = ex.submit(os.getsid, 0)
probe = ex.submit(os.getenv, "TLA_PROBE")
sleeper = ex.submit(time.sleep, 60)
print(submitit.__version__, job.job_id, sleeper.job_id, job.result(), probe.result(), flush=True)
"""


@pytest.mark.slow
def test_the_detached_local_executor_runs_jobs_in_their_own_session(versions, tmp_path):
    for version in versions:
        start = time.monotonic()
        # capture_output: were the controller's stdout inherited, this would wait for the sleeping job
        proc = python(versions, version, LOCAL, tmp_path / version, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert time.monotonic() - start < 50, "the submitting process waited for the job"
        got, job, sleeper, sid, probe = proc.stdout.split()
        assert got == version
        assert int(sid) == int(job)  # the task's session is led by its controller (the job id): not ours
        assert probe == "seen"  # the executor's extra environment reaches the job
        assert os.getsid(int(sleeper)) == int(sleeper)  # still running, in its own session
        os.killpg(int(sleeper), 9)
