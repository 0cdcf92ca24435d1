"""The status cache: a finished run's status kept in its run directory (rundir.STATUS_CACHE).

Why: `tla status` over 10,000 runs spent most of its time recomputing runs that finished long ago
(four JSON files parsed and checked, submitit's pickle looked up, the process table read: about
0.2 ms a run). A finished run's status cannot change unless one of its files does, so it is kept,
once computed, in the run directory and used while those files are unchanged.

The run directory stays the source of truth; the cache is only ever a copy of what state.collect()
computed from it, and is trusted only when all of this holds:
  * it was written by tla for this user: the file is signed with the user's cache key
    (jobs/signing.py), so a hand-written or edited cache (a fake run, a FAILED run shown COMPLETED)
    is ignored and the status computed again, never shown;
  * it was written for a run in a final state that no scheduler or process can change any more
    (cacheable: every local job's process gone; a SLURM run only when the trainer's own end
    record settled it and sacct has every job as ended): a live run is always computed;
  * every file that state was computed from (run.json, attempts.jsonl, heartbeat.json,
    summary.json, metrics.jsonl, submitit's result pickle of each job, each eval's eval.json) has
    the inode, size, mtime and ctime it had *before* it was read (a change made while the status
    was being computed leaves the cache stale at once), and is still missing if it was missing;
  * no such file had been modified within RACY_S before it was stat'ed, nor before the cache file
    was written (git's "racy clean" rule: a change within one timestamp tick of the previous one
    does not show in the mtime, so a file that was that fresh is not trusted);
  * the code that computes a status is the same (CODE: a hash of its modules' source), so a fix
    in decide() or in the files' checks never meets a status computed by the old rules.
It is written atomically (temporary file, rename) without fsync: a cache lost or cut short by a
crash does not verify, and is simply computed again. A runs root that cannot be written (a
teammate's, a full disk) is read as usual, without a cache. It is read only when it is a regular
file of a sane size (a FIFO there would block every `tla status`).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import time
from pathlib import Path

from tla_jobs import __version__, rundir
from tla_jobs.jobs import local, pickles, signing
from tla_jobs.jobs.attempts import job_of
from tla_jobs.jobs.scheduler import ACTIVE, JobRecord, SchedulerView
from tla_jobs.jobs.state import EvalStatus, RunStatus

RACY_S = 2.0
CACHE_FORMAT = 3  # 3: signed (the first line)
MAX_BYTES = 8 << 20  # a status is a few KB; a run with thousands of attempts, a few MB
_CODE_STAMP: str | None = None
_HOST = socket.gethostname()


# the modules a status is computed by (artifacts: the label of an eval; slurm: the records from sacct)
CODE = ("jobs/state.py", "jobs/status_cache.py", "jobs/attempts.py", "jobs/damage.py", "jobs/local.py",
        "jobs/pickles.py", "jobs/retry.py", "jobs/scheduler.py", "jobs/signing.py", "jobs/slurm.py",
        "jobs/artifacts.py", "rundir.py", "fsutil.py", "procs.py")


def _code_stamp() -> str:
    """A hash of the source of every module a status is computed by, and of tla's version."""
    global _CODE_STAMP
    if _CODE_STAMP is None:
        package = Path(rundir.__file__).parent
        h = hashlib.sha1(f"{CACHE_FORMAT} {__version__}".encode())
        for name in CODE:
            try:
                h.update((package / name).read_bytes())
            except OSError:
                h.update(b"?")  # no source to read (a zipped install): the version alone decides
        _CODE_STAMP = h.hexdigest()
    return _CODE_STAMP


def run_json_key(path: Path) -> dict:
    """The key of run.json, and when it was taken: collect() takes it before reading run.json."""
    return {"": time.time(), rundir.RUN_JSON: _stat_key(f"{path}{os.sep}{rundir.RUN_JSON}")}


def _stat_key(path: str) -> tuple[str, int]:
    """What tells a file's contents apart without reading it, "inode:size:mtime:ctime" (ns; "-" for
    a missing or unreadable file), and its mtime. ctime cannot be set back, so a rewrite that restores
    the size and the mtime still shows."""
    try:
        s = os.stat(path)
    except OSError:
        return "-", 0
    return f"{s.st_ino}:{s.st_size}:{s.st_mtime_ns}:{s.st_ctime_ns}", s.st_mtime_ns


def source_keys(path: Path, record: dict) -> dict[str, tuple[str, int] | None]:
    """The key of every file a run's status is computed from, except run.json (collect() stats it
    before reading it). Names inside the run directory are relative, so a moved run keeps its cache."""
    names = [rundir.ATTEMPTS, rundir.HEARTBEAT, rundir.SUMMARY, rundir.METRICS]
    for entry in record.get("submissions", []) + record.get("evals", []):
        try:
            names.append(_result_pickle(entry, path))
        except Exception:  # a job id submitit cannot name: nothing to key on, so nothing cached
            names.append("")
    for entry in record.get("evals", []):
        out = Path(entry.get("output_dir") or rundir.eval_dir(path, str(entry.get("eval_id", ""))))
        names.append(str(out / rundir.EVAL))
    base = str(path) + os.sep
    return {n.removeprefix(base): _stat_key(n if n.startswith(os.sep) else base + n) if n else None for n in names}


_PROBE = "0tla0job0"
_PICKLE_NAME: list[str] = []  # submitit's name of a result pickle, split where the job id goes


def _result_pickle(entry: dict, run: Path) -> str:
    """pickles.result_path of a job, as a string, for 10,000 runs: submitit's JobPaths names the file
    in the folder by putting the job id into a pattern, so the name is taken from it once (a probe id,
    checked to come out as the pattern's only change) and filled in; anything else asks JobPaths."""
    folder, job = str(local.folder_of(entry, run)), job_of(entry)
    if not _PICKLE_NAME:
        probe = pickles.result_path(Path(os.sep, "x"), _PROBE)
        parts = probe.name.split(_PROBE)
        _PICKLE_NAME.extend(parts if len(parts) == 2 and str(probe.parent) == os.sep + "x" else ["", "", "?"])
    if len(_PICKLE_NAME) == 2 and os.path.isabs(folder) and "%" not in folder and job.replace("_", "").isdigit():
        return f"{folder}{os.sep}{_PICKLE_NAME[0]}{job}{_PICKLE_NAME[1]}"
    return str(pickles.result_path(Path(folder), job))


def cacheable(st: RunStatus, view: SchedulerView) -> bool:
    """Only a run whose status no scheduler, process or clock can change any more (see above)."""
    if st.problems or st.state in ("DAMAGED", "UNKNOWN", "NOT SUBMITTED") or st.state in ACTIVE:
        return False
    _ = st.progress  # reads metrics.jsonl when the heartbeat lacks the figures: its damage is known now
    if st.problems or any(ev.state in ACTIVE or ev.state == "UNKNOWN" for ev in st.evals):
        return False
    jobs = st.record.get("submissions", []) + st.record.get("evals", [])
    if any(j.get("executor") == "slurm" for j in jobs):
        if st.decided_by not in ("attempts", rundir.RUN_JSON) or view.source != "sacct":
            return False  # settled by the scheduler: a requeue may still change it
        for j in jobs:
            recs = view.jobs.get(job_of(j), []) if j.get("executor") == "slurm" else []
            if j.get("executor") == "slurm" and (not recs or any(r.state in ACTIVE or r.source != "sacct"
                                                                  for r in recs)):
                return False
    return not any(r.state in ACTIVE for r in st.jobs)


def store(st: RunStatus, keys: dict) -> RunStatus | None:
    """Write the run's status cache, and return the status as read back from it (None when nothing
    was written); ``keys``: the files' keys, and under "" when they were taken.

    Three lines, so that a reader decodes only what it uses: the header (what it is valid for, and
    the run's state and last activity: all a listing needs to filter and order runs; plain fields
    between tabs, as splitting them costs a third of decoding JSON), the run's `tla status --json`
    form without its name and path (printed as it is), and the rest of the status (run.json's record,
    summary.json, the progress figures when metrics.jsonl gave them)."""
    progress_in_beat = isinstance((st.heartbeat or {}).get("progress"), dict)  # then metrics.jsonl was not used
    taken = keys.get("")
    keys = {k: v for k, v in keys.items() if k and not (progress_in_beat and k == rundir.METRICS)}
    newest = max((v[1] for v in keys.values() if v is not None), default=0)
    if None in keys.values() or not isinstance(taken, float) or newest > (taken - RACY_S) * 1e9:
        return None  # a file changed moments before it was read (or cannot be keyed): computed again next time
    fields = [str(CACHE_FORMAT), _code_stamp(), str(newest), st.state, repr(float(st.last_activity)),
              ",".join(v[0] for v in keys.values()), st.name, *keys]
    if any("\t" in f or "\n" in f for f in fields):
        return None  # a name the header cannot hold
    target = st.path / rundir.STATUS_CACHE
    tmp = f"{target}.{_HOST}.{os.getpid()}.tmp"  # unique to this process, on any host sharing the folder
    try:
        form = st.as_json()
        del form["run"], form["path"]
        head = "\t".join(fields).encode()
        body = "\n".join([
            json.dumps(form, default=str),
            json.dumps({"record": st.record, "summary": st.summary, "decided_by": st.decided_by,
                        "progress": None if progress_in_beat else st.progress}), ""]).encode()
        data = head + b"\n" + body
        signature = signing.sign(data)
        if signature is None:
            return None  # no key to prove it with: no cache
        data = signature.encode() + b"\n" + data
        # O_EXCL | O_NOFOLLOW: never through a link (or into a file) someone left under that name
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)  # the umask decides
        try:
            if os.write(fd, data) != len(data):
                raise OSError("short write")
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except (OSError, TypeError, ValueError):  # read-only or full, or a value JSON cannot hold: no cache
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return None
    return CachedStatus(st.path, st.name, st.state, float(st.last_activity), body)


def load(path: Path) -> RunStatus | None:
    """The run's cached status if it is valid for its files now (see above), else None. Plain
    strings and system calls: this runs once a run, 10,000 times for a large runs root."""
    d = f"{path}{os.sep}"
    try:  # O_NONBLOCK: a FIFO in its place answers at once instead of waiting for a writer
        fd = os.open(d + rundir.STATUS_CACHE, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:  # none (yet), or unreadable
        return None
    try:
        try:
            written = os.fstat(fd)
            if not stat.S_ISREG(written.st_mode) or written.st_size > MAX_BYTES:
                return None
            data = os.read(fd, written.st_size + 1)
        finally:
            os.close(fd)
        if len(data) != written.st_size:
            return None  # replaced while it was read
        cut = data.index(b"\n")
        if not signing.verify(data[cut + 1:], data[:cut]):
            return None  # not written by tla for this user (forged, edited, another user's): computed again
        data = data[cut + 1:]
        cut = data.index(b"\n")
        # format, code stamp, newest mtime, state, last activity, key, name, the files (see store)
        head = data[:cut].decode().split("\t")
        if len(head) < 8 or head[0] != str(CACHE_FORMAT) or head[1] != _code_stamp() \
                or int(head[2]) > written.st_mtime_ns - RACY_S * 1e9:
            return None
        if ",".join([_stat_key(n if n.startswith(os.sep) else d + n)[0] for n in head[7:]]) != head[5]:
            return None
        return CachedStatus(path, head[6], head[3], float(head[4]), data[cut + 1:])
    except (OSError, ValueError, IndexError, KeyError, TypeError, AttributeError):  # unreadable, another shape
        return None


class CachedStatus(RunStatus):
    """A finished run's status from its cache, decoded only as far as it is used: name, state and
    last activity at once (a listing filters and orders 10,000 runs by them), the rest on first use,
    and `--json` prints the cached form as it is."""

    _LAZY = ("record", "source", "attempts", "jobs", "heartbeat", "summary", "gpu_hours", "last_event", "evals",
             "waiting_for_ranks", "decided_by")

    def __init__(self, path: Path, name: str, state: str, last_activity: float, body: bytes):
        # not RunStatus.__init__: the fields of _LAZY are properties here, filled from ``body`` when first read
        self.name, self.path, self.state, self._last_activity, self._body = name, path, state, last_activity, body
        self.problems: list[str] = []
        self._metrics = None
        self._progress = None
        self._fields: dict | None = None

    def _field(self, name: str):
        if self._fields is None:
            form, rest = self._body.split(b"\n", 2)[:2]
            j, r = json.loads(form), json.loads(rest)
            self._fields = {
                "record": r["record"], "summary": r["summary"], "decided_by": r["decided_by"],
                "source": j["source"], "attempts": j["attempts"], "heartbeat": j["heartbeat"],
                "gpu_hours": j["gpu_hours"], "last_event": j["last_event"],
                "waiting_for_ranks": j["waiting_for_ranks"], "jobs": [JobRecord(**x) for x in j["jobs"]],
                "evals": [EvalStatus(**x) for x in j["evals"]]}
            if self._progress is None:
                self._progress = r["progress"]
        return self._fields[name]

    @property
    def last_activity(self) -> float:
        return self._last_activity

    def json_text(self) -> str:
        if self.problems:  # found since (metrics.jsonl read for a named run): computed with them
            return super().json_text()
        form = self._body.split(b"\n", 1)[0].decode()
        return f'{{"run": {json.dumps(self.name)}, "path": {json.dumps(str(self.path))}, {form[1:]}'


for _name in CachedStatus._LAZY:
    setattr(CachedStatus, _name, property(lambda self, _n=_name: self._field(_n)))
