"""`tla eval checkpoint`: which checkpoint of which run, with what data, and whether the eval job
must wait for the run's training job (SLURM --dependency afterok) to evaluate what it ends with."""

from __future__ import annotations

import time
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.errors import TlaError
from tla_jobs.jobs import profiles, records
from tla_jobs.jobs.scheduler import ACTIVE


def checkpoint_of(target: str) -> tuple[Path, Path]:
    """(run directory, checkpoint) for a checkpoint file inside a run, or a run (its newest checkpoint)."""
    path = Path(target).expanduser()
    if path.suffix == ".pth" or path.is_file():
        if not path.is_file():
            raise TlaError(f"checkpoint {path} does not exist")
        ckpt = path.resolve()
        if not (ckpt.parent / rundir.RUN_JSON).is_file():
            raise TlaError(f"{ckpt} is not inside a tla run directory (no run.json beside it)")
        return ckpt.parent, ckpt
    run_dir = records.resolve(target)
    return run_dir, run_dir / rundir.CHECKPOINT_LAST


def dependency(run_dir: Path, record: dict, profile: profiles.Profile) -> str | None:
    """afterok:JOB while the run's training job is queued or running on SLURM (and the eval goes
    there too); None when the checkpoint is to be evaluated as it is now."""
    from tla_jobs.jobs.state import collect

    latest = (record.get("submissions") or [{}])[-1]
    if latest.get("executor") == "slurm" and profile.executor == "slurm" and collect([run_dir])[0].state in ACTIVE:
        return f"afterok:{latest['job_id']}"
    return None


def _check_data(spec: dict) -> None:
    """The data a job will read is there, in the ImageFolder layout, before the job is queued."""
    from tla_jobs.data.folders import check_image_folder

    data = spec.get("data_path") or ""
    if spec.get("dataset", "imagefolder") != "imagefolder" and not (Path(data) / ".tla-dataset").is_file():
        return  # a bundled dataset: the job prepares it on first use
    check_image_folder(data, verify_images=False)


def submit(target: str, cluster: str | None = None, data_path: Path | None = None) -> tuple[Path, dict]:
    """Submit the eval job; (the run directory, its eval entry in run.json)."""
    from tla_jobs.config import TrainConfig
    from tla_jobs.jobs.submit import submit_eval

    run_dir, ckpt = checkpoint_of(target)
    record = records.load(run_dir)
    profile = profiles.load(cluster) if cluster else profiles.Profile.model_validate(record["profile"])
    after = dependency(run_dir, record, profile)
    if after is None and not ckpt.is_file():
        raise TlaError(f"checkpoint {ckpt} does not exist (has the run trained an epoch yet?)")
    eval_id = f"eval-{int(time.time() * 1000)}"
    spec = {**record["spec"], "resume": str(ckpt), "eval_only": True, "output_dir": str(rundir.eval_dir(run_dir,
                                                                                                         eval_id))}
    if data_path:
        spec["data_path"] = str(data_path.expanduser().resolve())
    spec = TrainConfig(**spec).model_dump()
    _check_data(spec)
    return run_dir, submit_eval(run_dir, profile, spec, after, eval_id)
