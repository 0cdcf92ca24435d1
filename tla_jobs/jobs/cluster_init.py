"""`tla cluster init`: a starting profile for the SLURM cluster this runs on, read from sinfo.

The profile is the packaged example's text (its comments explain every key) with what sinfo says
about one partition put in place of the example's values, so a newcomer gets a file that submits
as it is and says what to change. The result is validated like any profile before it is written.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import socket
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from tla_jobs.errors import TlaError
from tla_jobs.jobs import profiles
from tla_jobs.jobs.commands import run

FROM = ("slurm", "pyxis", "apptainer")  # the packaged examples that run on SLURM
MAX_TIME_MIN = 1440  # an attempt longer than a day buys nothing: the trainer is requeued from its checkpoint
MEM_SHARE = 0.9
# --exact: one line per group of identical nodes (without it sinfo folds a partition's nodes into one
# line with "minimum+" values); %P has a trailing * on the default partition.
SINFO = ["sinfo", "--noheader", "--exact", "--format", "%P|%a|%l|%D|%c|%m|%G"]
SINFO_TIMEOUT_S = 30


@dataclass
class Partition:
    """One partition as sinfo shows it; per-node figures are those of its smallest node, so that a
    job asking for them fits on any node of the partition."""

    name: str
    default: bool = False
    state: str = "up"
    nodes: int = 0
    cpus: int = 0
    mem_mb: int = 0
    gpus: int = 0
    max_time: str = ""
    mixed: bool = False  # its nodes differ (CPUs, memory or GPUs)


@dataclass
class Result:
    name: str
    path: str
    source: str  # the example it started from
    partition: dict
    values: dict  # what was filled in, by key of the slurm: block
    notes: list[str] = field(default_factory=list)
    next: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


# ------------------------------------------------------------------ reading sinfo


def _count(text: str) -> int:
    """sinfo's number (8192, or 8192+ when nodes were folded: the minimum); 0 when none."""
    m = re.match(r"\s*(\d+)", text)
    return int(m.group(1)) if m else 0


def gres_gpus(gres: str) -> int:
    """GPUs per node of sinfo's GRES column: gpu:4, gpu:a100:4(S:0-1), gpu:a100:2,gpu:v100:2,
    gpu (one), (null) (none). Other resources (mps, shard, ...) are not GPUs."""
    total = 0
    for item in re.sub(r"\([^)]*\)", "", gres).split(","):  # (S:0-1): the sockets, may hold commas
        bits = item.strip().split(":")
        if bits[0] != "gpu":
            continue
        total += int(bits[-1]) if len(bits) > 1 and bits[-1].isdigit() else 1  # `gpu` or `gpu:type` is one
    return total


def limit_minutes(limit: str) -> int | None:
    """A SLURM time limit (infinite, UNLIMITED, MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in
    whole minutes, rounded down so that a profile's time_min never exceeds it; None when there is
    no limit (or sinfo says something else)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", limit.strip())
    if not m:
        return None
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:
        seconds = a * 3600 + b * 60 + c
    elif b is not None:
        seconds = a * 60 + b
    else:
        seconds = a * 60
    return seconds // 60


def parse_sinfo(text: str) -> dict[str, Partition]:
    """Partitions, in sinfo's order, from the output of SINFO."""
    parts: dict[str, Partition] = {}
    for line in text.splitlines():
        bits = line.strip().split("|")
        if len(bits) != 7 or not bits[0]:
            continue
        raw, state, limit, nodes, cpus, mem, gres = bits
        name = raw.rstrip("*")
        group = Partition(name, raw.endswith("*"), state, _count(nodes), _count(cpus), _count(mem), gres_gpus(gres),
                          limit)
        p = parts.get(name)
        if p is None:
            parts[name] = group
            continue
        figures = (group.cpus, group.mem_mb, group.gpus)
        p.mixed = p.mixed or figures != (p.cpus, p.mem_mb, p.gpus)
        p.cpus, p.mem_mb, p.gpus = min(p.cpus, group.cpus), min(p.mem_mb, group.mem_mb), min(p.gpus, group.gpus)
        p.nodes += group.nodes
        p.default = p.default or group.default
    return parts


def read_sinfo() -> dict[str, Partition]:
    """The partitions this user can submit to; a TlaError when sinfo is missing or fails."""
    if shutil.which("sinfo") is None:
        raise TlaError("sinfo is not installed here (not on PATH): run `tla cluster init` on a login node of "
                       "the SLURM cluster, or copy an example from `tla cluster list` and edit it")
    proc = run(SINFO, timeout=SINFO_TIMEOUT_S)
    if proc is None:
        raise TlaError(f"sinfo did not answer within {SINFO_TIMEOUT_S} s: is the SLURM controller up?")
    if proc.returncode != 0:
        said = next((ln.strip() for ln in proc.stderr.splitlines() if ln.strip()), "no message")
        raise TlaError(f"sinfo failed (exit code {proc.returncode}): {said}; is the SLURM controller up "
                       "(SLURM_CONF)?")
    parts = parse_sinfo(proc.stdout)
    if not parts:
        raise TlaError("sinfo lists no partition this account can use")
    return parts


def pick(parts: dict[str, Partition], wanted: str | None) -> Partition:
    """The partition asked for, else the cluster's default one."""
    names = ", ".join(parts)
    if wanted:
        if wanted not in parts:
            raise TlaError(f"partition {wanted!r} is not in sinfo's list: {names}")
        return parts[wanted]
    default = [p for p in parts.values() if p.default]
    if not default:
        raise TlaError(f"this cluster has no default partition: choose one with --partition ({names})")
    return default[0]


# ------------------------------------------------------------------ the profile's values


def values_for(p: Partition, example: profiles.Profile) -> tuple[dict, list[str]]:
    """The slurm: values for partition ``p`` (None: leave the example's line), and notes on them."""
    notes = []
    tasks = p.gpus or 1  # one task (DDP rank) per GPU; one task on a node without GPUs
    limit = limit_minutes(p.max_time)
    time_min = MAX_TIME_MIN if limit is None else max(1, min(MAX_TIME_MIN, limit))
    if limit is None:
        notes.append(f"MaxTime {p.max_time or '?'}: time_min {MAX_TIME_MIN} (longer runs are requeued)")
    elif limit > MAX_TIME_MIN:
        notes.append(f"MaxTime {p.max_time}: time_min capped at {MAX_TIME_MIN} (longer runs are requeued)")
    # Memory: a share of the smallest node's RealMemory, not all of it: a site that keeps memory for
    # the system (MemSpecLimit) cannot give a job the full RealMemory, and such a job would wait forever.
    # Below 1 GB (RealMemory not configured: sinfo says 1) --mem is left to the site's default.
    mem_gb = int(p.mem_mb * MEM_SHARE / 1024) or None
    if mem_gb is None:
        notes.append(f"node memory {p.mem_mb} MB: mem_gb left to the site's default")
    vals = {
        "partition": p.name,
        "nodes": max(1, min(example.slurm.nodes, p.nodes or 1)),
        "tasks_per_node": tasks,
        "gpus_per_node": p.gpus,
        "cpus_per_task": max(1, p.cpus // tasks),
        "mem_gb": mem_gb,
        "time_min": time_min,
    }
    # The checkpoint signal must come well before the end of a short attempt (a debug partition).
    if example.slurm.signal_delay_s * 4 > time_min * 60:
        vals["signal_delay_s"] = max(1, time_min * 60 // 4)
    if p.mixed:
        notes.append(f"partition {p.name} has nodes of different sizes: the smallest one's CPUs, memory and "
                     "GPUs are used, so a job fits on any of them")
    if p.state != "up":
        notes.append(f"partition {p.name} is {p.state}: jobs wait until it is up")
    return vals, notes


def setup_lines() -> list[str]:
    """The batch script's setup for tasks on the host: activate the environment this `tla` runs in
    (a venv on the shared filesystem). Outside a venv there are none, and the job runs this very
    interpreter (sbatch.python_on_nodes)."""
    if sys.prefix == sys.base_prefix:
        return []
    return [f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"]


# ------------------------------------------------------------------ editing the example's text


def _scalar(v) -> str:
    """A YAML scalar for ``v``: plain where YAML reads it back as is, else double-quoted."""
    if v is None:
        return "null"
    if isinstance(v, bool | int):
        return json.dumps(v)
    try:
        plain = re.match(r"[A-Za-z0-9_/.~$]", v) and v == v.strip() and yaml.safe_load(v) == v
    except yaml.YAMLError:
        plain = False
    return v if plain else json.dumps(v, ensure_ascii=False)  # a JSON string is a YAML double-quoted scalar


def _block(lines: list[str], key: str) -> tuple[int, int]:
    """[start, end) of the top-level mapping ``key:`` (its line and the indented lines below it)."""
    start = next((i for i, ln in enumerate(lines) if re.match(rf"{key}:\s*(#.*)?$", ln)), None)
    if start is None:
        lines.append(f"{key}:")
        return len(lines) - 1, len(lines)
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][0] in " #"):
        end += 1
    while end - 1 > start and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
        end -= 1  # blank lines and column-0 comments at its end belong to what follows
    return start, end


def _set_line(line: str, prefix: str, value: str) -> str:
    """``line`` (prefix + old value + maybe a comment) with the new value, the comment kept in its column."""
    m = re.match(r"(?P<val>[^#]*?)(?P<gap>\s*)(?P<comment>#.*)?$", line[len(prefix):])
    new = prefix + value
    if m and m.group("comment"):
        column = len(prefix) + len(m.group("val")) + len(m.group("gap"))
        new = new.ljust(column - 1) + " " + m.group("comment")
    return new


def fill(text: str, values: dict, setup: list[str] | None, header: list[str]) -> str:
    """The example ``text`` with the slurm: ``values`` in place (None: the key's line says null) and,
    when ``setup`` is given, the setup: list replaced; comments are kept. Keys the example lacks are
    added at the end of the block."""
    lines = text.splitlines()
    start, end = _block(lines, "slurm")
    indent = "  "
    for ln in lines[start + 1:end]:
        if ln.strip() and not ln.lstrip().startswith("#"):
            indent = ln[: len(ln) - len(ln.lstrip())]
            break
    added = []
    for key, v in values.items():
        i = next((j for j in range(start + 1, end) if lines[j].startswith(f"{indent}{key}:")), None)
        if i is None:
            added.append(f"{indent}{key}: {_scalar(v)}")
        else:
            lines[i] = _set_line(lines[i], f"{indent}{key}:", " " + _scalar(v))
    if setup is not None:
        i = next((j for j in range(start + 1, end) if lines[j].startswith(f"{indent}setup:")), None)
        items = [f"{indent}  - {_scalar(s)}" for s in setup]
        if i is None:
            added += [f"{indent}setup:" + ("" if setup else " []"), *items]
        else:
            j = i + 1  # the example's items: deeper lines, or `- ` lines at the key's own indent
            while j < end and (lines[j].startswith(indent + " ") or lines[j].startswith(indent + "-")):
                j += 1
            old = [f"{indent}  # {ln.strip()}" for ln in lines[i + 1:j] if not setup and ln.strip()]
            lines[i:j] = [_set_line(lines[i], f"{indent}setup:", "" if setup else " []"), *items, *old]
            end += len(items) + len(old) - (j - i - 1)
    lines[end:end] = added
    return "\n".join(header + lines) + "\n"


# ------------------------------------------------------------------ the command


def init(name: str, source: str = "slurm", partition: str | None = None, folder: Path | None = None,
         force: bool = False) -> Result:
    """Write profile ``name`` for this SLURM cluster into ``folder`` (the user's profile directory)."""
    from tla_jobs.fsutil import atomic_write_text

    profiles.check_name(name)
    if source not in FROM:
        raise TlaError(f"--from must be one of {', '.join(FROM)} (not {source!r})")
    folder = Path(folder).expanduser() if folder else profiles.user_dir()
    path = folder / f"{name}.yaml"
    if (path.exists() or path.is_symlink()) and not force:
        raise TlaError(f"{path} already exists: pass --force to replace it, or choose another name")
    if path.is_dir():
        raise TlaError(f"{path} is a directory")
    example_text = profiles.packaged_text(source)
    example = profiles.parse(example_text, f"{profiles.BUILT_IN} {source}", source)

    p = pick(read_sinfo(), partition)
    values, notes = values_for(p, example)
    host = example.container.runtime == "none"
    setup = setup_lines() if host else None
    if host and not setup:
        notes.append("not in a virtual environment: no setup lines, jobs run this interpreter "
                     f"({sys.executable}); it must exist on the nodes")
    if not host:
        notes.append(f"set container.image to your {example.container.runtime} image (the example's "
                     f"{example.container.image} is a placeholder) and check container.mounts")
    gpus = f"{p.gpus} GPU{'s' if p.gpus != 1 else ''}" if p.gpus else "no GPU"
    where = " ".join(socket.gethostname().split()) or "this machine"
    header = [f"# Made by `tla cluster init {name} --from {source}` from sinfo on {where}:",
              f"# partition {p.name}, {p.nodes} node{'s' if p.nodes != 1 else ''} of {p.cpus} CPUs, {p.mem_mb} MB and "
              f"{gpus}; MaxTime {p.max_time}.",
              f"# The built-in example {source!r} follows, with the values for that partition"
              + (f"; mem_gb is {int(MEM_SHARE * 100)}% of" if values["mem_gb"] else "."),
              ("# a node's memory (the rest stays with the system). " if values["mem_gb"] else "# ")
              + f"Edit freely; `tla cluster check {name}` tests it.",
              ""]
    desc = f"partition {p.name}: {gpus}, {p.cpus} CPUs per node (tla cluster init --from {source})"
    text = fill(example_text, values, setup, header)
    text = re.sub(r"(?m)^description:.*$", lambda m: f"description: {_scalar(desc)}", text, count=1)

    # What was meant is what YAML reads back, and the profile validates: anything else is a bug here.
    data = yaml.safe_load(text)
    got = {k: data["slurm"].get(k) for k in values}
    if got != values or (setup is not None and (data["slurm"].get("setup") or []) != setup) or \
            data.get("description", desc) != desc:
        raise AssertionError(f"cluster init wrote {got} (setup {data['slurm'].get('setup')}), meant {values} "
                             f"(setup {setup})")
    profiles.parse(text, str(path), name)
    atomic_write_text(path, text)

    reached = profiles.sources().get(name, [None])[0]
    same = reached not in (None, profiles.BUILT_IN) and Path(reached).resolve() == path.resolve()
    ref = name if same else str(path)
    if not same:
        notes.append(f"the name {name} loads {reached} first: use the path {path} (or another name)"
                     if reached else f"{folder} is not searched for profiles: use the path {path}")
    return Result(name=name, path=str(path), source=source, partition=asdict(p),
                  values={**values, **({"setup": setup} if setup is not None else {})}, notes=notes,
                  next=[f"tla cluster check {shlex.quote(ref)}",
                        f"tla submit train --cluster {shlex.quote(ref)} --dry-run ..."])
