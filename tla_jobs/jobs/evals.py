"""`tla eval checkpoint`: which weights of which run (artifacts.locate: --which best|last|ema|epoch:N,
a checkpoint file or an export), with what data, and whether the eval job must wait for the run's
training job (SLURM --dependency afterok) to evaluate what it ends with. run.json keeps each eval
with the checkpoint it used (path, sha256, which); the job's eval.json has what it measured."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.errors import TlaError
from tla_jobs.jobs import artifacts, profiles, records
from tla_jobs.jobs.scheduler import ACTIVE


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


def _weights(target: str, which: str | None) -> artifacts.Weights:
    """The weights to evaluate, in a run that can hold the result."""
    src = artifacts.locate(target, which, exports=True, missing_ok=True)
    if src.run_dir is None:
        named = src.export.get("source_checkpoint") if src.export else None
        if isinstance(named, str) and artifacts.run_of(Path(named)) is not None:
            raise TlaError(f"{src.path.name}'s metadata names source checkpoint {named!r}, which no run's "
                           "checkpoints.jsonl records with its sha256: its eval cannot be kept with a run; evaluate "
                           "the run's checkpoint instead (tla eval checkpoint RUN --which ...)")
        where = f"its source checkpoint {named!r}" if src.export else src.path
        raise TlaError(f"{where} is not inside a tla run directory (no run.json beside it); the eval's result "
                       "is kept in the run it belongs to")
    return src


def submit(target: str, cluster: str | None = None, data_path: Path | None = None,
           which: str | None = None) -> tuple[Path, dict]:
    """Submit the eval job; (the run directory, its eval entry in run.json)."""
    from tla_jobs.config import TrainConfig
    from tla_jobs.jobs.entry import EvalJob
    from tla_jobs.jobs.submit import submit_eval

    src = _weights(target, which)
    run_dir = src.run_dir
    rundir.refuse_linked_dirs(run_dir)  # the eval job writes into RUN/evals, its submitit files into RUN/submitit
    if not os.path.lexists(run_dir / rundir.RUN_JSON):  # a `tla train --output-dir` folder: it becomes a run
        profile = profiles.load(cluster or "local")  # as `tla submit` defaults
        record = records.adopt(run_dir, profile.model_dump())
    else:
        record = records.load(run_dir)
        profile = profiles.load(cluster) if cluster else profiles.Profile.model_validate(record["profile"])
    if src.weights == "ema" and not record.get("spec", {}).get("model_ema"):
        raise TlaError(f"run {run_dir.name} was trained without --model-ema: it has no EMA weights")
    after = dependency(run_dir, record, profile)
    if after is None and not src.path.is_file():
        raise TlaError(f"checkpoint {src.path} does not exist (has the run trained an epoch yet?)")
    eval_id = f"eval-{int(time.time() * 1000)}"
    spec = {**record["spec"], "resume": str(src.path), "eval_only": True, "eval_weights": src.weights,
            "output_dir": str(rundir.eval_dir(run_dir, eval_id))}
    if data_path:
        spec["data_path"] = str(data_path.expanduser().resolve())
    spec = TrainConfig(**spec).model_dump()
    _check_data(spec)
    known = {"checkpoint_sha256": src.sha256, "which": src.which, "weights": src.weights}
    return run_dir, submit_eval(run_dir, profile, spec, after, eval_id, EvalJob(), known)
