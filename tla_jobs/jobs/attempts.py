"""A run's attempts: the trainer's start/end records paired into attempts, each matched with the
scheduler's record of the job (and restart) that ran it, and the GPU-hours they used."""

from __future__ import annotations

from pathlib import Path

from tla_jobs.jobs import damage, retry
from tla_jobs.jobs.scheduler import ACTIVE, FINAL_BAD, SchedulerView


def job_of(sub: dict) -> str:
    return str(sub.get("job_id", ""))


def _gpus_of(sub: dict) -> int:
    try:
        return int(sub.get("gpus_per_node") or 0) * int(sub.get("nodes") or 1)
    except (TypeError, ValueError):
        return 0


def attempts_of(path: Path, problems: list[str] | None = None) -> list[dict]:
    """Pair the trainer's start/end events into attempts (unusable lines are left out, and said in
    ``problems``). An end names its attempt (attempt_id); older runs' ends close the newest open one.
    A failure's record (jobs/retry.py: which rank, how, where; the SLURM batch shell's names its job
    and restart instead) joins the attempt's own end record, which it completes or stands for."""
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
        elif e.get("event") == "end" and e.get("reason") == retry.FAILED:
            a = by_id.get(str(e.get("attempt_id"))) if e.get("attempt_id") else next(
                (x for x in reversed(out) if str(x["start"].get("job_id")) == str(e.get("job_id"))
                 and x["start"].get("restart_count", 0) == e.get("restart_count", 0)), None)
            if a is not None:
                a["end"] = {**e, **a["end"]} if a["end"] else e  # the attempt's own words first
        elif e.get("event") == "end":
            a = by_id.get(str(e.get("attempt_id"))) if e.get("attempt_id") else None
            if a is None and not e.get("attempt_id"):
                a = out[-1] if out else None
            if a is not None and a["end"] is None:
                a["end"] = e
    return out


def pair(st, view: SchedulerView, subs: list[dict]) -> None:
    """Each attempt with the job (and the job's restart) that ran it, and how it ended: the trainer's
    own end record; else what the scheduler says of that restart; an attempt that a later one took
    over from (a requeue after a node failure) is superseded, never "killed"."""
    execs = {job_of(s): s.get("executor") for s in subs}
    attempts = st.attempts
    # whether any attempt after the i-th has an id, for every i at once (linear: runs with 100,000 attempts)
    later_has_id = [False] * (len(attempts) + 1)
    for i in range(len(attempts) - 1, -1, -1):
        later_has_id[i] = later_has_id[i + 1] or bool(attempts[i]["start"].get("attempt_id"))
    for i, a in enumerate(attempts):
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
        later = i + 1 < len(attempts)
        if e is not None:
            a["outcome"] = str(e.get("reason")) + (f": {retry.describe(e)}" if retry.is_failure(e) else "")
        elif later and s.get("attempt_id") and later_has_id[i + 1]:
            nxt = attempts[i + 1]["start"]
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


def gpu_hours(st, view: SchedulerView, subs: list[dict]) -> float:
    """From sacct (elapsed x allocated GPUs) where it has the job; else squeue's time used; else
    the trainer's own attempt records (start to end, or to the heartbeat while it runs)."""
    total = 0.0
    gpus = {job_of(s): _gpus_of(s) for s in subs}
    by_job: dict[str, list[dict]] = {}
    for a in st.attempts:
        by_job.setdefault(str(a["start"].get("job_id", "")), []).append(a)
    for sub in subs:
        job = job_of(sub)
        recs = view.jobs.get(job, []) if sub.get("executor") == "slurm" else []
        if recs and all(r.source == "sacct" for r in recs):
            total += sum(r.elapsed_s * (r.gpus or gpus[job]) for r in recs)
            continue
        seconds = 0.0
        for a in by_job.pop(job, []):  # each job's attempts once, however often it was submitted
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
