"""A run folder is never corrupted, misreported or a way out (issue 21): forged and damaged states as a
careless user or a hostile teammate on a shared filesystem leaves them, through real `tla` processes.

Each case asserts the one clear line (or the right status), the exit code, no traceback, no hang (every
subprocess has a timeout, which fails the test) and that nothing outside the run, nor any other run,
changed. The classes: PIDs acted on without proof, writes through links, caches believed without
proof, training into another run, exports over training files, files that are not regular files,
unbounded reads, user text as markup, forged export metadata, damage reported as fine, quadratic work,
concurrent commands.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAST, run_tla, runs_env, tla
from helpers_runs import trained_run
from test_bad_inputs import make_run, one_line_error, snapshot

from tla_jobs import fsutil, procs, rundir

pytestmark = pytest.mark.xdist_group("trained-run")  # the trained run is made once, on this worker

T = 60  # seconds: a `tla` that takes longer than this here is hanging


@pytest.fixture
def world(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "good-a", 70.0)
    make_run(root, "good-b", 80.0, evals=True)
    (tmp_path / "profiles").mkdir()
    env = runs_env(root, tmp_path / "profiles", XDG_CACHE_HOME=str(tmp_path / "cache"))
    return root, env


@pytest.fixture
def trained(shared_dir, digits, tmp_path) -> Path:
    """A copy of the session's trained run (a `tla train` folder: config.yaml, checkpoints, logs)."""
    src = trained_run(shared_dir, digits)
    dst = tmp_path / "runs" / "trained"
    shutil.copytree(src, dst, symlinks=True)
    return dst


@pytest.fixture
def stranger():
    """An unrelated live process."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait()


def _beat(run: Path, **fields) -> None:
    beat = json.loads((run / rundir.HEARTBEAT).read_text())
    beat.update(time=time.time(), **fields)
    (run / rundir.HEARTBEAT).write_text(json.dumps(beat))


# ------------------------------------------------------------------------------ PIDs without proof


@pytest.mark.parametrize("forged", ["bare-pid", "with-its-start-time"])
def test_signal_never_reaches_a_process_the_heartbeat_names_without_proof(world, stranger, forged):
    root, env = world
    extra = procs.identity(stranger.pid) if forged == "with-its-start-time" else {}
    _beat(root / "good-a", phase="training", pid=stranger.pid, **extra)
    line = one_line_error(tla(env, "signal", "good-a", timeout=T))
    assert "nothing sent" in line or "is gone" in line, line
    time.sleep(0.3)
    assert stranger.poll() is None  # still alive: no SIGUSR2 reached it


def test_cancel_never_kills_a_process_a_forged_submission_names(world, stranger):
    root, env = world
    record = json.loads((root / "good-a" / "run.json").read_text())
    record["submissions"][-1].update(job_id=str(stranger.pid), **procs.identity(stranger.pid))
    (root / "good-a" / "run.json").write_text(json.dumps(record))
    proc = tla(env, "cancel", "good-a", timeout=T)
    assert proc.returncode == 0 and "nothing to cancel" in proc.stdout, (proc.stdout, proc.stderr)
    time.sleep(0.3)
    assert stranger.poll() is None


@pytest.fixture
def lookalike(world):
    """A live process that looks like good-b's local job: submitit's controller and a trainer task of
    good-b's folder (their command lines), the trainer holding good-b's log open."""
    root, _ = world
    folder = root / "good-b" / rundir.SUBMITIT_DIR
    folder.mkdir()
    script = "import sys, time; f = open(sys.argv[1], 'a'); time.sleep(300)"
    log = str(root / "good-b" / "log_rank0.txt")
    ps = {name: subprocess.Popen([sys.executable, "-c", script, log, "-m", module, str(folder)])
          for name, module in (("controller", "submitit.local._local"), ("trainer", "submitit.core._submit"))}
    time.sleep(0.5)  # the log opened
    yield ps
    for p in ps.values():
        p.kill()
        p.wait()


def test_a_run_json_naming_another_run_s_job_folder_stops_nothing_of_it(world, lookalike):
    root, env = world
    ctl, trainer = lookalike["controller"], lookalike["trainer"]
    record = json.loads((root / "good-a" / "run.json").read_text())
    record["submissions"][-1].update(job_id=str(ctl.pid), submitit_folder=str(root / "good-b" / "submitit"),
                                     **procs.identity(ctl.pid))
    (root / "good-a" / "run.json").write_text(json.dumps(record))
    _beat(root / "good-a", phase="training", pid=trainer.pid, job_id=str(ctl.pid), **procs.identity(trainer.pid))
    assert tla(env, "status", "good-a", "--json", timeout=T).returncode in (0, 3)
    assert json.loads(tla(env, "status", "good-a", "--json", timeout=T).stdout)[0]["state"] != "RUNNING"
    one_line_error(tla(env, "signal", "good-a", timeout=T), "nothing sent")
    proc = tla(env, "cancel", "good-a", timeout=T)
    assert "nothing to cancel" in proc.stdout, (proc.stdout, proc.stderr)
    time.sleep(0.3)
    assert ctl.poll() is None and trainer.poll() is None


# ------------------------------------------------------------------------------ writes through links


@pytest.mark.parametrize("name", [rundir.ATTEMPTS, rundir.LOG_PATTERN.format(rank=0)])
def test_the_trainer_never_writes_through_a_link_out_of_its_folder(tmp_path, digits, name):
    out = tmp_path / "fresh"
    out.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text("mine\n")
    os.symlink(outside, out / name)
    proc = run_tla("train", *FAST, "--data-path", digits, "--epochs", "1", "--max-steps", "2", "--output-dir", out,
                   timeout=300)
    line = one_line_error(proc, name)
    assert "symbolic link" in line
    assert proc.returncode == 3
    assert outside.read_text() == "mine\n"


def _failed(root: Path, name: str, **spec) -> Path:
    """A run whose training failed (so `tla resume` would submit it again)."""
    run = make_run(root, name)
    (run / rundir.ATTEMPTS).write_text(json.dumps({"event": "start", "time": time.time(), "job_id": "4999999"})
                                       + "\n" + json.dumps({"event": "end", "reason": "error", "time": time.time(),
                                                            "error": "boom"}) + "\n")
    (run / rundir.SUMMARY).unlink()
    record = json.loads((run / rundir.RUN_JSON).read_text())
    record["spec"].update(spec)
    (run / rundir.RUN_JSON).write_text(json.dumps(record))
    return run


def test_a_linked_lock_file_is_refused_and_its_target_untouched(world, tmp_path):
    root, env = world
    run = _failed(root, "failed", dataset="synthetic", data_path="", batch_size=8, synthetic_images=64)
    outside = tmp_path / "outside.lock"
    before = snapshot(run)
    os.symlink(outside, run / "run.json.lock")
    one_line_error(tla(env, "resume", "failed", timeout=T), "run.json.lock")
    assert not outside.exists()
    (run / "run.json.lock").unlink()
    assert snapshot(run) == before


def test_resume_gets_the_checks_a_submission_gets(world, digits):
    root, env = world
    run = _failed(root, "failed", data_path=str(digits), batch_size=64)
    before = snapshot(run)
    one_line_error(tla(env, "resume", "failed", "--tasks-per-node", "64", timeout=T), "more than the")
    one_line_error(tla(env, "resume", "good-a", timeout=T), "has COMPLETED")
    assert snapshot(run) == before


@pytest.mark.parametrize("name", [rundir.SUBMITIT_DIR, rundir.EVALS_DIR, rundir.TENSORBOARD_DIR])
def test_a_run_whose_job_folders_link_out_of_it_is_refused(world, tmp_path, name):
    root, env = world
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.rmtree(root / "good-a" / name, ignore_errors=True)
    os.symlink(outside, root / "good-a" / name)
    one_line_error(tla(env, "resume", "good-a", timeout=T), name)
    assert list(outside.iterdir()) == []


def test_the_trainer_refuses_a_tensorboard_folder_that_links_out(tmp_path, digits):
    out, outside = tmp_path / "fresh", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    os.symlink(outside, out / rundir.TENSORBOARD_DIR)
    proc = run_tla("train", *FAST, "--data-path", digits, "--epochs", "1", "--max-steps", "2", "--output-dir", out,
                   timeout=300)
    one_line_error(proc, "symbolic link")
    assert list(outside.iterdir()) == [] and not (out / rundir.ATTEMPTS).exists()


def test_fsutil_append_and_lock_refuse_links_and_fifos(tmp_path):
    target = tmp_path / "target"
    target.write_text("x")
    os.symlink(target, tmp_path / "link")
    os.mkfifo(tmp_path / "fifo")
    for name in ("link", "fifo"):
        with pytest.raises(fsutil.UnsafeFile):
            fsutil.open_for_append(tmp_path / name)
    os.symlink(target, tmp_path / "lnk.lock")
    with pytest.raises(fsutil.UnsafeFile):
        with fsutil.locked(tmp_path / "lnk"):
            pass
    assert target.read_text() == "x"


# ------------------------------------------------------------------------------ caches without proof


def _forged_cache(run: Path, state: str, acc1: float) -> None:
    """A status cache as someone who read the format would write it, with no valid signature."""
    head = "\t".join(["3", "x" * 40, "0", state, "1.0", "-", run.name, rundir.RUN_JSON])
    form = {"state": state, "best_acc1": acc1, "last_acc1": acc1, "source": "sacct", "attempts": [], "jobs": [],
            "heartbeat": None, "gpu_hours": 0, "last_event": "forged", "waiting_for_ranks": False, "evals": []}
    rest = {"record": {}, "summary": None, "decided_by": "attempts", "progress": None}
    (run / rundir.STATUS_CACHE).write_text("0" * 64 + "\n" + head + "\n" + json.dumps(form) + "\n"
                                           + json.dumps(rest) + "\n")


def test_a_forged_status_cache_is_never_shown(world):
    root, env = world
    bad = make_run(root, "failed", 60.0)
    (bad / rundir.ATTEMPTS).write_text(json.dumps({"event": "start", "time": time.time(), "job_id": "4999999"})
                                       + "\n" + json.dumps({"event": "end", "reason": "error", "time": time.time(),
                                                            "error": "boom"}) + "\n")
    _forged_cache(bad, "COMPLETED", 99.99)
    shown = {st["run"]: st for st in json.loads(tla(env, "status", "--json", timeout=T).stdout)}
    assert shown["failed"]["state"] == "FAILED" and shown["failed"]["best_acc1"] != 99.99
    completed = tla(env, "status", "--state", "COMPLETED", "--json", timeout=T).stdout
    assert "failed" not in {st["run"] for st in json.loads(completed)}
    assert "99.99" not in tla(env, "report", "--format", "csv", timeout=T).stdout


def test_a_model_check_key_written_by_hand_is_not_believed(tmp_path, monkeypatch):
    from tla_jobs.jobs import check_cache, signing

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    signing._key.cache_clear()
    k = check_cache.key({"model": "resnet18", "dataset": "synthetic"})
    check_cache.path().parent.mkdir(parents=True)
    check_cache.path().write_text(json.dumps([k]))  # the key itself, added by hand
    assert not check_cache.passed(k)
    check_cache.remember(k)
    assert check_cache.passed(k)  # what tla itself remembered is believed
    assert signing.sign(k.encode()) in json.loads(check_cache.path().read_text())  # it keeps proofs of keys
    (tmp_path / "cache" / "tla" / "cache-key").write_bytes(os.urandom(32))  # another user's key
    signing._key.cache_clear()
    assert not check_cache.passed(k)
    signing._key.cache_clear()


# ------------------------------------------------------------------------------ training into another run


def test_training_into_a_folder_of_another_recipe_is_refused_before_anything_is_written(trained, digits):
    from helpers_runs import RECIPE

    before = snapshot(trained)
    proc = run_tla("train", *RECIPE, "--data-path", digits, "--output-dir", trained, "--lr", "0.5",
                   "--batch-size", "16", timeout=300)
    line = one_line_error(proc, "another recipe")
    assert "lr 0.5" in line and "batch_size 16" in line
    assert snapshot(trained) == before

    copy = trained.parent / "copy.yaml"  # a copied config.yaml, its epochs edited
    copy.write_text((trained / rundir.CONFIG_YAML).read_text().replace("epochs: 4", "epochs: 6"))
    one_line_error(run_tla("train", "--config", copy, timeout=300), "a config naming the run")
    line = one_line_error(run_tla("train", "--config", copy, "--output-dir", trained, timeout=300), "another recipe")
    assert "epochs 6 (was 4)" in line and "--extend" in line
    assert snapshot(trained) == before


def test_the_checkpoint_s_recipe_is_checked_when_config_yaml_is_gone(trained, digits):
    from helpers_runs import RECIPE

    (trained / rundir.CONFIG_YAML).unlink()
    keep = {n: (trained / n).read_bytes() for n in (rundir.CHECKPOINT_LAST, rundir.CHECKPOINT_LOG, rundir.ATTEMPTS,
                                                    rundir.METRICS)}
    proc = run_tla("train", *RECIPE, "--data-path", digits, "--output-dir", trained, "--lr", "0.5", timeout=300)
    one_line_error(proc, "checkpoint_last.pth")
    assert {n: (trained / n).read_bytes() for n in keep} == keep


@pytest.mark.slow
def test_extend_continues_a_run_with_more_epochs(trained, digits):
    from helpers_runs import EPOCHS, RECIPE

    run_tla("train", *RECIPE, "--data-path", digits, "--output-dir", trained, "--epochs", str(EPOCHS + 1),
            "--extend", check=True, timeout=600)
    rows = [json.loads(x) for x in (trained / rundir.METRICS).read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(EPOCHS + 1))


# ------------------------------------------------------------------------------ exports over training files


def test_export_never_replaces_a_checkpoint_of_a_run(trained):
    before = snapshot(trained)
    best = trained / rundir.CHECKPOINT_BEST
    one_line_error(run_tla("export", best, best, "--force", timeout=300), "checkpoint")
    one_line_error(run_tla("export", trained, trained / "checkpoint_epoch9.pth", timeout=300), "training checkpoint")
    one_line_error(run_tla("export", trained, trained / rundir.CHECKPOINT_LAST, "--force", timeout=300),
                   "training checkpoint")
    assert snapshot(trained) == before


def test_a_second_export_of_a_run_at_once_fails_cleanly(trained, tmp_path):
    with fsutil.locked(trained / "export"):  # as a first `tla export` of the run holds it
        one_line_error(run_tla("export", trained, tmp_path / "x.safetensors", timeout=300), "another `tla export`")
    assert not (tmp_path / "x.safetensors").exists()


def test_simultaneous_exports_to_one_file_leave_one_whole_export(trained, tmp_path):
    out = tmp_path / "w.safetensors"
    sources = [trained / n for n in (rundir.CHECKPOINT_BEST, rundir.CHECKPOINT_LAST)]
    procs_ = [subprocess.Popen([sys.executable, "-m", "tla_jobs", "export", str(s), str(out)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in sources]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs_]
    assert sorted(rc for rc, _ in results) == [0, 2], results
    assert "already exists" in [err for rc, err in results if rc][0]
    meta_len = struct.unpack("<Q", out.read_bytes()[:8])[0]
    assert json.loads(out.read_bytes()[8:8 + meta_len])["__metadata__"]["format"] == "tla-export/1"


# ------------------------------------------------------------------------------ forged export metadata


def _set_metadata(path: Path, **fields) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    header["__metadata__"].update(fields)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


@pytest.mark.parametrize("source", ["another-run", "a-number"])
def test_an_export_naming_another_run_is_not_filed_there(world, trained, tmp_path, source):
    root, env = world
    export = tmp_path / "x.safetensors"
    run_tla("export", trained, export, "--which", "last", check=True, timeout=300)
    victim = root / "good-b"
    (victim / rundir.CHECKPOINT_LAST).write_bytes(b"weights")
    before = snapshot(victim)
    named = str(victim / rundir.CHECKPOINT_LAST) if source == "another-run" else 12
    _set_metadata(export, source_checkpoint=named)
    one_line_error(tla(env, "eval", "checkpoint", str(export), timeout=T), "source checkpoint")
    assert snapshot(victim) == before


# ------------------------------------------------------------------------------ not regular, unbounded


def _fifo(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def _zero(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.symlink("/dev/zero", path)


def _huge(path: Path) -> None:
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(4 << 30)  # sparse: 4 GB that take no disk


@pytest.mark.parametrize("make", [_fifo, _zero, _huge], ids=["fifo", "dev-zero", "4GB"])
@pytest.mark.parametrize("name", [rundir.RUN_JSON, rundir.HEARTBEAT, rundir.ATTEMPTS, rundir.SUMMARY,
                                  rundir.STATUS_CACHE, "evals/eval-1/eval.json"])
def test_a_run_file_that_is_not_a_regular_file_is_damage_not_a_hang(world, make, name):
    root, env = world
    make(root / "good-b" / name)
    proc = tla(env, "status", "--json", timeout=T)
    assert "Traceback" not in proc.stderr and proc.returncode in (0, 3), proc.stderr
    shown = {st["run"]: st for st in json.loads(proc.stdout)}
    assert shown["good-a"]["state"] == "COMPLETED"
    if name != rundir.STATUS_CACHE:  # a cache that cannot be used is simply not used
        assert proc.returncode == 3 and "good-b" in proc.stderr, proc.stderr
        assert shown["good-b"]["problems"] or shown["good-b"]["state"] == "DAMAGED", shown["good-b"]
    for cmd in (["report"], ["logs", "good-b"], ["checkpoints", "good-b"]):
        proc = tla(env, *cmd, timeout=T)
        assert "Traceback" not in proc.stderr + proc.stdout, (cmd, proc.stderr)


@pytest.mark.parametrize("make", [_fifo, _zero, _huge], ids=["fifo", "dev-zero", "4GB"])
def test_a_log_that_is_not_a_regular_file_is_skipped(world, make):
    root, env = world
    make(root / "good-a" / "log_rank0.txt")
    proc = tla(env, "logs", "good-a", timeout=T)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("make", [_fifo, _zero, _huge, lambda p: p.write_bytes(b""), lambda p: p.write_bytes(
    b"\x00\xff" * 20), lambda p: p.mkdir()], ids=["fifo", "dev-zero", "4GB", "empty", "binary", "directory"])
def test_checkpoints_verify_says_a_damaged_sidecar_is_damaged(trained, make):
    side = trained / (rundir.CHECKPOINT_LAST + ".sha256")
    side.unlink()
    make(side)
    proc = run_tla("checkpoints", trained, "--verify", "--json", timeout=T)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    one_line_error(proc, "sidecar")
    row = next(r for r in json.loads(proc.stdout)["checkpoints"] if r["name"] == rundir.CHECKPOINT_LAST)
    assert row["sidecar_problem"] and row["verified"] is False


@pytest.mark.parametrize("make", [_fifo, _zero, lambda p: p.write_bytes(b"\x00\xff" * 20)],
                         ids=["fifo", "dev-zero", "binary"])
def test_checkpoints_says_damage_without_verify_too(trained, make):
    side = trained / (rundir.CHECKPOINT_LAST + ".sha256")
    side.unlink()
    make(side)
    one_line_error(run_tla("checkpoints", trained, timeout=T), "sidecar")
    log = trained / rundir.CHECKPOINT_LOG
    side.unlink()
    (trained / (rundir.CHECKPOINT_LAST + ".sha256")).write_text("0" * 64 + "  checkpoint_last.pth\n")
    make(log)
    proc = run_tla("checkpoints", trained, timeout=T)
    assert proc.returncode == 3, (proc.stdout, proc.stderr)
    one_line_error(proc, rundir.CHECKPOINT_LOG)


@pytest.mark.parametrize("acc", [1e300, -50.0, 100.5])
def test_an_accuracy_no_run_can_have_is_damage(world, acc):
    root, env = world
    rows = [json.loads(x) for x in (root / "good-b" / rundir.METRICS).read_text().splitlines()]
    rows[-1]["acc1"] = acc
    (root / "good-b" / rundir.METRICS).write_text("".join(json.dumps(r) + "\n" for r in rows))
    beat = json.loads((root / "good-b" / rundir.HEARTBEAT).read_text())
    beat["progress"]["best"]["acc1"] = acc
    (root / "good-b" / rundir.HEARTBEAT).write_text(json.dumps(beat))
    proc = tla(env, "status", "--json", timeout=T)
    assert proc.returncode == 3 and "good-b" in proc.stderr, proc.stderr
    assert str(acc) not in tla(env, "report", "--format", "csv", timeout=T).stdout


def test_a_fifo_checkpoint_is_not_read(trained):
    _fifo(trained / "checkpoint_epoch7.pth")
    (trained / "checkpoint_epoch7.pth.sha256").write_text("0" * 64 + "  checkpoint_epoch7.pth\n")
    proc = run_tla("checkpoints", trained, "--verify", timeout=T)
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ user text is text


def test_markup_and_mathtext_in_run_text_are_printed_as_they_are(world, tmp_path):
    root, env = world
    record = json.loads((root / "good-a" / "run.json").read_text())
    record["spec"]["model"] = "[/oops]"
    (root / "good-a" / "run.json").write_text(json.dumps(record))
    os.rename(root / "good-b", root / "$\\frac{$")
    proc = tla(env, "report", timeout=T)
    assert proc.returncode == 0 and "[/oops]" in proc.stdout, proc.stderr
    proc = tla(env, "report", "--plot", str(tmp_path / "p.png"), timeout=T)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    proc = tla(env, "status", str(root / "$\\frac{$"), timeout=T)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ damage reported, not hidden


def test_an_unreadable_run_folder_is_listed_as_such():
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="tla-unreadable-"))  # pytest's tmp_path is root's alone: nobody can't enter
    try:
        _unreadable_run_folder(top)
    finally:
        shutil.rmtree(top)


def _unreadable_run_folder(top: Path) -> None:
    os.chmod(top, 0o755)
    root = top / "runs"
    make_run(root, "good-a", 70.0)
    make_run(root, "good-b", 80.0)
    env = runs_env(root, top / "profiles")
    os.chmod(root / "good-b", 0o700)  # only root can look inside; tla runs as nobody
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                           "tla_jobs", "status", "--json"], capture_output=True, text=True, timeout=T,
                          env={**os.environ, **{k: v for k, v in env.items() if k != "runs"},
                               "XDG_CACHE_HOME": "/tmp/tla-nobody-cache"})
    assert proc.returncode == 3 and "Traceback" not in proc.stderr, proc.stderr
    shown = {st["run"]: st for st in json.loads(proc.stdout)}
    assert shown["good-b"]["state"] == "DAMAGED" and "unreadable" in shown["good-b"]["last_event"]


def test_prune_with_an_eval_submitted_at_a_time_that_is_text(trained):
    record = {"name": "trained", "spec": {}, "profile": {}, "evals": [
        {"eval_id": "e1", "checkpoint": str(trained / "checkpoint_epoch3.pth"), "submitted": "yesterday"}]}
    (trained / rundir.RUN_JSON).write_text(json.dumps(record))
    proc = run_tla("checkpoints", "prune", trained, "--keep-last", "1", "--dry-run", timeout=T)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


# ------------------------------------------------------------------------------ quadratic work, concurrency


def test_status_of_a_run_with_80000_attempts_ends(world):
    root, env = world
    now = time.time()
    rows = []
    for i in range(40_000):
        rows.append(json.dumps({"event": "start", "attempt_id": f"a{i}", "time": now, "job_id": "4999999",
                                "epoch": 0, "step": i}))
        rows.append(json.dumps({"event": "end", "attempt_id": f"a{i}", "reason": "signal:SIGUSR2", "time": now}))
    (root / "good-a" / rundir.ATTEMPTS).write_text("\n".join(rows) + "\n")
    proc = tla(env, "status", "good-a", "--json", timeout=T)
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)[0]["attempts"]) == 40_000
    proc = tla(env, "status", "good-a", timeout=T)  # the table: the newest attempts, and how many more
    assert proc.returncode == 0 and "39950 earlier attempt(s) not shown" in " ".join(proc.stdout.split())


def test_a_second_resume_at_once_fails_cleanly(world):
    root, env = world
    before = snapshot(root / "good-a")
    with fsutil.locked(root / "good-a" / "resume"):  # as a first `tla resume good-a` holds it
        one_line_error(tla(env, "resume", "good-a", timeout=T), "another `tla resume good-a`")
    after = snapshot(root / "good-a")
    after.pop("resume.lock", None)
    assert after == before
