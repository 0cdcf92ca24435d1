"""Where runs stand: one scheduler query for every SLURM job shown (slurm.py), the process table for
local jobs (local.py), and the trainer's own files (heartbeat, attempts, summary) for what the
scheduler cannot know. Every state says which source it came from; ``decide`` holds the precedence.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

from tla_jobs import __version__, rundir
from tla_jobs.jobs import damage, local, pickles, slurm
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
            return 1 + s.get("max_requeue_timeout", 3) + s.get("max_requeue_preempt", 20)
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

    ``cache``: use and refresh each finished run's status cache (see "The status cache" below), so
    that listing thousands of finished runs reads one small file per run instead of computing each
    again; the scheduler is asked only about the runs that were not in it."""
    loaded: list[tuple[Path, dict | str | RunStatus, dict | None]] = []
    slurm_ids: list[str] = []
    for p in paths:
        keys = None
        if cache:
            hit = _cache_load(p)
            if hit is not None:
                loaded.append((p, hit, None))
                continue
            # the files' keys are taken before they are read (and when): see "The status cache" below
            keys = {"": time.time(), rundir.RUN_JSON: _stat_key(f"{p}{os.sep}{rundir.RUN_JSON}")}
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
            keys.update(_source_keys(p, record))  # before the files are read: a later change shows in them
            st = _one_safe(p, record, view)
            if _cacheable(st, view):
                st = _cache_store(st, keys) or st  # as read back from it: --json prints the text just written
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
    st.evals = [_eval_status(path, e, view) for e in record.get("evals", [])]
    if not subs:
        st.state, st.source = "NOT SUBMITTED", rundir.RUN_JSON
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
            return "CANCELLED", rundir.RUN_JSON  # it died of the cancel (stopped while it started up)
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


def _eval_status(path: Path, entry: dict, view: SchedulerView) -> EvalStatus:
    from tla_jobs.jobs.artifacts import label  # entries written before --which: from the file's name

    job = job_of(entry)
    folder = local.folder_of(entry, path)
    out = Path(entry.get("output_dir") or rundir.eval_dir(path, str(entry.get("eval_id", ""))))
    ev = EvalStatus(str(entry.get("eval_id", "")), job, str(entry.get("checkpoint", "")), "UNKNOWN", "",
                    which=str(entry.get("which") or label(Path(str(entry.get("checkpoint", ""))).name)),
                    sha256=entry.get("checkpoint_sha256"), weights=str(entry.get("weights") or "model"))
    result, problem = damage.eval_result(out)
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


# ------------------------------------------------------------------------------------ the status cache
#
# Why: `tla status` over 10,000 runs spent most of its time recomputing runs that finished long ago
# (four JSON files parsed and checked, submitit's pickle looked up, the process table read: about
# 0.2 ms a run). A finished run's status cannot change unless one of its files does, so it is kept,
# once computed, in the run directory (rundir.STATUS_CACHE) and used while those files are unchanged.
#
# The run directory stays the source of truth; the cache is only ever a copy of what collect()
# computed from it, and is trusted only when all of this holds:
#   * it was written for a run in a final state that no scheduler or process can change any more
#     (_cacheable: every local job's process gone; a SLURM run only when the trainer's own end
#     record settled it and sacct has every job as ended): a live run is always computed;
#   * every file that state was computed from (run.json, attempts.jsonl, heartbeat.json,
#     summary.json, metrics.jsonl, submitit's result pickle of each job, each eval's eval.json) has
#     the inode, size, mtime and ctime it had *before* it was read (a change made while the status
#     was being computed leaves the cache stale at once), and is still missing if it was missing;
#   * no such file had been modified within RACY_S before it was stat'ed, nor before the cache file
#     was written (git's "racy clean" rule: a change within one timestamp tick of the previous one
#     does not show in the mtime, so a file that was that fresh is not trusted);
#   * the code that computes a status is the same (CODE: a hash of its modules' source), so a fix
#     in decide() or in the files' checks never meets a status computed by the old rules.
# It is written atomically (temporary file, rename) without fsync: a cache lost or cut short by a
# crash is not valid JSON or not valid for the files, and is simply computed again. A runs root
# that cannot be written (a teammate's, a full disk) is read as usual, without a cache.

RACY_S = 2.0
CACHE_FORMAT = 2
_CODE_STAMP: str | None = None
_HOST = socket.gethostname()


# the modules a status is computed by (artifacts: the label of an eval; slurm: the records from sacct)
CODE = ("jobs/state.py", "jobs/attempts.py", "jobs/damage.py", "jobs/local.py", "jobs/pickles.py",
        "jobs/scheduler.py", "jobs/slurm.py", "jobs/artifacts.py", "rundir.py", "fsutil.py")


def _code_stamp() -> str:
    """A hash of the source of every module a status is computed by, and of tla's version."""
    global _CODE_STAMP
    if _CODE_STAMP is None:
        package = Path(rundir.__file__).parent
        h = hashlib.sha1(f"{CACHE_FORMAT} {__version__}".encode())
        for name in CODE:
            try:
                h.update((package / name).read_bytes())
            except OSError:
                h.update(b"?")  # no source to read (a zipped install): the version alone decides
        _CODE_STAMP = h.hexdigest()
    return _CODE_STAMP


def _stat_key(path: str) -> tuple[str, int]:
    """What tells a file's contents apart without reading it, "inode:size:mtime:ctime" (ns; "-" for
    a missing or unreadable file), and its mtime. ctime cannot be set back, so a rewrite that restores
    the size and the mtime still shows."""
    try:
        s = os.stat(path)
    except OSError:
        return "-", 0
    return f"{s.st_ino}:{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}", s.st_mtime_ns


def _source_keys(path: Path, record: dict) -> dict[str, tuple[str, int] | None]:
    """The key of every file a run's status is computed from, except run.json (collect() stats it
    before reading it). Names inside the run directory are relative, so a moved run keeps its cache."""
    names = [rundir.ATTEMPTS, rundir.HEARTBEAT, rundir.SUMMARY, rundir.METRICS]
    for entry in record.get("submissions", []) + record.get("evals", []):
        try:
            names.append(_result_pickle(entry, path))
        except Exception:  # a job id submitit cannot name: nothing to key on, so nothing cached
            names.append("")
    for entry in record.get("evals", []):
        out = Path(entry.get("output_dir") or rundir.eval_dir(path, str(entry.get("eval_id", ""))))
        names.append(str(out / rundir.EVAL))
    base = str(path) + os.sep
    return {n.removeprefix(base): _stat_key(n if n.startswith(os.sep) else base + n) if n else None for n in names}


_PROBE = "0tla0job0"
_PICKLE_NAME: list[str] = []  # submitit's name of a result pickle, split where the job id goes


def _result_pickle(entry: dict, run: Path) -> str:
    """pickles.result_path of a job, as a string, for 10,000 runs: submitit's JobPaths names the file
    in the folder by putting the job id into a pattern, so the name is taken from it once (a probe id,
    checked to come out as the pattern's only change) and filled in; anything else asks JobPaths."""
    folder, job = str(local.folder_of(entry, run)), job_of(entry)
    if not _PICKLE_NAME:
        probe = pickles.result_path(Path(os.sep, "x"), _PROBE)
        parts = probe.name.split(_PROBE)
        _PICKLE_NAME.extend(parts if len(parts) == 2 and str(probe.parent) == os.sep + "x" else ["", "", "?"])
    if len(_PICKLE_NAME) == 2 and os.path.isabs(folder) and "%" not in folder and job.replace("_", "").isdigit():
        return f"{folder}{os.sep}{_PICKLE_NAME[0]}{job}{_PICKLE_NAME[1]}"
    return str(pickles.result_path(Path(folder), job))


def _cacheable(st: RunStatus, view: SchedulerView) -> bool:
    """Only a run whose status no scheduler, process or clock can change any more (see above)."""
    if st.problems or st.state in ("DAMAGED", "UNKNOWN", "NOT SUBMITTED") or st.state in ACTIVE:
        return False
    _ = st.progress  # reads metrics.jsonl when the heartbeat lacks the figures: its damage is known now
    if st.problems or any(ev.state in ACTIVE or ev.state == "UNKNOWN" for ev in st.evals):
        return False
    jobs = st.record.get("submissions", []) + st.record.get("evals", [])
    if any(j.get("executor") == "slurm" for j in jobs):
        if st.decided_by not in ("attempts", rundir.RUN_JSON) or view.source != "sacct":
            return False  # settled by the scheduler: a requeue may still change it
        for j in jobs:
            recs = view.jobs.get(job_of(j), []) if j.get("executor") == "slurm" else []
            if j.get("executor") == "slurm" and (not recs or any(r.state in ACTIVE or r.source != "sacct"
                                                                  for r in recs)):
                return False
    return not any(r.state in ACTIVE for r in st.jobs)


def _cache_store(st: RunStatus, keys: dict) -> RunStatus | None:
    """Write the run's status cache, and return the status as read back from it (None when nothing
    was written); ``keys``: the files' keys, and under "" when they were taken.

    Three lines, so that a reader decodes only what it uses: the header (what it is valid for, and
    the run's state and last activity: all a listing needs to filter and order runs; plain fields
    between tabs, as splitting them costs a third of decoding JSON), the run's `tla status --json`
    form without its name and path (printed as it is), and the rest of the status (run.json's record,
    summary.json, the progress figures when metrics.jsonl gave them)."""
    progress_in_beat = isinstance((st.heartbeat or {}).get("progress"), dict)  # then metrics.jsonl was not used
    taken = keys.get("")
    keys = {k: v for k, v in keys.items() if k and not (progress_in_beat and k == rundir.METRICS)}
    newest = max((v[1] for v in keys.values() if v is not None), default=0)
    if None in keys.values() or not isinstance(taken, float) or newest > (taken - RACY_S) * 1e9:
        return None  # a file changed moments before it was read (or cannot be keyed): computed again next time
    fields = [str(CACHE_FORMAT), _code_stamp(), str(newest), st.state, repr(float(st.last_activity)),
              ",".join(v[0] for v in keys.values()), st.name, *keys]
    if any("\t" in f or "\n" in f for f in fields):
        return None  # a name the header cannot hold
    target = st.path / rundir.STATUS_CACHE
    tmp = f"{target}.{_HOST}.{os.getpid()}.tmp"  # unique to this process, on any host sharing the folder
    try:
        form = st.as_json()
        del form["run"], form["path"]
        head = "\t".join(fields).encode()
        body = "\n".join([
            json.dumps(form, default=str),
            json.dumps({"record": st.record, "summary": st.summary, "decided_by": st.decided_by,
                        "progress": None if progress_in_beat else st.progress}), ""]).encode()
        data = head + b"\n" + body
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)  # the umask decides, as for other files
        try:
            if os.write(fd, data) != len(data):
                raise OSError("short write")
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except (OSError, TypeError, ValueError):  # read-only or full, or a value JSON cannot hold: no cache
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None
    return CachedStatus(st.path, st.name, st.state, float(st.last_activity), body)


def _cache_load(path: Path) -> RunStatus | None:
    """The run's cached status if it is valid for its files now (see above), else None. Plain
    strings and system calls: this runs once a run, 10,000 times for a large runs root."""
    d = f"{path}{os.sep}"
    try:
        fd = os.open(d + rundir.STATUS_CACHE, os.O_RDONLY)
    except OSError:  # none (yet), or unreadable
        return None
    try:
        try:
            written = os.fstat(fd)
            data = os.read(fd, written.st_size + 1)
        finally:
            os.close(fd)
        if len(data) != written.st_size:
            return None  # replaced while it was read
        cut = data.index(b"\n")
        # format, code stamp, newest mtime, state, last activity, key, name, the files (see _cache_store)
        head = data[:cut].decode().split("\t")
        if len(head) < 8 or head[0] != str(CACHE_FORMAT) or head[1] != _code_stamp() \
                or int(head[2]) > written.st_mtime_ns - RACY_S * 1e9:
            return None
        if ",".join([_stat_key(n if n.startswith(os.sep) else d + n)[0] for n in head[7:]]) != head[5]:
            return None
        return CachedStatus(path, head[6], head[3], float(head[4]), data[cut + 1:])
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):  # unreadable, another shape
        return None


class CachedStatus(RunStatus):
    """A finished run's status from its cache, decoded only as far as it is used: name, state and
    last activity at once (a listing filters and orders 10,000 runs by them), the rest on first use,
    and `--json` prints the cached form as it is."""

    _LAZY = ("record", "source", "attempts", "jobs", "heartbeat", "summary", "gpu_hours", "last_event", "evals",
             "waiting_for_ranks", "decided_by")

    def __init__(self, path: Path, name: str, state: str, last_activity: float, body: bytes):
        # not RunStatus.__init__: the fields of _LAZY are properties here, filled from ``body`` when first read
        self.name, self.path, self.state, self._last_activity, self._body = name, path, state, last_activity, body
        self.problems: list[str] = []
        self._metrics = None
        self._progress = None
        self._fields: dict | None = None

    def _field(self, name: str):
        if self._fields is None:
            form, rest = self._body.split(b"\n", 2)[:2]
            j, r = json.loads(form), json.loads(rest)
            self._fields = {
                "record": r["record"], "summary": r["summary"], "decided_by": r["decided_by"],
                "source": j["source"], "attempts": j["attempts"], "heartbeat": j["heartbeat"],
                "gpu_hours": j["gpu_hours"], "last_event": j["last_event"],
                "waiting_for_ranks": j["waiting_for_ranks"], "jobs": [JobRecord(**x) for x in j["jobs"]],
                "evals": [EvalStatus(**x) for x in j["evals"]]}
            if self._progress is None:
                self._progress = r["progress"]
        return self._fields[name]

    @property
    def last_activity(self) -> float:
        return self._last_activity

    def json_text(self) -> str:
        if self.problems:  # found since (metrics.jsonl read for a named run): computed with them
            return super().json_text()
        form = self._body.split(b"\n", 1)[0].decode()
        return f'{{"run": {json.dumps(self.name)}, "path": {json.dumps(str(self.path))}, {form[1:]}'


for _name in CachedStatus._LAZY:
    setattr(CachedStatus, _name, property(lambda self, _n=_name: self._field(_n)))
