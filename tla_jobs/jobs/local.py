"""The local executor's jobs as processes: a job id is the PID of submitit's controller, told apart
from a later process with the same PID by its start time and the boot; its state from the process
table and submitit's result pickle; cancelling it (TERM, then INT, then KILL of its group)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tla_jobs import procs, rundir
from tla_jobs.fsutil import UnsafeFile, open_for_append
from tla_jobs.jobs import pickles
from tla_jobs.jobs.scheduler import JobRecord

KILL_WAIT_S = 10.0  # like SLURM's KillWait: time to checkpoint on SIGTERM before the job is stopped harder
MAX_ATTEMPTS = 6  # submitit's local controller restarts a requeued task up to 6 times


def executor(profile, folder: Path, name: str, env: dict[str, str] | None = None):
    """submitit's local executor for this profile, whose controller outlives `tla` (executors.py)."""
    from tla_jobs.jobs.executors import DetachedLocalExecutor

    ex = DetachedLocalExecutor(folder, log=folder / rundir.CONTROLLER_LOG, env=env)
    ex.update_parameters(timeout_min=profile.local.timeout_min, tasks_per_node=profile.local.tasks, nodes=1,
                         name=name)
    return ex


SLOTS_ENV = "TLA_SWEEP_SLOTS"  # "N:FOLDER": at most N runs of this local sweep train at once


def default_parallelism(tasks: int) -> int:
    """A local sweep's runs at once by default: one per core (each run's ranks count)."""
    return max(1, (os.cpu_count() or 1) // tasks)


def sweep_env(elements: int, tasks: int, parallel: int, folder: Path) -> dict[str, str]:
    """submitit's local executor starts every element of an array at once and has no array
    parallelism: the elements take turns through ``parallel`` slots (wait_for_slot), and the cores
    are shared between the runs that train at the same time (24 threads on 2 cores run slower than 2).
    A TLA_CPU_THREADS the user set wins: only they know what else shares the cores (two sweeps at once
    with two threads each ran 4.5x slower on 2 cores than with one)."""
    running = min(elements, parallel)
    from tla_jobs import envvars

    threads = envvars.cpu_threads() or max(1, (os.cpu_count() or 1) // (running * tasks))
    return {"TLA_CPU_THREADS": str(threads),
            SLOTS_ENV: f"{parallel}:{folder / 'slots'}"}


def _held(path: Path) -> bool:
    """Another process holds the lock on ``path``."""
    import fcntl

    try:
        with os.fdopen(open_for_append(path), "a") as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return False
    except BlockingIOError:
        return True
    except (OSError, UnsafeFile):
        return False


def wait_for_slot(run_dir: Path, is_main: bool, on_wait=None, poll_s: float = 1.0):
    """In a local sweep's job (SLOTS_ENV set): block until fewer than N of the sweep's runs train,
    then hold this run's slot until the process ends (an flock: a crashed or killed run frees it).
    Rank 0 takes the slot under the sweep's mutex; the other ranks of the run wait until it has.
    Returns the open lock file to keep (None outside a local sweep)."""
    import fcntl

    spec = os.environ.get(SLOTS_ENV)
    if not spec:
        return None
    count, where = spec.split(":", 1)
    parallel, folder = int(count), Path(where)
    folder.mkdir(parents=True, exist_ok=True)
    mine = folder / f"{run_dir.name}.lock"
    waited = False
    while True:
        if not is_main:
            if _held(mine):
                return None
        else:
            with os.fdopen(open_for_append(folder / "mutex"), "a") as mutex:  # no link, no FIFO
                fcntl.flock(mutex, fcntl.LOCK_EX)
                running = sum(_held(p) for p in folder.glob("*.lock") if p != mine)
                if running < parallel:
                    held = os.fdopen(open_for_append(mine), "a")  # held until the process ends
                    fcntl.flock(held, fcntl.LOCK_EX)
                    return held
        if on_wait is not None and is_main and not waited:  # only rank 0 writes the run's files
            on_wait(parallel)
        waited = True
        time.sleep(poll_s)


CONTROLLER = "submitit.local._local"  # the local job's controller: python -m submitit.local._local FOLDER
TASK = "submitit.core._submit"  # each of its tasks (the trainer's ranks): python -u -m submitit.core._submit FOLDER


def folder_of(entry: dict, run_dir: Path) -> Path:
    """The submitit folder of a job of the run: its own (RUN/submitit), or for a sweep's element the
    sweep's beside it (ROOT/.sweep-NAME). A folder run.json names anywhere else (by hand, or a copied
    record) is not believed: tla would read, and act on, another run's jobs through it."""
    own = run_dir / rundir.SUBMITIT_DIR
    named = entry.get("submitit_folder")
    if not isinstance(named, str) or not named:
        return own
    folder = Path(named)
    beside = os.path.realpath(folder.parent) == os.path.realpath(run_dir.parent)
    return folder if beside and folder.name.startswith(rundir.SWEEP_DIR.format(name="")) else own


def alive(entry: dict, folder: Path) -> bool:
    """Is the local job's controller (submitit's, PID = job id) still the process that was
    started? PIDs wrap: a bare PID may name any later process. The process must be submitit's
    controller of this job's folder (its command line), and, where the record has them, started at the
    time and in the boot recorded at submission."""
    job_id = str(entry.get("job_id", ""))
    if not job_id.isdigit() or not procs.running(int(job_id)):
        return False
    pid = int(job_id)
    if entry.get("pid_start") is not None and not procs.same_process(pid, entry):
        return False
    return procs.names_folder(pid, CONTROLLER, folder)


def state(entry: dict, folder: Path) -> JobRecord:
    """The job's state from the process table, and submitit's result once the process is gone."""
    job_id = str(entry.get("job_id", ""))
    outcome = pickles.outcome(folder, job_id)
    if alive(entry, folder):
        st = "RUNNING"
    elif outcome == "success":
        st = "COMPLETED"
    elif outcome == "error":
        st = "FAILED"
    else:
        st = "ENDED"  # gone without a result: killed, cancelled or crashed
    return JobRecord(job_id, st, "process table")


def cancel(entries: list[dict], run_dir: Path, kill_wait_s: float = KILL_WAIT_S) -> list[str]:
    """Stop these local jobs, each only while its controller is the very process that was started:
    SIGTERM (forwarded to the tasks, which checkpoint), after ``kill_wait_s`` SIGINT (submitit then
    kills its tasks) and finally SIGKILL of its process group. A task still starting up ignores
    SIGTERM (submitit's handler only logs it). Returns the ids signalled."""
    live = [e for e in entries if alive(e, folder_of(e, run_dir))]

    def still(e):
        return alive(e, folder_of(e, run_dir))

    def send(sig, group=False):
        for e in live:
            if still(e):
                pid = int(e["job_id"])
                try:
                    if group and os.getpgid(pid) == pid:
                        os.killpg(pid, sig)  # the controller leads its own session
                    else:
                        os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    send(signal.SIGTERM)
    for sig, wait in ((signal.SIGINT, kill_wait_s), (signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(still(e) for e in live):
            time.sleep(0.2)
        if not any(still(e) for e in live):
            break
        send(sig, group=sig == signal.SIGKILL)
    return [str(e["job_id"]) for e in live]


def signal_trainer(run_dir: Path, beat: dict, sig: str, folder: Path) -> None:
    """Send SIG``sig`` to the run's trainer process, named by its live heartbeat, only when that PID is
    provably the trainer: the process started when the heartbeat says (not a later process that got
    the PID after the trainer ended), runs submitit's task of this run's job folder ``folder`` and holds
    a file of the run open (its log), so a heartbeat anyone could have written names no other process."""
    from tla_jobs.errors import TlaError

    pid = beat.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1 or \
            beat.get("phase") not in ("training", "evaluating"):
        raise TlaError(f"run {run_dir.name} is not training (no live heartbeat)")
    if not procs.running(pid):
        raise TlaError(f"the trainer process {pid} of {run_dir.name} is gone")
    if beat.get("pid_start") is None or not procs.same_process(pid, beat):
        raise TlaError(f"process {pid} named by {run_dir.name}'s heartbeat is not its trainer (it did not start when "
                       "the trainer did: the trainer is gone); nothing sent")
    if not procs.names_folder(pid, TASK, folder) or not procs.holds_open(pid, run_dir):
        raise TlaError(f"process {pid} named by {run_dir.name}'s heartbeat is not this run's trainer (its command "
                       f"line names no {folder}, or it has no file of the run open); nothing sent")
    try:
        os.kill(pid, getattr(signal, f"SIG{sig}"))
    except ProcessLookupError:
        raise TlaError(f"the trainer process {pid} of {run_dir.name} is gone") from None
