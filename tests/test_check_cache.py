"""A recipe's model check, remembered once it passed (tla_jobs/jobs/check_cache.py): the second
submission of the same recipe imports neither torch nor timm, and nothing that would fail is let
through by the cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import FAST, run_tla

pytestmark = pytest.mark.slow  # trains real models: `make test`, not `make test-fast`


def test_a_passed_model_check_is_remembered_and_a_new_recipe_is_checked(tmp_path, digits):
    env = {"TLA_RUNS": str(tmp_path / "runs"), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    submit = ["submit", "train", "--name", "c", *FAST, "--data-path", digits, "--dry-run"]
    first = run_tla(*submit, env=env, check=True).stdout
    assert "ok  model: tla_vit_nano" in first and "passed before" not in first
    cache = tmp_path / "cache" / "tla" / "model-checks.json"
    assert len(json.loads(cache.read_text())) == 1
    # the same recipe with another seed and epochs: remembered, and torch/timm are not imported
    probe = ("import runpy, sys; sys.argv = ['tla', *sys.argv[1:]]\n"
             "try:\n    runpy.run_module('tla_jobs', run_name='__main__')\n"
             "except SystemExit:\n    pass\n"
             "print('IMPORTED', sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", probe, *map(str, submit), "--seed", "7", "--epochs", "9"],
                          capture_output=True, text=True, env={**os.environ, **env}, timeout=300)
    assert "passed before" in proc.stdout and "IMPORTED []" in proc.stdout, proc.stdout + proc.stderr
    # a recipe the model cannot take is checked (and refused), whatever passed before
    bad = run_tla(*submit, "--img-size", "18", env=env)
    assert bad.returncode == 2 and "model" in bad.stderr and "passed before" not in bad.stdout
    assert len(json.loads(cache.read_text())) == 1  # a failure is never remembered
    # a damaged cache is no cache
    cache.write_text("{not json")
    again = run_tla(*submit, env=env, check=True).stdout
    assert "ok  model: tla_vit_nano" in again and "passed before" not in again
