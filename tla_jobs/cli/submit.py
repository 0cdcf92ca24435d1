"""`tla submit train`, `tla submit sweep` and `tla resume`: the commands that queue training jobs."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from tla_jobs.cli.options import with_resource_options, with_train_options
from tla_jobs.cli.root import app, flag_name, guard
from tla_jobs.errors import TlaError

submit_app = typer.Typer(help="Submit training runs (one, or a sweep as one job array).", no_args_is_help=True)
app.add_typer(submit_app, name="submit")
console = Console()

PROFILE_HELP = ("Cluster profile: a name (`tla cluster list` shows them: $TLA_CLUSTER_CONFIGS, ./cluster_configs, "
                "~/.config/tla/clusters, the built-in examples) or a YAML path.")


def _warn(specs: list[dict]) -> None:
    """The recipe's warnings (TrainConfig.warnings), each once, on stderr: allowed, but said."""
    from tla_jobs.config import TrainConfig

    said: list[str] = []
    for spec in specs:
        said += [w for w in TrainConfig(**spec).warnings() if w not in said]
    for line in said:
        typer.echo(f"tla: warning: {line}", err=True)


def _profile(name: str, overrides: dict):
    from pydantic import ValidationError

    from tla_jobs import envvars
    from tla_jobs.jobs import profiles
    from tla_jobs.jobs.plan import apply_overrides

    envvars.check_job_env()  # what the job inherits (TLA_CPU_THREADS ...): refused here, not in every rank
    prof = profiles.load(name)
    try:
        return apply_overrides(prof, **overrides)
    except ValidationError as exc:  # a zero or negative override: the flag typed (--time), not the field
        e = exc.errors()[0]
        raise TlaError(f"{flag_name(e['loc'], 'Profile')}: {e['msg']}") from None


def _show_plan(plan) -> None:
    """A dry run: the script, then the checks; a failed check makes the exit non-zero (one line on
    stderr), so a dry run can gate a script."""
    from tla_jobs.jobs.submit import render

    console.rule(f"[bold]dry run: {escape(plan.name)}[/] ({plan.profile.executor}, "
                 f"profile {escape(plan.profile.name)})")
    console.print(f"run directory: {plan.run_dir}", markup=False)
    console.print("[bold]script[/]")
    console.print(render(plan), markup=False, highlight=False, soft_wrap=True)
    console.print("[bold]preflight[/]")
    for c in plan.checks:
        console.print(f"  {c.label}  {escape(c.name)}: {escape(c.detail)}", highlight=False)


def _announce(entry: dict, as_json: bool, follow: bool, run_dir: Path, text: str) -> None:
    """Say what was submitted (a line, or JSON for scripts), then optionally follow it to its end."""
    if as_json:
        typer.echo(json.dumps(entry))
    else:
        console.print(text)
    if follow:
        from tla_jobs.cli.status import follow_run

        raise typer.Exit(follow_run(run_dir))


@submit_app.command("train")
@guard
@with_train_options(not_from_file=("output_dir",))  # a run's config.yaml names its own folder; this run is RUNS/NAME
@with_resource_options
def submit_train(
    name: str = typer.Option(..., "--name", help="Run name (a safe file name); the run lives in RUNS/NAME."),
    cluster: str = typer.Option("local", "--cluster", help=PROFILE_HELP),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the sbatch script and preflight checks only."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Follow the run with a progress display until it ends "
                                "(exit code 1 if it does not complete)."),
    as_json: bool = typer.Option(False, "--json", help="Print the submission as JSON."),
    overrides: dict = None,
    train_kwargs: dict = None,
) -> None:
    """Submit a training run through submitit (local executor or SLURM)."""
    from tla_jobs.jobs.preflight import preflight, refuse_failed
    from tla_jobs.jobs.submit import run_plan, submit_new_run

    profile = _profile(cluster, overrides)
    if train_kwargs.get("output_dir"):
        raise TlaError("--output-dir is not used by `tla submit train`: a submitted run lives in RUNS/NAME "
                       "(set $TLA_RUNS or the profile's runs_root to choose RUNS); --output-dir is for `tla train`")
    plan = run_plan(name, train_kwargs, profile)
    preflight(plan)
    if dry_run:
        _show_plan(plan)
    refuse_failed(plan.checks)
    if dry_run:
        _warn(plan.specs)
        return
    entry = submit_new_run(plan)
    _warn(plan.specs)  # once it is queued: a refusal stays one line
    _announce({"run": name, "run_dir": str(plan.run_dir), **entry}, as_json, follow, plan.run_dir,
              f"submitted [bold]{name}[/] as {profile.executor} job {entry['job_id']}  ({escape(str(plan.run_dir))})")


@submit_app.command("sweep")
@guard
@with_train_options(not_from_file=("output_dir",))
@with_resource_options
def submit_sweep(
    name: str = typer.Option(..., "--name", help="Sweep name; each run is NAME-MODEL-ARM-sSEED (mixup+cutmix as "
                             "mixup-cutmix); `tla status/logs/report/cancel` take the sweep's name."),
    models: str = typer.Option(None, "--models", help="Comma-separated models (default: --model)."),
    seeds: str = typer.Option("0", "--seeds", help="Comma-separated seeds."),
    arms: str = typer.Option("tl-align,mixup+cutmix", "--arms",
                             help="Comma-separated arms, named as reports name them: tl-align (TL-Align), "
                                  "mixup+cutmix (DeiT's baseline), grid-cutmix (token-grid CutMix, area labels: "
                                  "TL-Align's control), none (no mixing). tla, base and grid are short for the "
                                  "first three."),
    cluster: str = typer.Option("local", "--cluster", help=PROFILE_HELP),
    parallel: int = typer.Option(None, "--array-parallelism", "--parallel", min=1,
                                 help="Run at most N of the sweep's runs at once; the others wait (SLURM: the "
                                      "array's %N; default all. Local: a free slot; default one per CPU core)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything and print the job array's batch "
                                 "script; submit nothing, create no run."),
    as_json: bool = typer.Option(False, "--json", help="Print the runs and their submission as JSON."),
    overrides: dict = None,
    train_kwargs: dict = None,
) -> None:
    """Submit a grid of models x seeds x arms as ONE job array; every element is its own run."""
    from tla_jobs.jobs import records, sweep
    from tla_jobs.jobs.preflight import preflight, refuse_failed

    grid = sweep.grid(models or train_kwargs["model"], arms, seeds)
    records.check_name(name)
    profile = _profile(cluster, overrides)
    if train_kwargs.get("output_dir"):
        raise TlaError("--output-dir is not used by `tla submit sweep`: each run lives in RUNS/NAME-MODEL-ARM-sSEED "
                       "(set $TLA_RUNS or the profile's runs_root to choose RUNS)")
    whole, runs = sweep.plans(name, grid, train_kwargs, profile)
    whole.parallel = parallel
    preflight(whole)
    if dry_run:
        _show_plan(whole)
        console.print("[bold]runs[/]: " + ", ".join(p.name for p in runs))
    refuse_failed(whole.checks)
    if dry_run:
        _warn(whole.specs)
        return
    entries = sweep.submit(whole, runs)
    _warn(whole.specs)
    if as_json:
        typer.echo(json.dumps([{"run": p.name, **e} for p, e in zip(runs, entries)]))
    else:
        console.print(f"submitted sweep [bold]{name}[/]: {len(runs)} runs as one job array "
                      f"{entries[0]['job_id'].split('_')[0]}")
        for p, e in zip(runs, entries):
            console.print(f"  {p.name}  job {e['job_id']}")


@app.command("resume")
@guard
@with_resource_options
def resume(
    run: str = typer.Argument(..., help="Run name or directory."),
    cluster: str = typer.Option(None, "--cluster", help="Another profile (default: the run's)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Follow the run with a progress display until it ends "
                                "(exit code 1 if it does not complete)."),
    as_json: bool = typer.Option(False, "--json", help="Print the submission as JSON."),
    overrides: dict = None,
) -> None:
    """Resubmit a run from its stored spec; it continues from its newest good checkpoint."""
    from tla_jobs.jobs import control

    run_dir, entry = control.resume(run, cluster, **overrides)
    _announce(entry, as_json, follow, run_dir,
              f"resumed [bold]{run_dir.name}[/] as {entry['executor']} job {entry['job_id']}")
