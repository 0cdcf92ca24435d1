"""Crash-safe file writes and a lock for files that several `tla` processes update.

The run directory lives on a shared filesystem and is the record of a run, so every file in it is
written whole or not at all: temporary file in the same folder, fsync, rename, fsync the folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tla_jobs.errors import ChecksFailed

# Size bounds of what tla reads (a run file pointing at /dev/zero or a 4 GB file is damage, not data).
# Generous for what each file can be: run.json grows by a few hundred bytes a submission, a JSONL a line
# an epoch or an attempt (300,000 attempts are about 60 MB).
MAX_JSON = 32 << 20
MAX_JSONL = 256 << 20
MAX_TEXT = 4 << 20  # configs, profiles, sidecars, caches

_KIND = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
         stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


class UnsafeFile(ChecksFailed):
    """A file tla would read or write is not a plain file of its own: a FIFO, a device, a socket, a
    directory, a symbolic link where tla writes, or far larger than the file can be. Reading a FIFO
    hangs, /dev/zero never ends, and writing through a link writes outside the run directory."""

    def __init__(self, path: str | Path, what: str):
        super().__init__(f"{path} is {what}")
        self.path, self.what = str(path), what


def kind_of(mode: int) -> str:
    return _KIND.get(stat.S_IFMT(mode), "not a regular file")


def open_regular(path: str | Path) -> tuple[int, os.stat_result]:
    """A read-only descriptor of a regular file and its stat. FileNotFoundError when it is missing;
    UnsafeFile (the descriptor closed) for a FIFO, device, socket or directory. Opened O_NONBLOCK, so
    that a FIFO answers at once instead of waiting for a writer."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(path, kind_of(st.st_mode))
    return fd, st


def read_regular(path: str | Path, limit: int = MAX_TEXT) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (open_regular says what else it may raise;
    UnsafeFile too when it is larger than ``limit``)."""
    fd, st = open_regular(path)
    try:
        if st.st_size > limit:
            raise UnsafeFile(path, f"{st.st_size:,} bytes, more than such a file can be ({limit:,})")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:  # grew while read
                raise UnsafeFile(path, f"more than {limit:,} bytes, more than such a file can be")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_tail(path: str | Path, limit: int) -> bytes:
    """At most the last ``limit`` bytes of a regular file (a log: what matters is at its end; a 4 GB
    log or one linked to /dev/zero must not take a `tla logs` down). UnsafeFile for a non-regular file."""
    fd, st = open_regular(path)
    try:
        start = max(0, st.st_size - limit)
        chunks, total = [], 0
        while total < limit:
            chunk = os.pread(fd, min(1 << 20, limit - total), start + total)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        data = b"".join(chunks)
        return data.split(b"\n", 1)[-1] if start and b"\n" in data else data  # no cut first line
    finally:
        os.close(fd)


def read_regular_text(path: str | Path, limit: int = MAX_TEXT) -> str:
    """read_regular as UTF-8 text (UnicodeDecodeError for a binary file)."""
    return read_regular(path, limit).decode("utf-8")


def open_for_append(path: str | Path) -> int:
    """A file descriptor appending to ``path`` (created when missing), never through a symbolic link and
    only to a regular file: a run file linked out of the run directory would have tla write where the
    link points, a FIFO would block the writer. UnsafeFile says which."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                     0o666)  # the umask decides, as for other files
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UnsafeFile(path, "a symbolic link: tla writes only inside the run directory") from None
        if exc.errno == errno.ENXIO:  # a FIFO with no reader
            raise UnsafeFile(path, "a FIFO") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise UnsafeFile(path, kind_of(st.st_mode))
    os.set_blocking(fd, True)
    return fd


def refuse_links(base: str | Path, path: str | Path) -> None:
    """Raise UnsafeFile if a folder between ``base`` (itself not checked: a runs root may well live
    behind a link) and ``path``, or ``path`` itself, is a symbolic link: writing there would leave
    the run directory."""
    base, path = Path(base), Path(path)
    try:
        rel = path.relative_to(base)
    except ValueError:
        return
    here = base
    for part in rel.parts:
        here = here / part
        try:
            if stat.S_ISLNK(os.lstat(here).st_mode):
                raise UnsafeFile(here, "a symbolic link: tla writes only inside the run directory")
        except FileNotFoundError:
            return


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some network filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, without changing it (Linux reports it in /proc; elsewhere set and restore)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_temp(folder: Path, data: bytes, prefix: str, target: Path | None = None) -> Path:
    """Write ``data`` to a new fsynced temporary file in ``folder`` and return its path.

    The file gets the mode any new file of this process gets (0666 less the umask), not mkstemp's
    0600: a run directory on a shared filesystem is read by teammates as well. A failed write
    (disk full, quota) removes the temporary file and names ``target`` in the error.
    """
    folder.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    except OSError as exc:  # name the file the user knows, not the temporary one
        raise OSError(exc.errno, exc.strerror, str(target or folder)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(target or tmp)) from None
        raise
    return Path(tmp)


def atomic_write_bytes(path: str | Path, data: bytes, replace: bool = True) -> None:
    """Write ``path`` whole or not at all. ``replace=False``: FileExistsError when ``path`` exists, also
    when another process creates it meanwhile (the file is linked into place, which never replaces)."""
    path = Path(path)
    tmp = write_temp(path.parent, data, f".{path.name}.", target=path)
    try:
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str, replace: bool = True) -> None:
    atomic_write_bytes(path, text.encode(), replace)


def atomic_write_json(path: str | Path, obj: Any, replace: bool = True) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", replace)


def read_text_checked(path: str | Path, limit: int) -> tuple[str | None, str | None]:
    """(text, None), (None, None) for a missing file, (None, what is wrong: not a regular file, larger than
    ``limit``, a directory, not text, unreadable)."""
    name = Path(path).name
    try:
        return read_regular_text(path, limit), None
    except FileNotFoundError:
        return None, None
    except UnsafeFile as exc:
        return None, f"{name} is {exc.what}"
    except IsADirectoryError:
        return None, f"{name} is a directory"
    except UnicodeDecodeError:
        return None, f"{name} is not text"
    except OSError as exc:
        return None, f"{name} is unreadable ({exc.strerror})"


def read_json_checked(path: str | Path, default: Any = None, limit: int = MAX_JSON) -> tuple[Any, str | None]:
    """(value, None) for a good file, (default, None) for a missing one, and (default, what is wrong)
    for a file that is there but cannot be used: truncated, empty, not JSON, a directory, unreadable,
    not a regular file, larger than ``limit``."""
    text, problem = read_text_checked(path, limit)
    if text is None:
        return default, problem
    if not text.strip():
        return default, f"{Path(path).name} is empty"
    try:
        return json.loads(text), None
    except (json.JSONDecodeError, RecursionError) as exc:
        where = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        return default, f"{Path(path).name} is not valid JSON{where} (truncated?)"


def read_json(path: str | Path, default: Any = None) -> Any:
    """The file's JSON value; ``default`` when it is missing or damaged (read_json_checked says which)."""
    return read_json_checked(path, default)[0]


def read_jsonl_checked(path: str | Path, limit: int = MAX_JSONL) -> tuple[list[dict], str | None]:
    """Rows of a JSON-lines file, and what is wrong with it (None when nothing): lines that are
    not JSON objects are left out and counted. Parsed as one JSON array when every line is good
    (a single decoder call: `tla status` reads thousands of these)."""
    name = Path(path).name
    text, problem = read_text_checked(path, limit)
    if text is None:
        return [], problem
    lines = [ln for ln in text.splitlines() if ln.strip()]
    try:
        rows = json.loads("[" + ",".join(lines) + "]")
        if all(isinstance(r, dict) for r in rows):
            return rows, None
    except (json.JSONDecodeError, RecursionError):
        pass
    rows, bad = [], 0
    for line in lines:
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            row = None
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, (f"{name}: {bad} of {len(lines)} lines damaged" if bad else None)


def read_jsonl(path: str | Path) -> list[dict]:
    """The good rows of a JSON-lines file (read_jsonl_checked also says what was left out)."""
    return read_jsonl_checked(path)[0]


@contextlib.contextmanager
def locked(path: str | Path, wait: bool = True, busy: str = "") -> Iterator[None]:
    """An exclusive advisory lock on ``path``.lock (flock; also honoured across NFS clients with
    lockd, and always between processes of one node). The lock file is never a link or a FIFO
    (UnsafeFile). ``wait=False``: a lock another process holds raises TlaError(``busy``) at once."""
    from tla_jobs.errors import TlaError

    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = open_for_append(lock)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise TlaError(busy or f"{path} is busy: another tla process holds its lock") from None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
