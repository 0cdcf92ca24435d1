"""Helpers of the tests that drive `tla` against a runs root (test_cli, test_jobs_control,
test_bad_inputs, test_slurm_e2e, test_submitit_versions)."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import ROOT, run_tla

PROFILES = ROOT / "tests" / "profiles"


def tla(env: dict, *args, **kw):
    """`tla ARGS` as a subprocess with env's variables (an entry "runs" is the runs root as a Path,
    not a variable), run from the folder that holds the runs root."""
    variables = {k: v for k, v in env.items() if k != "runs"}
    return run_tla(*args, env=variables, cwd=Path(variables["TLA_RUNS"]).parent, **kw)


def status(env: dict, run: str) -> dict:
    """`tla status RUN --json`: the run's status."""
    return json.loads(tla(env, "status", run, "--json", check=True).stdout)[0]
