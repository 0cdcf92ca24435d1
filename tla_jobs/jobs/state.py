"""Where runs stand: one batched `sacct` for every SLURM job shown, `squeue` when accounting is
missing, the process table for local jobs, and the trainer's own files (heartbeat, attempts,
summary) for what the scheduler cannot know. Every state says which source it came from.
"""

from __future__ import annotations

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
        _check_live_against_squeue(view, [j for j in job_ids if j not in view.jobs])
        return view
    # No accounting (or slurmdbd down): squeue knows live jobs, and finished ones for MinJobAge.
    queue = _run(["squeue", "-h", "--states=all", "-j", ",".join(base_ids), "-o", "%i|%T|%r|%N|%M|%D|%b|%S"])
    view.source = "squeue"
    if queue is not None and queue.returncode == 0:
        for line in queue.stdout.splitlines():
            f = line.strip().split("|")
            if len(f) >= 3:
                nodes = _int(f[5]) if len(f) > 5 else 1
                rec = JobRecord(f[0], f[1], "squeue", reason=f[2], nodes=f[3] if len(f) > 3 else "",
                                elapsed_s=squeue_elapsed(f[4]) if len(f) > 4 else 0,
                                gpus=_gres_gpus(f[6]) * max(nodes, 1) if len(f) > 6 else 0,
                                start=f[7] if len(f) > 7 else "")
                view.jobs.setdefault(f[0], []).append(rec)
    return view


def _check_live_against_squeue(view: SchedulerView, missing: list[str]) -> None:
    """sacct can be stale (slurmdbd restarted, slurmctld still replaying): a job it calls live but
    that slurmctld (squeue) no longer has, or has as finished, is not live; a job it does not have
    yet (just submitted, slurmdbd behind) is taken from squeue. One squeue call, only when needed;
    nothing changes when squeue does not answer."""
    live = [job for job, recs in view.jobs.items() if recs[-1].state in ACTIVE]
    if not live and not missing:
        return
    queue = _run(["squeue", "-h", "--states=all", "-j", ",".join(sorted({j.split("_")[0] for j in live + missing})),
                  "-o", "%i|%T|%r|%N|%M"])
    if queue is None or queue.returncode != 0:
        return
    now = {}
    for line in queue.stdout.splitlines():
        f = line.strip().split("|")
        if len(f) == 5:
            now[f[0]] = f
    for job in live:
        last = view.jobs[job][-1]
        f = now.get(job)
        if f is None:
            last.state, last.reason = "UNKNOWN", "sacct said live, slurmctld no longer has the job"
        elif f[1] not in ACTIVE:
            last.state = f[1]
    for job in missing:
        f = now.get(job)
        if f is not None:
            view.jobs[job] = [JobRecord(job, f[1], "squeue", reason=f[2], nodes=f[3], elapsed_s=squeue_elapsed(f[4]))]


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def squeue_elapsed(text: str) -> int:
    """squeue's %M (time used): [days-][hours:]minutes:seconds, in seconds."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = _int(d)
    parts = [_int(x) for x in text.split(":")] if text and text not in ("INVALID", "N/A") else []
    seconds = 0
    for x in parts:
        seconds = seconds * 60 + x
    return days * 86400 + seconds


def _gres_gpus(text: str) -> int:
    """GPUs per node from squeue's %b (e.g. gres:gpu:8, gres/gpu:a100:4, N/A)."""
    for part in text.split(","):
        bits = part.replace("/", ":").split(":")
        if "gpu" in bits:
            return _int(bits[-1]) if bits[-1] != "gpu" else 1
    return 0


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


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat after the command name (whose parentheses may hold spaces): field 3 onwards."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_start(pid: int) -> int | None:
    """When the process started (field 22 of /proc/PID/stat, clock ticks since boot); None when gone."""
    fields = _stat_fields(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def local_identity(pid: int) -> dict:
    """What tells this process apart from a later one that gets the same PID: its start time and
    the boot. Stored with every local submission."""
    return {"pid_start": process_start(pid), "boot_id": boot_id()}


def local_process_alive(entry: dict, folder: Path) -> bool:
    """Is the local job's controller (submitit's, PID = job id) still the process that was
    started? PIDs wrap: a bare PID may name any later process. The start time (and boot) recorded
    at submission must match; records without one need the controller's command line, which names
    its submitit folder."""
    job_id = str(entry.get("job_id", ""))
    if not job_id.isdigit():
        return False
    pid = int(job_id)
    fields = _stat_fields(pid)
    if not fields or fields[0] in ("Z", "X"):  # gone, or a zombie (exited, not reaped)
        return False
    if entry.get("pid_start") is not None:
        same_boot = not entry.get("boot_id") or entry["boot_id"] == boot_id()
        return same_boot and process_start(pid) == entry["pid_start"]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"submitit" in part for part in cmdline) and str(folder).encode() in cmdline


def local_state(entry: dict, folder: Path) -> JobRecord:
    """The local executor's job id is the pid of submitit's controller process."""
    job_id = str(entry.get("job_id", ""))
    outcome = submitit_outcome(folder, job_id)
    if local_process_alive(entry, folder):
        state = "RUNNING"
    elif outcome == "success":
        state = "COMPLETED"
    elif outcome == "error":
        state = "FAILED"
    else:
        state = "ENDED"  # gone without a result: killed, cancelled or crashed
    return JobRecord(job_id, state, "process table")


def submitit_error(folder: Path, job_id: str) -> str:
    """The last line of the traceback in submitit's error pickle ('' when there is none)."""
    path = folder / f"{job_id}_0_result.pkl"
    try:
        with open(path, "rb") as f:
            outcome = _PlainUnpickler(f).load()
        if str(outcome[0]) == "error":
            lines = [ln.strip() for ln in str(outcome[1]).splitlines() if ln.strip()]
            return lines[-1][:300] if lines else "error"
    except Exception:
        pass
    return ""


@dataclass
class EvalStatus:
    """One `tla eval checkpoint` job: its state and what it found (or why it failed)."""

    eval_id: str
    job_id: str
    checkpoint: str
    state: str
    source: str
    acc1: float | None = None
    acc5: float | None = None
    error: str = ""


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
    evals: list[EvalStatus] = field(default_factory=list)  # `tla eval checkpoint` jobs and their outcome
    waiting_for_ranks: bool = False  # the newest attempt's rank 0 waits for the others to join

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
    ``problems``). An end names its attempt (attempt_id); older runs' ends close the newest open one."""
    out: list[dict] = []
    rows, problem = damage.attempt_rows(path)
    if problem and problems is not None:
        problems.append(problem)
    by_id: dict[str, dict] = {}
    for e in rows:
        if e.get("event") == "start":
            a = {"start": e, "end": None}
            out.append(a)
            if e.get("attempt_id"):
                by_id[str(e["attempt_id"])] = a
        elif e.get("event") == "end":
            a = by_id.get(str(e.get("attempt_id"))) if e.get("attempt_id") else None
            if a is None and not e.get("attempt_id"):
                a = out[-1] if out else None
            if a is not None and a["end"] is None:
                a["end"] = e
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


FINAL_REASONS = {"completed", "max_steps"}  # the trainer's end reasons that finish a run
FAILED_REASONS = {"error", "stalled", "requeue limit"}  # ... and those that end it for good


def _job_of(sub: dict) -> str:
    return str(sub.get("job_id", ""))


def _gpus_of(sub: dict) -> int:
    try:
        return int(sub.get("gpus_per_node") or 0) * int(sub.get("nodes") or 1)
    except (TypeError, ValueError):
        return 0


def _one(path: Path, record: dict, view: SchedulerView) -> RunStatus:
    st = RunStatus(record.get("name", path.name), path, record)
    st.attempts = attempts_of(path, st.problems)
    st.heartbeat, beat_problem = damage.heartbeat(path)
    st.summary, summary_problem = damage.summary(path)
    st.problems += [p for p in (beat_problem, summary_problem) if p]
    subs = record.get("submissions", [])
    local: dict[str, JobRecord] = {}
    for sub in subs:
        if sub.get("executor") == "slurm":
            st.jobs += view.jobs.get(_job_of(sub), [])
        else:
            local[_job_of(sub)] = local_state(sub, _folder_for(sub, path))
            st.jobs.append(local[_job_of(sub)])
    st.evals = [_eval_status(path, e, view) for e in record.get("evals", [])]
    if not subs:
        st.state, st.source = "NOT SUBMITTED", "run.json"
        return st
    latest = subs[-1]
    if latest.get("executor") == "slurm":
        recs = view.jobs.get(_job_of(latest), [])
        sched = recs[-1].state if recs else None
        st.source = view.source if recs else ("heartbeat" if view.source == "none" else view.source)
    else:
        sched = local[_job_of(latest)].state
        st.source = "process table"
    mine = [a for a in st.attempts if str(a["start"].get("job_id", "")) == _job_of(latest)]
    st.state, decided_by = decide(sched, mine[-1] if mine else None, st.summary, record, latest, path,
                                  st.heartbeat, st.attempts)
    if decided_by and sched != st.state:  # settled by the run's own files, not (only) the scheduler
        st.source = f"{st.source}+{decided_by}"
    _pair(st, view, subs)
    st.gpu_hours = _gpu_hours(st, view, subs)
    beat = st.heartbeat or {}
    st.waiting_for_ranks = (st.state in ("RUNNING", "UNKNOWN") and beat.get("phase") == "waiting for ranks"
                            and str(beat.get("job_id", _job_of(latest))) == _job_of(latest))
    st.last_event = _last_event(st, st.attempts[-1]["end"] if st.attempts else None)
    return st


def decide(sched: str | None, attempt: dict | None, summary: dict | None, record: dict, latest: dict,
           path: Path, beat: dict | None = None, attempts: list[dict] | None = None) -> tuple[str, str]:
    """The run's state from every source, and which source settled it ('' = the scheduler).

    Precedence, the first rule that applies wins:

    1. The trainer's own end record is final for its attempt. When the newest attempt of the
       newest submission ended ``completed``/``max_steps`` (and summary.json is there) the run is
       COMPLETED; when it ended ``error``, ``stalled`` or ``requeue limit`` it is FAILED (CANCELLED
       when that end came after a `tla cancel`, which caused it): whatever a scheduler still says
       (sacct lags after a slurmdbd restart, squeue says COMPLETING).
    2. The scheduler, for the newest submission (sacct; squeue when accounting is off or down; the
       process table for local jobs): a live state as it is; a final one as it is, except
       COMPLETED, which needs the trainer's or submitit's word (a program that failed is never
       shown completed).
    3. submitit's result pickle: error is FAILED, success is COMPLETED.
    4. `tla cancel` recorded a cancel of the live training job: CANCELLED.
    5. No scheduler record at all (accounting off and the job left squeue): an attempt that ended
       on SIGTERM with no requeue after it was cancelled (scancel); a heartbeat younger than two
       minutes is RUNNING.
    6. Otherwise UNKNOWN.

    A local job whose process is gone without a result is STOPPED.
    """
    end = (attempt or {}).get("end") or {}
    reason = end.get("reason")
    if reason in FINAL_REASONS and summary is not None:
        return "COMPLETED", "attempts"
    if reason in FAILED_REASONS:
        cancelled_at = record.get("cancelled_at") if record.get("cancelled") else None
        if isinstance(cancelled_at, (int, float)) and (end.get("time") or 0) >= cancelled_at - 1:
            return "CANCELLED", "run.json"  # it died of the cancel (stopped while it started up)
        return "FAILED", "attempts"
    if sched in ACTIVE:
        return sched, ""
    outcome = submitit_outcome(_folder_for(latest, path), _job_of(latest))
    if outcome == "error":
        return "FAILED", "submitit"
    if sched == "COMPLETED":
        return ("COMPLETED", "") if reason in FINAL_REASONS or outcome == "success" else ("FAILED", "")
    if sched in FINAL_BAD:
        return sched, ""
    if outcome == "success":
        return "COMPLETED", "submitit"
    if record.get("cancelled"):
        return "CANCELLED", "run.json"
    if sched == "ENDED":
        return "STOPPED", ""
    if reason == "signal:SIGTERM":
        return "CANCELLED", "attempts"
    beat = beat or {}
    fresh = isinstance(beat.get("time"), (int, float)) and time.time() - beat["time"] < 120
    if fresh and beat.get("phase") in ("training", "evaluating", "waiting for ranks"):
        return "RUNNING", "heartbeat"
    return "UNKNOWN", ""


def _pair(st: RunStatus, view: SchedulerView, subs: list[dict]) -> None:
    """Each attempt with the job (and the job's restart) that ran it, and how it ended: the trainer's
    own end record; else what the scheduler says of that restart; an attempt that a later one took
    over from (a requeue after a node failure) is superseded, never "killed"."""
    execs = {_job_of(s): s.get("executor") for s in subs}
    for i, a in enumerate(st.attempts):
        s, e = a["start"], a["end"]
        job = str(s.get("job_id", ""))
        try:
            restart = int(s.get("restart_count") or 0)
        except (TypeError, ValueError):
            restart = 0
        recs = view.jobs.get(job, []) if execs.get(job) == "slurm" else []
        rec = recs[restart] if restart < len(recs) else None
        a["job"] = vars(rec) if rec else None
        a["restart_count"] = restart
        later = st.attempts[i + 1:]
        if e is not None:
            a["outcome"] = str(e.get("reason"))
        elif later and s.get("attempt_id") and any(x["start"].get("attempt_id") for x in later):
            nxt = later[0]["start"]
            why = f" after {rec.state}" if rec and rec.state in FINAL_BAD else ""
            a["outcome"] = (f"superseded{why} by the attempt of job {nxt.get('job_id')} "
                            f"restart {nxt.get('restart_count', 0)}")
        elif rec is not None and rec.state not in ACTIVE and rec.state != "COMPLETED":
            a["outcome"] = f"{rec.state.lower().replace('_', ' ')} (no end record)"
        elif not later and st.state in ACTIVE:
            a["outcome"] = "running"
        elif later:
            a["outcome"] = "ended without a record (requeued)"
        else:
            a["outcome"] = "ended without a record"


def _gpu_hours(st: RunStatus, view: SchedulerView, subs: list[dict]) -> float:
    """From sacct (elapsed x allocated GPUs) where it has the job; else squeue's time used; else
    the trainer's own attempt records (start to end, or to the heartbeat while it runs)."""
    total = 0.0
    gpus = {_job_of(s): _gpus_of(s) for s in subs}
    for sub in subs:
        job = _job_of(sub)
        recs = view.jobs.get(job, []) if sub.get("executor") == "slurm" else []
        if recs and all(r.source == "sacct" for r in recs):
            total += sum(r.elapsed_s * (r.gpus or gpus[job]) for r in recs)
            continue
        seconds = 0.0
        for a in st.attempts:
            if str(a["start"].get("job_id", "")) != job:
                continue
            t0 = a["start"].get("time") or 0
            t1 = (a["end"] or {}).get("time")
            if t1 is None:
                t1 = (st.heartbeat or {}).get("time") if (st.heartbeat or {}).get("job_id") == job else None
            if isinstance(t1, (int, float)) and t1 > t0:
                seconds += t1 - t0
        if recs:  # squeue: the time used of the current run, if more than the attempts say
            seconds = max(seconds, float(sum(r.elapsed_s for r in recs)))
        total += seconds * gpus[job]
    return total / 3600.0


def _eval_status(path: Path, entry: dict, view: SchedulerView) -> EvalStatus:
    job = _job_of(entry)
    folder = _folder_for(entry, path)
    out = Path(entry.get("output_dir") or path / rundir.EVALS_DIR / str(entry.get("eval_id", "")))
    ev = EvalStatus(str(entry.get("eval_id", "")), job, str(entry.get("checkpoint", "")), "UNKNOWN", "")
    result, problem = damage.eval_result(out)
    if entry.get("executor") == "slurm":
        recs = view.jobs.get(job, [])
        sched, ev.source = (recs[-1].state, view.source) if recs else (None, view.source)
    else:
        sched, ev.source = local_state(entry, folder).state, "process table"
    error = submitit_error(folder, job)
    if result is not None:
        ev.state, ev.acc1, ev.acc5 = "COMPLETED", result.get("acc1"), result.get("acc5")
    elif error:
        ev.state, ev.error = "FAILED", error
    elif sched in ACTIVE:
        ev.state = sched
    elif entry.get("cancelled"):
        ev.state = "CANCELLED"
    elif sched in FINAL_BAD or sched == "COMPLETED":
        ev.state = "FAILED" if sched == "COMPLETED" else sched  # COMPLETED without eval.json: it failed
        ev.error = problem or ("no eval.json written" if sched == "COMPLETED" else "")
    elif sched == "ENDED":
        ev.state, ev.error = "FAILED", problem or "the eval job ended without a result"
    if problem and not ev.error and ev.state != "COMPLETED":
        ev.error = problem
    return ev


def _last_event(st: RunStatus, last_end: dict | None) -> str:
    beat = st.heartbeat or {}
    if st.waiting_for_ranks:
        age = time.time() - beat["time"] if isinstance(beat.get("time"), (int, float)) else 0
        return f"waiting for ranks: {beat.get('world_size', '?')} expected ({age:.0f}s)"
    if st.attempts and last_end is None and st.attempts[-1].get("outcome", "running") != "running":
        return f"attempt {len(st.attempts)}: {st.attempts[-1]['outcome']}"
    if last_end is not None:
        return f"attempt ended: {last_end.get('reason')} at epoch {last_end.get('epoch', '?')}"
    if st.attempts:
        s = st.attempts[-1]["start"]
        return f"attempt started on {s.get('host')} at epoch {s.get('epoch')}"
    return f"submitted {st.record['submissions'][-1].get('reason', '')}"
