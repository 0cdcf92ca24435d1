"""A newcomer's first minutes with only the package installed (a wheel, no checkout): the built-in
profiles are there, the first run trains on the local executor and shows up in status and report."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST, ROOT

pytestmark = pytest.mark.slow  # trains real models: `make test`, not `make test-fast`


@pytest.mark.slow
def test_the_installed_package_alone_lists_profiles_and_trains_a_first_run(tmp_path, digits):
    wheels, site, home = tmp_path / "wheels", tmp_path / "site", tmp_path / "home"
    home.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], check=True,
                   capture_output=True, timeout=600)
    wheel = next(wheels.glob("tla_jobs-*.whl"))
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, capture_output=True,
                   timeout=600)
    # the installed copy, not the checkout: PYTHONPATH comes before the editable install's finder;
    # the working folder has no cluster_configs, HOME no profiles
    env = {k: v for k, v in os.environ.items() if not k.startswith("TLA_")}
    env.update(PYTHONPATH=str(site), HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"),
               XDG_CACHE_HOME=str(home / ".cache"), TLA_CPU_THREADS="1")

    def tla(*args, check=True):
        proc = subprocess.run([sys.executable, "-m", "tla_jobs", *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=home, timeout=600)
        assert not check or proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc

    where = subprocess.run([sys.executable, "-c", "import tla_jobs; print(tla_jobs.__file__)"], env=env, cwd=home,
                           capture_output=True, text=True, check=True).stdout
    assert where.startswith(str(site)), where
    profiles = {p["name"]: p for p in json.loads(tla("cluster", "list", "--json").stdout)}
    assert {"local", "slurm", "pyxis", "apptainer", "deit-repro"} <= set(profiles)
    assert profiles["slurm"]["source"] == "built-in"
    tla("submit", "train", "--name", "first", *FAST, "--data-path", digits, "--epochs", "1", "--max-steps", "3",
        "--follow")
    assert (home / "runs" / "first" / "checkpoint_last.pth").is_file()
    (row,) = json.loads(tla("report", "--format", "json").stdout)
    assert row["run"] == "first" and row["state"] == "COMPLETED" and row["mixing"] == "tl-align"
