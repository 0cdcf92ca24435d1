"""Exports (tla_jobs/train/export.py): weights a user loads with plain timm, in an interpreter that
never imports tla_jobs, giving exactly the trained model's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import FAST, run_tla

from tla_jobs.errors import CheckpointError, TlaError
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train.export import export, load_line, read_metadata
from tla_jobs.train.models import build_model

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("export")]  # trains real models: not in `make test-fast`

# Runs in a fresh interpreter: builds the model from the export's own metadata with timm alone and
# prints its logits on a fixed input. tla_jobs must not even be importable by accident.
PLAIN_TIMM = """
import json, sys
import timm, torch

path, fmt = sys.argv[1], sys.argv[2]
if fmt == "safetensors":
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = f.metadata()
else:
    meta = torch.load(path, weights_only=True)["metadata"]
kwargs = json.loads(meta["timm_kwargs"])
model = timm.create_model(meta["timm_model"], checkpoint_path=path, **kwargs).eval()
size = json.loads(meta["input_size"])[-1]
x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    print(json.dumps({"logits": model(x).tolist(), "tla_loaded": any(m.startswith("tla_jobs") for m in sys.modules),
                      "classes": json.loads(meta["class_names"])}))
"""


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("export") / "run"
    run_tla("train", *FAST, "--data-path", digits, "--epochs", "1", "--max-steps", "8", "--output-dir", run,
            check=True)
    return run


def _trained_logits(run: Path, size: int) -> torch.Tensor:
    payload, _ = ckpt.load(run / ckpt.LAST)
    model = build_model(payload["model_name"], payload["num_classes"]).eval()
    model.load_state_dict(payload["model"])
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_export_loads_in_plain_timm_with_identical_logits(trained, digits, tmp_path, fmt):
    out = tmp_path / f"nano.{fmt}"
    meta = export(trained / ckpt.LAST, out)
    assert read_metadata(out) == meta and meta["model_name"] == "tla_vit_nano"
    assert json.loads(meta["class_names"]) == sorted(p.name for p in (digits / "train").iterdir())
    assert meta["source_sha256"] == ckpt.file_sha256(trained / ckpt.LAST)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-I", "-c", PLAIN_TIMM, str(out), fmt], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert not got["tla_loaded"]
    assert torch.equal(torch.tensor(got["logits"]), _trained_logits(trained, 16))
    assert "checkpoint_path=" in load_line(meta, str(out))


def test_export_refuses_what_it_cannot_write(trained, tmp_path):
    with pytest.raises(CheckpointError, match="no ema weights"):
        export(trained / ckpt.LAST, tmp_path / "x.safetensors", weights="ema")
    with pytest.raises(TlaError, match="does not exist"):
        export(trained / ckpt.LAST, tmp_path / "missing" / "x.safetensors")
    damaged = tmp_path / "damaged.pth"
    damaged.write_bytes((trained / ckpt.LAST).read_bytes()[:-10])
    (tmp_path / "damaged.pth.sha256").write_text((trained / "checkpoint_last.pth.sha256").read_text())
    with pytest.raises(CheckpointError, match="damaged"):
        export(damaged, tmp_path / "y.safetensors")
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
    with pytest.raises(CheckpointError, match="not a"):
        read_metadata(trained / ckpt.LAST)
