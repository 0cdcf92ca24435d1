"""What an attempt writes into its run directory besides checkpoints: attempts, heartbeat, metrics,
summary; and the fencing that keeps a superseded attempt from writing any of it.

Torch-free, so code outside the trainer (the job entry point) can record attempts with it too.

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
from tla_jobs.config import TrainConfig
from tla_jobs.errors import TlaError
from tla_jobs.fsutil import atomic_write_json, atomic_write_text, read_json, read_jsonl

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
    def record_attempt(self, event: str, p=None, **fields) -> None:
        """One line of attempts.jsonl: event 'start' or 'end', where training stood (a Progress, or
        None before the trainer has one), ``fields`` (resumed_from; reason, error), and who ran it."""
        if self.is_main:
            self.check_owner()
            where = {"epoch": p.epoch, "step": p.step_in_epoch, "global_step": p.global_step} if p is not None else {}
            rundir.append_event(
                self.out / rundir.ATTEMPTS,
                {"event": event, "attempt_id": self.attempt_id, **where, **fields, **rundir.job_identity()},
            )

    def refuse_if_stalled(self, max_stalled_attempts: int, p) -> None:
        """Stop a requeue loop that never advances: N+1 attempts in a row starting at the same step."""
        n = max_stalled_attempts
        if not n:
            return
        rows = read_jsonl(self.out / rundir.ATTEMPTS)
        starts = [e.get("global_step") for e in rows if e.get("event") == "start"]
        if len(starts) > n and len(set(starts[-(n + 1):])) == 1:
            msg = f"no progress in the last {n} attempts (all stopped before step {p.global_step + 1}); not continuing"
            error = next((e["error"] for e in reversed(rows) if e.get("event") == "end" and e.get("error")), None)
            if error:  # a failure that repeats at the same step: say which
                msg += f"; last error: {error}"
            self.record_attempt("end", p, reason="stalled", error=msg)
            raise TlaError(msg)

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

    def config(self, cfg: TrainConfig) -> None:
        """config.yaml: the resolved TrainConfig of this attempt, so `--config RUN/config.yaml` repeats the run."""
        if self.is_main:
            import yaml

            self.check_owner()
            resolved = cfg.model_dump()
            if not resolved["resume"]:
                # a later attempt continues from the run's own checkpoints (resume ""), but the run
                # began from the first attempt's --resume: repeating it must start there too
                first = rundir.read_config(self.out) or {}  # checked already (recipe.check_folder)
                resolved["resume"] = str(first.get("resume") or "")
            head = (f"# the resolved config of {self.out.name} (tla {__version__}); repeat it with "
                    "--config FILE --output-dir NEW\n")
            atomic_write_text(self.out / rundir.CONFIG_YAML, head + yaml.safe_dump(resolved, sort_keys=False))

    def metrics(self, history: list[dict]) -> None:
        if self.is_main:
            self.check_owner()
            atomic_write_text(self.out / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in history))

    def summary(self, p, reason: str, cfg: TrainConfig, num_classes: int) -> dict:
        """summary.json at the end of training: what ran, how far, the best and last epoch."""
        history = p.history
        best = max(history, key=lambda r: r["acc1"]) if history else None
        last = history[-1] if history else None
        summary = {
            "model": cfg.model,
            "mixing": cfg.mixing(),
            "tl_align": cfg.tl_align,
            "num_classes": num_classes,
            "epochs": cfg.epochs,
            "epochs_done": p.epoch,
            "global_step": p.global_step,
            "end_reason": reason,
            "best_acc1": best["acc1"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "best_acc5": best["acc5"] if best else None,
            "last_acc1": last["acc1"] if last else None,
            "last_acc5": last["acc5"] if last else None,
            "world_size": self.world_size,
            "time": time.time(),
            "version": __version__,
        }
        if self.is_main:
            self.check_owner()
            atomic_write_json(self.out / rundir.SUMMARY, summary)
        return summary


def waiting_for_slot(out: Path, parallel: int) -> None:
    """The heartbeat of a local sweep's run while the sweep's other runs take every slot."""
    atomic_write_json(
        out / rundir.HEARTBEAT,
        {"phase": "waiting for a slot", "array_parallelism": parallel, "time": time.time(), "version": __version__,
         **rundir.job_identity()},
    )


def waiting_for_ranks(out: Path, world_size: int) -> None:
    """Rank 0's heartbeat while the process group forms, so `tla status` can say so."""
    atomic_write_json(
        out / rundir.HEARTBEAT,
        {"phase": "waiting for ranks", "world_size": world_size, "time": time.time(), "version": __version__,
         **rundir.job_identity()},
    )
