"""Where training stands (saved in every checkpoint) and the loop's two clocks: when to check, and
how fast an epoch runs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

MAX_CHECK_EVERY = 100  # steps between two checks at most


@dataclass
class Progress:
    """Where training stands; all of it goes into every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # batches of this epoch already trained (the sampler resumes after them)
    global_step: int = 0
    loss_sum: float = 0.0  # this epoch's running train loss, so a resumed epoch reports the same mean
    loss_count: int = 0
    shift_sum: float = 0.0  # this epoch's running mean |w_cls - λ| (aligned batches only)
    shift_count: int = 0
    best_acc1: float = -1.0
    global_batch: int = 0  # images per optimizer step, all ranks: the run's, kept on any number of ranks (0: unknown)
    history: list = field(default_factory=list)  # metrics.jsonl rows, rewritten from here on resume

    _KEYS = {"train_loss_sum": "loss_sum", "train_loss_count": "loss_count", "metrics": "history"}

    def as_payload(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {next((k for k, v in self._KEYS.items() if v == name), name): val for name, val in d.items()}

    @classmethod
    def from_payload(cls, payload: dict) -> Progress:
        names = {f.name for f in fields(cls)}
        kw = {cls._KEYS.get(k, k): v for k, v in payload.items() if cls._KEYS.get(k, k) in names}
        kw["history"] = list(kw.get("history", []))
        return cls(**kw)

    def fold(self, sums: list[float]) -> None:
        """Add what TrainStep.read() returned: loss sum, steps, non-finite, |w - λ| sum, aligned steps."""
        self.loss_sum += sums[0]
        self.loss_count += int(sums[1])
        self.shift_sum += sums[3]
        self.shift_count += int(sums[4])

    def next_epoch(self) -> None:
        """The epoch is done (its metrics row is in history): the next one starts at step 0."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.loss_sum, self.loss_count, self.shift_sum, self.shift_count = 0.0, 0, 0.0, 0


class CheckClock:
    """When the loop next synchronises: every k steps, k chosen from the agreed step time so that a
    check comes about every ``every_s`` seconds. Ranks must check at the same steps (the check is a
    collective), so k only changes from values all ranks share. A single process needs no
    agreement and also checks at once when a signal or the checkpoint clock asks for it.
    Also the run's other two clocks: when a checkpoint is due, and when a heartbeat."""

    def __init__(self, info, every_s: float, heartbeat_every_s: float, checkpoint_every_min: float):
        self.info, self.every_s, self.every, self.since = info, every_s, 1, 0
        self.heartbeat_every_s, self.checkpoint_every_s = heartbeat_every_s, 60 * checkpoint_every_min
        self.mark = self.last_save = time.monotonic()
        self.last_beat = 0.0

    def now(self, host_wants: bool, force: bool) -> bool:
        self.since += 1
        return force or self.since >= self.every or (host_wants and not self.info.distributed)

    def step_seconds(self) -> float:
        return (time.monotonic() - self.mark) / max(self.since, 1)

    def agreed(self, step_s: float) -> None:
        self.every = int(min(MAX_CHECK_EVERY, max(1, self.every_s / max(step_s, 1e-6))))
        self.since, self.mark = 0, time.monotonic()

    def checkpoint_due(self) -> bool:
        """--checkpoint-every-min has passed since the last save (0: only at epoch ends)."""
        return self.checkpoint_every_s > 0 and time.monotonic() - self.last_save >= self.checkpoint_every_s

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def heartbeat_due(self) -> bool:
        """True (and the clock restarts) when the last heartbeat is ``heartbeat_every_s`` old."""
        now = time.monotonic()
        if now - self.last_beat < self.heartbeat_every_s:
            return False
        self.last_beat = now
        return True


class EpochClock:
    """Images/s of an epoch, overall and in steady state (after the first few steps' start-up)."""

    def __init__(self, start_step: int, steps_per_epoch: int, global_batch: int):
        self.start, self.global_batch, self.start_step = time.monotonic(), global_batch, start_step
        self.warm_step = start_step + min(10, max(1, (steps_per_epoch - start_step) // 4))
        self.warm_time: float | None = None
        self.images = 0
        self.steps = 0

    def stepped(self, step_in_epoch: int) -> None:
        self.images += self.global_batch
        self.steps = step_in_epoch
        if step_in_epoch == self.warm_step:
            self.warm_time = time.monotonic()

    def rate(self, now: float) -> float:
        if self.warm_time is not None and self.steps > self.warm_step and now > self.warm_time:
            return (self.steps - self.warm_step) * self.global_batch / (now - self.warm_time)
        return self.images / max(now - self.start, 1e-9)
