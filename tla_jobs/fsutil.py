"""Crash-safe file writes and a lock for files that several `tla` processes update.

The run directory lives on a shared filesystem and is the record of a run, so every file in it is
written whole or not at all: temporary file in the same folder, fsync, rename, fsync the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


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


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    tmp = write_temp(path.parent, data, f".{path.name}.", target=path)
    try:
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json_checked(path: str | Path, default: Any = None) -> tuple[Any, str | None]:
    """(value, None) for a good file, (default, None) for a missing one, and (default, what is wrong)
    for a file that is there but cannot be used: truncated, empty, not JSON, a directory, unreadable."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return default, None
    except IsADirectoryError:
        return default, f"{Path(path).name} is a directory"
    except UnicodeDecodeError:
        return default, f"{Path(path).name} is not text"
    except OSError as exc:
        return default, f"{Path(path).name} is unreadable ({exc.strerror})"
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


def read_jsonl_checked(path: str | Path) -> tuple[list[dict], str | None]:
    """Rows of a JSON-lines file, and what is wrong with it (None when nothing): lines that are
    not JSON objects are left out and counted. Parsed as one JSON array when every line is good
    (a single decoder call: `tla status` reads thousands of these)."""
    name = Path(path).name
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return [], None
    except IsADirectoryError:
        return [], f"{name} is a directory"
    except UnicodeDecodeError:
        return [], f"{name} is not text"
    except OSError as exc:
        return [], f"{name} is unreadable ({exc.strerror})"
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
def locked(path: str | Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path``.lock (flock; also honoured across NFS clients with
    lockd, and always between processes of one node)."""
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
