"""A run's checkpoints without torch: what is on disk, what each one is, and pruning old ones.

Each ``X.pth`` of a run directory has a sidecar ``X.pth.sha256`` (written by the trainer before the
data, see tla_jobs/train/checkpoint.py) and, since 0.5, a line in ``checkpoints.jsonl`` written after
it (:func:`log_line`). :func:`list_checkpoints` joins the three by sha256: the bytes of
checkpoint_last, checkpoint_best and checkpoint_epoch{N} of one save are identical, and
checkpoint_prev is a renamed checkpoint_last, so its line is the one written under the old name.

Pruning (:func:`prune`, the trainer's --keep-last/--keep-best and `tla checkpoints prune`) only ever
removes periodic checkpoint_epoch{N}.pth files, never checkpoint_last / checkpoint_prev (what a
running or requeued attempt resumes from), checkpoint_best, nor the checkpoint a new attempt would
resume from when last and prev are missing or damaged (:func:`resume_target`, the trainer's own order).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import time
from pathlib import Path

from tla_jobs import rundir
from tla_jobs.errors import TlaError
from tla_jobs.fsutil import UnsafeFile, open_regular, read_json, read_jsonl, read_text_checked

WHICH = {rundir.CHECKPOINT_LAST: "last", rundir.CHECKPOINT_PREV: "prev", rundir.CHECKPOINT_BEST: "best"}
ORDER = {"last": 0, "prev": 1, "best": 2, "epoch": 3, "other": 4}
# What the listing takes from a checkpoint's log line.
LOGGED = ("epochs_done", "step_in_epoch", "global_step", "acc1", "acc5", "ema_acc1", "ema_acc5", "ema")


def sidecar(path: Path) -> Path:
    """``X.pth.sha256``, the sha256 of ``X.pth`` as `sha256sum` writes it."""
    return path.with_name(path.name + ".sha256")


SHA256_RE = re.compile(r"[0-9a-f]{64}")


def sidecar_checked(path: Path) -> tuple[str | None, str | None]:
    """(digest, None) for a good sidecar of ``path``, (None, None) when there is none, and (None, what
    is wrong) for one that is there but holds no digest: empty, binary, a directory, a FIFO, huge."""
    name = sidecar(path).name
    text, problem = read_text_checked(sidecar(path), 4096)  # "DIGEST  NAME\n": a few dozen bytes
    if text is None:
        return None, problem
    word = text.split()[0] if text.split() else ""
    if not SHA256_RE.fullmatch(word):
        return None, f"{name} holds no sha256 digest" if word else f"{name} is empty"
    return word, None


def read_sidecar(path: Path) -> str | None:
    """The digest recorded beside ``path``; None when the sidecar is missing or damaged
    (sidecar_checked says which)."""
    return sidecar_checked(path)[0]


def file_sha256(path: Path) -> str:
    """sha256 of a regular file (UnsafeFile for a FIFO or device, whose read would never end)."""
    h = hashlib.sha256()
    with os.fdopen(open_regular(path)[0], "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def is_good(path: Path) -> bool:
    """The file is there and hashes to its sidecar's digest (a full read of the file)."""
    expected = read_sidecar(path)
    try:
        return expected is not None and file_sha256(path) == expected
    except (OSError, UnsafeFile):
        return False


def epoch_number(name: str) -> int | None:
    m = re.fullmatch(rundir.CHECKPOINT_EPOCH_RE, name)
    return int(m.group(1)) if m else None


def candidates(folder: Path) -> list[Path]:
    """Resumable checkpoints of a run in the order a new attempt tries them: the last one, then the
    others (prev, epoch N) newest first by write time."""
    others = [folder / rundir.CHECKPOINT_PREV, *(p for p in folder.glob("checkpoint_epoch*.pth")
                                                 if epoch_number(p.name) is not None)]
    mtimes = {}
    for p in others:
        try:
            mtimes[p] = p.stat().st_mtime
        except OSError:  # missing, or removed meanwhile
            pass
    last = folder / rundir.CHECKPOINT_LAST
    return [last] * last.exists() + sorted(mtimes, key=mtimes.get, reverse=True)


def resume_target(folder: Path, trust_last: bool = False) -> Path | None:
    """The checkpoint a new attempt of this run would resume from: the first of :func:`candidates`
    whose bytes match its sidecar. ``trust_last``: checkpoint_last was just written by the caller."""
    for path in candidates(folder):
        if (trust_last and path.name == rundir.CHECKPOINT_LAST) or is_good(path):
            return path
    return None


# ---- the log line (written by the trainer) and the listing -----------------------------------------


def log_line(name: str, digest: str, size: int, progress: dict, metrics: dict | None, ema: bool) -> dict:
    """One line of checkpoints.jsonl for a checkpoint just written: ``progress`` is where training
    stood (epoch, step_in_epoch, global_step), ``metrics`` the metrics.jsonl row measured on exactly
    these weights (None for a checkpoint written mid-epoch)."""
    m = metrics or {}
    return {
        "name": name,
        "sha256": digest,
        "bytes": size,
        "epochs_done": progress["epoch"],
        "step_in_epoch": progress["step_in_epoch"],
        "global_step": progress["global_step"],
        "acc1": m.get("acc1"),
        "acc5": m.get("acc5"),
        "ema_acc1": m.get("ema_acc1"),
        "ema_acc5": m.get("ema_acc5"),
        "ema": ema,
    }


def which(name: str) -> str:
    """last / prev / best / epoch / other."""
    return WHICH.get(name) or ("epoch" if epoch_number(name) is not None else "other")


def list_checkpoints(run_dir: str | Path, verify: bool = False) -> list[dict]:
    """Every ``*.pth`` of a run directory, ordered last, prev, best, then epoch N newest first.

    Each row: run, name, path, which (last/prev/best/epoch/other), epoch (N of checkpoint_epoch{N},
    else the epochs done from the log; None when unknown), the LOGGED fields (None without a log
    line; ``ema``: EMA weights are inside), bytes, mtime, sha256 (the sidecar's; None without one),
    sidecar (bool), logged (bool), verified (with ``verify``, a full read of every file: whether its
    bytes hash to the sidecar's digest; None without ``verify`` or without a sidecar)."""
    run_dir = Path(run_dir)
    log = {row.get("sha256"): row for row in read_jsonl(run_dir / rundir.CHECKPOINT_LOG)}  # damage: log_problem()
    rows = []
    for path in run_dir.glob("*.pth"):
        try:
            st = path.stat()
        except OSError:  # removed meanwhile
            continue
        digest, sidecar_problem = sidecar_checked(path)
        entry = log.get(digest) if digest else None
        kind = which(path.name)
        row = {"run": run_dir.name, "name": path.name, "path": str(path), "which": kind,
               "epoch": epoch_number(path.name) if kind == "epoch" else (entry or {}).get("epochs_done"),
               **{k: (entry or {}).get(k) for k in LOGGED}, "bytes": st.st_size, "mtime": st.st_mtime,
               "sha256": digest, "sidecar": digest is not None, "logged": entry is not None,
               "sidecar_problem": sidecar_problem,  # a sidecar that is there but damaged: the file cannot be checked
               "verified": (False if sidecar_problem or not stat.S_ISREG(st.st_mode) else is_good(path))
               if verify and (digest or sidecar_problem) else None}
        rows.append(row)
    return sorted(rows, key=lambda r: (ORDER[r["which"]], -(r["epoch"] or 0) if r["which"] == "epoch" else 0,
                                       r["name"]))


def log_problem(run_dir: Path) -> str | None:
    """What is wrong with the run's checkpoints.jsonl (not a regular file, too large, damaged lines); None
    when it is good or missing."""
    from tla_jobs.fsutil import read_jsonl_checked

    return read_jsonl_checked(Path(run_dir) / rundir.CHECKPOINT_LOG)[1]


def totals(rows: list[dict]) -> dict:
    """Per run (or over any rows): how many checkpoints, their bytes, and how many are damaged (a
    verified mismatch) or have no sidecar."""
    return {
        "count": len(rows),
        "bytes": sum(r["bytes"] for r in rows),
        # checked and not what the sidecar says, or a sidecar that is there but holds no digest
        "damaged": sum(r["verified"] is False or bool(r.get("sidecar_problem")) for r in rows),
        "no_sidecar": sum(not r["sidecar"] and not r.get("sidecar_problem") for r in rows),
    }


def select(run_dir: str | Path, choice: str) -> tuple[Path, str]:
    """`--which` of `tla eval checkpoint` / `tla export`: best, last, ema (checkpoint_last's EMA
    weights), prev or epoch:N → (the checkpoint file, "model" or "ema": the trainer's --eval-weights).
    A choice that names no file of the run is a one-line TlaError."""
    run_dir = Path(run_dir)
    names = {"best": rundir.CHECKPOINT_BEST, "last": rundir.CHECKPOINT_LAST, "ema": rundir.CHECKPOINT_LAST,
             "prev": rundir.CHECKPOINT_PREV}
    m = re.fullmatch(r"epoch:(\d+)", choice)
    name = rundir.CHECKPOINT_EPOCH.format(epoch=int(m.group(1))) if m else names.get(choice)
    if name is None:
        raise TlaError(f"--which {choice!r}: one of best, last, ema, prev, epoch:N")
    path = run_dir / name
    if not path.is_file():
        kept = ", ".join(r["name"] for r in list_checkpoints(run_dir)) or "none"
        raise TlaError(f"{run_dir.name} has no {name} (its checkpoints: {kept})")
    return path, "ema" if choice == "ema" else "model"


# ---- retention -------------------------------------------------------------------------------------


def to_remove(rows: list[dict], keep_last: int, keep_best: int = 0) -> list[dict]:
    """Which periodic checkpoints a keep-last/keep-best policy drops (the listing's rows).

    keep_last: the newest N checkpoint_epoch files stay; keep_best: the K of them with the highest
    top-1 (as logged) stay as well (timm's --checkpoint-hist, Lightning's save_top_k). Either one
    alone is a policy; both 0 is none (nothing goes)."""
    periodic = sorted((r for r in rows if r["which"] == "epoch"), key=lambda r: r["epoch"], reverse=True)
    if keep_last <= 0 and keep_best <= 0:
        return []
    keep = {r["name"] for r in periodic[:keep_last]}
    scored = sorted((r for r in periodic if r["acc1"] is not None), key=lambda r: (-r["acc1"], -r["epoch"]))
    keep |= {r["name"] for r in scored[:keep_best]}
    return [r for r in periodic if r["name"] not in keep]


def pinned_by_evals(run_dir: Path, max_age_s: float = 7 * 86400) -> dict[str, str]:
    """Checkpoints of the run that a submitted eval job (`tla eval checkpoint --which epoch:N`, which
    may wait in the queue, or for the training job, for days) has yet to read: {file name: eval id}.
    An eval is waiting until its eval.json exists; one submitted over ``max_age_s`` ago that never
    reported (cancelled, failed) no longer pins its file."""
    record = read_json(run_dir / rundir.RUN_JSON, default={})  # none in a `tla train` folder; damaged: {}
    evals = record.get("evals") if isinstance(record, dict) else None
    now, out = time.time(), {}
    for e in evals if isinstance(evals, list) else []:
        if not isinstance(e, dict) or not e.get("checkpoint") or not e.get("eval_id"):
            continue
        path = Path(e["checkpoint"])
        if path.parent != run_dir and path.parent.resolve() != run_dir.resolve():
            continue
        submitted = e.get("submitted")
        if not isinstance(submitted, (int, float)) or isinstance(submitted, bool) or not math.isfinite(submitted):
            submitted = 0  # a time run.json does not hold as a number: no pin can be proved for it
        if now - submitted > max_age_s:
            continue
        if not (rundir.eval_dir(run_dir, str(e["eval_id"])) / rundir.EVAL).exists():
            out[path.name] = str(e["eval_id"])
    return out


def prune(run_dir: str | Path, keep_last: int, keep_best: int = 0, dry_run: bool = False,
          trust_last: bool = False) -> dict:
    """Remove the periodic checkpoints (and their sidecars) that the policy drops; ``dry_run``
    removes nothing. Never removes last, prev, best, :func:`resume_target` (whose search reads
    checkpoint_last whole unless ``trust_last``: the trainer has just written it), nor a file an
    eval job has yet to read (:func:`pinned_by_evals`).

    Returns {"run", "dry_run", "removed": [listing rows], "kept": [listing rows], "bytes": freed,
    "resume": name of the checkpoint a new attempt would resume from (None when nothing was to go),
    "pinned": {name: eval id} of the files kept for a waiting eval}."""
    run_dir = Path(run_dir)
    rows = list_checkpoints(run_dir)
    drop = to_remove(rows, keep_last, keep_best)
    resume = resume_target(run_dir, trust_last) if drop else None
    pinned = pinned_by_evals(run_dir) if drop else {}
    drop = [r for r in drop if r["name"] not in pinned and (resume is None or r["name"] != resume.name)]
    if not dry_run:
        for r in drop:
            for p in (Path(r["path"]), sidecar(Path(r["path"]))):  # data first: a lone sidecar is harmless
                try:
                    os.unlink(p)
                except FileNotFoundError:  # another pruner (the trainer, a second `tla`) was first
                    pass
    names, listed = {r["name"] for r in drop}, {r["name"] for r in rows}
    return {"run": run_dir.name, "dry_run": dry_run, "removed": drop,
            "kept": [r for r in rows if r["name"] not in names], "bytes": sum(r["bytes"] for r in drop),
            "resume": resume.name if resume else None,
            "pinned": {n: e for n, e in pinned.items() if n in listed}}
