"""The trainer's GPU-first mechanics, checked on the CPU: host-device synchronisations per step,
batches normalised and erased on the device, --compile, --dataset synthetic and throughput figures,
fencing of a superseded attempt, SIGTERM inside a SLURM job, the rendezvous heartbeat."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import FAST, TLA, run_tla

from tla_jobs import rundir
from tla_jobs.config import TrainConfig
from tla_jobs.data.device import DeviceTransform
from tla_jobs.train import checkpoint as ckpt

pytestmark = pytest.mark.slow  # trains real models: `make test`, not `make test-fast`

# Calls that make the host wait for a GPU when their tensor lives there.
SYNCS = ("item", "__bool__", "tolist", "cpu", "numpy", "__float__", "__int__")
HOST_SIDE = (f"{os.sep}tla_jobs{os.sep}data{os.sep}", f"{os.sep}align{os.sep}cutmix.py")


class SyncCounter:
    """Counts the synchronising calls that the trainer's own code makes inside the training loop's
    steps (loop.train_one_epoch), by wrapping those Tensor methods for the test. Left out: checkpoint
    writes and the end of an epoch (once per checkpoint or epoch, not per step), calls made inside
    torch itself (the optimizer's CPU step counters, the loader's seeds), and the host-side data code
    (tla_jobs/data; align/cutmix.py's draws from the CPU mixing generator), whose tensors are on
    the CPU on every machine."""

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in SYNCS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name)))

    def _wrap(self, method):
        def counted(tensor, *args, **kwargs):
            caller = sys._getframe(1)
            where = caller.f_code.co_filename
            if f"{os.sep}tla_jobs{os.sep}" in where and not any(h in where for h in HOST_SIDE):
                names, frame = set(), caller
                while frame is not None:
                    names.add(frame.f_code.co_name)
                    frame = frame.f_back
                if "train_one_epoch" in names and not names & {"save", "end_epoch"}:
                    inside = "in check" if "check" in names else "outside check"
                    self.calls.append(f"{Path(where).name}:{caller.f_lineno} {method.__name__} {inside}")
            return method(tensor, *args, **kwargs)

        return counted


def _cfg(digits, out, **kw) -> TrainConfig:
    """conftest.FAST as a TrainConfig."""
    args = list(FAST)
    base = {}
    while args:
        flag = args.pop(0)
        if flag.startswith("--no-"):
            base[flag[5:].replace("-", "_")] = False
        else:
            base[flag[2:].replace("-", "_")] = args.pop(0)
    return TrainConfig(**{**base, "data_path": str(digits), "output_dir": str(out), **kw})


def test_training_synchronises_per_check_not_per_step(digits, tmp_path, monkeypatch):
    from tla_jobs.train.loop import train

    # Checks come about every 2 s; a loaded 2-core machine makes steps slow enough that 2 s
    # is a few steps, so the interval is widened here to see what the loop itself does per step.
    monkeypatch.setattr("tla_jobs.train.loop.CHECK_EVERY_S", 30.0)
    monkeypatch.setenv("PYTHONHASHSEED", "0")  # what train() sets for its process
    counter = SyncCounter(monkeypatch)
    summary = train(_cfg(digits, tmp_path / "run", epochs=2, checkpoint_every_min=0))
    steps = summary["global_step"]
    assert steps >= 80
    # The loop reads the device once per check (about every 2 s), so the count is far below
    # one per step; before, loss.item() and the stop flags made three per step.
    assert 1 <= len(counter.calls) <= steps / 4, counter.calls
    assert all(c.endswith(" in check") for c in counter.calls), counter.calls  # none in the step itself


def test_device_transform_normalises_and_erases_reproducibly():
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    images = torch.randint(0, 256, (64, 3, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    plain = DeviceTransform(torch.device("cpu"), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)(images)
    expected = (images.float() / 255 - torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    assert torch.allclose(plain, expected, atol=1e-5)

    erase = DeviceTransform(torch.device("cpu"), IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, reprob=0.5)
    a, b, c = erase(images, seed=7), erase(images, seed=7), erase(images, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)  # a resumed step erases the same pixels
    changed = (a != plain).any(dim=1)  # (B, H, W) pixels replaced by noise
    erased = changed.flatten(1).any(dim=1)
    assert 16 <= int(erased.sum()) <= 48  # about half of 64 samples
    for mask in changed[erased]:
        rows, cols = mask.any(dim=1).nonzero(), mask.any(dim=0).nonzero()
        h, w = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert int(mask.sum()) == h * w  # one rectangle
        assert 0.02 * 24 * 24 * 0.5 <= h * w <= 24 * 24 / 3 * 1.5  # timm's area range, up to rounding


def test_synthetic_data_reports_throughput_and_removes_orphaned_temporaries(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    orphan = run / ".checkpoint_last.pth.x1y2.tmp"  # what a kill during a checkpoint write leaves
    orphan.write_bytes(b"partial")
    run_tla("train", "--model", "tla_vit_nano", "--dataset", "synthetic", "--num-classes", "7", "--img-size", "16",
            "--synthetic-images", "256", "--batch-size", "32", "--epochs", "2", "--workers", "0",
            "--peak-tflops", "1.0", "--output-dir", run, check=True, timeout=300)
    assert not orphan.exists()
    rows = [json.loads(x) for x in (run / rundir.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and rows[-1]["global_step"] == 16
    for key in ("images_per_s", "images_per_s_per_device", "tflops_per_device", "mfu", "images_per_s_steady"):
        assert rows[-1][key] > 0, key
    assert rows[-1]["mfu"] == pytest.approx(rows[-1]["tflops_per_device"] / 1.0)
    assert rows[-1]["w_shift"] is not None and 0 <= rows[-1]["w_shift"] <= 1


@pytest.mark.slow
def test_compile_gives_the_same_losses_as_eager(digits, tmp_path):
    losses = {}
    for name, extra in (("eager", []), ("compiled", ["--compile"])):
        run = tmp_path / name
        run_tla("train", *FAST, "--data-path", digits, "--output-dir", run, "--epochs", "1", "--max-steps", "6",
                "--checkpoint-every-min", "0", *extra, check=True, timeout=900)
        losses[name] = json.loads((run / rundir.HEARTBEAT).read_text())["train_loss"]
    assert losses["eager"] > 0
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-3)


def _wait_for(predicate, timeout=120.0, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("condition not reached")


def _heartbeat(run: Path) -> dict:
    try:
        return json.loads((run / rundir.HEARTBEAT).read_text())
    except (OSError, ValueError):
        return {}


def _start(digits, run, env=None, epochs=3, every_min="0.0005"):
    args = [*FAST, "--data-path", digits, "--epochs", str(epochs), "--checkpoint-every-min", every_min,
            "--step-delay", "0.05", "--output-dir", run]
    return subprocess.Popen([*TLA, "train", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_superseded_attempt_stops_writing_and_exits(digits, tmp_path):
    run = tmp_path / "run"
    # Checkpoints only at epoch ends, so none is being written at the moment of the takeover (a write
    # already under way when another attempt takes over is allowed to finish; the heartbeat, written
    # at every check, is left out for the same reason).
    proc = _start(digits, run, every_min="0")
    _wait_for(lambda: _heartbeat(run).get("global_step", 0) >= 3, proc=proc)
    # A newer attempt of the same run (e.g. SLURM's requeue after the node's slurmd died) takes over.
    (run / rundir.OWNER).write_text(json.dumps({"attempt_id": "newer", "job_id": "42", "restart_count": 1}))
    watched = [rundir.METRICS, rundir.ATTEMPTS, ckpt.LAST, ckpt.PREV, ckpt.BEST, rundir.SUMMARY]
    before = {n: (run / n).read_bytes() if (run / n).exists() else None for n in watched}
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rundir.EXIT_SUPERSEDED, err
    assert "superseded by attempt newer" in err
    after = {n: (run / n).read_bytes() if (run / n).exists() else None for n in watched}
    assert after == before  # nothing written after the takeover
    assert json.loads((run / rundir.OWNER).read_text())["attempt_id"] == "newer"


@pytest.mark.slow
def test_sigterm_inside_a_slurm_job_checkpoints_then_waits_to_be_killed(digits, tmp_path):
    run = tmp_path / "run"
    # The variables SLURM sets in a job step (RANK/WORLD_SIZE: one task); the real cluster's
    # preemption is tested in test_slurm_e2e.py.
    env = {"SLURM_JOB_ID": "4242", "RANK": "0", "WORLD_SIZE": "1", "TLA_SIGTERM_WAIT_S": "60"}
    proc = _start(digits, run, env)
    _wait_for(lambda: _heartbeat(run).get("global_step", 0) >= 3, proc=proc)
    proc.send_signal(signal.SIGTERM)

    def ended() -> bool:
        return any('"end"' in x for x in (run / rundir.ATTEMPTS).read_text().splitlines())

    _wait_for(ended, proc=proc)
    end = [json.loads(x) for x in (run / rundir.ATTEMPTS).read_text().splitlines() if '"end"' in x][-1]
    assert end["reason"] == "signal:SIGTERM" and end["job_id"] == "4242"
    ckpt.load(run / ckpt.LAST)  # the checkpoint is complete before the wait
    proc.send_signal(signal.SIGTERM)  # a second SIGTERM (SLURM may repeat it) does not end it either
    time.sleep(3)
    assert proc.poll() is None, "the trainer must leave the job's end to SLURM"
    proc.send_signal(signal.SIGKILL)  # what SLURM does after GraceTime / KillWait
    proc.wait(timeout=30)

    # Outside SLURM (or when the wait runs out) it exits 75 as before.
    proc = _start(digits, run, {**env, "TLA_SIGTERM_WAIT_S": "1"})
    _wait_for(lambda: _heartbeat(run).get("pid") == proc.pid, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == rundir.EXIT_INTERRUPTED, err


def test_rank0_reports_waiting_for_ranks_and_times_out_with_one_line(digits, tmp_path):
    run = tmp_path / "run"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "TLA_RENDEZVOUS_TIMEOUT_S": "6"}
    proc = subprocess.Popen([*TLA, "train", *map(str, FAST), "--data-path", str(digits), "--epochs", "1",
                             "--output-dir", str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})
    _wait_for(lambda: _heartbeat(run).get("phase") == "waiting for ranks", proc=proc)
    assert _heartbeat(run)["world_size"] == 2
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, err
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and "did not all meet" in lines[0] and "Traceback" not in err


def test_status_shows_throughput_of_a_synthetic_smoke_run(tmp_path):
    """The cluster smoke test a user runs before a long job: synthetic data, then `tla status`."""
    from conftest import ROOT

    env = {"TLA_RUNS": str(tmp_path / "runs"), "TLA_CLUSTER_CONFIGS": str(ROOT / "tests" / "profiles")}
    run_tla("submit", "train", "--name", "smoke", "--model", "tla_vit_nano", "--dataset", "synthetic",
            "--num-classes", "7", "--img-size", "16", "--synthetic-images", "256", "--batch-size", "32", "--epochs",
            "1", "--workers", "0", "--peak-tflops", "2.0", env=env, check=True, cwd=tmp_path)
    deadline = time.time() + 300
    while time.time() < deadline:
        st = json.loads(run_tla("status", "smoke", "--json", env=env, check=True, cwd=tmp_path).stdout)[0]
        if st["state"] in ("COMPLETED", "FAILED"):
            break
        time.sleep(1)
    assert st["state"] == "COMPLETED", st
    text = run_tla("status", "smoke", env={**env, "COLUMNS": "200"}, check=True, cwd=tmp_path).stdout
    line = next(x for x in text.splitlines() if x.startswith("last epoch"))
    assert "img/s" in line and "TFLOP/s per device" in line and "MFU" in line, text


def test_an_unreadable_image_the_check_did_not_see_is_skipped_not_fatal(digits, tmp_path):
    """Above 100,000 images the data check samples; a bad file it missed must not stop step N."""
    import shutil

    from torchvision.datasets import ImageFolder

    from tla_jobs.data.loaders import SeededSamples, _loader

    root = tmp_path / "train"
    shutil.copytree(digits / "train", root)
    ds = ImageFolder(str(root), loader=_loader)
    bad_path = Path(ds.samples[3][0])
    bad_path.write_bytes(bad_path.read_bytes()[:20])  # cut off mid-header
    samples = SeededSamples(ds)
    image, label = samples[(3, 123)]
    assert (image.size, label) == (ds[4][0].size, ds[4][1])  # the next readable one stands in
    assert samples[(3, 123)][0].tobytes() == image.tobytes()  # the same one every time (exact resume)
