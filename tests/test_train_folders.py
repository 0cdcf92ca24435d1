"""A `tla train --output-dir $TLA_RUNS/NAME` folder is found by its name, as a submitted run is (issue 22,
item 3): `tla checkpoints NAME`, `tla export NAME` and `tla eval checkpoint NAME`; the eval makes the folder
a run tla keeps records of (run.json from its config.yaml), whose state is what its trainer recorded."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import runs_env, status, tla, wait_for
from helpers_runs import trained_run

from tla_jobs import rundir

pytestmark = pytest.mark.xdist_group("trained-run")


@pytest.fixture
def env(shared_dir, digits, tmp_path):
    shutil.copytree(trained_run(shared_dir, digits), tmp_path / "runs" / "ex1")
    (tmp_path / "profiles").mkdir()
    return runs_env(tmp_path / "runs", tmp_path / "profiles", XDG_CACHE_HOME=str(tmp_path / "cache"))


def test_a_train_folder_is_found_by_its_name(env, tmp_path):
    rows = json.loads(tla(env, "checkpoints", "ex1", "--json", check=True).stdout)["checkpoints"]
    assert {r["which"] for r in rows} >= {"last", "best"} and {r["run"] for r in rows} == {"ex1"}
    tla(env, "export", "ex1", str(tmp_path / "f.safetensors"), check=True)
    assert (tmp_path / "f.safetensors").stat().st_size > 0
    assert not (env["runs"] / "ex1" / rundir.RUN_JSON).exists()  # reading it made it nothing else


@pytest.mark.slow
def test_eval_of_a_train_folder_by_name_is_kept_with_it(env):
    run = env["runs"] / "ex1"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = tla(env, "eval", "checkpoint", "ex1", "--which", "best", check=True)
    assert "for run ex1" in proc.stdout
    record = json.loads((run / rundir.RUN_JSON).read_text())
    assert record["adopted"] and record["submissions"] == [] and record["spec"]["model"] == "tla_vit_nano"
    wait_for(lambda: status(env, "ex1")["evals"][0]["state"] == "COMPLETED", what="the eval to complete")
    st = status(env, "ex1")
    assert st["state"] == "COMPLETED" and st["evals"][0]["acc1"] is not None
    assert {n: (run / n).read_bytes() for n in before} == before  # the training files as they were
