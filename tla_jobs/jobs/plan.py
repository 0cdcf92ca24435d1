"""What a submission is before anything is written: the runs, their specs, the profile (with the
command line's overrides), and the outcome of the checks made before queueing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tla_jobs.jobs.profiles import Profile


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    warning: bool = False  # worth saying, but nothing stops the job (e.g. no accounting)

    @property
    def label(self) -> str:
        return "[yellow]warn[/]" if self.warning else "[green]ok[/]" if self.ok else "[red]FAIL[/]"


@dataclass
class Plan:
    """Everything about a submission, before anything is written: one run (one spec), or a sweep
    (one spec per run, submitted as one job array from ``run_dir``, the sweep's folder)."""

    name: str
    run_dir: Path
    profile: Profile
    specs: list[dict]
    kind: str = "train"
    dependency: str | None = None
    checks: list[Check] = field(default_factory=list)
    parallel: int | None = None  # a sweep: at most this many runs at once (None: the executor's default)

    @property
    def ranks(self) -> int:
        """Processes one job of this plan runs (DDP world size)."""
        p = self.profile
        return p.slurm.nodes * p.slurm.tasks_per_node if p.executor == "slurm" else p.local.tasks


# The overrides only SLURM honours (the flag a user types, the parameter): the local executor runs one
# process group on this machine, with the profile's local.timeout_min, whatever they say.
SLURM_ONLY = {"--nodes": "nodes", "--gpus-per-node": "gpus_per_node", "--time": "time_min",
              "--partition": "partition"}


def apply_overrides(profile: Profile, nodes=None, gpus_per_node=None, time_min=None, partition=None,
                    tasks_per_node=None) -> Profile:
    given = dict(nodes=nodes, gpus_per_node=gpus_per_node, time_min=time_min, partition=partition)
    if profile.executor != "slurm":
        typed = [flag for flag, key in SLURM_ONLY.items() if given[key] is not None]
        if typed:
            from tla_jobs.errors import TlaError

            raise TlaError(f"{', '.join(typed)}: SLURM option{'s' if len(typed) > 1 else ''}, but profile "
                           f"{profile.name} uses the local executor (one machine; its time limit is the "
                           f"profile's local.timeout_min): drop {'them' if len(typed) > 1 else 'it'}, or choose a "
                           "SLURM profile with --cluster")
    slurm = profile.slurm.model_copy(update={k: v for k, v in dict(
        nodes=nodes, gpus_per_node=gpus_per_node, time_min=time_min, partition=partition,
        tasks_per_node=tasks_per_node).items() if v is not None})
    local = profile.local
    if tasks_per_node is not None:
        local = local.model_copy(update={"tasks": tasks_per_node})
    out = profile.model_copy(update={"slurm": slurm, "local": local})
    return Profile.model_validate(out.model_dump())  # re-validate (a zero or negative override is an error)


def requeue_limits(profile: Profile) -> dict:
    """What the job itself enforces when SLURM (or the host shell) brings it back."""
    if profile.executor != "slurm":  # a local job's failed rank asks for the requeue itself (jobs/retry.py)
        return {"max_requeue_failure": profile.local.max_requeue_failure}
    return {"max_requeue_preempt": profile.slurm.max_requeue_preempt, "time_min": profile.slurm.time_min,
            "max_stalled_attempts": profile.slurm.max_stalled_attempts}


def train_spec(train_kwargs: dict, run_dir: Path) -> dict:
    """The run's TrainConfig as run.json stores it: the trainer options given, with absolute data
    and checkpoint paths (the job may start elsewhere) and the run directory as its output."""
    from tla_jobs.config import TrainConfig
    from tla_jobs.errors import TlaError

    kw = dict(train_kwargs)
    for key in ("data_path", "resume"):
        if kw.get(key):
            try:
                kw[key] = str(Path(kw[key]).expanduser().resolve())
            except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
                raise TlaError(f"--{key.replace('_', '-')} {kw[key]}: cannot be resolved "
                               f"({getattr(exc, 'strerror', None) or exc}): a link that points back at "
                               "itself?") from None
    kw["output_dir"] = str(run_dir)
    return TrainConfig(**kw).model_dump()
