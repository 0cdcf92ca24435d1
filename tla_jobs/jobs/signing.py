"""Proof that a cache entry was written by tla for this user: an HMAC with a key only this user reads.

tla keeps two caches (a finished run's status beside the run, jobs/status_cache.py; the recipes whose
model check passed, jobs/check_cache.py). Their content is what tla would otherwise compute, so a
hand-written or edited cache would be believed: a teammate's forged `.status-cache.json` showing a
fake top-1, a key added to model-checks.json letting an unknown model pass preflight. Whatever a cache
can check against the files it was made from it checks; what it cannot (the computed state, a key's
meaning) is signed with a key kept in the user's cache folder (mode 0600), made once from
os.urandom. A cache whose signature does not verify is ignored and computed again: never shown.
Without a usable key (a read-only home) nothing is cached, and tla computes everything as before.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import os
from pathlib import Path

KEY_BYTES = 32


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tla"


@functools.cache
def _key(where: str) -> bytes | None:
    from tla_jobs.fsutil import UnsafeFile, read_regular

    path = Path(where)
    for _ in range(2):
        try:
            key = read_regular(path, 256)
            return key if len(key) == KEY_BYTES else None  # damaged: no cache rather than a guessable key
        except FileNotFoundError:
            pass
        except (OSError, UnsafeFile):
            return None
        try:  # made once, atomically: a temporary file linked into place (the first of two racing wins)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            try:
                os.write(fd, os.urandom(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
            os.unlink(tmp)
        except OSError:
            return None
    return None


def key() -> bytes | None:
    """This user's cache key (None when none can be kept)."""
    return _key(str(cache_dir() / "cache-key"))


def sign(data: bytes) -> str | None:
    k = key()
    return hmac.new(k, data, hashlib.sha256).hexdigest() if k else None


def verify(data: bytes, signature: str | bytes) -> bool:
    expected = sign(data)
    if expected is None:
        return False
    if isinstance(signature, bytes):
        signature = signature.decode("ascii", "replace")
    return hmac.compare_digest(expected, signature)
