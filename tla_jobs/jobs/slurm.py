"""SLURM, as `tla` asks it: one batched `sacct` for every job shown (`squeue` where accounting is
missing, behind, or does not answer), the preflight checks against the cluster (sinfo, sacct, the
partition's time limit, the image), and scancel.

`tla status`, `report`, `cancel` and `logs` never wait on accounting: an overloaded or stopped
slurmdbd leaves sacct waiting for its own timeouts (31 s measured), so sacct gets SACCT_TIMEOUT_S,
then squeue (slurmctld, which does not wait on slurmdbd) and the runs' own files answer; the
source says so. Within one process (`status --watch`) sacct is not asked again for a while after.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from tla_jobs.errors import TlaError
from tla_jobs.jobs.commands import TIMED_OUT, run
from tla_jobs.jobs.plan import Check
from tla_jobs.jobs.profiles import Profile
from tla_jobs.jobs.scheduler import ACTIVE, SACCT_SILENT, JobRecord, SchedulerView

SACCT_TIMEOUT_S = float(os.environ.get("TLA_SACCT_TIMEOUT_S", "2"))  # then squeue: within 5 s in all
SACCT_RETRY_S = 30.0  # after sacct did not answer, this process leaves it alone this long
_sacct_silent_until = 0.0


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _gpus(tres: str) -> int:
    """GPUs of sacct's AllocTRES (gres/gpu=8 or gres/gpu:a100=8)."""
    for part in tres.split(","):
        if part.startswith("gres/gpu=") or part.startswith("gres/gpu:"):
            return _int(part.split("=")[-1])
    return 0


def _base_ids(job_ids: list[str]) -> str:
    return ",".join(sorted({j.split("_")[0] for j in job_ids}))


def query(job_ids: list[str]) -> SchedulerView:
    """One sacct call for all jobs (every attempt of a requeued job: -D); squeue when sacct has nothing."""
    global _sacct_silent_until
    view = SchedulerView()
    if not job_ids:
        return view
    acct, silent = None, time.monotonic() < _sacct_silent_until
    if not silent:
        acct = run(["sacct", "-n", "-P", "-D", "-X", "-j", _base_ids(job_ids), "-o",
                    "JobID,State,ExitCode,Start,End,ElapsedRaw,AllocTRES,NodeList,Reason"], timeout=SACCT_TIMEOUT_S,
                   say_timeout=True)
        silent = acct is not None and acct.returncode == TIMED_OUT
        if silent:
            _sacct_silent_until = time.monotonic() + SACCT_RETRY_S
    if acct is not None and acct.returncode == 0 and acct.stdout.strip():
        view.source = "sacct"
        for line in acct.stdout.splitlines():
            f = line.split("|")
            if len(f) < 9:
                continue
            state = f[1].split()[0] if f[1] else "UNKNOWN"  # "CANCELLED by 0" -> CANCELLED
            rec = JobRecord(f[0], state, "sacct", f[2], f[3], f[4], _int(f[5]), _gpus(f[6]), f[7], f[8])
            view.jobs.setdefault(f[0], []).append(rec)
        _check_live_against_squeue(view, [j for j in job_ids if j not in view.jobs])
        return view
    # No accounting (or slurmdbd down): squeue knows live jobs, and finished ones for MinJobAge.
    queue = run(["squeue", "-h", "--states=all", "-j", _base_ids(job_ids), "-o", "%i|%T|%r|%N|%M|%D|%b|%S"])
    view.source = f"squeue ({SACCT_SILENT})" if silent else "squeue"
    if queue is not None and queue.returncode == 0:
        for line in queue.stdout.splitlines():
            f = line.strip().split("|")
            if len(f) >= 3:
                nodes = _int(f[5]) if len(f) > 5 else 1
                rec = JobRecord(f[0], f[1], "squeue", reason=f[2], nodes=f[3] if len(f) > 3 else "",
                                elapsed_s=squeue_elapsed(f[4]) if len(f) > 4 else 0,
                                gpus=_gres_gpus(f[6]) * max(nodes, 1) if len(f) > 6 else 0,
                                start=f[7] if len(f) > 7 else "")
                view.jobs.setdefault(f[0], []).append(rec)
    return view


def silent_note(sources: list[str]) -> str | None:
    """The line `tla status` prints under its table when accounting did not answer for these runs."""
    if any(SACCT_SILENT in s for s in sources):
        return (f"accounting (sacct) did not answer within {SACCT_TIMEOUT_S:g} s: states from squeue and the runs' "
                "own files")
    return None


def _check_live_against_squeue(view: SchedulerView, missing: list[str]) -> None:
    """sacct can be stale (slurmdbd restarted, slurmctld still replaying): a job it calls live but
    that slurmctld (squeue) no longer has, or has as finished, is not live; a job it does not have
    yet (just submitted, slurmdbd behind) is taken from squeue. One squeue call, only when needed;
    nothing changes when squeue does not answer."""
    live = [job for job, recs in view.jobs.items() if recs[-1].state in ACTIVE]
    if not live and not missing:
        return
    queue = run(["squeue", "-h", "--states=all", "-j", _base_ids(live + missing), "-o", "%i|%T|%r|%N|%M"])
    if queue is None or queue.returncode != 0:
        return
    now = {}
    for line in queue.stdout.splitlines():
        f = line.strip().split("|")
        if len(f) == 5:
            now[f[0]] = f
    for job in live:
        last = view.jobs[job][-1]
        f = now.get(job)
        if f is None:
            last.state, last.reason = "UNKNOWN", "sacct said live, slurmctld no longer has the job"
        elif f[1] not in ACTIVE:
            last.state = f[1]
    for job in missing:
        f = now.get(job)
        if f is not None:
            view.jobs[job] = [JobRecord(job, f[1], "squeue", reason=f[2], nodes=f[3], elapsed_s=squeue_elapsed(f[4]))]


def squeue_elapsed(text: str) -> int:
    """squeue's %M (time used): [days-][hours:]minutes:seconds, in seconds."""
    text = text.strip()
    days = 0
    if "-" in text:
        d, text = text.split("-", 1)
        days = _int(d)
    parts = [_int(x) for x in text.split(":")] if text and text not in ("INVALID", "N/A") else []
    seconds = 0
    for x in parts:
        seconds = seconds * 60 + x
    return days * 86400 + seconds


def _gres_gpus(text: str) -> int:
    """GPUs per node from squeue's %b (e.g. gres:gpu:8, gres/gpu:a100:4, N/A)."""
    for part in text.split(","):
        bits = part.replace("/", ":").split(":")
        if "gpu" in bits:
            return _int(bits[-1]) if bits[-1] != "gpu" else 1
    return 0


def scancel(job_ids: list[str], signal: str | None = None) -> None:
    """scancel the jobs, or send them ``signal`` (USR2, TERM, ...); a TlaError when that fails."""
    flags = [f"--signal={signal}"] if signal else []
    res = run(["scancel", *flags, *job_ids], timeout=20)
    if res is None or res.returncode != 0:
        raise TlaError(f"scancel{' --signal' if signal else ''} failed: "
                       f"{res.stderr.strip() if res else 'scancel not found'}")


# ---------------------------------------------------------------------------------------- checks


def checks(profile: Profile) -> list[Check]:
    """Does the cluster answer, and take what the profile asks for (partition, time limit, image)?"""
    s = profile.slurm
    out = []
    info = run(["sinfo", "-h", "-o", "%R|%l|%D|%a"], timeout=20)
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
    acct = run(["sacct", "-n", "-X", "-S", "now-1hours", "-o", "JobID", "--parsable2"], timeout=SACCT_TIMEOUT_S,
               say_timeout=True)
    acct_ok = bool(acct and acct.returncode == 0)
    # Without accounting jobs still run; `tla status` then reads squeue and the heartbeat.
    silent = f"sacct did not answer within {SACCT_TIMEOUT_S:g} s" if acct and acct.returncode == TIMED_OUT else \
        "sacct unavailable"
    out.append(Check("sacct", True, "accounting answers" if acct_ok else
                     f"{silent}: status falls back to squeue and heartbeats", warning=not acct_ok))
    c = profile.container
    if (c.runtime == "apptainer" and c.image.endswith(".sif")) or (c.runtime == "pyxis" and c.image.startswith("/")):
        present = Path(c.image).is_file()
        out.append(Check("image", present, f"{c.image} {'present' if present else 'missing'}"))
    if c.runtime == "podman":
        have = run(["podman", "image", "exists", c.image], timeout=20)
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
