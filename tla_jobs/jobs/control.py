"""Acting on submitted runs: cancel (a run's live training and eval jobs, or a whole sweep's),
resume (a new job from the run's stored spec), and signal (the preemption path, on demand)."""

from __future__ import annotations

import time
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.errors import TlaError
from tla_jobs.fsutil import locked
from tla_jobs.jobs import damage, local, profiles, records, slurm
from tla_jobs.jobs.plan import Plan, apply_overrides
from tla_jobs.jobs.scheduler import ACTIVE, SchedulerView

SIGNALS = ("USR2", "TERM")  # the two the trainer checkpoints on (train/signals.py); others would kill it


def _live(entry: dict, path: Path, view: SchedulerView) -> bool:
    if entry.get("executor") == "slurm":
        return view.latest(str(entry["job_id"])) in ACTIVE
    return local.alive(entry, local.folder_of(entry, path))


def _stop(entries: list[dict], run_dir: Path) -> set[str]:
    """Stop these live jobs of a run; the ids actually signalled. SLURM jobs get scancel (SIGTERM,
    then SIGKILL after the cluster's KillWait); local ones local.cancel's TERM, INT, KILL."""
    slurm_ids = [str(e["job_id"]) for e in entries if e.get("executor") == "slurm"]
    if slurm_ids:
        slurm.scancel(slurm_ids)
    return set(slurm_ids) | set(local.cancel([e for e in entries if e.get("executor") == "local"], run_dir))


def cancel(run: str | None = None, sweep: str | None = None, train_only: bool = False,
           eval_only: bool = False) -> list[str]:
    """Cancel the live jobs of a run or of every run of a sweep (only the training or only the eval
    jobs when asked); one line per run saying what was cancelled. Only queued or running jobs are
    signalled; a finished run keeps its state, also while its process exits after the trainer's
    final record."""
    from tla_jobs.jobs.state import collect

    if bool(run) == bool(sweep):
        raise TlaError("give one run, or --sweep NAME")
    if train_only and eval_only:
        raise TlaError("--train and --eval together: leave both out to cancel every job of the run")
    if sweep:
        paths = records.sweep_runs(records.check_name(sweep))
    else:
        paths, is_sweep = records.run_or_sweep(run)  # a sweep's name works as in `tla status`
        if not is_sweep:
            records.load(paths[0])  # a damaged run says so
    loaded = [(p, damage.record(p)[0]) for p in paths]
    ids = [str(e["job_id"]) for _, rec in loaded if rec for e in rec.get("submissions", []) + rec.get("evals", [])
           if e.get("executor") == "slurm"]
    view = slurm.query(ids)
    statuses = {st.path: st for st in collect(paths, view)}
    said = []
    for path, rec in loaded:
        st = statuses.get(path)
        if rec is None or st is None:
            said.append(f"{path.name}: damaged run, nothing cancelled")
            continue
        train = [] if eval_only or st.state not in ACTIVE else [e for e in rec.get("submissions", [])
                                                                 if _live(e, path, view)]
        evals = [] if train_only else [e for e in rec.get("evals", []) if _live(e, path, view)]
        if not train and not evals:
            said.append(f"{path.name}: nothing to cancel ({st.state}; no live "
                        f"{'eval ' if eval_only else 'training ' if train_only else ''}job)")
            continue
        now = time.time()
        stopped = _stop(train + evals, path)
        train_stopped = bool({str(e["job_id"]) for e in train} & stopped)
        eval_ids = {str(e["job_id"]) for e in evals} & stopped

        def mark(r, train_stopped=train_stopped, eval_ids=eval_ids, now=now):
            if train_stopped:
                r.update(cancelled=True, cancelled_at=now)
            for e in r.get("evals", []):
                if str(e.get("job_id")) in eval_ids:
                    e["cancelled"] = now

        records.update(path, mark)
        parts = [f"training job {e['job_id']}" for e in train if str(e["job_id"]) in stopped]
        parts += [f"eval job {e['job_id']} ({e.get('eval_id', '')})" for e in evals if str(e["job_id"]) in stopped]
        said.append(f"cancelled {path.name}: {', '.join(parts)}" if parts else f"{path.name}: nothing to cancel")
    return said


def resume(run: str, cluster: str | None = None, **overrides) -> tuple[Path, dict]:
    """A new training job for a run that is not live, from its stored spec (it continues from its
    newest good checkpoint), with its own profile or ``cluster`` and the resource overrides."""
    from tla_jobs.jobs.preflight import preflight, refuse_failed
    from tla_jobs.jobs.state import collect
    from tla_jobs.jobs.submit import submit_train

    run_dir = records.resolve(run)
    # one resume of a run at a time: a second `tla resume` while the first is submitting would see the
    # run not yet live and queue a second job training into the same folder
    with locked(run_dir / "resume", wait=False, busy=f"another `tla resume {run_dir.name}` is submitting it; "
                                                     "see `tla status` once it has"):
        record = records.load(run_dir)
        rundir.refuse_linked_dirs(run_dir)
        st = collect([run_dir])[0]
        if st.state in ACTIVE:
            raise TlaError(f"run {run_dir.name} is {st.state}; `tla cancel {run_dir.name}` first")
        base = profiles.load(cluster) if cluster else profiles.Profile.model_validate(record["profile"])
        profile = apply_overrides(base, **overrides)
        if st.state == "COMPLETED":
            raise TlaError(f"run {run_dir.name} has COMPLETED: nothing to resume (to train it longer: `tla train "
                           f"--output-dir {run_dir} --extend --epochs N` with its recipe)")
        plan = Plan(run_dir.name, run_dir, profile, [{**record["spec"], "resume": ""}])
        preflight(plan)  # the checks a submission gets: another --tasks-per-node may not fit the data, ...
        refuse_failed(plan.checks)
        records.update(run_dir, lambda r: (r.update(profile=profile.model_dump(), cancelled=False)))
        return run_dir, submit_train(plan, reason="resume")


def signal(run: str, sig: str) -> tuple[Path, str]:
    """Send SIG``sig`` to the run's newest job (SLURM: scancel --signal; local: the trainer named by
    its live heartbeat); (the run directory, the job id)."""
    if sig not in SIGNALS:
        raise TlaError(f"--signal must be USR2 or TERM (the signals the trainer checkpoints on), not {sig!r}")
    run_dir = records.resolve(run)
    record = records.load(run_dir)
    if not record.get("submissions"):
        raise TlaError(f"run {run_dir.name} has no job")
    latest = record["submissions"][-1]
    if latest["executor"] == "slurm":
        slurm.scancel([latest["job_id"]], signal=sig)
    else:
        local.signal_trainer(run_dir, damage.heartbeat(run_dir)[0] or {}, sig,  # a damaged heartbeat is no live one
                             local.folder_of(latest, run_dir))
    return run_dir, str(latest["job_id"])
