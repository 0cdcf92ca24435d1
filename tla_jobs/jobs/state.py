"""Where runs stand: one scheduler query for every SLURM job shown (slurm.py), the process table for
local jobs (local.py), and the trainer's own files (heartbeat, attempts, summary) for what the
scheduler cannot know. Every state says which source it came from; ``decide`` holds the precedence.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.jobs import damage, local, pickles, retry, slurm
from tla_jobs.jobs.attempts import attempts_of, gpu_hours, job_of, pair
from tla_jobs.jobs.scheduler import ACTIVE, FINAL_BAD, JobRecord, SchedulerView

__all__ = ["ACTIVE", "FINAL_BAD", "RunStatus", "EvalStatus", "collect", "decide", "attempts_of"]


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
    which: str = ""  # best, last, ema, epoch:N, prev, file, export
    sha256: str | None = None  # of the checkpoint evaluated (eval.json's, else the one recorded at submission)
    epoch: int | None = None  # the epochs done of the weights evaluated (from eval.json)
    weights: str = "model"  # or ema


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
    decided_by: str = ""  # which of the run's own files settled the state ('' = the scheduler), see decide()
    _progress: dict | None = None  # computed from metrics.jsonl once, or kept in the status cache

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
        if self._progress is None:
            self._progress = rundir.metrics_summary(self.metrics)
        return self._progress

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

    @property
    def max_attempts(self) -> int:
        """Attempts the run may have: 1 + the profile's requeue limits (SLURM); submitit's local limit."""
        prof = self.record.get("profile", {})
        if prof.get("executor") == "slurm":
            s = prof.get("slurm", {})
            return 1 + s.get("max_requeue_timeout", 3) + s.get("max_requeue_preempt", 20) + \
                s.get("max_requeue_failure", 0)
        return local.MAX_ATTEMPTS

    @property
    def last_activity(self) -> float:
        return max((self.heartbeat or {}).get("time", 0), self.record.get("created", 0),
                   *(s.get("submitted", 0) for s in self.record.get("submissions", [])))

    def eta_s(self) -> float | None:
        per_epoch = self.progress.get("mean_epoch_s")
        if self.state not in ("RUNNING", "PENDING") or not per_epoch:
            return None
        return per_epoch * max(0, self.spec.get("epochs", 0) - self.epoch)

    def as_json(self) -> dict:
        """The run as `tla status --json` gives it."""
        return {
            "run": self.name, "path": str(self.path), "state": self.state, "source": self.source,
            "attempts": [{"start": a["start"], "end": a["end"], "outcome": a.get("outcome"), "job": a.get("job"),
                          "restart_count": a.get("restart_count")} for a in self.attempts],
            "evals": [vars(ev) for ev in self.evals], "waiting_for_ranks": self.waiting_for_ranks,
            "jobs": [vars(j) for j in self.jobs], "epoch": self.epoch, "epochs": self.spec.get("epochs"),
            "best_acc1": self.best_acc1, "last_acc1": self.last_acc1, "gpu_hours": self.gpu_hours,
            "eta_s": self.eta_s(), "heartbeat": self.heartbeat, "last_event": self.last_event,
            "job_ids": [s["job_id"] for s in self.record.get("submissions", [])],
            "problems": self.problems,
        }

    def json_text(self) -> str:
        """as_json() as one line of JSON."""
        return json.dumps(self.as_json(), default=str)


def collect(paths: list[Path], view: SchedulerView | None = None, cache: bool = False) -> list[RunStatus]:
    """Status of many runs with a single scheduler query.

    ``cache``: use and refresh each finished run's status cache (jobs/status_cache.py), so
    that listing thousands of finished runs reads one small file per run instead of computing each
    again; the scheduler is asked only about the runs that were not in it."""
    from tla_jobs.jobs import status_cache  # it builds on RunStatus

    loaded: list[tuple[Path, dict | str | RunStatus, dict | None]] = []
    slurm_ids: list[str] = []
    for p in paths:
        keys = None
        if cache:
            hit = status_cache.load(p)
            if hit is not None:
                loaded.append((p, hit, None))
                continue
            # the files' keys are taken before they are read (and when): see jobs/status_cache.py
            keys = status_cache.run_json_key(p)
        record, problem = damage.record(p)
        if problem:  # listed, with what is wrong, instead of vanishing or breaking every other run
            loaded.append((p, problem, None))
            continue
        if record is None:
            continue
        loaded.append((p, record, keys))
        for sub in record.get("submissions", []) + record.get("evals", []):
            if sub.get("executor") == "slurm":
                slurm_ids.append(str(sub["job_id"]))
    if view is None:
        view = slurm.query(slurm_ids) if slurm_ids else SchedulerView()
    out = []
    for p, record, keys in loaded:
        if isinstance(record, RunStatus):
            out.append(record)
        elif isinstance(record, str):
            out.append(_damaged(p, record))
        elif keys is None:
            out.append(_one_safe(p, record, view))
        else:
            keys.update(status_cache.source_keys(p, record))  # before the files are read: a later change shows in them
            st = _one_safe(p, record, view)
            if status_cache.cacheable(st, view):
                st = status_cache.store(st, keys) or st  # as read back from it: --json prints the text just written
            out.append(st)
    return out


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


def _one(path: Path, record: dict, view: SchedulerView) -> RunStatus:
    st = RunStatus(record.get("name", path.name), path, record)
    st.attempts = attempts_of(path, st.problems)
    st.heartbeat, beat_problem = damage.heartbeat(path)
    st.summary, summary_problem = damage.summary(path)
    st.problems += [p for p in (beat_problem, summary_problem) if p]
    subs = record.get("submissions", [])
    procs: dict[str, JobRecord] = {}
    for sub in subs:
        if sub.get("executor") == "slurm":
            st.jobs += view.jobs.get(job_of(sub), [])
        else:
            procs[job_of(sub)] = local.state(sub, local.folder_of(sub, path))
            st.jobs.append(procs[job_of(sub)])
    st.evals = [_eval_status(path, e, view, st.problems) for e in record.get("evals", [])]
    if not subs:  # a `tla train` folder tla keeps records of (records.adopt): what its trainer recorded
        st.state, st.source = _trained_outside(st), "attempts" if st.attempts else rundir.RUN_JSON
        st.last_event = _last_event(st, st.attempts[-1]["end"] if st.attempts else None) if st.attempts else ""
        return st
    latest = subs[-1]
    if latest.get("executor") == "slurm":
        recs = view.jobs.get(job_of(latest), [])
        sched = recs[-1].state if recs else None
        st.source = view.source if recs else ("heartbeat" if view.source == "none" else view.source)
    else:
        sched = procs[job_of(latest)].state
        st.source = "process table"
    mine = [a for a in st.attempts if str(a["start"].get("job_id", "")) == job_of(latest)]
    st.state, decided_by = decide(sched, mine[-1] if mine else None, st.summary, record, latest, path,
                                  st.heartbeat, st.attempts)
    st.decided_by = decided_by
    if decided_by and sched != st.state:  # settled by the run's own files, not (only) the scheduler
        st.source = f"{st.source}+{decided_by}"
    pair(st, view, subs)
    st.gpu_hours = gpu_hours(st, view, subs)
    beat = st.heartbeat or {}
    st.waiting_for_ranks = (st.state in ("RUNNING", "UNKNOWN") and beat.get("phase") == "waiting for ranks"
                            and str(beat.get("job_id", job_of(latest))) == job_of(latest))
    st.last_event = _last_event(st, st.attempts[-1]["end"] if st.attempts else None)
    # a local sweep's run whose process waits for one of the sweep's slots (jobs/local.py): queued
    if (st.state == "RUNNING" and beat.get("phase") == "waiting for a slot"
            and str(beat.get("job_id", job_of(latest))) == job_of(latest)):
        st.state = "PENDING"
        st.last_event = f"waiting for a slot (at most {beat.get('array_parallelism', '?')} of the sweep at once)"
    return st


def _trained_outside(st: RunStatus) -> str:
    """The state of a run trained by `tla train` in a shell (no job of tla's): its newest attempt's end
    record, or a fresh heartbeat; NOT SUBMITTED when it never trained."""
    if not st.attempts:
        return "NOT SUBMITTED"
    end = st.attempts[-1]["end"] or {}
    if end.get("reason") in FINAL_REASONS and st.summary is not None:
        return "COMPLETED"
    if end.get("reason") in FAILED_REASONS:
        return "FAILED"
    beat = st.heartbeat or {}
    if not end and isinstance(beat.get("time"), (int, float)) and time.time() - beat["time"] < 120:
        return "RUNNING"
    return "STOPPED"


def decide(sched: str | None, attempt: dict | None, summary: dict | None, record: dict, latest: dict,
           path: Path, beat: dict | None = None, attempts: list[dict] | None = None) -> tuple[str, str]:
    """The run's state from every source, and which source settled it ('' = the scheduler).

    Precedence, the first rule that applies wins:

    1. The trainer's own end record is final for its attempt. When the newest attempt of the
       newest submission ended ``completed``/``max_steps`` (and summary.json is there) the run is
       COMPLETED; when it ended ``error``, ``stalled`` or ``requeue limit`` it is FAILED (CANCELLED
       when that end came after a `tla cancel`, which caused it): whatever a scheduler still says
       (sacct lags after a slurmdbd restart, squeue says COMPLETING). A failure that is requeued
       (jobs/retry.py) is not final: while the job is live, the scheduler says where it stands.
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
    if reason in FAILED_REASONS or reason == retry.FAILED:
        cancelled_at = record.get("cancelled_at") if record.get("cancelled") else None
        if isinstance(cancelled_at, (int, float)) and (end.get("time") or 0) >= cancelled_at - 1:
            return "CANCELLED", rundir.RUN_JSON  # it died of the cancel (stopped while it started up)
        # a failure that is retried (jobs/retry.py), or that may be until its record says (an error
        # of rank 0 comes just before it): the job comes back, the scheduler says how far it is
        if sched in ACTIVE and end.get("requeue", reason == "error" and retry.retries(record)):
            return sched, ""
        return "FAILED", "attempts"
    if sched in ACTIVE:
        return sched, ""
    outcome = pickles.outcome(local.folder_of(latest, path), job_of(latest))
    if outcome == "error":
        return "FAILED", "submitit"
    if sched == "COMPLETED":
        return ("COMPLETED", "") if reason in FINAL_REASONS or outcome == "success" else ("FAILED", "")
    if sched in FINAL_BAD:
        return sched, ""
    if outcome == "success":
        return "COMPLETED", "submitit"
    if record.get("cancelled"):
        return "CANCELLED", rundir.RUN_JSON
    if sched == "ENDED":
        return "STOPPED", ""
    if reason == "signal:SIGTERM":
        return "CANCELLED", "attempts"
    beat = beat or {}
    fresh = isinstance(beat.get("time"), (int, float)) and time.time() - beat["time"] < 120
    if fresh and beat.get("phase") in ("training", "evaluating", "waiting for ranks", "staging"):
        return "RUNNING", "heartbeat"
    return "UNKNOWN", ""


def _eval_status(path: Path, entry: dict, view: SchedulerView, problems: list[str] | None = None) -> EvalStatus:
    """``problems``: the run's, to which a damaged eval.json is added (shown, and `tla status` exits 3)."""
    from tla_jobs.jobs.artifacts import label  # entries written before --which: from the file's name

    job = job_of(entry)
    folder = local.folder_of(entry, path)
    out = Path(entry.get("output_dir") or rundir.eval_dir(path, str(entry.get("eval_id", ""))))
    ev = EvalStatus(str(entry.get("eval_id", "")), job, str(entry.get("checkpoint", "")), "UNKNOWN", "",
                    which=str(entry.get("which") or label(Path(str(entry.get("checkpoint", ""))).name)),
                    sha256=entry.get("checkpoint_sha256"), weights=str(entry.get("weights") or "model"))
    result, problem = damage.eval_result(out)
    if problem and problems is not None and problem not in problems:
        problems.append(problem)
    if result is not None:
        ev.sha256 = result.get("checkpoint_sha256") or ev.sha256
        ev.weights = str(result.get("weights") or ev.weights)  # an export's: what it was made of
        ev.epoch = result.get("epoch") if isinstance(result.get("epoch"), int) else None
    if entry.get("executor") == "slurm":
        recs = view.jobs.get(job, [])
        sched, ev.source = (recs[-1].state, view.source) if recs else (None, view.source)
    else:
        sched, ev.source = local.state(entry, folder).state, "process table"
    error = pickles.error(folder, job)
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
    if st.state in ("RUNNING", "UNKNOWN") and beat.get("phase") == "staging":  # --stage-data, at job start
        done, total = beat.get("staged_bytes"), beat.get("stage_bytes")
        if isinstance(done, (int, float)) and isinstance(total, (int, float)) and total > 0:
            how_far = f"{done / 1e9:.1f} of {total / 1e9:.1f} GB ({100 * done / total:.0f}%)"
        else:
            how_far = "waiting for the rank of its node that copies"
        return f"staging data to {beat.get('stage_dir', '?')}: {how_far}"
    if st.attempts and last_end is None and st.attempts[-1].get("outcome", "running") != "running":
        return f"attempt {len(st.attempts)}: {st.attempts[-1]['outcome']}"
    if last_end is not None:
        return f"attempt ended: {last_end.get('reason')} at epoch {last_end.get('epoch', '?')}"
    if st.attempts:
        s = st.attempts[-1]["start"]
        return f"attempt started on {s.get('host')} at epoch {s.get('epoch')}"
    return f"submitted {st.record['submissions'][-1].get('reason', '')}"
