"""Shared fixtures: the bundled digits dataset, and helpers to run `tla` as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TLA = [sys.executable, "-m", "tla_jobs"]

# A recipe that learns digits in seconds on a CPU: the DeiT recipe minus the augmentations that
# drown 8x8 images (RandAugment, random erasing, tiny crops) and minus warm-up.
FAST = ["--model", "tla_vit_nano", "--dataset", "digits", "--batch-size", "32", "--workers", "0",
        "--no-repeated-aug", "--aa", "none", "--reprob", "0", "--crop-scale", "0.7", "--drop-path", "0",
        "--warmup-epochs", "0", "--lr", "1.5e-3"]


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    from tla_jobs.data.prepare import prepare

    return prepare("digits", tmp_path_factory.mktemp("data") / "digits")


def run_tla(*args, env=None, timeout=300, check=False, cwd=None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run([*TLA, *map(str, args)], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd)
    if check and proc.returncode != 0:
        raise AssertionError(f"tla {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def assert_clean_error(proc: subprocess.CompletedProcess, fragment: str) -> None:
    """One clear line on stderr, exit code 2, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    assert fragment.lower() in lines[0].lower(), lines[0]


def wait_for(predicate, timeout=180, every=0.5, what="the condition"):
    """Poll ``predicate`` until it returns something true (returned) or ``timeout`` seconds pass."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
