"""A sweep: models x arms x seeds, each its own run (NAME-MODEL-ARM-sSEED), submitted as ONE job
array from the sweep's folder. The arms are tla_jobs.config.ARMS (next to TrainConfig.mixing()), named
as reports name the mixing (tl-align, grid-cutmix, mixup+cutmix, none; tla, grid and base also do)."""

from __future__ import annotations

import itertools
import shutil

from tla_jobs import rundir
from tla_jobs.config import ARM_ALIASES, ARMS, arm_name, arm_slug
from tla_jobs.errors import TlaError
from tla_jobs.jobs import records
from tla_jobs.jobs.plan import Plan, train_spec
from tla_jobs.jobs.profiles import Profile


def _items(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def grid(models: str, arms: str, seeds: str) -> list[tuple[str, str, int]]:
    """The (model, arm, seed) of every run, from the comma-separated lists of the command line."""
    arm_list = [arm_name(a) for a in _items(arms)]
    unknown = [a for a in arm_list if a not in ARMS]
    if unknown or not arm_list:
        aliases = ", ".join(f"{k} = {v}" for k, v in ARM_ALIASES.items())
        raise TlaError(f"unknown arm(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ARMS)} "
                       f"({aliases})")
    model_list = _items(models)
    try:
        seed_list = [int(s) for s in _items(seeds)]
    except ValueError:
        raise TlaError(f"--seeds must be comma-separated integers, got {seeds!r}") from None
    for flag, values in (("--models", model_list), ("--arms", arm_list), ("--seeds", seed_list)):
        twice = sorted({str(v) for v in values if values.count(v) > 1})
        if twice or not values:  # one run name twice would leave a run that is never submitted
            raise TlaError(f"{flag} {'gives ' + ', '.join(twice) + ' twice' if twice else 'is empty'}")
    return list(itertools.product(model_list, arm_list, seed_list))


def plans(name: str, runs: list[tuple[str, str, int]], train_kwargs: dict, profile: Profile) -> tuple[Plan, list[Plan]]:
    """The sweep's own plan (its folder, every spec: what is checked and rendered) and one per run."""
    root = records.runs_root(profile.runs_root)
    out = []
    for model, arm, seed in runs:
        run_name = records.check_name(f"{name}-{model}-{arm_slug(arm)}-s{seed}")
        run_dir = records.run_dir(run_name, root)
        if run_dir.exists():
            raise TlaError(f"run {run_name} already exists in {run_dir.parent}")
        kw = {**train_kwargs, "model": model, "seed": seed, **ARMS[arm]}
        out.append(Plan(run_name, run_dir, profile, [train_spec(kw, run_dir)]))
    sweep = Plan(name, rundir.sweep_dir(root, name), profile, [p.specs[0] for p in out], kind="sweep")
    return sweep, out


def submit(sweep: Plan, runs: list[Plan]) -> list[dict]:
    """Create every run (all or none) and submit them as one job array; their submissions, in order."""
    from tla_jobs.jobs.submit import submit_sweep

    if sweep.run_dir.exists():
        raise TlaError(f"sweep {sweep.name} already exists ({sweep.run_dir})")
    created = []
    try:
        for p in runs:
            records.create(p.run_dir, {"kind": "train", "spec": p.specs[0], "profile": sweep.profile.model_dump(),
                                       "profile_name": sweep.profile.name, "sweep": sweep.name,
                                       "image": sweep.profile.container.image})
            created.append(p.run_dir)
    except BaseException:  # e.g. the disk filled up half-way: no run of the sweep is left unsubmitted
        for run_dir in created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    return submit_sweep(runs, sweep.profile, sweep.run_dir, sweep.name, sweep.parallel)
