"""What a training run leaves besides checkpoints and metrics: TensorBoard curves (read back with
tensorboard's own reader), the EMA weights' accuracy at each epoch, the resolved config.yaml and
its loader, and the optional extras' failure modes (no tensorboard: a warning; --wandb without
wandb: one line before anything starts)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import FAST, assert_clean_error, run_tla
from helpers_runs import EPOCHS, trained_run

from tla_jobs import rundir
from tla_jobs.config import TrainConfig, load_config_file
from tla_jobs.errors import TlaError
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train.curves import EPOCH_TAGS

pytestmark = pytest.mark.slow  # trains real models: `make test`, not `make test-fast`


@pytest.fixture(scope="module")
def run(shared_dir, digits) -> Path:
    return trained_run(shared_dir, digits)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / rundir.METRICS).read_text().splitlines()]


def test_tensorboard_curves_read_back_with_tensorboards_reader(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / rundir.TENSORBOARD_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {*EPOCH_TAGS.values(), "epoch", "train/loss_step", "speed/images_per_s_step", "speed/data_wait_step"}
    rows = metrics(run)
    for key, tag in EPOCH_TAGS.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [r["global_step"] for r in rows], tag
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6), tag
    assert [e.value for e in acc.Scalars("epoch")] == list(range(1, EPOCHS + 1))
    steps = [e.step for e in acc.Scalars("train/loss_step")]
    assert steps and steps == sorted(steps) and steps[-1] <= rows[-1]["global_step"]


def test_ema_weights_are_evaluated_at_each_epoch_and_stay_in_the_checkpoint(run, tmp_path):
    from tla_jobs.train.export import export

    rows = metrics(run)
    assert all(0 <= r["ema_acc1"] <= r["ema_acc5"] <= 100 and r["ema_val_loss"] > 0 for r in rows)
    assert any(r["ema_acc1"] != r["acc1"] for r in rows)  # the EMA's own weights, not the model's again
    assert "EMA top-1" in (run / "log_rank0.txt").read_text()
    assert export(run / ckpt.LAST, tmp_path / "ema.safetensors", weights="ema")["weights"] == "ema"


def test_eval_only_of_the_ema_weights_and_of_an_export_gives_the_epochs_figures(run, digits, tmp_path):
    from tla_jobs.train.export import export

    last = metrics(run)[-1]
    args = [*FAST, "--data-path", digits, "--eval-only"]
    run_tla("train", *args, "--resume", run / ckpt.LAST, "--eval-weights", "ema", "--output-dir", tmp_path / "a",
            check=True)
    result = json.loads((tmp_path / "a" / rundir.EVAL).read_text())
    assert (result["acc1"], result["acc5"]) == pytest.approx((last["ema_acc1"], last["ema_acc5"]), abs=1e-9)
    assert result["weights"] == "ema" and result["checkpoint_sha256"] == ckpt.file_sha256(run / ckpt.LAST)
    exported = tmp_path / "ema.safetensors"
    export(run / ckpt.LAST, exported, weights="ema")
    run_tla("train", *args, "--resume", exported, "--output-dir", tmp_path / "b", check=True)
    result = json.loads((tmp_path / "b" / rundir.EVAL).read_text())
    assert result["acc1"] == pytest.approx(last["ema_acc1"], abs=1e-9) and result["export"]
    assert result["checkpoint_sha256"] == ckpt.file_sha256(exported) and result["epoch"] == EPOCHS
    proc = run_tla("train", *[a if a != "tla_vit_nano" else "tla_vit_micro" for a in args], "--resume", exported,
                   "--output-dir", tmp_path / "c")
    assert_clean_error(proc, "is a tla_vit_nano with 10 classes; this run is a tla_vit_micro")


def test_config_yaml_repeats_the_run(run):
    payload, _ = ckpt.load(run / ckpt.LAST)
    text = (run / rundir.CONFIG_YAML).read_text()
    assert text.startswith("#")
    assert TrainConfig(**load_config_file(run / rundir.CONFIG_YAML)) == TrainConfig(**payload["config"])
    assert load_config_file(run / rundir.CONFIG_YAML) == payload["config"]


@pytest.mark.parametrize("text, message", [
    (None, "does not exist"),
    ("epochs: [1\n", "not valid YAML at line 2"),
    ("- epochs\n", "must be a mapping"),
    ("epochs: 2\nbatch_sise: 8\n", "unknown option(s) batch_sise (did you mean batch_size?)"),
])
def test_config_file_errors_are_one_line(tmp_path, text, message):
    path = tmp_path / "recipe.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(TlaError) as err:
        load_config_file(path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_config_file_takes_command_line_spellings_and_an_empty_file(tmp_path):
    (tmp_path / "a.yaml").write_text("batch-size: 8\nmodel_ema: true\n")
    assert load_config_file(tmp_path / "a.yaml") == {"batch_size": 8, "model_ema": True}
    (tmp_path / "b.yaml").write_text("# nothing yet\n")
    assert load_config_file(tmp_path / "b.yaml") == {}


def test_without_tensorboard_one_warning_and_the_run_goes_on(digits, tmp_path):
    fake = tmp_path / "site"
    (fake / "tensorboard").mkdir(parents=True)
    (fake / "tensorboard" / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    out = tmp_path / "run"
    proc = run_tla("train", *FAST, "--data-path", digits, "--output-dir", out, "--epochs", "1",
                   env={"PYTHONPATH": str(fake)}, check=True)
    assert proc.stderr.count("TensorBoard curves are off") == 1
    assert not (out / rundir.TENSORBOARD_DIR).exists()
    assert [k for k in metrics(out)[0] if k.startswith("ema")] == []  # EMA off: no EMA columns


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed here")
def test_wandb_without_the_package_is_one_line(digits, tmp_path):
    proc = run_tla("train", *FAST, "--data-path", digits, "--output-dir", tmp_path / "run", "--wandb")
    assert_clean_error(proc, "--wandb needs the wandb package")
    assert not (tmp_path / "run").exists()
