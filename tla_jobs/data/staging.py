"""--stage-data DIR: the packed shards copied once per node to a local disk at job start.

Every rank calls :func:`stage` before the process group forms. The first rank of a node to take the
lock (flock on a file in DIR: DIR is node-local, so the lock is per node) copies; the others wait for
it and then find the copy finished. Each shard is copied to a temporary file while its sha256 is
computed, checked against the manifest, fsynced and renamed; the manifest is copied last, so a folder
with a manifest is a whole, verified copy. A later job on the same node (DIR kept, e.g. a node-local
SSD) finds it there: the manifest equal to the source's and every shard of its recorded size, so
it is used without copying. A shard left by a staging that was killed is kept only when its sha256
matches. When DIR has not the room (checked first, and a full disk while copying), the job reads
the data in place with a one-line warning instead of failing.

Only packed folders (`tla data pack`) are staged: copying an ImageFolder file by file is the metadata
storm that staging is meant to avoid. Written here rather than with a library (rsync, fsspec): it
needs the checksums of the manifest, the node-wide lock and the fallback, and is a copy loop.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from tla_jobs.data import shards
from tla_jobs.fsutil import _fsync_dir

log = logging.getLogger("tla.data")
CHUNK = 8 << 20
POLL_S = 0.5


def _name(src: Path, manifest: dict) -> str:
    """The copy's folder name: the source's name and a digest of its manifest (another packing of the
    same name gets another folder)."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:12]
    return f"{src.name}-{digest}"


def _files(manifest: dict) -> list[dict]:
    return [m for split in shards.SPLITS for m in manifest["splits"][split]["shards"]]


def staged(dest: Path, manifest: dict) -> bool:
    """Is ``dest`` a finished copy of the packing ``manifest`` describes (its manifest equal, each shard
    of its recorded size; the checksums were verified when it was copied)?"""
    try:
        if json.loads((dest / shards.MANIFEST).read_text()) != manifest:
            return False
        return all((dest / m["name"]).stat().st_size == m["bytes"] for m in _files(manifest))
    except (OSError, ValueError):
        return False


def _copy_verified(src: Path, dst: Path, sha256: str | None, done: Callable[[int], None]) -> None:
    """src → dst through a temporary file, hashed on the way; renamed only when the hash matches."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with open(src, "rb") as fin, open(tmp, "wb") as fout:
            while chunk := fin.read(CHUNK):
                fout.write(chunk)
                h.update(chunk)
                done(len(chunk))
            fout.flush()
            os.fsync(fout.fileno())
        if sha256 is not None and h.hexdigest() != sha256:
            raise ValueError(f"{src} does not match its manifest (sha256 {h.hexdigest()[:12]}… != {sha256[:12]}…)")
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _copy(src: Path, dest: Path, manifest: dict, progress: Callable[[int, int], None]) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    (dest / shards.MANIFEST).unlink(missing_ok=True)  # not a finished copy until the manifest is back
    for tmp in dest.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
    files = _files(manifest)
    total = sum(m["bytes"] for m in files)
    copied = 0

    def done(n: int) -> None:
        nonlocal copied
        copied += n
        progress(copied, total)

    progress(0, total)
    for m in files:
        target = dest / m["name"]
        if target.is_file() and target.stat().st_size == m["bytes"] and shards.file_sha256(target) == m["sha256"]:
            done(m["bytes"])  # left whole by a staging that was stopped
            continue
        _copy_verified(src / m["name"], target, m["sha256"], done)
        index = m["name"].removesuffix(".tar") + ".idx.json"
        _copy_verified(src / index, dest / index, None, lambda n: None)
    for small in (shards.CLASSES, *(f"{s}.wids.json" for s in shards.SPLITS)):
        if (src / small).is_file():
            _copy_verified(src / small, dest / small, None, lambda n: None)
    for m in files:  # indices of shards kept from before: copied again (small), they must match the source
        index = m["name"].removesuffix(".tar") + ".idx.json"
        if not (dest / index).is_file():
            _copy_verified(src / index, dest / index, None, lambda n: None)
    _copy_verified(src / shards.MANIFEST, dest / shards.MANIFEST, None, lambda n: None)
    _fsync_dir(dest)


def _room(root: Path, dest: Path, manifest: dict) -> tuple[int, int]:
    """(bytes still to copy, bytes free on the disk of ``root``)."""
    need = 0
    for m in _files(manifest):
        try:
            have = (dest / m["name"]).stat().st_size
        except OSError:
            have = 0
        need += m["bytes"] if have != m["bytes"] else 0
    return need, shutil.disk_usage(root).free


def stage(src: str | os.PathLike, root: str | os.PathLike,
          progress: Callable[[int, int], None] | None = None,
          waiting: Callable[[], None] | None = None) -> Path:
    """The folder to read the data from: ``src`` copied under ``root`` (once per node), or ``src``
    itself when it cannot be (not packed, no room). ``progress(copied, total)`` is called by the rank
    that copies; ``waiting()`` every half second by the ranks that wait for it."""
    src = Path(src).expanduser()
    expanded = os.path.expandvars(str(root))
    if "$" in expanded:
        log.warning("--stage-data %s names a variable that is not set here: reading %s in place", root, src)
        return src
    root = Path(expanded).expanduser()
    if not shards.is_packed(src):
        log.warning("--stage-data copies packed folders only (`tla data pack`; copying an ImageFolder file by "
                    "file is the load staging avoids): reading %s in place", src)
        return src
    manifest = shards.read_manifest(src)
    dest = root / _name(src, manifest)
    if staged(dest, manifest):
        log.info("data already staged in %s", dest)
        return dest
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = open(root / f".{dest.name}.lock", "a")  # held across the copy, closed below
    except OSError as exc:
        log.warning("cannot stage the data in %s (%s): reading %s in place", root, exc.strerror or exc, src)
        return src
    try:
        while True:  # not a blocking flock: the ranks that wait keep reporting (heartbeat)
            try:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waiting:
                    waiting()
                time.sleep(POLL_S)
        if staged(dest, manifest):  # another rank of this node copied it while this one waited
            return dest
        need, free = _room(root, dest, manifest)
        if need > free:
            log.warning("not enough room to stage the data in %s (%.1f GB needed, %.1f GB free): reading %s in place",
                        root, need / 1e9, free / 1e9, src)
            return src
        t = time.monotonic()
        try:
            _copy(src, dest, manifest, progress or (lambda *_: None))
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            log.warning("the disk of %s filled up while staging the data (%s): reading %s in place", root,
                        exc.strerror, src)
            return src
        except ValueError as exc:  # a shard that does not match its manifest: the source is damaged
            from tla_jobs.errors import DataError

            raise DataError(f"cannot stage the data: {exc}: pack it again") from None
        total = sum(m["bytes"] for m in _files(manifest))
        log.info("staged %s to %s: %.2f GB in %.0f s", src, dest, total / 1e9, time.monotonic() - t)
        return dest
    finally:
        lock.close()  # releases the flock


def stage_for_run(root: str, data: Path, out: Path, rank: int, world_size: int) -> Path:
    """:func:`stage` at a job's start; the job's rank 0 reports in the run's heartbeat (phase "staging",
    bytes copied of the total) so that `tla status` says that the run is staging and how far it is."""
    from tla_jobs import __version__, rundir
    from tla_jobs.fsutil import atomic_write_json

    last = [0.0]

    def beat(copied: int | None, total: int | None, force: bool = False) -> None:
        now = time.time()
        if rank != 0 or (now - last[0] < 2.0 and not force):
            return
        last[0] = now
        atomic_write_json(out / rundir.HEARTBEAT, {
            "phase": "staging", "staged_bytes": copied, "stage_bytes": total, "stage_dir": str(root),
            "world_size": world_size, "time": now, "version": __version__, **rundir.job_identity()})

    beat(0, None, force=True)
    return stage(data, root, progress=lambda copied, total: beat(copied, total, force=copied == total),
                 waiting=lambda: beat(None, None))
