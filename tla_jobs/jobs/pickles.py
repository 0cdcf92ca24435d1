"""submitit's result pickles, read without running code: how a job's program ended (both backends)."""

from __future__ import annotations

import pickle
from pathlib import Path


class _PlainUnpickler(pickle.Unpickler):
    """submitit's result pickles hold ("success", result) or ("error", traceback text); a status
    command has no business running code from a shared folder, so only plain types load."""

    def find_class(self, module, name):
        if module == "builtins" and name in {"tuple", "list", "dict", "str", "int", "float", "bool", "set"}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} refused")


def result_path(folder: Path, job_id: str) -> Path:
    """Task 0's result pickle, as submitit names it."""
    from submitit.core.utils import JobPaths

    return JobPaths(folder, str(job_id), 0).result_pickle


MAX_BYTES = 64 << 20  # a job's result: a summary dict or a traceback's text


def _load(folder: Path, job_id: str):
    import io

    from tla_jobs.fsutil import read_regular

    # read_regular: a FIFO or a device in its place is refused (UnsafeFile), never read until it ends
    return _PlainUnpickler(io.BytesIO(read_regular(result_path(folder, job_id), MAX_BYTES))).load()


def outcome(folder: Path, job_id: str) -> str | None:
    """'success' / 'error' from submitit's result pickle of task 0, or None when there is none."""
    path = result_path(folder, job_id)
    if not path.is_file():
        return None
    try:
        return str(_load(folder, job_id)[0])
    except Exception:
        return "success" if path.stat().st_size else None


def error(folder: Path, job_id: str) -> str:
    """The last line of the traceback in submitit's error pickle ('' when there is none)."""
    try:
        result = _load(folder, job_id)
        if str(result[0]) == "error":
            lines = [ln.strip() for ln in str(result[1]).splitlines() if ln.strip()]
            return lines[-1][:300] if lines else "error"
    except Exception:
        pass
    return ""
