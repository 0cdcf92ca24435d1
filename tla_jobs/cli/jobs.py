"""`tla submit train|sweep`, `tla eval checkpoint`, `tla resume`, `tla cancel`, `tla signal`."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path

import typer
from rich.console import Console

from tla_jobs import rundir
from tla_jobs.cli.app import app, guard
from tla_jobs.cli.options import with_train_options
from tla_jobs.errors import TlaError

submit_app = typer.Typer(help="Submit training runs (one, or a sweep as one job array).", no_args_is_help=True)
eval_app = typer.Typer(help="Evaluate checkpoints as jobs.", no_args_is_help=True)
app.add_typer(submit_app, name="submit")
app.add_typer(eval_app, name="eval")
console = Console()
err = Console(stderr=True)

PROFILE_HELP = "Cluster profile: a name in ./cluster_configs (or $TLA_CLUSTER_CONFIGS), or a YAML path."
# Resource overrides shared by `submit train`, `submit sweep` and `resume` (one declaration, same help;
# the values are checked by the profile model, which gives bad ones a one-line error).
NODES = typer.Option(None, "--nodes", help="Override the profile's node count.")
GPUS_PER_NODE = typer.Option(None, "--gpus-per-node", help="Override the profile's GPUs per node.")
TASKS_PER_NODE = typer.Option(None, "--tasks-per-node", help="Override tasks (ranks) per node.")
TIME_MIN = typer.Option(None, "--time", help="Override the time limit of one attempt (minutes).")
PARTITION = typer.Option(None, "--partition", help="Override the SLURM partition.")


def _profile(name: str, nodes, gpus, time_min, partition, tasks):
    from tla_jobs.jobs import profiles
    from tla_jobs.jobs.submit import apply_overrides

    prof = profiles.load(name)
    try:
        return apply_overrides(prof, nodes, gpus, time_min, partition, tasks)
    except Exception as exc:  # pydantic: a zero or negative override
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            e = exc.errors()[0]
            from tla_jobs.cli.app import flag_name  # the flag typed (--time), not the field (time_min)

            raise TlaError(f"{flag_name(e['loc'], 'Profile')}: {e['msg']}") from None
        raise


def _spec(train_kwargs: dict, run_dir: Path, profile) -> dict:
    from tla_jobs.config import TrainConfig

    kw = dict(train_kwargs)
    for key in ("data_path", "resume"):
        if kw.get(key):
            kw[key] = str(Path(kw[key]).expanduser().resolve())
    kw["output_dir"] = str(run_dir)
    return TrainConfig(**kw).model_dump()


def _check_data(spec: dict) -> None:
    """The data a job will read is there, in the ImageFolder layout, before the job is queued."""
    from tla_jobs.data.folders import check_image_folder

    data = spec.get("data_path") or ""
    if spec.get("dataset", "imagefolder") != "imagefolder" and not (Path(data) / ".tla-dataset").is_file():
        return  # a bundled dataset: the job prepares it on first use
    check_image_folder(data, verify_images=False)


def _show_plan(plan, script: str, checks) -> None:
    console.rule(f"[bold]dry run: {plan.name}[/] ({plan.profile.executor}, profile {plan.profile.name})")
    console.print(f"run directory: {plan.run_dir}")
    console.print("[bold]script[/]")
    console.print(script, markup=False, highlight=False, soft_wrap=True)
    console.print("[bold]preflight[/]")
    for c in checks:
        console.print(f"  {c.label}  {c.name}: {c.detail}", highlight=False)


def _refuse_failed(checks) -> None:
    """A dry run whose checks fail exits non-zero (one line on stderr), so it can gate a script."""
    bad = [c for c in checks if not c.ok]
    if bad:
        raise TlaError(f"preflight failed: {bad[0].name}: {bad[0].detail}")


@submit_app.command("train")
@guard
@with_train_options
def submit_train(
    name: str = typer.Option(..., "--name", help="Run name (a safe file name); the run lives in RUNS/NAME."),
    cluster: str = typer.Option("local", "--cluster", help=PROFILE_HELP),
    nodes: int = NODES,
    gpus_per_node: int = GPUS_PER_NODE,
    tasks_per_node: int = TASKS_PER_NODE,
    time_min: int = TIME_MIN,
    partition: str = PARTITION,
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the sbatch script and preflight checks only."),
    follow: bool = typer.Option(False, "--follow", help="Follow the run with a progress display until it ends."),
    as_json: bool = typer.Option(False, "--json", help="Print the submission as JSON."),
    train_kwargs: dict = None,
) -> None:
    """Submit a training run through submitit (local executor or SLURM)."""
    from tla_jobs.jobs import records
    from tla_jobs.jobs.submit import Plan, preflight, render
    from tla_jobs.jobs.submit import submit_train as do_submit

    profile = _profile(cluster, nodes, gpus_per_node, time_min, partition, tasks_per_node)
    if train_kwargs.get("output_dir"):
        raise TlaError("--output-dir is not used by `tla submit train`: a submitted run lives in RUNS/NAME "
                       "(set $TLA_RUNS or the profile's runs_root to choose RUNS); --output-dir is for `tla train`")
    run_dir = records.run_dir(name, records.runs_root(profile.runs_root))
    if (run_dir / rundir.RUN_JSON).exists() or (run_dir.exists() and any(run_dir.iterdir())):
        raise TlaError(f"run {name} already exists in {run_dir.parent}; use `tla resume {name}` or another --name")
    plan = Plan(name, run_dir, profile, [_spec(train_kwargs, run_dir, profile)])
    checks = preflight(plan)
    if dry_run:
        _show_plan(plan, render(plan), checks)
        _refuse_failed(checks)
        return
    bad = [c for c in checks if not c.ok]
    if bad:
        raise TlaError(f"preflight failed: {bad[0].name}: {bad[0].detail}")
    records.create(run_dir, {"kind": "train", "spec": plan.specs[0], "profile": profile.model_dump(),
                             "profile_name": profile.name, "image": profile.container.image})
    try:
        entry = do_submit(plan)
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # no job was queued: leave nothing behind
        raise
    _announce({"run": name, "run_dir": str(run_dir), **entry}, as_json, follow, run_dir,
              f"submitted [bold]{name}[/] as {profile.executor} job {entry['job_id']}  ({run_dir})")


def _announce(entry: dict, as_json: bool, follow: bool, run_dir: Path, text: str) -> None:
    """Say what was submitted (a line, or JSON for scripts), then optionally follow it to its end."""
    if as_json:
        typer.echo(json.dumps(entry))
    else:
        console.print(text)
    if follow:
        from tla_jobs.cli.status import follow_run

        raise typer.Exit(follow_run(run_dir))


@submit_app.command("sweep")
@guard
@with_train_options
def submit_sweep(
    name: str = typer.Option(..., "--name", help="Sweep name; each run is NAME-MODEL-{tla,base}-sSEED."),
    models: str = typer.Option(None, "--models", help="Comma-separated models (default: --model)."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
    arms: str = typer.Option("tla,base", "--arms",
                             help="Comma-separated arms: tla (TL-Align), base (DeiT mixup+cutmix), grid (token-grid "
                                  "CutMix, area labels), none (no mixing)."),
    cluster: str = typer.Option("local", "--cluster", help=PROFILE_HELP),
    nodes: int = NODES,
    gpus_per_node: int = GPUS_PER_NODE,
    tasks_per_node: int = TASKS_PER_NODE,
    time_min: int = TIME_MIN,
    partition: str = PARTITION,
    dry_run: bool = typer.Option(False, "--dry-run"),
    as_json: bool = typer.Option(False, "--json"),
    train_kwargs: dict = None,
) -> None:
    """Submit a grid of models x seeds x arms as ONE job array; every element is its own run."""
    from tla_jobs.config import ARMS as arm_opts
    from tla_jobs.jobs import records
    from tla_jobs.jobs.submit import Plan, preflight, render
    from tla_jobs.jobs.submit import submit_sweep as do_sweep

    arm_list = [a.strip() for a in arms.split(",") if a.strip()]
    unknown = [a for a in arm_list if a not in arm_opts]
    if unknown or not arm_list:
        raise TlaError(f"unknown arm(s) {unknown}; choose from {', '.join(arm_opts)}")
    model_list = [m.strip() for m in (models or train_kwargs["model"]).split(",") if m.strip()]
    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
    except ValueError:
        raise TlaError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    for flag, values in (("--models", model_list), ("--arms", arm_list), ("--seeds", seed_list)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice or not values:  # one run name twice would leave a run that is never submitted
            raise TlaError(f"{flag} {'gives ' + ', '.join(twice) + ' twice' if twice else 'is empty'}")
    records.check_name(name)
    profile = _profile(cluster, nodes, gpus_per_node, time_min, partition, tasks_per_node)
    if train_kwargs.get("output_dir"):
        raise TlaError("--output-dir is not used by `tla submit sweep`: each run lives in RUNS/NAME-MODEL-ARM-sSEED "
                       "(set $TLA_RUNS or the profile's runs_root to choose RUNS)")
    root = records.runs_root(profile.runs_root)
    plans = []
    for model, arm, seed in itertools.product(model_list, arm_list, seed_list):
        run_name = records.check_name(f"{name}-{model}-{arm}-s{seed}")
        run_dir = records.run_dir(run_name, root)
        if run_dir.exists():
            raise TlaError(f"run {run_name} already exists in {run_dir.parent}")
        kw = {**train_kwargs, "model": model, "seed": seed, **arm_opts[arm]}
        plans.append(Plan(run_name, run_dir, profile, [_spec(kw, run_dir, profile)]))
    sweep_dir = root / f".sweep-{name}"
    checks = preflight(Plan(name, sweep_dir, profile, [p.specs[0] for p in plans]))
    if dry_run:
        plan = Plan(name, sweep_dir, profile, [p.specs[0] for p in plans])
        _show_plan(plan, render(plan), checks)
        console.print("[bold]runs[/]: " + ", ".join(p.name for p in plans))
        _refuse_failed(checks)
        return
    bad = [c for c in checks if not c.ok]
    if bad:
        raise TlaError(f"preflight failed: {bad[0].name}: {bad[0].detail}")
    if sweep_dir.exists():
        raise TlaError(f"sweep {name} already exists ({sweep_dir})")
    created = []
    try:
        for p in plans:
            records.create(p.run_dir, {"kind": "train", "spec": p.specs[0], "profile": profile.model_dump(),
                                       "profile_name": profile.name, "sweep": name, "image": profile.container.image})
            created.append(p.run_dir)
    except BaseException:  # e.g. the disk filled up half-way: no run of the sweep is left unsubmitted
        for run_dir in created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    entries = do_sweep(plans, profile, sweep_dir, name)
    if as_json:
        typer.echo(json.dumps([{"run": p.name, **e} for p, e in zip(plans, entries)]))
    else:
        console.print(f"submitted sweep [bold]{name}[/]: {len(plans)} runs as one job array "
                      f"{entries[0]['job_id'].split('_')[0]}")
        for p, e in zip(plans, entries):
            console.print(f"  {p.name}  job {e['job_id']}")


@eval_app.command("checkpoint")
@guard
def eval_checkpoint(
    target: str = typer.Argument(..., help="A checkpoint file, or a run (its newest checkpoint)."),
    cluster: str = typer.Option(None, "--cluster", help=PROFILE_HELP + " Default: the run's own profile."),
    data_path: Path = typer.Option(None, "--data-path", help="Dataset root (default: the run's)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Evaluate a checkpoint as a job; top-1/top-5 land in the run it belongs to.

    When the run's training job is still queued or running on SLURM, the eval job waits for it
    (--dependency afterok) and evaluates the checkpoint training ends with.
    """
    from tla_jobs.config import TrainConfig
    from tla_jobs.jobs import profiles, records
    from tla_jobs.jobs.state import ACTIVE, collect
    from tla_jobs.jobs.submit import submit_eval

    path = Path(target).expanduser()
    if path.suffix == ".pth" or path.is_file():
        if not path.is_file():
            raise TlaError(f"checkpoint {path} does not exist")
        ckpt = path.resolve()
        run_dir = ckpt.parent
        if not (run_dir / rundir.RUN_JSON).is_file():
            raise TlaError(f"{ckpt} is not inside a tla run directory (no run.json beside it)")
    else:
        run_dir = records.resolve(target)
        ckpt = run_dir / rundir.CHECKPOINT_LAST
    record = records.load(run_dir)
    st = collect([run_dir])[0]
    profile = profiles.load(cluster) if cluster else profiles.Profile.model_validate(record["profile"])
    dependency = None
    latest = (record.get("submissions") or [{}])[-1]
    if st.state in ACTIVE and latest.get("executor") == "slurm" and profile.executor == "slurm":
        dependency = f"afterok:{latest['job_id']}"
    elif not ckpt.is_file():
        raise TlaError(f"checkpoint {ckpt} does not exist (has the run trained an epoch yet?)")
    eval_id = f"eval-{int(time.time() * 1000)}"
    out = run_dir / "evals" / eval_id
    spec = {**record["spec"], "resume": str(ckpt), "eval_only": True, "output_dir": str(out)}
    if data_path:
        spec["data_path"] = str(data_path.expanduser().resolve())
    spec = TrainConfig(**spec).model_dump()
    _check_data(spec)
    entry = submit_eval(run_dir, profile, spec, dependency, eval_id)
    if as_json:
        typer.echo(json.dumps(entry))
    else:
        dep = f" after job {dependency.split(':')[1]}" if dependency else ""
        console.print(f"submitted eval of {ckpt.name} for run {run_dir.name} as job {entry['job_id']}{dep}")


@app.command("resume")
@guard
def resume(
    run: str = typer.Argument(..., help="Run name or directory."),
    cluster: str = typer.Option(None, "--cluster", help="Another profile (default: the run's)."),
    nodes: int = NODES,
    gpus_per_node: int = GPUS_PER_NODE,
    tasks_per_node: int = TASKS_PER_NODE,
    time_min: int = TIME_MIN,
    partition: str = PARTITION,
    follow: bool = typer.Option(False, "--follow"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Resubmit a run from its stored spec; it continues from its newest good checkpoint."""
    from tla_jobs.jobs import profiles, records
    from tla_jobs.jobs.state import ACTIVE, collect
    from tla_jobs.jobs.submit import Plan, apply_overrides
    from tla_jobs.jobs.submit import submit_train as do_submit

    run_dir = records.resolve(run)
    record = records.load(run_dir)
    st = collect([run_dir])[0]
    if st.state in ACTIVE:
        raise TlaError(f"run {run_dir.name} is {st.state}; `tla cancel {run_dir.name}` first")
    base = profiles.load(cluster) if cluster else profiles.Profile.model_validate(record["profile"])
    profile = apply_overrides(base, nodes, gpus_per_node, time_min, partition, tasks_per_node)
    spec = {**record["spec"], "resume": ""}
    plan = Plan(run_dir.name, run_dir, profile, [spec])
    records.update(run_dir, lambda r: (r.update(profile=profile.model_dump(), cancelled=False)))
    entry = do_submit(plan, reason="resume")
    _announce(entry, as_json, follow, run_dir,
              f"resumed [bold]{run_dir.name}[/] as {profile.executor} job {entry['job_id']}")


@app.command("cancel")
@guard
def cancel(
    run: str = typer.Argument(None, help="Run name or directory."),
    sweep: str = typer.Option(None, "--sweep", help="Cancel every run of this sweep (`tla submit sweep --name`)."),
    train_only: bool = typer.Option(False, "--train", help="Only the training job, not the eval jobs."),
    eval_only: bool = typer.Option(False, "--eval", help="Only the eval jobs, not the training job."),
) -> None:
    """Cancel a run's live jobs: its training job and its eval jobs (or a whole sweep's).

    Only jobs that are queued or running are signalled; a finished run keeps its state.
    """
    from tla_jobs.jobs import records
    from tla_jobs.jobs.state import ACTIVE, _folder_for, collect, local_process_alive, query_slurm
    from tla_jobs.jobs.submit import cancel as do_cancel

    if bool(run) == bool(sweep):
        raise TlaError("give one run, or --sweep NAME")
    if train_only and eval_only:
        raise TlaError("--train and --eval together: leave both out to cancel every job of the run")
    if sweep:
        records.check_name(sweep)
        paths = []
        for p in records.all_runs():
            rec, _ = _record_or_none(p)
            if rec and rec.get("sweep") == sweep:
                paths.append(p)
        if not paths:
            raise TlaError(f"no runs of a sweep named {sweep!r}")
    else:
        paths = [records.resolve(run)]
        records.load(paths[0])  # a damaged run says so
    loaded = [(p, _record_or_none(p)[0]) for p in paths]
    ids = [str(e["job_id"]) for _, rec in loaded if rec for e in rec.get("submissions", []) + rec.get("evals", [])
           if e.get("executor") == "slurm"]
    view = query_slurm(ids)

    def live(entry: dict, path: Path) -> bool:
        if entry.get("executor") == "slurm":
            recs = view.jobs.get(str(entry["job_id"]), [])
            return bool(recs) and recs[-1].state in ACTIVE
        return local_process_alive(entry, _folder_for(entry, path))

    statuses = {st.path: st for st in collect(paths, view)}
    said = []
    for path, rec in loaded:
        st = statuses.get(path)
        if rec is None or st is None:
            said.append(f"{path.name}: damaged run, nothing cancelled")
            continue
        # a run whose trainer has written its final record is finished, even while its process exits
        train = [] if eval_only or st.state not in ACTIVE else [e for e in rec.get("submissions", []) if live(e, path)]
        evals = [] if train_only else [e for e in rec.get("evals", []) if live(e, path)]
        if not train and not evals:
            said.append(f"{path.name}: nothing to cancel ({st.state}; no live "
                        f"{'eval ' if eval_only else 'training ' if train_only else ''}job)")
            continue
        now = time.time()
        stopped = set(do_cancel(train + evals, path))
        eval_ids = {str(e["job_id"]) for e in evals} & stopped

        def mark(r, train_stopped=bool({str(e["job_id"]) for e in train} & stopped), eval_ids=eval_ids, now=now):
            if train_stopped:
                r.update(cancelled=True, cancelled_at=now)
            for e in r.get("evals", []):
                if str(e.get("job_id")) in eval_ids:
                    e["cancelled"] = now

        records.update(path, mark)
        parts = [f"training job {e['job_id']}" for e in train if str(e["job_id"]) in stopped]
        parts += [f"eval job {e['job_id']} ({e.get('eval_id', '')})" for e in evals if str(e["job_id"]) in stopped]
        said.append(f"cancelled {path.name}: {', '.join(parts)}" if parts else f"{path.name}: nothing to cancel")
    for line in said:
        console.print(line, highlight=False, markup=False)


def _record_or_none(path: Path):
    from tla_jobs.jobs import damage

    return damage.record(path)


@app.command("signal")
@guard
def send_signal(
    run: str = typer.Argument(..., help="Run name or directory."),
    sig: str = typer.Option("USR2", "--signal", help="USR2 (preemption / time limit, requeues) or TERM."),
) -> None:
    """Send the preemption signal to a running run, to test its checkpoint-and-requeue path."""
    import signal as _signal

    from tla_jobs.jobs import damage, records
    from tla_jobs.jobs.submit import _run

    if sig not in ("USR2", "TERM", "USR1", "INT"):
        raise TlaError(f"--signal must be USR2, TERM, USR1 or INT, not {sig!r}")
    run_dir = records.resolve(run)
    record = records.load(run_dir)
    if not record.get("submissions"):
        raise TlaError(f"run {run_dir.name} has no job")
    latest = record["submissions"][-1]
    if latest["executor"] == "slurm":
        res = _run(["scancel", f"--signal={sig}", latest["job_id"]])
        if res is None or res.returncode != 0:
            raise TlaError(f"scancel --signal failed: {res.stderr.strip() if res else 'scancel not found'}")
    else:
        beat = damage.heartbeat(run_dir)[0] or {}  # checked: a damaged heartbeat is no live one
        pid = beat.get("pid")
        if not isinstance(pid, int) or pid <= 1 or beat.get("phase") not in ("training", "evaluating"):
            raise TlaError(f"run {run_dir.name} is not training (no live heartbeat)")
        try:
            os.kill(int(pid), getattr(_signal, f"SIG{sig}"))
        except ProcessLookupError:
            raise TlaError(f"the trainer process {pid} of {run_dir.name} is gone") from None
    console.print(f"sent SIG{sig} to {run_dir.name} (job {latest['job_id']})")
