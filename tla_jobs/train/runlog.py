"""What an attempt writes into its run directory besides checkpoints: attempts, heartbeat, metrics,
summary; and the fencing that keeps a superseded attempt from writing any of it.

Fencing: SLURM may requeue a job whose node stopped answering while the old process still runs
there (the node's slurmd died, the trainer did not). Each attempt takes ownership of the run at
start by writing ``owner.json`` with a fresh attempt id; before every write it checks the file
still names it. An attempt that lost ownership writes nothing more and exits with
EXIT_SUPERSEDED. Only rank 0 writes run files, so only rank 0 checks; the loop spreads the verdict.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from tla_jobs import __version__, rundir
from tla_jobs.fsutil import atomic_write_json, atomic_write_text, read_json

log = logging.getLogger("tla.train")


class Superseded(Exception):
    """Another attempt owns the run now; this one must stop without writing."""


class RunLog:
    def __init__(self, out: Path, is_main: bool, world_size: int, epochs: int):
        self.out, self.is_main, self.world_size, self.epochs = out, is_main, world_size, epochs
        self.attempt_id = uuid.uuid4().hex
        self.owner: dict | None = None

    # ---- ownership ---------------------------------------------------------------------------
    def take_ownership(self) -> None:
        if self.is_main:
            self.owner = {"attempt_id": self.attempt_id, **rundir.job_identity(), "time": time.time()}
            atomic_write_json(self.out / rundir.OWNER, self.owner)

    def owns_run(self) -> bool:
        if not self.is_main or self.owner is None:
            return True
        current = read_json(self.out / rundir.OWNER, default=None)
        return not isinstance(current, dict) or current.get("attempt_id") == self.attempt_id

    def check_owner(self) -> None:
        if not self.owns_run():
            current = read_json(self.out / rundir.OWNER, default={}) or {}
            raise Superseded(
                f"attempt {self.attempt_id[:8]} was superseded by attempt {str(current.get('attempt_id'))[:8]} "
                f"(job {current.get('job_id')}, restart {current.get('restart_count')}, host {current.get('host')})"
            )

    # ---- records -----------------------------------------------------------------------------
    def record_attempt(self, event: str, **fields) -> None:
        """One line of attempts.jsonl: event 'start' or 'end', with who ran it."""
        if self.is_main:
            self.check_owner()
            rundir.append_event(
                self.out / rundir.ATTEMPTS,
                {"event": event, "attempt_id": self.attempt_id, **fields, **rundir.job_identity()},
            )

    def heartbeat(self, phase: str, p, steps_per_epoch: int, lr: float = 0.0, rates: dict | None = None) -> None:
        if not self.is_main:
            return
        self.check_owner()
        atomic_write_json(
            self.out / rundir.HEARTBEAT,
            {
                "phase": phase,
                "epoch": p.epoch,
                "epochs": self.epochs,
                "step": p.step_in_epoch,
                "steps_per_epoch": steps_per_epoch,
                "global_step": p.global_step,
                "train_loss": p.loss_sum / max(p.loss_count, 1),
                "lr": lr,
                "images_per_s": 0.0,
                **(rates or {}),
                "time": time.time(),
                "world_size": self.world_size,
                "attempt_id": self.attempt_id,
                "progress": rundir.metrics_summary(p.history),
                **rundir.job_identity(),
            },
        )

    def metrics(self, history: list[dict]) -> None:
        if self.is_main:
            self.check_owner()
            atomic_write_text(self.out / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in history))

    def summary(self, summary: dict) -> None:
        if self.is_main:
            self.check_owner()
            atomic_write_json(self.out / rundir.SUMMARY, summary)


def waiting_for_ranks(out: Path, world_size: int) -> None:
    """Rank 0's heartbeat while the process group forms, so `tla status` can say so."""
    atomic_write_json(
        out / rundir.HEARTBEAT,
        {"phase": "waiting for ranks", "world_size": world_size, "time": time.time(), "version": __version__,
         **rundir.job_identity()},
    )
