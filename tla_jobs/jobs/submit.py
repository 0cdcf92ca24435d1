"""Submission of training, evaluation and sweep jobs, all through submitit.

A submission is: a TrainConfig (stored in run.json as the run's spec), a profile (resources,
requeue limits, container), and a submitit executor built from both. `--dry-run` renders the very
sbatch script submitit would submit (its own template, with the same parameters), plus the
preflight checks, and writes nothing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.errors import TlaError
from tla_jobs.jobs import containers, records
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
    """Everything about a submission, before anything is written."""

    name: str
    run_dir: Path
    profile: Profile
    specs: list[dict]
    kind: str = "train"
    dependency: str | None = None
    checks: list[Check] = field(default_factory=list)


def apply_overrides(profile: Profile, nodes=None, gpus_per_node=None, time_min=None, partition=None,
                    tasks_per_node=None) -> Profile:
    slurm = profile.slurm.model_copy(update={k: v for k, v in dict(
        nodes=nodes, gpus_per_node=gpus_per_node, time_min=time_min, partition=partition,
        tasks_per_node=tasks_per_node).items() if v is not None})
    local = profile.local
    if tasks_per_node is not None:
        local = local.model_copy(update={"tasks": tasks_per_node})
    out = profile.model_copy(update={"slurm": slurm, "local": local})
    return Profile.model_validate(out.model_dump())  # re-validate (a zero or negative override is an error)


# ------------------------------------------------------------------------------- script values

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_SBATCH_KEY = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")


def _no_control(value, what: str) -> None:
    if isinstance(value, str) and _CONTROL.search(value):
        raise TlaError(f"{what} contains a control character ({value!r}): refused, it would break the batch script")


def check_script_values(profile: Profile, paths: list[str], name: str = "") -> None:
    """Every value that reaches the sbatch script (or a mount list), refused when it could break out
    of its line or its list: control characters (a newline in --partition would start a new shell
    line) anywhere; ',' and ':' in paths that go into Pyxis/Apptainer/podman mount lists."""
    s, c = profile.slurm, profile.container
    _no_control(name, "the run name")
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
        return profile.container.python, "container.python, inside the image"
    if explicit:
        return shlex.join(shlex.split(explicit)), "the profile's slurm.python"
    if s.setup:
        return "python", "python on PATH after the profile's setup lines (the environment they activate)"
    return shlex.quote(sys.executable), "the submitting interpreter (the profile has no setup lines)"


# ------------------------------------------------------------------------------------------ executor


def make_executor(profile: Profile, folder: Path, name: str, run_dir: Path, data_path: str = "",
                  dependency: str | None = None, array_size: int | None = None, data_paths: list[str] | None = None):
    import submitit

    check_script_values(profile, [str(run_dir.parent), str(folder), *(data_paths or [data_path])], name)
    if profile.executor == "local":
        ex = submitit.AutoExecutor(folder=folder, cluster="local")
        ex.update_parameters(timeout_min=profile.local.timeout_min, tasks_per_node=profile.local.tasks, nodes=1,
                             name=name)
        return ex
    s, c = profile.slurm, profile.container
    mount_list = containers.mounts(c, [str(run_dir.parent), data_path]) if c.runtime != "none" else []
    python = containers.step_python(c, mount_list) if c.runtime != "none" else node_python(profile)[0]
    kwargs = {"slurm_max_num_timeout": s.max_requeue_timeout, "slurm_python": python}
    ex = submitit.AutoExecutor(folder=folder, cluster="slurm", **kwargs)
    # sbatch reads "#SBATCH --key=value" with its own quoting: a value with spaces goes in double quotes
    extra = {"requeue": True, **{k: f'"{v}"' if isinstance(v, str) and re.search(r"\s", v) else v
                                 for k, v in s.additional_parameters.items()}}
    setup = list(s.setup)
    if c.runtime != "none":
        extra["signal"] = f"B:USR2@{s.signal_delay_s}"
        setup += containers.host_requeue_setup(s.max_requeue_timeout + s.max_requeue_preempt)
    if dependency:
        extra["dependency"] = dependency
    params = dict(
        name=name, timeout_min=s.time_min, nodes=s.nodes, tasks_per_node=s.tasks_per_node,
        cpus_per_task=s.cpus_per_task, slurm_signal_delay_s=s.signal_delay_s, slurm_additional_parameters=extra,
        slurm_setup=setup,
    )
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    for key in ("partition", "account", "qos", "constraint", "exclude"):
        if getattr(s, key):
            params[f"slurm_{key}"] = getattr(s, key)
    # A rank that dies takes the whole step down at once, instead of leaving the others waiting in
    # a collective until the rendezvous or NCCL timeout.
    params["slurm_srun_args"] = ["--kill-on-bad-exit=1", *containers.srun_args(c, mount_list)]
    if array_size:
        params["slurm_array_parallelism"] = array_size
    ex.update_parameters(**params)
    return ex


def render(plan: Plan) -> str:
    """The exact script (sbatch) or command (local) the submission would run."""
    from unittest import mock

    from submitit.slurm.slurm import SlurmExecutor

    spec = plan.specs[0]
    if plan.profile.executor != "slurm":
        # not through submitit's local executor: building one creates its folder, and a dry run writes nothing
        cmd = [sys.executable, "-m", "submitit.local._local", str(plan.run_dir / rundir.SUBMITIT_DIR)]
        return (f"# submitit local executor: {plan.profile.local.tasks} task(s), timeout "
                f"{plan.profile.local.timeout_min} min\n{shlex.join(cmd)}\n")
    # submitit refuses to build a SLURM executor where srun is missing; a dry run is for exactly
    # such a machine (a laptop preparing a submission), and it submits nothing.
    with mock.patch.object(SlurmExecutor, "affinity", classmethod(lambda cls: 1)):
        ex = make_executor(plan.profile, plan.run_dir / rundir.SUBMITIT_DIR, plan.name, plan.run_dir,
                           spec.get("data_path", ""), plan.dependency, len(plan.specs) if len(plan.specs) > 1 else None)
    inner = ex._executor  # submitit renders its own template; only the job id placeholder is ours
    if plan.profile.executor == "slurm":
        from submitit.slurm.slurm import _make_sbatch_string

        params = dict(inner.parameters)
        if len(plan.specs) > 1:
            params["map_count"] = len(plan.specs)
        return _make_sbatch_string(command=inner._submitit_command_str, folder=inner.folder, **params)
    cmd = [sys.executable, "-m", "submitit.local._local", str(inner.folder)]
    return (f"# submitit local executor: {plan.profile.local.tasks} task(s), timeout {plan.profile.local.timeout_min} "
            f"min\n{shlex.join(cmd)}\n")


# -------------------------------------------------------------------------------------------- checks


def preflight(plan: Plan) -> list[Check]:
    """Checks that need no job: the model exists, the data is there, the cluster answers."""
    from tla_jobs.data.folders import check_image_folder

    # first: a value that would break the batch script is refused outright, not reported as a check
    check_script_values(plan.profile, [str(plan.run_dir.parent), *(s.get("data_path", "") for s in plan.specs)],
                        plan.name)
    checks: list[Check] = []
    seen_data = set()
    for spec in plan.specs:
        data = spec.get("data_path", "")
        if data in seen_data:
            continue
        seen_data.add(data)
        if spec.get("dataset", "imagefolder") != "imagefolder" and not (Path(data) / ".tla-dataset").is_file():
            checks.append(Check("data", True, f"{spec['dataset']} will be prepared into {data} on first use"))
            continue
        train, val = check_image_folder(data)  # images verified: all of a split up to 100k, else a sample
        checks.append(Check("data", True, f"{data}: {len(train.classes)} classes, {train.size} train / "
                                          f"{val.size} val images"))
        # what the trainer would refuse once its ranks have met: too few images for one global batch,
        # fewer classes than class folders
        ranks = (plan.profile.slurm.nodes * plan.profile.slurm.tasks_per_node if plan.profile.executor == "slurm"
                 else plan.profile.local.tasks)
        if train.size < spec.get("batch_size", 1) * ranks:
            checks.append(Check("batch", False, f"--batch-size {spec.get('batch_size')} x {ranks} rank(s) is more "
                                                f"than the {train.size} training images"))
        if spec.get("num_classes") and spec["num_classes"] < len(train.classes):
            checks.append(Check("classes", False, f"--num-classes {spec['num_classes']} is fewer than the "
                                                  f"{len(train.classes)} class folders"))
    checks.append(model_check(plan.specs))
    root = plan.run_dir.parent
    existing = next((p for p in (root, *root.parents) if p.exists()), root)  # a dry run creates nothing
    writable = existing.is_dir() and os.access(existing, os.W_OK)  # access() says EROFS for root too
    checks.append(Check("runs root", writable, f"{root} {'writable' if writable else 'not writable'}"))
    if plan.profile.executor == "slurm":
        py, why = node_python(plan.profile)
        checks.append(Check("python on the nodes", True, f"{py} ({why})"))
        checks += slurm_checks(plan.profile)
    return checks


def model_check(specs: list[dict]) -> Check:
    """The trainer's own model checks (TL-Align support, input size, a meta-device forward) for each
    distinct spec: what would otherwise fail on the cluster after waiting in the queue."""
    from tla_jobs.train.preflight import check_spec

    seen: set[str] = set()
    for spec in specs:
        key = repr(sorted((k, v) for k, v in spec.items() if k not in ("seed", "output_dir", "run_dir")))
        if key in seen:
            continue
        seen.add(key)
        try:
            check_spec(spec)
        except TlaError as exc:
            return Check("model", False, str(exc))
    return Check("model", True, ", ".join(sorted({s["model"] for s in specs})))


def _run(cmd: list[str], timeout: int = 20) -> subprocess.CompletedProcess | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None


def slurm_checks(profile: Profile) -> list[Check]:
    s = profile.slurm
    out = []
    info = _run(["sinfo", "-h", "-o", "%R|%l|%D|%a"])
    if info is None or info.returncode != 0:
        out.append(Check("sinfo", False, "sinfo not found or the controller does not answer"))
        return out
    parts = {}
    for line in info.stdout.splitlines():
        bits = line.strip().split("|")
        if len(bits) == 4:
            parts[bits[0]] = bits
    out.append(Check("sinfo", True, f"partitions: {', '.join(sorted(parts)) or 'none'}"))
    if s.partition:
        if s.partition not in parts:
            out.append(Check("partition", False, f"partition {s.partition!r} not in {sorted(parts)}"))
        else:
            limit = _minutes(parts[s.partition][1])
            ok = limit is None or s.time_min <= limit
            out.append(Check("time limit", ok, f"--time {s.time_min} min vs partition MaxTime "
                                               f"{parts[s.partition][1]}"))
    acct = _run(["sacct", "-n", "-X", "-S", "now-1hours", "-o", "JobID", "--parsable2"])
    acct_ok = bool(acct and acct.returncode == 0)
    # Without accounting jobs still run; `tla status` then reads squeue and the heartbeat.
    out.append(Check("sacct", True, "accounting answers" if acct_ok else
                     "sacct unavailable: status falls back to squeue and heartbeats", warning=not acct_ok))
    c = profile.container
    if (c.runtime == "apptainer" and c.image.endswith(".sif")) or (c.runtime == "pyxis" and c.image.startswith("/")):
        present = Path(c.image).is_file()
        out.append(Check("image", present, f"{c.image} {'present' if present else 'missing'}"))
    if c.runtime == "podman":
        have = _run(["podman", "image", "exists", c.image])
        out.append(Check("image", bool(have and have.returncode == 0), f"podman image {c.image}"))
    return out


def _minutes(limit: str) -> int | None:
    """SLURM time limit text (e.g. 2-00:00:00, 4:00:00, 30, UNLIMITED) in minutes."""
    if limit in ("UNLIMITED", "infinite", "n/a", ""):
        return None
    days = 0
    if "-" in limit:
        d, limit = limit.split("-", 1)
        days = int(d)
    nums = [int(x) for x in limit.split(":")]
    if len(nums) == 3:
        h, m, sec = nums
    elif len(nums) == 2:
        h, m, sec = 0, nums[0], nums[1]
    else:
        h, m, sec = 0, nums[0], 0
    return days * 1440 + h * 60 + m + (1 if sec else 0)


# ---------------------------------------------------------------------------------------- submitting


class _DetachedSubprocess:
    """Stands in for the `subprocess` module inside submitit's local executor while it spawns its
    controller: the controller gets a new session (a Ctrl-C in the submitting terminal must not
    kill the training) and no inherited stdio (a caller reading `tla submit`'s output through a
    pipe must not wait for the whole job)."""

    def __init__(self, log: Path):
        self.log = log

    def __getattr__(self, name):
        return getattr(subprocess, name)

    def Popen(self, *args, **kwargs):  # noqa: N802 (the name submitit calls)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            kwargs.setdefault("start_new_session", True)
            kwargs.setdefault("stdin", subprocess.DEVNULL)
            kwargs.setdefault("stdout", out)
            kwargs.setdefault("stderr", subprocess.STDOUT)
            return subprocess.Popen(*args, **kwargs)


def _submitting(profile: Profile, folder: Path):
    from contextlib import nullcontext
    from unittest import mock

    if profile.executor != "local":
        return nullcontext()
    import submitit.local.local as local_module

    return mock.patch.object(local_module, "subprocess", _DetachedSubprocess(folder / "controller.log"))



def _submission(job, reason: str, profile: Profile, extra: dict | None = None) -> dict:
    ident = {}
    if profile.executor == "local" and str(job.job_id).isdigit():
        from tla_jobs.jobs.state import local_identity

        ident = local_identity(int(job.job_id))  # a PID alone may later name another process
    return {"job_id": str(job.job_id), "submitted": time.time(), "executor": profile.executor, "reason": reason,
            **ident,
            "profile": profile.name, "nodes": profile.slurm.nodes if profile.executor == "slurm" else 1,
            "tasks_per_node": profile.slurm.tasks_per_node if profile.executor == "slurm" else profile.local.tasks,
            "gpus_per_node": profile.slurm.gpus_per_node if profile.executor == "slurm" else 0,
            "time_min": profile.slurm.time_min if profile.executor == "slurm" else profile.local.timeout_min,
            **(extra or {})}


def requeue_limits(profile: Profile) -> dict:
    """What the job itself enforces when SLURM (or the host shell) brings it back."""
    if profile.executor != "slurm":
        return {}
    return {"max_requeue_preempt": profile.slurm.max_requeue_preempt, "time_min": profile.slurm.time_min,
            "max_stalled_attempts": profile.slurm.max_stalled_attempts}


def submit_train(plan: Plan, reason: str = "submit") -> dict:
    from tla_jobs.jobs.entry import TrainJob

    spec = plan.specs[0]
    ex = make_executor(plan.profile, plan.run_dir / rundir.SUBMITIT_DIR, plan.name, plan.run_dir,
                       spec.get("data_path", ""), plan.dependency)
    with _submitting(plan.profile, plan.run_dir / rundir.SUBMITIT_DIR):
        job = ex.submit(TrainJob(**requeue_limits(plan.profile)), spec)
    entry = _submission(job, reason, plan.profile)
    records.update(plan.run_dir, lambda r: r["submissions"].append(entry))
    return entry


def submit_eval(run_dir: Path, profile: Profile, spec: dict, dependency: str | None, eval_id: str) -> dict:
    from tla_jobs.jobs.entry import EvalJob

    ex = make_executor(profile, run_dir / rundir.SUBMITIT_DIR, f"{run_dir.name}-eval", run_dir,
                       spec.get("data_path", ""), dependency)
    with _submitting(profile, run_dir / rundir.SUBMITIT_DIR):
        job = ex.submit(EvalJob(), spec)
    entry = {**_submission(job, "eval", profile), "eval_id": eval_id, "checkpoint": spec["resume"],
             "dependency": dependency, "output_dir": spec["output_dir"]}
    records.update(run_dir, lambda r: r["evals"].append(entry))
    return entry


def submit_sweep(plans: list[Plan], profile: Profile, sweep_dir: Path, name: str) -> list[dict]:
    """One submitit job array (one SLURM array job) for every run of the sweep."""
    from tla_jobs.jobs.entry import TrainJob

    specs = [p.specs[0] for p in plans]
    ex = make_executor(profile, sweep_dir, name, plans[0].run_dir, specs[0].get("data_path", ""),
                       array_size=len(specs), data_paths=[sp.get("data_path", "") for sp in specs])
    from unittest import mock

    threads = {}
    if profile.executor == "local":
        # submitit's local executor starts every element at once: share this machine's cores between
        # them instead of giving each all of them (24 threads on 2 cores run slower than 2).
        per_run = max(1, (os.cpu_count() or 1) // (len(specs) * profile.local.tasks))
        threads = {"TLA_CPU_THREADS": str(per_run)}
    with _submitting(profile, sweep_dir), mock.patch.dict(os.environ, threads):
        jobs = ex.map_array(TrainJob(**requeue_limits(profile)), specs)
    out = []
    for index, (plan, job) in enumerate(zip(plans, jobs)):
        entry = _submission(job, "sweep", profile, {"sweep": name, "array_index": index,
                                                      "submitit_folder": str(sweep_dir)})
        records.update(plan.run_dir, lambda r, e=entry: r["submissions"].append(e))
        out.append(entry)
    return out


LOCAL_KILL_WAIT_S = 10.0  # like SLURM's KillWait: time to checkpoint on SIGTERM before the job is stopped harder


def cancel(entries: list[dict], run_dir: Path, kill_wait_s: float = LOCAL_KILL_WAIT_S) -> list[str]:
    """Stop these jobs (run.json entries of jobs that are live); returns the ids actually signalled.
    SLURM jobs get scancel (SIGTERM, then SIGKILL after the cluster's KillWait). A local job's
    controller gets the same treatment, only while it is the very process that was started (a PID
    alone may by now name another process): SIGTERM (forwarded to the tasks, which checkpoint), and
    after ``kill_wait_s`` SIGINT (submitit then kills its tasks) and finally SIGKILL of its process
    group. A task still starting up ignores SIGTERM (submitit's handler only logs it)."""
    import signal as _signal

    from tla_jobs.jobs.state import _folder_for, local_process_alive

    stopped: list[str] = []
    slurm_ids = [str(e["job_id"]) for e in entries if e.get("executor") == "slurm"]
    if slurm_ids:
        res = _run(["scancel", *slurm_ids])
        if res is None or res.returncode != 0:
            raise TlaError(f"scancel failed: {res.stderr.strip() if res else 'scancel not found'}")
        stopped += slurm_ids
    local = [e for e in entries if e.get("executor") == "local" and local_process_alive(e, _folder_for(e, run_dir))]

    def still(e):
        return local_process_alive(e, _folder_for(e, run_dir))

    def send(sig, group=False):
        for e in local:
            if still(e):
                try:
                    if group and os.getpgid(int(e["job_id"])) == int(e["job_id"]):
                        os.killpg(int(e["job_id"]), sig)  # the controller leads its own session
                    else:
                        os.kill(int(e["job_id"]), sig)
                except (ProcessLookupError, PermissionError):
                    pass

    send(_signal.SIGTERM)
    stopped += [str(e["job_id"]) for e in local]
    for sig, wait in ((_signal.SIGINT, kill_wait_s), (_signal.SIGKILL, 5.0)):
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and any(still(e) for e in local):
            time.sleep(0.2)
        if not any(still(e) for e in local):
            break
        send(sig, group=sig == _signal.SIGKILL)
    return stopped
