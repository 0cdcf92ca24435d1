"""A SLURM submission's batch script: submitit's own template filled from the profile (resources,
requeue, setup lines, the container step), the interpreter on the nodes, and the refusal of any
value that could break out of its line of the script or of a container's mount list."""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path

from tla_jobs.errors import TlaError
from tla_jobs.jobs import containers, retry
from tla_jobs.jobs.profiles import Profile, python_words

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _no_control(value, what: str) -> None:
    if isinstance(value, str) and _CONTROL.search(value):
        raise TlaError(f"{what} contains a control character ({value!r}): refused, it would break the batch script")


# What submitit reads in its folder's path as the job's ids (JobPaths._format_id), with no way to escape
# them: a folder /runs/a%jb would be /runs/a123b for submitit's pickles and logs. A literal '%' otherwise
# is escaped on the script's --output/--error (executors.SlurmExecutor).
SUBMITIT_TAGS = re.compile(r"%[jtAa]")


def check_script_values(profile: Profile, paths: list[str], name: str = "", folder: str | None = None) -> None:
    """Every value that reaches the sbatch script (or a mount list), refused when it could break out
    of its line or its list: control characters (a newline in --partition would start a new shell
    line) anywhere; ',' and ':' in paths that go into Pyxis/Apptainer/podman mount lists; submitit's
    id patterns (%j ...) in ``folder``, the run's (or sweep's) folder that submitit and SLURM write to."""
    s, c = profile.slurm, profile.container
    _no_control(name, "the run name")
    tag = SUBMITIT_TAGS.search(folder or "")
    if tag:
        raise TlaError(f"{folder} contains {tag.group()}, which submitit and SLURM read as a job id in the "
                       "paths of a job's files: choose a runs root without %j, %t, %A or %a ($TLA_RUNS, or "
                       "the profile's runs_root)")
    for key in ("partition", "account", "qos", "constraint", "exclude", "python"):
        flag = "--partition" if key == "partition" else f"profile slurm.{key}"
        value = getattr(s, key, None)
        _no_control(value, flag)
        if key != "python" and isinstance(value, str) and re.search(r"[\s\"']", value):
            raise TlaError(f"{flag} {value!r} contains a space or a quote: not a SLURM name")
    for key, value in s.additional_parameters.items():
        if not _SBATCH_KEY.fullmatch(str(key)):
            raise TlaError(f"profile slurm.additional_parameters: {key!r} is not an sbatch option name")
        _no_control(value, f"profile slurm.additional_parameters.{key}")
        if isinstance(value, str) and '"' in value:
            raise TlaError(f"profile slurm.additional_parameters.{key} contains a double quote, which an #SBATCH "
                           "line cannot carry")
    for i, line in enumerate(s.setup):
        _no_control(line, f"profile slurm.setup[{i}] (one shell line per entry)")
    for key in ("image", "workdir", "python"):
        _no_control(getattr(c, key), f"profile container.{key}")
    for i, m in enumerate(c.mounts):
        _no_control(m, f"profile container.mounts[{i}]")
        if c.runtime != "none" and "," in m:
            raise TlaError(f"profile container.mounts[{i}] {m!r} contains ',', which separates mounts")
    for i, flag in enumerate(c.extra_flags):
        _no_control(flag, f"profile container.extra_flags[{i}]")
    for path in paths:
        if not path:
            continue
        _no_control(path, f"path {path!r}")
        if c.runtime != "none" and ("," in path or ":" in path):
            raise TlaError(f"path {path!r} contains {',' if ',' in path else ':'}, which {c.runtime} mount lists "
                           "use as a separator: move or link it to a path without one")
    _no_control(sys.executable, "this Python's path")


def node_python(profile: Profile) -> tuple[str, str]:
    """The interpreter the job runs on the nodes, and why: the profile's slurm.python; else `python`
    of the environment the profile's setup lines prepare; else (no setup) this very interpreter,
    by its absolute path (a shared filesystem, like the run directory)."""
    s = profile.slurm
    explicit = getattr(s, "python", None)
    if profile.container.runtime != "none":
        return shlex.join(python_words(profile.container.python, "container.python")), \
            "container.python, inside the image"
    if explicit:
        return shlex.join(python_words(explicit, "slurm.python")), "the profile's slurm.python"
    if s.setup:
        return "python", "python on PATH after the profile's setup lines (the environment they activate)"
    return shlex.quote(sys.executable), "the submitting interpreter (the profile has no setup lines)"


def _mem(mem_gb: float) -> str:
    """sbatch's --mem for a size in GB (whole GB, else MB), as submitit writes it."""
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def parameters(profile: Profile, name: str, dependency: str | None, mount_list: list[str],
               array_size: int | None, parallel: int | None = None, retry_dirs: list[str] | None = None) -> dict:
    """submitit.SlurmExecutor's parameters (its own names) for the profile. ``retry_dirs``: a
    training job's run directories (one per array element), whose failed steps are requeued."""
    s, c = profile.slurm, profile.container
    # sbatch reads "#SBATCH --key=value" with its own quoting: a value with spaces goes in double quotes
    extra = {"requeue": True, **{k: f'"{v}"' if isinstance(v, str) and re.search(r"\s", v) else v
                                 for k, v in s.additional_parameters.items()}}
    setup = list(s.setup)
    if c.runtime != "none":
        extra["signal"] = f"B:USR2@{s.signal_delay_s}"
        setup += containers.step_env_setup()
        if retry_dirs and s.max_requeue_failure:
            setup += retry.setup_lines(s.max_requeue_failure, retry_dirs, own_srun=False)
        setup += containers.host_requeue_setup(s.max_requeue_timeout + s.max_requeue_preempt)
    elif retry_dirs and s.max_requeue_failure:
        setup += retry.setup_lines(s.max_requeue_failure, retry_dirs)
    if dependency:
        extra["dependency"] = dependency
    params = dict(job_name=name, time=s.time_min, nodes=s.nodes, ntasks_per_node=s.tasks_per_node,
                  cpus_per_task=s.cpus_per_task, signal_delay_s=s.signal_delay_s, additional_parameters=extra,
                  setup=setup)
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem"] = _mem(s.mem_gb)
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(s, key):
            params[key] = getattr(s, key)
    # A rank that dies takes the whole step down at once, instead of leaving the others waiting in
    # a collective until the rendezvous or NCCL timeout.
    params["srun_args"] = ["--kill-on-bad-exit=1", *containers.srun_args(c, mount_list)]
    if array_size:
        params["array_parallelism"] = min(parallel or array_size, array_size)  # sbatch --array=0-N%P
    return params


def executor(profile: Profile, folder: Path, name: str, run_dir: Path, data_path: str = "",
             dependency: str | None = None, array_size: int | None = None, dry_run: bool = False,
             parallel: int | None = None, retry_dirs: list[str] | None = None):
    """submitit's SLURM executor for the profile; with ``dry_run`` one that only renders its script
    (executors.SlurmScriptExecutor), also where SLURM is not installed."""
    from tla_jobs.jobs.executors import SlurmExecutor, SlurmScriptExecutor

    c = profile.container
    mount_list = containers.mounts(c, [str(run_dir.parent), data_path]) if c.runtime != "none" else []
    python = containers.step_python(c, mount_list) if c.runtime != "none" else node_python(profile)[0]
    cls = SlurmScriptExecutor if dry_run else SlurmExecutor
    ex = cls(folder, max_num_timeout=profile.slurm.max_requeue_timeout, python=python)
    ex.update_parameters(**parameters(profile, name, dependency, mount_list, array_size, parallel, retry_dirs))
    return ex
