"""SIGUSR2 / SIGTERM: finish the current step, write a checkpoint, stop.

SLURM sends SIGTERM on `scontrol requeue` and on preemption (then SIGKILL after KillWait or
GraceTime); submitit's time-limit and preemption signal is SIGUSR2 (`--signal=USR2@delay`). A
checkpoint written from inside a signal handler could catch the optimizer half-way through a
step, so the handler only records the signal and the training loop acts on it at the next step
boundary. submitit's own USR2 handler (which requeues the job) is kept and called after the
checkpoint is on disk.

After a SIGTERM inside a SLURM job the trainer must not exit on its own: with preemption by
SIGTERM + GraceTime (PreemptMode=REQUEUE, the common site set-up) or `scontrol requeue`, SLURM
requeues a job that it ends itself, but a job that exits during the grace time is recorded FAILED
and never comes back. So after its checkpoint the trainer waits to be killed.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("tla.train")


class StopSignals:
    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict[int, object] = {}

    def _handler(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGUSR2, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def submitit_requeue(self) -> bool:
        """Hand SIGUSR2 to submitit's handler, which requeues the job (and exits) on rank 0.
        Returns False when no submitit handler was installed (a plain shell or torchrun)."""
        if os.environ.get("TLA_HOST_REQUEUE") == "1":
            return False  # in a container: the host batch shell requeues (no scontrol in here)
        handler = self.previous.get(signal.SIGUSR2)
        owner = getattr(handler, "__self__", None)
        if owner is None or type(owner).__module__.split(".")[0] != "submitit":
            return False
        self.restore()
        handler(signal.SIGUSR2, None)
        return True


def must_wait_for_kill(signame: str) -> bool:
    """SIGTERM in a SLURM job (not in a container whose host shell requeues): let SLURM end it."""
    return (signame == "SIGTERM" and bool(os.environ.get("SLURM_JOB_ID"))
            and os.environ.get("TLA_HOST_REQUEUE") != "1")


def wait_for_kill() -> None:
    """Sleep until SLURM's SIGKILL (bounded by TLA_SIGTERM_WAIT_S, default 600 s); SIGTERMs that
    arrive meanwhile are ignored."""
    from tla_jobs import envvars

    limit = envvars.sigterm_wait_s()
    log.info("checkpoint written; waiting for SLURM to end the job (it requeues jobs it ends itself)")
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(min(1.0, max(deadline - time.monotonic(), 0.0)))
