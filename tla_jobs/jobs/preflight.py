"""Checks made before anything is queued: the script's values, the data, the model, the runs root
and, for SLURM, the cluster itself (slurm.checks). What would otherwise fail on the cluster after
waiting in the queue."""

from __future__ import annotations

import os
from pathlib import Path

from tla_jobs.errors import TlaError
from tla_jobs.jobs import sbatch, slurm
from tla_jobs.jobs.plan import Check, Plan


def preflight(plan: Plan) -> list[Check]:
    """Checks that need no job: the model exists, the data is there, the cluster answers (also
    stored in ``plan.checks``)."""
    from tla_jobs.data.folders import check_image_folder

    # first: a value that would break the batch script is refused outright, not reported as a check
    sbatch.check_script_values(plan.profile, [str(plan.run_dir.parent), *(s.get("data_path", "") for s in plan.specs)],
                               plan.name, folder=str(plan.run_dir))
    from tla_jobs.config import TrainConfig
    from tla_jobs.data.prepare import check_prepared

    checks: list[Check] = []
    for spec in plan.specs:  # the default --lr is known with the ranks: a --min-lr above it is a swapped pair
        problem = TrainConfig(**spec).schedule_error(plan.ranks)
        if problem:
            raise TlaError(problem)
    seen_data = set()
    for spec in plan.specs:
        data = spec.get("data_path", "")
        if data in seen_data:
            continue
        seen_data.add(data)
        dataset = spec.get("dataset", "imagefolder")
        if dataset == "synthetic":
            checks.append(Check("data", True, f"synthetic: {spec.get('synthetic_images')} random images per "
                                              "epoch, made on the device"))
            continue
        if dataset != "imagefolder":
            check_prepared(dataset, data)  # a folder of another bundled dataset: one line
            if not (Path(data) / ".tla-dataset").is_file():
                checks.append(Check("data", True, f"{dataset} will be prepared into {data} on first use"))
                continue
        train, val = check_image_folder(data)  # images verified: all of a split up to 100k, else a sample
        checks.append(Check("data", True, f"{data}: {len(train.classes)} classes, {train.size} train / "
                                          f"{val.size} val images"))
        # what the trainer would refuse once its ranks have met: too few images for one global batch,
        # fewer classes than class folders
        if train.size < (spec.get("global_batch") or spec.get("batch_size", 1) * plan.ranks):
            checks.append(Check("batch", False, f"--batch-size {spec.get('batch_size')} x {plan.ranks} rank(s) is "
                                                f"more than the {train.size} training images"))
        if spec.get("global_batch") and spec["global_batch"] % (spec.get("batch_size", 1) * plan.ranks):
            checks.append(Check("batch", False, f"--global-batch {spec['global_batch']} is not a multiple of "
                                                f"--batch-size {spec.get('batch_size')} x {plan.ranks} rank(s)"))
        if spec.get("num_classes") and spec["num_classes"] < len(train.classes):
            checks.append(Check("classes", False, f"--num-classes {spec['num_classes']} is fewer than the "
                                                  f"{len(train.classes)} class folders"))
    checks.append(model_check(plan.specs))
    checks.append(runs_root_check(plan.run_dir.parent, create=False))
    if plan.profile.executor == "slurm":
        py, why = sbatch.node_python(plan.profile)
        checks.append(Check("python on the nodes", True, f"{py} ({why})"))
        checks += slurm.checks(plan.profile)
    plan.checks = checks
    return checks


def runs_root_check(root: Path, create: bool) -> Check:
    """Can runs be written under ``root``? With ``create`` it is made (`tla cluster check`); a dry
    run creates nothing and asks of the nearest folder that exists."""
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
            ok = os.access(root, os.W_OK)
        except OSError:
            ok = False
    else:
        existing = next((p for p in (root, *root.parents) if p.exists()), root)
        ok = existing.is_dir() and os.access(existing, os.W_OK)  # access() says EROFS for root too
    return Check("runs root", ok, f"{root} {'writable' if ok else 'not writable'}")


def model_check(specs: list[dict]) -> Check:
    """The trainer's own model checks (TL-Align support, input size, a meta-device forward) for each
    distinct spec: what would otherwise fail on the cluster after waiting in the queue. A recipe
    that passed before is not checked again (check_cache: the check costs a torch and timm import)."""
    from tla_jobs.jobs import check_cache

    seen: set[str] = set()
    remembered = 0
    for spec in specs:
        key = check_cache.key(spec)
        if key in seen:
            continue
        seen.add(key)
        if check_cache.passed(key):
            remembered += 1
            continue
        from tla_jobs.train.preflight import check_spec

        try:
            check_spec(spec)
        except TlaError as exc:
            return Check("model", False, str(exc))
        check_cache.remember(key)
    note = f" (passed before: {check_cache.path()})" if remembered == len(seen) else ""
    return Check("model", True, ", ".join(sorted({s["model"] for s in specs})) + note)


def refuse_failed(checks: list[Check]) -> None:
    """A failed check stops the submission (and makes a dry run exit non-zero): one line, the first."""
    bad = [c for c in checks if not c.ok]
    if bad:
        raise TlaError(f"preflight failed: {bad[0].name}: {bad[0].detail}")
