"""Submission of training, evaluation and sweep jobs, all through submitit.

A submission is a Plan (plan.py): the TrainConfig of each run (stored in run.json as the run's
spec), a profile (resources, requeue limits, container), and a submitit executor built from both
(local.py for this machine, sbatch.py for SLURM). `--dry-run` renders the very sbatch script
submitit would submit (its own template, with the same parameters) and writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import shlex
import sys
import time
from pathlib import Path

from tla_jobs import procs, rundir
from tla_jobs.jobs import local, records, sbatch
from tla_jobs.jobs.plan import Plan, requeue_limits
from tla_jobs.jobs.profiles import Profile


def executor_for(profile: Profile, folder: Path, name: str, run_dir: Path, data_paths: list[str],
                  dependency: str | None = None, array_size: int | None = None, dry_run: bool = False,
                  parallel: int | None = None, retry_dirs: list[Path] | None = None):
    """The submitit executor for the profile, once every value the script gets has been checked.
    A job array runs at most ``parallel`` elements at once (SLURM: all by default; local: one per core).
    ``retry_dirs``: a training job's run directories, whose failed steps are requeued (jobs/retry.py)."""
    sbatch.check_script_values(profile, [str(run_dir.parent), str(folder), *data_paths], name, folder=str(folder))
    if profile.executor == "local":
        env = None
        if array_size:
            env = local.sweep_env(array_size, profile.local.tasks,
                                  parallel or local.default_parallelism(profile.local.tasks), folder)
        return local.executor(profile, folder, name, env)
    return sbatch.executor(profile, folder, name, run_dir, data_paths[0] if data_paths else "", dependency,
                           array_size, dry_run=dry_run, parallel=parallel,
                           retry_dirs=[str(d) for d in retry_dirs] if retry_dirs else None)


def _folder(plan: Plan) -> Path:
    """Where submitit keeps the jobs' files: the run's submitit folder; a sweep's own folder."""
    return plan.run_dir if plan.kind == "sweep" else plan.run_dir / rundir.SUBMITIT_DIR


def render(plan: Plan) -> str:
    """The exact script (sbatch) or command (local) the submission would run."""
    if plan.profile.executor != "slurm":
        # not through submitit's local executor: building one creates its folder, and a dry run writes nothing
        cmd = [sys.executable, "-m", "submitit.local._local", str(_folder(plan))]
        at_once = ""
        if plan.kind == "sweep":
            n = plan.parallel or local.default_parallelism(plan.profile.local.tasks)
            at_once = f", {len(plan.specs)} runs, at most {min(n, len(plan.specs))} at once"
        return (f"# submitit local executor: {plan.profile.local.tasks} task(s), timeout "
                f"{plan.profile.local.timeout_min} min{at_once}\n{shlex.join(cmd)}\n")
    array = len(plan.specs) if plan.kind == "sweep" else None
    ex = executor_for(plan.profile, _folder(plan), plan.name, plan.run_dir,
                       [s.get("data_path", "") for s in plan.specs], plan.dependency, array, dry_run=True,
                       parallel=plan.parallel, retry_dirs=[s.get("output_dir") or plan.run_dir for s in plan.specs])
    return ex.script(array if array and array > 1 else None)  # submitit submits a one-run array as one job


@contextlib.contextmanager
def _queueing():
    """sbatch's refusal as one line (submitit prints sbatch's stderr and raises FailedJobError)."""
    from submitit.core.utils import FailedJobError, FailedSubmissionError

    printed = io.StringIO()
    try:
        with contextlib.redirect_stderr(printed):
            yield
    except (FailedJobError, FailedSubmissionError) as exc:
        from tla_jobs.errors import SubmissionError

        raise SubmissionError(f"the job was not queued: {' '.join((str(exc) or printed.getvalue()).split())}") from None
    sys.stderr.write(printed.getvalue())  # whatever else was said while submitting, as it was said


def _submission(job, reason: str, profile: Profile, extra: dict | None = None) -> dict:
    ident = {}
    if profile.executor == "local" and str(job.job_id).isdigit():
        ident = procs.identity(int(job.job_id))  # a PID alone may later name another process
    slurm = profile.executor == "slurm"
    return {"job_id": str(job.job_id), "submitted": time.time(), "executor": profile.executor, "reason": reason,
            **ident,
            "profile": profile.name, "nodes": profile.slurm.nodes if slurm else 1,
            "tasks_per_node": profile.slurm.tasks_per_node if slurm else profile.local.tasks,
            "gpus_per_node": profile.slurm.gpus_per_node if slurm else 0,
            "time_min": profile.slurm.time_min if slurm else profile.local.timeout_min,
            **(extra or {})}


def submit_train(plan: Plan, reason: str = "submit") -> dict:
    from tla_jobs.jobs.entry import TrainJob

    spec = plan.specs[0]
    ex = executor_for(plan.profile, plan.run_dir / rundir.SUBMITIT_DIR, plan.name, plan.run_dir,
                       [spec.get("data_path", "")], plan.dependency, retry_dirs=[plan.run_dir])
    with _queueing():
        job = ex.submit(TrainJob(**requeue_limits(plan.profile)), spec)
    entry = _submission(job, reason, plan.profile)
    records.update(plan.run_dir, lambda r: r["submissions"].append(entry))
    return entry


def submit_eval(run_dir: Path, profile: Profile, spec: dict, dependency: str | None, eval_id: str, fn,
                extra: dict) -> dict:
    """Queue ``fn`` (an EvalJob) on ``spec``; run.json's entry keeps ``extra`` (the checkpoint's
    sha256, which weights) beside the checkpoint's path."""
    ex = executor_for(profile, run_dir / rundir.SUBMITIT_DIR, f"{run_dir.name}-eval", run_dir,
                       [spec.get("data_path", "")], dependency)
    with _queueing():
        job = ex.submit(fn, spec)
    entry = {**_submission(job, "eval", profile), "eval_id": eval_id, "checkpoint": spec["resume"], **extra,
             "dependency": dependency, "output_dir": spec["output_dir"]}
    records.update(run_dir, lambda r: r["evals"].append(entry))
    return entry


def submit_sweep(plans: list[Plan], profile: Profile, sweep_dir: Path, name: str,
                 parallel: int | None = None) -> list[dict]:
    """One submitit job array (one SLURM array job) for every run of the sweep, at most ``parallel``
    of them at once."""
    from tla_jobs.jobs.entry import TrainJob

    specs = [p.specs[0] for p in plans]
    ex = executor_for(profile, sweep_dir, name, plans[0].run_dir, [sp.get("data_path", "") for sp in specs],
                       array_size=len(specs), parallel=parallel, retry_dirs=[p.run_dir for p in plans])
    with _queueing():
        jobs = ex.map_array(TrainJob(**requeue_limits(profile)), specs)
    out = []
    for index, (plan, job) in enumerate(zip(plans, jobs)):
        entry = _submission(job, "sweep", profile, {"sweep": name, "array_index": index,
                                                      "submitit_folder": str(sweep_dir)})
        records.update(plan.run_dir, lambda r, e=entry: r["submissions"].append(e))
        out.append(entry)
    return out


def run_plan(name: str, train_kwargs: dict, profile: Profile) -> Plan:
    """The plan of a new run NAME under the profile's runs root (refused when the name is taken)."""
    from tla_jobs.errors import TlaError
    from tla_jobs.jobs.plan import train_spec

    run_dir = records.run_dir(name, records.runs_root(profile.runs_root))
    if (run_dir / rundir.RUN_JSON).exists() or (run_dir.exists() and any(run_dir.iterdir())):
        raise TlaError(f"run {name} already exists in {run_dir.parent}; use `tla resume {name}` or another --name")
    return Plan(name, run_dir, profile, [train_spec(train_kwargs, run_dir)])


def submit_new_run(plan: Plan) -> dict:
    """Create the run (run.json) and submit its training job; no job queued leaves nothing behind."""
    import shutil

    profile = plan.profile
    records.create(plan.run_dir, {"kind": "train", "spec": plan.specs[0], "profile": profile.model_dump(),
                                  "profile_name": profile.name, "image": profile.container.image})
    try:
        return submit_train(plan)
    except BaseException:
        shutil.rmtree(plan.run_dir, ignore_errors=True)
        raise
