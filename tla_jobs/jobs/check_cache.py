"""Remembered model checks: a recipe whose model check passed once is not checked again.

The model check (tla_jobs/train/preflight.py) imports torch and timm and builds the model on the meta
device: about 4 s of the 5.5 s a `tla submit train` took, spent again on every submission of the same
recipe (a sweep resubmitted, the next seed, a resume). A pass is remembered under a key made of the
recipe's fields (all but those that cannot change the model: seed, run directory, data folder), the
versions of torch, torchvision and timm (read from their metadata, not imported) and the code of the
checks themselves (tla's version and its check modules' sizes and mtimes): any change there checks
again. Failures are never remembered. The file is a cache: unreadable or damaged, it is ignored.
It holds each key signed with the user's cache key (jobs/signing.py), not the key itself: a key
added by hand (e.g. computed for `--model resnet18`) proves nothing and is not believed.
"""

from __future__ import annotations

import functools
import hashlib
import json
from importlib import metadata
from pathlib import Path

from tla_jobs import __version__
from tla_jobs.errors import TlaError

# Fields that cannot change whether the model builds and aligns.
UNRELATED = ("seed", "output_dir", "run_dir", "data_path", "epochs", "extend", "max_steps", "step_delay",
             "step_delay_once", "fail_at_step", "tensorboard", "wandb", "checkpoint_every_min",
             "checkpoint_every_epochs", "keep_last", "keep_best")
# The code the check runs, by module file.
CHECK_CODE = ("config.py", "train/preflight.py", "train/models.py", "align/__init__.py", "align/attention.py",
              "align/models.py", "align/cutmix.py", "data/loaders.py")
KEEP = 500  # remembered passes; the oldest go first


def path() -> Path:
    from tla_jobs.jobs.signing import cache_dir

    return cache_dir() / "model-checks.json"


@functools.cache  # once per process: a sweep keys every run's spec against the same libraries and code
def _versions() -> tuple[str, ...]:
    out = [__version__]
    for dist in ("torch", "torchvision", "timm"):
        try:
            out.append(f"{dist}={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            out.append(f"{dist}=none")
    root = Path(__file__).resolve().parent.parent
    for rel in CHECK_CODE:
        try:
            st = (root / rel).stat()
            out.append(f"{rel}:{st.st_size}:{st.st_mtime_ns}")
        except OSError:
            out.append(f"{rel}:missing")
    return tuple(out)


def key(spec: dict) -> str:
    recipe = {k: v for k, v in sorted(spec.items()) if k not in UNRELATED}
    text = json.dumps([recipe, _versions()], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _read() -> list[str]:
    from tla_jobs.fsutil import UnsafeFile, read_regular_text

    try:
        keys = json.loads(read_regular_text(path(), 1 << 20))  # 500 signatures are 33 KB
        return [k for k in keys if isinstance(k, str)] if isinstance(keys, list) else []
    except (OSError, ValueError, UnsafeFile):
        return []


def passed(k: str) -> bool:
    from tla_jobs.jobs.signing import sign

    signed = sign(k.encode())
    return signed is not None and signed in _read()


def remember(k: str) -> None:
    """Add a pass; a cache that cannot be written (a read-only home) is simply not kept."""
    from tla_jobs.fsutil import atomic_write_text
    from tla_jobs.jobs.signing import sign

    signed = sign(k.encode())
    if signed is None:
        return
    keys = [x for x in _read() if x != signed] + [signed]
    try:
        path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path(), json.dumps(keys[-KEEP:]))
    except (OSError, TlaError):  # TlaError: fsutil refused a link or FIFO in its place
        pass
