"""Shared fixtures and helpers: the bundled digits dataset, `tla` as a real subprocess, the runs-root
environment of a test, and how the suite is spread over pytest-xdist workers.

Parallel runs (`make test`, `make test-fast` pass `-n N --dist loadgroup`): every test that talks to
the one SLURM cluster runs in the group "slurm" (one worker, one after the other: they preempt
partitions, restart daemons and count nodes), the container tests that need the built image in the
group "image" (one worker builds it once); every other test goes to whichever worker is free. What a
session fixture makes for all workers (the digits dataset, the image) is made once, under a file
lock, in the folder that the workers share.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
TLA = [sys.executable, "-m", "tla_jobs"]
PROFILES = ROOT / "tests" / "profiles"
CLUSTER = ROOT / "tests" / "slurm_cluster" / "cluster.sh"

# One CPU thread per trainer and per worker: the tests' models are tiny, and two-thread OpenMP
# regions in several processes on a 2-core machine wait on each other (measured: a digits epoch
# takes about 25% less wall time and 40% less CPU with one thread, alone or beside other tests).
# Set before torch is imported anywhere in the session; inherited by every `tla` subprocess and
# by SLURM jobs (sbatch exports the environment). An explicit setting wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TLA_CPU_THREADS", "1")

# A recipe that learns digits in seconds on a CPU: the DeiT recipe minus the augmentations that
# drown 8x8 images (RandAugment, random erasing, tiny crops) and minus warm-up.
FAST = ["--model", "tla_vit_nano", "--dataset", "digits", "--batch-size", "32", "--workers", "0",
        "--no-repeated-aug", "--aa", "none", "--reprob", "0", "--crop-scale", "0.7", "--drop-path", "0",
        "--warmup-epochs", "0", "--lr", "1.5e-3"]


# ------------------------------------------------------------------ xdist groups and shared session state
#
# xdist's own loadgroup scheduler learns a test's group from a suffix that the worker appends to the
# test's node id; since pytest 9.2 that suffix no longer takes (pytest-dev/pytest-xdist#1386: every test
# is scheduled on its own, the groups are silently ignored). So the groups travel in a file instead:
# each worker writes {node id: group} after collection (all workers collect the same tests), and the
# controller's scheduler, which runs after every worker has finished collecting, reads it.
GROUPS_ENV = "TLA_TEST_XDIST_GROUPS"


def pytest_configure(config):
    if config.getoption("dist", "no") == "loadgroup" and not hasattr(config, "workerinput"):
        fd, path = tempfile.mkstemp(prefix="tla-xdist-groups-", suffix=".json")  # the controller: workers inherit
        os.close(fd)
        os.environ[GROUPS_ENV] = config.groups_file = path


def pytest_unconfigure(config):
    if getattr(config, "groups_file", None):
        Path(config.groups_file).unlink(missing_ok=True)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """--dist loadgroup: xdist's group scheduling (largest group first, a group on one worker, each
    other test on its own), with the groups from the workers' file."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class GroupScheduling(LoadScopeScheduling):
        groups: dict | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                self.groups = json.loads(Path(os.environ[GROUPS_ENV]).read_text() or "{}")
            return self.groups.get(nodeid, nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(config, items):
    """The tests that share one resource, in one group (see above; used only with --dist loadgroup).

    slurm: everything marked `slurm` (container ones included), serial on one worker; those that
    also need the built image go last in that group, so that this worker (the longest) does not sit
    waiting for the image while the "image" group builds it. image: the container tests that use
    the `built_image` fixture and no cluster. Any other test marked ``xdist_group(NAME)``: group NAME
    (a module whose module-scoped fixture trains a run marks itself, so that the run is trained
    once, not once on every worker that gets one of its tests)."""
    def needs_image(item) -> bool:
        return "built_image" in getattr(item, "fixturenames", ())

    groups = {}
    for item in items:
        if item.get_closest_marker("slurm"):
            groups[item.nodeid] = "slurm"
        elif needs_image(item):
            groups[item.nodeid] = "image"
        elif (mark := item.get_closest_marker("xdist_group")) is not None:
            groups[item.nodeid] = mark.args[0] if mark.args else mark.kwargs["name"]
    late = [i for i in items if i.get_closest_marker("slurm") and needs_image(i)]
    items[:] = [i for i in items if i not in late] + late
    if hasattr(config, "workerinput") and os.environ.get(GROUPS_ENV):
        path = Path(os.environ[GROUPS_ENV])
        tmp = path.with_name(f"{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(groups))
        tmp.replace(path)


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory) -> Path:
    """A folder every xdist worker of this session sees (the session's base temp without xdist)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def once(shared: Path, name: str, make):
    """``make()`` run by one worker of the session; the others wait for it and get its JSON result."""
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.is_file():
            done.write_text(json.dumps(make()))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def digits(shared_dir) -> Path:
    from tla_jobs.data.prepare import prepare

    return Path(once(shared_dir, "digits", lambda: str(prepare("digits", shared_dir / "data" / "digits"))))


# ------------------------------------------------------------------ subprocesses


def sh(*cmd, check=True, timeout=300, env=None, **kw) -> subprocess.CompletedProcess:
    """Run a command (arguments may be paths), capture its output; ``env`` adds to this environment."""
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-4000:]}")
    return proc


def fake_sbatch(bin_dir: Path) -> Path:
    """A folder with stand-ins for sbatch (answers a job id, submits nothing) and srun (fails): for
    tests of what a submission writes where no SLURM is (a fake: the real cluster is tests/slurm_cluster)."""
    bin_dir.mkdir(parents=True)
    (bin_dir / "sbatch").write_text("#!/bin/sh\necho 'Submitted batch job 4242'\n")
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return bin_dir


def run_tla(*args, env=None, timeout=300, check=False, cwd=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([*TLA, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"tla {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def runs_env(runs: Path, profiles: Path = PROFILES, **extra: str) -> dict:
    """A test's world: TLA_RUNS and TLA_CLUSTER_CONFIGS (the test profiles) for `tla`, plus ``runs``,
    the runs root as a Path, for the test itself."""
    return {"TLA_RUNS": str(runs), "TLA_CLUSTER_CONFIGS": str(profiles), **extra, "runs": Path(runs)}


def tla(env: dict, *args, **kw) -> subprocess.CompletedProcess:
    """`tla ARGS` in a test's world (see runs_env), from the folder that holds the runs root."""
    kw.setdefault("cwd", Path(env["TLA_RUNS"]).parent)
    return run_tla(*args, env={k: v for k, v in env.items() if k != "runs"}, **kw)


def status(env: dict, run: str) -> dict:
    """The run's entry of `tla status RUN --json`, computed in this process by the library that command
    calls (tla_jobs.jobs.state; without the status cache, so that nothing is written). The tests poll
    it in their waits, hundreds of times a session: a `tla` process costs about half a CPU-second, and
    on 2 cores those polls took CPU from the very jobs the tests waited on. The command itself, its
    --json output and its exit codes are tested as subprocesses (test_cli, test_bad_inputs, ...)."""
    from tla_jobs.jobs.state import collect

    found = collect([Path(env["runs"]) / run])
    assert found, f"no run {run!r} in {env['runs']}"
    return json.loads(found[0].json_text())


def assert_clean_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """One clear line on stderr, exit code 2, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert fragment.lower() in lines[0].lower(), lines[0]


def wait_for(predicate, timeout=180, every=0.5, what="the condition"):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass.
    ``what`` may be a callable: called only then, for the message (logs, say)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what() if callable(what) else what}")


# ------------------------------------------------------------------ the SLURM test cluster


def cluster_env() -> dict:
    """The client environment of the test cluster (`cluster.sh env` prints `export NAME=VALUE` lines)."""
    out = sh("bash", CLUSTER, "env").stdout
    return {k: shlex.split(v)[0] if v else "" for k, v in re.findall(r"^export (\w+)=(.*)$", out, re.M)}
