"""A trained run that several test modules read (test_checkpoints, test_run_outputs), made once per
test session, on whichever xdist worker asks first; tests that change it work on a copy."""

from __future__ import annotations

from pathlib import Path

from conftest import FAST, once, run_tla

EPOCHS = 4
# 4 epochs with a checkpoint_epoch{N} every epoch, the newest 2 kept and the best 1 too, EMA on (a
# fast decay, so that its accuracy differs from the model's within 4 epochs)
RECIPE = [*FAST, "--epochs", str(EPOCHS), "--checkpoint-every-epochs", "1", "--model-ema", "--model-ema-decay", "0.9"]


def trained_run(shared_dir: Path, digits: Path) -> Path:
    def make() -> str:
        out = shared_dir / "trained-run"
        run_tla("train", *RECIPE, "--data-path", digits, "--output-dir", out, "--keep-last", "2", "--keep-best", "1",
                check=True, timeout=600)
        return str(out)

    return Path(once(shared_dir, "trained-run", make))
