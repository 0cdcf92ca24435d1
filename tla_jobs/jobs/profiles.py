"""Cluster profiles (YAML files), validated with pydantic: unknown keys are errors.

A profile says where jobs run (submitit's local executor, or SLURM), with what resources, how they
are requeued, and whether the training step runs in a container (Pyxis, Apptainer, podman).

A name is looked up in $TLA_CLUSTER_CONFIGS (its entries, in order), then ./cluster_configs, then
the user's profile directory (user_dir()), then the commented examples shipped in the package
(tla_jobs/jobs/profiles/, which the checkout's top-level cluster_configs links to).
"""

from __future__ import annotations

import os
import re
from importlib import resources
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tla_jobs.errors import TlaError


class _Strict(BaseModel):
    # strict: `time_min: true` or `nodes: "2"` is an error, not 1 or 2; no NaN or infinity anywhere
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


# Upper bounds, far above any cluster's (a year of minutes; a thousand ranks per node), so that a typo
# such as --tasks-per-node 100000 (that many processes on this machine) is refused, not started.
MAX_MINUTES = 366 * 24 * 60


class LocalSettings(_Strict):
    tasks: int = Field(1, ge=1, le=1024, description="processes (DDP ranks over gloo) on this machine")
    timeout_min: int = Field(24 * 60, ge=1, le=MAX_MINUTES)
    max_requeue_failure: int = Field(2, ge=0, le=10_000,
                                     description="attempts that may end by a failure (0: none retried)")


class SlurmSettings(_Strict):
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(1, ge=1, le=100_000)
    tasks_per_node: int = Field(1, ge=1, le=1024, description="one task per GPU")
    gpus_per_node: int = Field(0, ge=0, le=1024)
    cpus_per_task: int = Field(1, ge=1, le=100_000)
    mem_gb: float | None = Field(None, gt=0, le=1_000_000)
    time_min: int = Field(60, ge=1, le=MAX_MINUTES, description="time limit of one attempt, minutes")
    signal_delay_s: int = Field(120, ge=1, le=24 * 3600, description="USR2 this long before the time limit")
    max_requeue_timeout: int = Field(3, ge=0, le=10_000, description="attempts that may end at the time limit")
    max_requeue_preempt: int = Field(20, ge=0, le=10_000, description="attempts that may end by preemption")
    max_requeue_failure: int = Field(2, ge=0, le=10_000, description="attempts that may end by a failure: a "
                                     "rank's non-zero exit or signal (0: none retried)")
    max_stalled_attempts: int = Field(3, ge=1, le=10_000,
                                      description="attempts in a row with no new step before giving up")
    constraint: str | None = None
    exclude: str | None = None
    additional_parameters: dict[str, str | int | bool] = Field(default_factory=dict, description="extra #SBATCH keys")
    setup: list[str] = Field(default_factory=list, description="shell lines run in the batch script before the step")
    python: str | None = Field(None, description="the interpreter on the nodes (default: `python` after the setup "
                               "lines, or the submitting interpreter when there are none)")

    @model_validator(mode="after")
    def _python(self) -> SlurmSettings:
        if self.python:  # empty: the default, as when absent
            python_words(self.python, "slurm.python")
        return self


def python_words(value: str, where: str) -> list[str]:
    """An interpreter setting (slurm.python, container.python) as the words of its command line,
    the way a shell would split it; each word is quoted again where the batch script gets it, so
    `python; id #` is three words given to an interpreter named `python;`, never a second command."""
    import shlex

    try:
        words = shlex.split(value)
    except ValueError as exc:  # "No closing quotation", "No escaped character"
        raise ValueError(f"{value!r} cannot be split into words ({exc}): {where} is a command line, "
                         "e.g. python or /opt/env/bin/python -X faulthandler") from None
    if not words:
        raise ValueError(f"{where} is empty: name the interpreter, e.g. python")
    return words


class ContainerSettings(_Strict):
    runtime: Literal["none", "pyxis", "apptainer", "podman"] = "none"
    image: str = ""
    mounts: list[str] = Field(default_factory=list, description="HOST[:CONTAINER[:ro]]; run and data dirs are added")
    workdir: str | None = None
    extra_flags: list[str] = Field(default_factory=list)
    python: str = "python"

    @model_validator(mode="after")
    def _python(self) -> ContainerSettings:
        python_words(self.python, "container.python")
        return self

    @model_validator(mode="after")
    def _image(self) -> ContainerSettings:
        if self.runtime != "none" and not self.image:
            raise ValueError(f"container runtime {self.runtime} needs an image")
        return self


class Profile(_Strict):
    name: str = "local"
    executor: Literal["local", "slurm"] = "local"
    description: str = ""
    local: LocalSettings = Field(default_factory=LocalSettings)
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)
    container: ContainerSettings = Field(default_factory=ContainerSettings)
    runs_root: str | None = Field(None, description="default runs root for this cluster (else ./runs or $TLA_RUNS)")


# A profile name is a file name without a folder: letters, digits, '.', '_', '-', not starting with '.' or '-'.
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
BUILT_IN = "built-in"


def check_name(name: str) -> str:
    """``name`` when it is a plain profile name (no folder, no leading '.' or '-'); else a TlaError."""
    if not NAME_RE.fullmatch(name) or name.endswith((".yaml", ".yml")):
        raise TlaError(f"profile name {name!r} is not a plain name (letters, digits, '.', '_', '-'; "
                       "no folder, no .yaml)")
    return name


def user_dir() -> Path:
    """The per-user profile directory, where `tla cluster init` writes: the first entry of
    $TLA_CLUSTER_CONFIGS when set, else $XDG_CONFIG_HOME/tla/clusters (~/.config/tla/clusters)."""
    env = [p for p in os.environ.get("TLA_CLUSTER_CONFIGS", "").split(os.pathsep) if p]
    if env:
        return Path(env[0]).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME", "")
    # the XDG spec: a relative value is invalid and ignored
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".config"
    return base / "tla" / "clusters"


def search_dirs() -> list[Path]:
    """The folders a profile name is looked up in, in order (the packaged examples come after)."""
    dirs = [Path(p).expanduser() for p in os.environ.get("TLA_CLUSTER_CONFIGS", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "cluster_configs")
    if user_dir() not in dirs:
        dirs.append(user_dir())
    return dirs


def _packaged_dir():
    return resources.files("tla_jobs.jobs") / "profiles"


def _packaged(name: str) -> str | None:
    res = _packaged_dir() / f"{name}.yaml"
    return res.read_text(encoding="utf-8") if res.is_file() else None


def packaged_names() -> list[str]:
    """The examples shipped in the package (local, slurm, pyxis, apptainer, ...)."""
    return sorted(r.name[:-5] for r in _packaged_dir().iterdir() if r.name.endswith(".yaml") and r.is_file())


def packaged_text(name: str) -> str:
    """The text of a packaged example, comments included (`tla cluster init` starts from it)."""
    text = _packaged(name)
    if text is None:
        raise TlaError(f"no built-in profile {name!r}; built-in: {', '.join(packaged_names())}")
    return text


def _real(path) -> Path | None:
    try:
        return Path(str(path)).resolve()
    except (OSError, RuntimeError):
        return None


def sources() -> dict[str, list[str]]:
    """Every profile a name can reach: name -> where it is found, the one that wins first (file
    paths, or BUILT_IN for a packaged example). The same file reached twice (./cluster_configs is
    the packaged folder in a checkout) counts once."""
    found: dict[str, list[str]] = {}
    seen: set[Path] = set()

    def add(name: str, where: str, real: Path | None) -> None:
        if real is not None and real in seen:
            return
        if real is not None:
            seen.add(real)
        found.setdefault(name, []).append(where)

    for d in search_dirs():
        try:
            files = sorted(p for p in d.glob("*.yaml") if _is_entry(p))
        except OSError:
            continue
        for p in files:
            if NAME_RE.fullmatch(p.stem):
                add(p.stem, str(p), _real(p))
    for name in packaged_names():
        add(name, BUILT_IN, _real(_packaged_dir() / f"{name}.yaml"))
    return dict(sorted(found.items()))


def _is_entry(path: Path) -> bool:
    """A profile file's name that is there (a FIFO or a device too: listed, and refused when it is read,
    rather than silently passed over); folders are not."""
    return os.path.lexists(path) and not path.is_dir()


def available() -> list[str]:
    return list(sources())


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently).
    Profiles and `--config` recipes (config.load_config_file) are read with it."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) and key is not None:
                    raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is not a plain value",
                                                            key_node.start_mark)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}",
                                                            key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse(text: str, source: str, name: str) -> Profile:
    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise TlaError(f"profile {source} is not valid YAML{where}: {getattr(exc, 'problem', None) or exc}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise TlaError(f"profile {source} must be a mapping of settings")
    data.setdefault("name", name)
    try:
        return Profile.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise TlaError(f"profile {source}: {loc}: {msg}") from None


def _read(path: Path) -> str:
    from tla_jobs.fsutil import MAX_TEXT, UnsafeFile, read_regular_text

    try:
        return read_regular_text(path, MAX_TEXT)  # a FIFO or /dev/zero in its place: refused, not read forever
    except UnicodeDecodeError:
        raise TlaError(f"profile {path} is not a text (UTF-8) file") from None
    except UnsafeFile as exc:
        raise TlaError(f"profile {exc}") from None


def load(name_or_path: str) -> Profile:
    """A profile by name (searched in search_dirs(), then the packaged examples) or by path to a
    YAML file."""
    if name_or_path.endswith((".yaml", ".yml")) or os.sep in name_or_path:
        path = Path(name_or_path).expanduser()
        if not _is_entry(path):
            raise TlaError(f"profile file {path} does not exist")
        return parse(_read(path), str(path), path.stem)
    check_name(name_or_path)
    for d in search_dirs():
        path = d / f"{name_or_path}.yaml"
        if _is_entry(path):
            return parse(_read(path), str(path), name_or_path)
    text = _packaged(name_or_path)
    if text is not None:
        return parse(text, f"{BUILT_IN} {name_or_path}", name_or_path)
    raise TlaError(f"unknown cluster profile {name_or_path!r}; available: {', '.join(available())}")


def listing() -> list[dict]:
    """One row per profile name (`tla cluster list`): what the name loads (executor, description),
    from where (a file path, or BUILT_IN), and what it shadows. A profile that does not load is
    listed with its error rather than hiding the others."""
    rows = []
    for name, wheres in sources().items():
        row = {"name": name, "executor": None, "description": "", "source": wheres[0], "shadows": wheres[1:],
               "error": None}
        try:
            text = _packaged(name) if wheres[0] == BUILT_IN else _read(Path(wheres[0]))
            prof = parse(text or "", wheres[0] if wheres[0] != BUILT_IN else f"{BUILT_IN} {name}", name)
            row.update(executor=prof.executor, description=prof.description)
        except (TlaError, OSError) as exc:
            row["error"] = " ".join(str(exc).split())
        rows.append(row)
    return rows
