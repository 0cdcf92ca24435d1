"""Live curves of a run: TensorBoard event files in RUN/tensorboard and, with --wandb, Weights & Biases.

Both are optional extras, written by rank 0 only, and never needed by anything else (metrics.jsonl
stays the record; `tla` reads only that). Without the tensorboard package the trainer logs one
warning and writes no event files; --wandb without the wandb package is refused before anything
starts (:func:`check_wandb`), since the user asked for it explicitly.

Every scalar's step is the global optimizer step, as in timm's and Lightning's logs, so that a
resumed attempt can hide what its killed predecessor wrote after the checkpoint (TensorBoard's
purge_step) and the epoch scalars line up with the per-step ones. Tags:
  per check (about every 2 s): train/loss_step (mean loss since the previous one), speed/images_per_s_step
  per epoch: train/loss, train/lr, val/acc1, val/acc5, val/loss, val/ema_acc1, val/ema_acc5 (with
  --model-ema), align/w_shift (mean |w - λ|, TL-Align only), speed/images_per_s, epoch (epochs done)
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.config import TrainConfig
from tla_jobs.errors import TlaError

log = logging.getLogger("tla.train")

# metrics.jsonl row key -> tag of the epoch scalars
EPOCH_TAGS = {
    "train_loss": "train/loss", "lr": "train/lr", "acc1": "val/acc1", "acc5": "val/acc5", "val_loss": "val/loss",
    "ema_acc1": "val/ema_acc1", "ema_acc5": "val/ema_acc5", "w_shift": "align/w_shift",
    "images_per_s": "speed/images_per_s", "data_wait": "speed/data_wait",
}


class MissingExtra(TlaError):
    """An option needs a package that is not installed."""


def check_wandb(cfg: TrainConfig) -> None:
    """--wandb needs the wandb package: one line saying how to get it, before any process group."""
    if cfg.wandb and importlib.util.find_spec("wandb") is None:
        raise MissingExtra("--wandb needs the wandb package, which is not installed here "
                           "(pip install wandb, or leave --wandb off)")


class Curves:
    """Rank 0's writers; on other ranks, or with nothing to write to, every call does nothing."""

    def __init__(self, cfg: TrainConfig, out: Path, is_main: bool, start_step: int = 0):
        self.tb = self.wandb = None
        self.last = (0, 0.0, 0)  # epoch, loss sum and count at the previous per-step point
        if not is_main:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log.warning("TensorBoard curves are off: the tensorboard package is not installed "
                            "(pip install tensorboard; --no-tensorboard turns this warning off)")
            else:
                # TensorBoard hides what an earlier attempt logged after the step this one starts from
                self.tb = SummaryWriter(str(out / rundir.TENSORBOARD_DIR), purge_step=start_step + 1,
                                        flush_secs=30)
        if cfg.wandb:
            import wandb

            run_id = hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:16]  # the same for every attempt
            self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "tla"), name=out.name, id=run_id,
                                    resume="allow", dir=str(out), config=cfg.model_dump())

    def _write(self, step: int, scalars: dict) -> None:
        scalars = {k: v for k, v in scalars.items() if isinstance(v, (int, float))}
        if self.tb is not None:
            for tag, value in scalars.items():
                self.tb.add_scalar(tag, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def step(self, p, rates: dict) -> None:
        """A per-step point (at a heartbeat): the mean loss since the previous point, images/s."""
        if self.tb is None and self.wandb is None:
            return
        epoch, loss_sum, count = self.last
        if epoch != p.epoch or count > p.loss_count:
            loss_sum, count = 0.0, 0
        self.last = (p.epoch, p.loss_sum, p.loss_count)
        scalars = {"speed/images_per_s_step": rates.get("images_per_s"), "speed/data_wait_step": rates.get("data_wait")}
        if p.loss_count > count:
            scalars["train/loss_step"] = (p.loss_sum - loss_sum) / (p.loss_count - count)
        self._write(p.global_step, scalars)

    def epoch(self, row: dict) -> None:
        """The epoch's metrics row, at its last step."""
        if self.tb is None and self.wandb is None:
            return
        self._write(row["global_step"], {"epoch": row["epoch"] + 1,
                                         **{tag: row.get(key) for key, tag in EPOCH_TAGS.items()}})
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
