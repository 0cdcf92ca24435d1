"""A run's checkpoints (tla_jobs/checkpoint_files.py and the trainer's side of it): the log line of
every checkpoint written, the torch-free listing against the files on disk, --keep-last/--keep-best in
the trainer, and pruning an existing run, which never removes what a new attempt would resume from."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import assert_clean_error, run_tla
from helpers_runs import EPOCHS, RECIPE, trained_run

from tla_jobs import checkpoint_files as checkpoints
from tla_jobs import rundir
from tla_jobs.config import TrainConfig, load_config_file
from tla_jobs.errors import TlaError
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train.runlog import RunLog


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def run(shared_dir, digits) -> Path:
    return trained_run(shared_dir, digits)


@pytest.fixture
def copy(run, tmp_path) -> Path:
    """The run, copied with its files' times (the resume order goes by them), to change."""
    return Path(shutil.copytree(run, tmp_path / "run", copy_function=shutil.copy2))


def snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def test_keep_last_and_keep_best_leave_exactly_the_expected_files(run):
    metrics = rows_of(run / rundir.METRICS)
    # checkpoint_epoch{N} holds the weights after N epochs: metrics row N-1
    best = max(range(1, EPOCHS + 1), key=lambda n: (metrics[n - 1]["acc1"], n))
    epochs = {EPOCHS - 1, EPOCHS, best}
    expected = {ckpt.LAST, ckpt.PREV, ckpt.BEST, *(rundir.CHECKPOINT_EPOCH.format(epoch=n) for n in epochs)}
    assert {p.name for p in run.glob("*.pth")} == expected
    assert {p.name for p in run.glob("*.sha256")} == {f"{n}.sha256" for n in expected}
    log = rows_of(run / rundir.CHECKPOINT_LOG)
    written = [r["name"] for r in log]
    assert written.count(ckpt.LAST) == EPOCHS
    assert sorted(n for n in written if n.startswith("checkpoint_epoch")) == [
        rundir.CHECKPOINT_EPOCH.format(epoch=n) for n in range(1, EPOCHS + 1)]
    assert all(r["ema"] and r["step_in_epoch"] == 0 for r in log)


@pytest.mark.slow
def test_listing_matches_the_files_on_disk(run):
    metrics = rows_of(run / rundir.METRICS)
    rows = checkpoints.list_checkpoints(run, verify=True)
    assert [r["which"] for r in rows][:3] == ["last", "prev", "best"]
    assert {r["name"] for r in rows} == {p.name for p in run.glob("*.pth")}
    for r in rows:
        path = Path(r["path"])
        assert r["bytes"] == path.stat().st_size and r["verified"] and r["logged"] and r["ema"]
        assert r["sha256"] == ckpt.file_sha256(path)
        payload, _ = ckpt.load(path)
        assert r["epoch"] == payload["epoch"] and r["global_step"] == payload["global_step"]
        row = metrics[payload["epoch"] - 1]  # every save here came at an epoch's end
        assert (r["acc1"], r["acc5"], r["ema_acc1"]) == (row["acc1"], row["acc5"], row["ema_acc1"])
    best = next(r for r in rows if r["which"] == "best")
    assert best["acc1"] == max(m["acc1"] for m in metrics)
    epochs = [r["epoch"] for r in rows if r["which"] == "epoch"]
    assert epochs == sorted(epochs, reverse=True)
    assert checkpoints.totals(rows) == {"count": len(rows), "bytes": sum(r["bytes"] for r in rows), "damaged": 0,
                                        "no_sidecar": 0}


def test_listing_says_what_is_damaged_or_unknown(copy):
    last = copy / ckpt.LAST
    last.write_bytes(last.read_bytes()[:-100])
    checkpoints.sidecar(copy / ckpt.PREV).unlink()
    (copy / "mine.pth").write_bytes(b"x")
    rows = {r["name"]: r for r in checkpoints.list_checkpoints(copy, verify=True)}
    assert rows[ckpt.LAST]["verified"] is False and rows[ckpt.LAST]["logged"]
    assert not rows[ckpt.PREV]["sidecar"] and rows[ckpt.PREV]["verified"] is None
    assert rows["mine.pth"]["which"] == "other" and rows["mine.pth"]["epoch"] is None
    assert all(r["verified"] is None for r in checkpoints.list_checkpoints(copy))
    assert checkpoints.totals(list(rows.values())) | {"bytes": 0} == {"count": len(rows), "bytes": 0, "damaged": 1,
                                                                     "no_sidecar": 2}


@pytest.mark.slow
def test_listing_and_pruning_do_not_import_torch(run):
    code = ("import sys; from tla_jobs import checkpoint_files as c; "
            f"c.list_checkpoints({str(run)!r}, verify=True); c.prune({str(run)!r}, 1, dry_run=True); "
            "print([m for m in ('torch', 'timm') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_prune_dry_run_changes_nothing(copy):
    before = snapshot(copy)
    res = checkpoints.prune(copy, keep_last=1, dry_run=True)
    assert snapshot(copy) == before
    periodic = sorted((p.name for p in copy.glob("checkpoint_epoch*.pth")), key=checkpoints.epoch_number)
    assert [r["name"] for r in res["removed"]] == periodic[-2::-1]  # all but the newest, newest first
    assert res["dry_run"] and res["resume"] == ckpt.LAST and res["bytes"] == sum(r["bytes"] for r in res["removed"])
    res = checkpoints.prune(copy, keep_last=1)
    left = {p.name for p in copy.iterdir()}
    assert {ckpt.LAST, ckpt.PREV, ckpt.BEST, periodic[-1]} <= left
    assert not any(r["name"] in left or f"{r['name']}.sha256" in left for r in res["removed"])
    assert checkpoints.prune(copy, keep_last=0)["removed"] == []  # no policy: nothing goes


def periodic_of(folder: Path) -> list[Path]:
    return sorted(folder.glob("checkpoint_epoch*.pth"), key=lambda p: checkpoints.epoch_number(p.name))


def test_keep_best_alone_keeps_the_k_best_periodic_ones(copy):
    acc = {r["name"]: r["acc1"] for r in checkpoints.list_checkpoints(copy) if r["which"] == "epoch"}
    best = max(acc, key=lambda n: (acc[n], checkpoints.epoch_number(n)))
    res = checkpoints.prune(copy, keep_last=0, keep_best=1)
    assert [p.name for p in periodic_of(copy)] == [best]
    assert {r["name"] for r in res["removed"]} == set(acc) - {best}
    assert {ckpt.LAST, ckpt.PREV, ckpt.BEST} <= {p.name for p in copy.iterdir()}


def test_prune_keeps_what_a_waiting_eval_job_will_read(copy):
    """`tla eval checkpoint --which epoch:N` may wait in the queue (or for the training job) for
    days: pruning, by hand or by the trainer's --keep-last, leaves its file until it has reported."""
    oldest = periodic_of(copy)[0]
    evals = [{"eval_id": "eval-1", "checkpoint": str(oldest), "submitted": time.time()},
             {"eval_id": "eval-0", "checkpoint": str(oldest), "submitted": time.time() - 8 * 86400}]  # never reported
    (copy / rundir.RUN_JSON).write_text(json.dumps({"evals": evals}))
    proc = run_tla("checkpoints", "prune", copy, "--keep-last", "1", check=True)
    assert f"kept {oldest.name}: eval eval-1 has yet to read it" in proc.stdout
    assert oldest.exists() and checkpoints.sidecar(oldest).exists() and len(periodic_of(copy)) == 2
    result = rundir.eval_dir(copy, "eval-1") / rundir.EVAL
    result.parent.mkdir(parents=True)
    result.write_text("{}")  # it has read the file and reported
    assert [r["name"] for r in checkpoints.prune(copy, keep_last=1)["removed"]] == [oldest.name]
    assert not oldest.exists()


def test_prune_says_what_to_keep(copy):
    before = snapshot(copy)
    assert_clean_error(run_tla("checkpoints", "prune", copy), "--keep-last N and/or --keep-best K")
    assert snapshot(copy) == before


@pytest.mark.slow
def test_a_job_requeued_by_slurm_continues_from_its_own_checkpoints_not_from_its_resume(run, tmp_path, digits):
    """A job submitted with --resume X (a fine-tune, a run branched from another) that SLURM requeues
    by itself (node failure, `scontrol requeue`) runs again with the same --resume X: it must go on
    from its own progress, not start over from X (which may since have been pruned from its run).
    The job's identity is the local executor's here (SUBMITIT_LOCAL_JOB_ID), as SLURM_JOB_ID there."""
    start_from, out = periodic_of(run)[0], tmp_path / "branch"
    base = [a for a in RECIPE if a not in ("--epochs", str(EPOCHS))]
    env = {"SUBMITIT_LOCAL_JOB_ID": "4242"}
    for epochs, more in ((EPOCHS + 1, []), (EPOCHS + 2, ["--extend"])):  # then the requeued one, one epoch more
        run_tla("train", *base, "--epochs", epochs, *more, "--data-path", digits, "--resume", start_from,
                "--output-dir", out, env=env, check=True, timeout=600)
    first, again = (r for r in rows_of(out / rundir.ATTEMPTS) if r["event"] == "start")
    assert first["resumed_from"]["path"] == str(start_from) and first["job_id"] == again["job_id"] == "4242"
    assert again["resumed_from"]["path"] == str(out / ckpt.LAST) and again["resumed_from"]["epoch"] == EPOCHS + 1
    # the history carried over from the run it branched from, then each of its own epochs once
    assert [r["epoch"] for r in rows_of(out / rundir.METRICS)] == list(range(EPOCHS + 2))


def test_config_yaml_keeps_the_resume_the_run_began_from(tmp_path):
    """Attempts after the first continue from the run's own checkpoints (resume ""); the config a
    repeat starts from keeps the first attempt's --resume."""
    log = RunLog(tmp_path, is_main=True, world_size=1, epochs=1)
    log.take_ownership()
    log.config(TrainConfig(resume="/pretrained/deit.pth", output_dir=str(tmp_path)))
    log.config(TrainConfig(resume="", output_dir=str(tmp_path), epochs=7))
    assert load_config_file(tmp_path / rundir.CONFIG_YAML) == TrainConfig(
        resume="/pretrained/deit.pth", output_dir=str(tmp_path), epochs=7).model_dump()


@pytest.mark.slow
def test_prune_keeps_the_only_good_checkpoint_a_new_attempt_would_resume_from(copy, digits):
    periodic = sorted(copy.glob("checkpoint_epoch*.pth"), key=lambda p: checkpoints.epoch_number(p.name))
    newest, good = periodic[-1], periodic[-2]
    for damaged in (copy / ckpt.LAST, copy / ckpt.PREV, newest):  # as by a disk fault or a kill mid-copy
        damaged.write_bytes(damaged.read_bytes()[:1000])
    assert ckpt.load_latest(copy)[2] == good  # where the trainer would resume
    res = checkpoints.prune(copy, keep_last=1)
    assert res["resume"] == good.name and good.exists() and checkpoints.sidecar(good).exists()
    assert {ckpt.LAST, ckpt.PREV, ckpt.BEST, newest.name} <= {p.name for p in copy.iterdir()}
    assert all(p.exists() for p in periodic[-2:])
    # the next attempt resumes from it and finishes
    run_tla("train", *RECIPE, "--data-path", digits, "--output-dir", copy, check=True, timeout=600)
    start = [r for r in rows_of(copy / rundir.ATTEMPTS) if r["event"] == "start"][-1]
    assert start["resumed_from"]["path"] == str(good)


def test_prune_with_a_damaged_last_keeps_prev_and_last(copy):
    last = copy / ckpt.LAST
    last.write_bytes(last.read_bytes()[:-10])
    (copy / ckpt.PREV).unlink()
    checkpoints.sidecar(copy / ckpt.PREV).unlink()
    newest = max(copy.glob("checkpoint_epoch*.pth"), key=lambda p: p.stat().st_mtime)
    res = checkpoints.prune(copy, keep_last=1)
    assert res["resume"] == newest.name == ckpt.load_latest(copy)[2].name
    assert last.exists() and newest.exists() and (copy / ckpt.BEST).exists()


def test_which_names_a_file_of_the_run(run):
    assert checkpoints.select(run, "best") == (run / ckpt.BEST, "model")
    assert checkpoints.select(run, "ema") == (run / ckpt.LAST, "ema")
    assert checkpoints.select(run, f"epoch:{EPOCHS}") == (run / rundir.CHECKPOINT_EPOCH.format(epoch=EPOCHS), "model")
    with pytest.raises(TlaError, match="has no checkpoint_epoch999.pth .its checkpoints: checkpoint_last.pth"):
        checkpoints.select(run, "epoch:999")
    with pytest.raises(TlaError, match="one of best, last"):
        checkpoints.select(run, "newest")
