"""Numbers read from the environment (TLA_CPU_THREADS, WORLD_SIZE, RANK, SLURM_RESTART_COUNT, ...),
parsed in one place: a value that is not a number, or is out of its range, is one TlaError line
naming the variable and what it should be, never a ValueError traceback in a rank.

Free of torch (the CLI reads some of these too). os.environ itself stays the source: these
helpers only parse.
"""

from __future__ import annotations

import math
import os

from tla_jobs.errors import TlaError


def env_int(name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    """$name as an integer in [lo, hi]; ``default`` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        raise TlaError(f"environment variable {name}={raw[:40]!r} is not a whole number"
                       f"{_range(lo, hi)}") from None
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise TlaError(f"environment variable {name}={value} is out of range{_range(lo, hi)}")
    return value


def env_float(name: str, default: float, lo: float | None = None, hi: float | None = None) -> float:
    """$name as a finite number in [lo, hi]; ``default`` when unset or empty."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise TlaError(f"environment variable {name}={raw[:40]!r} is not a number{_range(lo, hi)}") from None
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise TlaError(f"environment variable {name}={raw[:40]} is out of range{_range(lo, hi)}")
    return value


def _range(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f" (expected {lo} to {hi})"
    if lo is not None:
        return f" (expected at least {lo})"
    if hi is not None:
        return f" (expected at most {hi})"
    return ""


# The bounds of the variables tla reads. A CPU thread count above this is a typo (1e9 threads would
# make torch try to start them); ranks beyond this are no cluster's.
MAX_THREADS = 4096
MAX_RANKS = 1 << 20


def cpu_threads() -> int | None:
    """TLA_CPU_THREADS: torch threads per trainer process; None when unset (share the cores)."""
    value = env_int("TLA_CPU_THREADS", 0, lo=1, hi=MAX_THREADS)
    return value or None


def rendezvous_timeout_s() -> float:
    """TLA_RENDEZVOUS_TIMEOUT_S: how long ranks wait for each other (train/distributed.py)."""
    return env_float("TLA_RENDEZVOUS_TIMEOUT_S", 300.0, lo=1.0, hi=7 * 24 * 3600.0)


def sigterm_wait_s() -> float:
    """TLA_SIGTERM_WAIT_S: how long a checkpointed trainer waits for SLURM's SIGKILL (train/signals.py)."""
    return env_float("TLA_SIGTERM_WAIT_S", 600.0, lo=0.0, hi=7 * 24 * 3600.0)


def check_job_env() -> None:
    """The variables a submitted job inherits and reads, checked before anything is queued (a bad
    one would otherwise stop every rank of the job after it waited in the queue)."""
    cpu_threads()
    rendezvous_timeout_s()
    sigterm_wait_s()


def world_size() -> int:
    return env_int("WORLD_SIZE", 1, lo=1, hi=MAX_RANKS)


def rank() -> int:
    return env_int("RANK", 0, lo=0, hi=MAX_RANKS - 1)


def local_rank() -> int:
    return env_int("LOCAL_RANK", 0, lo=0, hi=MAX_RANKS - 1)


def local_world_size(world: int) -> int:
    return env_int("LOCAL_WORLD_SIZE", world, lo=1, hi=MAX_RANKS)


def restart_count() -> int:
    """SLURM_RESTART_COUNT: how often SLURM requeued this job (0 when not set)."""
    return env_int("SLURM_RESTART_COUNT", 0, lo=0, hi=10**9)


def check_trainer_env() -> None:
    """Every variable the trainer reads, checked before it does anything (`tla train`'s preflight)."""
    check_job_env()
    world = world_size()
    rank()
    local, local_world = local_rank(), local_world_size(world)
    if "LOCAL_RANK" in os.environ and local >= local_world:
        raise TlaError(f"environment: LOCAL_RANK={local} is not below LOCAL_WORLD_SIZE={local_world} (the ranks of "
                       "this node)")
    restart_count()
    in_job = "SUBMITIT_EXECUTOR" in os.environ or "SLURM_JOB_ID" in os.environ  # these set the address later
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if world > 1 and missing and ("RANK" in os.environ or not in_job):
        raise TlaError(f"environment: WORLD_SIZE={world} but {' and '.join(missing)} not set: the ranks need an "
                       "address to meet (torchrun and SLURM jobs set them)")
