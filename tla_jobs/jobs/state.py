"""Where runs stand: one batched `sacct` for every SLURM job shown, `squeue` when accounting is
missing, the process table for local jobs, and the trainer's own files (heartbeat, attempts,
summary) for what the scheduler cannot know. Every state says which source it came from.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.jobs import damage

ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "PREEMPTED_RUNNING"}
FINAL_BAD = {"FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


@dataclass
class JobRecord:
    job_id: str
    state: str
    source: str
    exit_code: str = ""
    start: str = ""
    end: str = ""
    elapsed_s: int = 0
    gpus: int = 0
    nodes: str = ""
    reason: str = ""


@dataclass
class SchedulerView:
    """What the scheduler says about a set of jobs: job id -> its records (one per attempt)."""

    jobs: dict[str, list[JobRecord]] = field(default_factory=dict)
    source: str = "none"


def _run(cmd: list[str]) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None


def _gpus(tres: str) -> int:
    for part in tres.split(","):
        if part.startswith("gres/gpu=") or part.startswith("gres/gpu:"):
            try:
                return int(part.split("=")[-1])
            except ValueError:
                return 0
    return 0


def _elapsed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def query_slurm(job_ids: list[str]) -> SchedulerView:
    """One sacct call for all jobs (every attempt of a requeued job: -D); squeue when sacct has nothing."""
    view = SchedulerView()
    if not job_ids:
        return view
    base_ids = sorted({j.split("_")[0] for j in job_ids})
    acct = _run(["sacct", "-n", "-P", "-D", "-X", "-j", ",".join(base_ids), "-o",
                 "JobID,State,ExitCode,Start,End,ElapsedRaw,AllocTRES,NodeList,Reason"])
    if acct is not None and acct.returncode == 0 and acct.stdout.strip():
        view.source = "sacct"
        for line in acct.stdout.splitlines():
            f = line.split("|")
            if len(f) < 9:
                continue
            state = f[1].split()[0] if f[1] else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
            rec = JobRecord(f[0], state, "sacct", f[2], f[3], f[4], _elapsed(f[5]), _gpus(f[6]), f[7], f[8])
            view.jobs.setdefault(f[0], []).append(rec)
        return view
    queue = _run(["squeue", "-h", "-j", ",".join(base_ids), "-o", "%i|%T|%r|%N|%M"])
    view.source = "squeue"
    if queue is not None and queue.returncode == 0:
        for line in queue.stdout.splitlines():
            f = line.strip().split("|")
            if len(f) >= 3:
                view.jobs.setdefault(f[0], []).append(JobRecord(f[0], f[1], "squeue", reason=f[2],
                                                                nodes=f[3] if len(f) > 3 else ""))
    return view


class _PlainUnpickler(pickle.Unpickler):
    """submitit's result pickles hold ("success", result) or ("error", traceback text); a status
    command has no business running code from a shared folder, so only plain types load."""

    def find_class(self, module, name):
        if module == "builtins" and name in {"tuple", "list", "dict", "str", "int", "float", "bool", "set"}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} refused")


def submitit_outcome(folder: Path, job_id: str) -> str | None:
    """'success' / 'error' from submitit's result pickle of task 0, or None when there is none."""
    path = folder / f"{job_id}_0_result.pkl"
    if not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            outcome = _PlainUnpickler(f).load()
        return str(outcome[0])
    except Exception:
        return "success" if path.stat().st_size else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie (our own child, not reaped) is not running
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def local_state(folder: Path, job_id: str) -> JobRecord:
    """The local executor's job id is the pid of submitit's controller process."""
    outcome = submitit_outcome(folder, job_id)
    alive = job_id.isdigit() and _pid_alive(int(job_id))
    if alive:
        state = "RUNNING"
    elif outcome == "success":
        state = "COMPLETED"
    elif outcome == "error":
        state = "FAILED"
    else:
        state = "ENDED"  # gone without a result: killed, cancelled or crashed
    return JobRecord(job_id, state, "process table")


@dataclass
class RunStatus:
    name: str
    path: Path
    record: dict
    state: str = "UNKNOWN"
    source: str = ""
    attempts: list[dict] = field(default_factory=list)
    jobs: list[JobRecord] = field(default_factory=list)
    heartbeat: dict | None = None
    summary: dict | None = None
    gpu_hours: float = 0.0
    last_event: str = ""
    _metrics: list[dict] | None = None
    problems: list[str] = field(default_factory=list)  # damaged files of this run (damage.py says what)

    @property
    def spec(self) -> dict:
        return self.record.get("spec", {})

    @property
    def metrics(self) -> list[dict]:
        """The whole history (plots); read on first use only."""
        if self._metrics is None:
            self._metrics, problem = damage.metric_rows(self.path)
            if problem and problem not in self.problems:
                self.problems.append(problem)
        return self._metrics

    @property
    def progress(self) -> dict:
        """Epochs done, best and last rows: from the heartbeat when it has them (cheap), else
        computed from metrics.jsonl (runs written by older versions)."""
        beat = self.heartbeat or {}
        if isinstance(beat.get("progress"), dict):
            return beat["progress"]
        return rundir.metrics_summary(self.metrics)

    @property
    def epoch(self) -> int:
        return self.progress["epochs_done"]

    @property
    def best_acc1(self):
        best = self.progress["best"]
        return best["acc1"] if best else None

    @property
    def last_acc1(self):
        last = self.progress["last"]
        return last["acc1"] if last else None

    def eta_s(self) -> float | None:
        per_epoch = self.progress.get("mean_epoch_s")
        if self.state not in ("RUNNING", "PENDING") or not per_epoch:
            return None
        return per_epoch * max(0, self.spec.get("epochs", 0) - self.epoch)


def attempts_of(path: Path, problems: list[str] | None = None) -> list[dict]:
    """Pair the trainer's start/end events into attempts (unusable lines are left out, and said in
    ``problems``)."""
    out: list[dict] = []
    rows, problem = damage.attempt_rows(path)
    if problem and problems is not None:
        problems.append(problem)
    for e in rows:
        if e.get("event") == "start":
            out.append({"start": e, "end": None})
        elif e.get("event") == "end" and out and out[-1]["end"] is None:
            out[-1]["end"] = e
    return out


def _folder_for(entry: dict, path: Path) -> Path:
    return Path(entry.get("submitit_folder") or path / rundir.SUBMITIT_DIR)


def collect(paths: list[Path], view: SchedulerView | None = None) -> list[RunStatus]:
    """Status of many runs with a single scheduler query."""
    loaded = []
    slurm_ids: list[str] = []
    for p in paths:
        record, problem = damage.record(p)
        if problem:  # listed, with what is wrong, instead of vanishing or breaking every other run
            loaded.append((p, problem))
            continue
        if record is None:
            continue
        loaded.append((p, record))
        for sub in record.get("submissions", []) + record.get("evals", []):
            if sub.get("executor") == "slurm":
                slurm_ids.append(str(sub["job_id"]))
    if view is None:
        view = query_slurm(slurm_ids) if slurm_ids else SchedulerView()
    return [_damaged(p, record) if isinstance(record, str) else _one_safe(p, record, view) for p, record in loaded]


def _damaged(path: Path, problem: str) -> RunStatus:
    return RunStatus(path.name, path, {}, state="DAMAGED", source=rundir.RUN_JSON, last_event=problem,
                     problems=[problem])


def _one_safe(path: Path, record: dict, view: SchedulerView) -> RunStatus:
    try:
        return _one(path, record, view)
    except Exception as exc:  # a value no check foresaw: this run is shown damaged, the others normally
        return _damaged(path, f"unreadable run files ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})")


def _one(path: Path, record: dict, view: SchedulerView) -> RunStatus:
    st = RunStatus(record.get("name", path.name), path, record)
    st.attempts = attempts_of(path, st.problems)
    st.heartbeat, beat_problem = damage.heartbeat(path)
    st.summary, summary_problem = damage.summary(path)
    st.problems += [p for p in (beat_problem, summary_problem) if p]
    subs = record.get("submissions", [])
    for sub in subs:
        if sub.get("executor") == "slurm":
            recs = view.jobs.get(sub["job_id"], [])
            st.jobs += recs
        else:
            st.jobs.append(local_state(_folder_for(sub, path), sub["job_id"]))
    st.gpu_hours = sum(j.elapsed_s * j.gpus for j in st.jobs) / 3600.0
    last_end = st.attempts[-1]["end"] if st.attempts else None
    if not subs:
        st.state, st.source = "NOT SUBMITTED", "run.json"
        return st
    latest = subs[-1]
    if latest.get("executor") == "slurm":
        recs = view.jobs.get(latest["job_id"], [])
        if recs:
            sched = recs[-1].state
            st.source = view.source
        else:
            sched = None
            st.source = view.source if view.source != "none" else "heartbeat"
    else:
        sched = local_state(_folder_for(latest, path), latest["job_id"]).state
        st.source = "process table"
    st.state = _decide(sched, last_end, st.summary, record, latest, path)
    if sched is None:  # the scheduler no longer knows the job: the state came from the run's own files
        st.source = f"{view.source}+heartbeat"
    st.last_event = _last_event(st, last_end)
    return st


def _decide(sched: str | None, last_end: dict | None, summary: dict | None, record: dict, latest: dict,
            path: Path) -> str:
    finished = summary is not None and last_end is not None and last_end.get("reason") in ("completed", "max_steps")
    failed = last_end is not None and last_end.get("reason") in ("error", "stalled")
    if record.get("cancelled") and (sched in (None, "CANCELLED", "ENDED") or sched not in ACTIVE):
        return "CANCELLED"
    if sched in ACTIVE:
        if sched == "RUNNING" and latest.get("executor") == "slurm" and failed:
            return "FAILED"
        return "REQUEUED" if sched == "REQUEUED" else sched
    outcome = submitit_outcome(_folder_for(latest, path), latest["job_id"])
    if outcome == "error" or failed:
        return "FAILED"  # never shown as completed when the program failed
    if sched == "COMPLETED":
        return "COMPLETED" if finished or outcome == "success" else "FAILED"
    if sched in FINAL_BAD:
        return sched
    if finished:
        return "COMPLETED"
    if sched == "ENDED":
        return "STOPPED"
    # no scheduler record (accounting off and no longer queued): trust a fresh heartbeat
    beat = damage.heartbeat(path)[0] or {}
    if beat and time.time() - beat.get("time", 0) < 120 and beat.get("phase") in ("training", "evaluating"):
        return "RUNNING"
    return "UNKNOWN"


def _last_event(st: RunStatus, last_end: dict | None) -> str:
    if last_end is not None:
        return f"attempt ended: {last_end.get('reason')} at epoch {last_end.get('epoch', '?')}"
    if st.attempts:
        s = st.attempts[-1]["start"]
        return f"attempt started on {s.get('host')} at epoch {s.get('epoch')}"
    return f"submitted {st.record['submissions'][-1].get('reason', '')}"
