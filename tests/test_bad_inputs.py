"""A catalogue of bad inputs and damaged files, run through real `tla` subprocesses.

Every case must end with a non-zero exit, exactly one line on stderr that says what is wrong
(naming the option or file), no traceback, and every other run still readable. The damaged-file
cases damage one run among good ones; the disk cases mount a read-only or a full tmpfs (root).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from conftest import PROFILES, run_tla, runs_env, tla

from tla_jobs.rundir import metrics_summary

JOB = "4999999"  # a local job id that is no live process: a run whose job has ended


def one_line_error(proc: subprocess.CompletedProcess, fragment: str = "", code: int | None = None) -> str:
    """Non-zero exit (``code`` when given), one line on stderr containing ``fragment``, no traceback anywhere."""
    assert proc.returncode != 0 and code in (None, proc.returncode), (proc.returncode, proc.stdout[-2000:],
                                                                       proc.stderr)
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tla: error: "), lines[0]
    assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------ the world


def make_run(root: Path, name: str, acc: float = 70.0, evals: bool = False) -> Path:
    """A finished run as the trainer and `tla` leave it (local job ended, summary written)."""
    d = root / name
    d.mkdir(parents=True)
    now = time.time()
    spec = {"model": "tla_vit_nano", "epochs": 3, "dataset": "digits", "data_path": str(root / "data"),
            "output_dir": str(d)}
    record = {"name": name, "created": now, "spec": spec, "profile": {"executor": "local"}, "kind": "train",
              "submissions": [{"job_id": JOB, "executor": "local", "submitted": now, "reason": "submit",
                               "nodes": 1, "tasks_per_node": 1}], "evals": []}
    rows = [{"epoch": e, "acc1": acc - 2 + e, "acc5": 95.0 + e, "train_loss": 1.0, "val_loss": 1.0,
             "epoch_s": 10.0, "lr": 1e-3, "time": now} for e in range(3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "heartbeat.json").write_text(json.dumps(
        {"phase": "finished", "epoch": 3, "epochs": 3, "step": 10, "steps_per_epoch": 10, "time": now,
         "train_loss": 1.0, "images_per_s": 100.0, "world_size": 1, "progress": metrics_summary(rows)}))
    (d / "summary.json").write_text(json.dumps({"state": "completed", "best_acc1": acc}))
    (d / "attempts.jsonl").write_text(
        json.dumps({"event": "start", "epoch": 0, "step": 0, "global_step": 0, "time": now, "job_id": JOB,
                    "host": "h", "resumed_from": None}) + "\n"
        + json.dumps({"event": "end", "reason": "completed", "epoch": 3, "global_step": 30, "time": now}) + "\n")
    (d / "log_rank0.txt").write_text("2026-11-26 10:00:00 [rank 0] INFO epoch 1/3: top-1 70.00\n")
    if evals:
        out = d / "evals" / "eval-1"
        out.mkdir(parents=True)
        (out / "eval.json").write_text(json.dumps({"acc1": acc, "acc5": 99.0, "time": now}))
        record["evals"].append({"job_id": "4999998", "executor": "local", "submitted": now, "reason": "eval",
                                "output_dir": str(out), "checkpoint": str(d / "checkpoint_last.pth")})
    (d / "run.json").write_text(json.dumps(record))
    return d


@pytest.fixture
def world(tmp_path):
    """A runs root with two good runs; tests add damaged ones beside them."""
    root = tmp_path / "runs"
    make_run(root, "good-a", 70.0)
    make_run(root, "good-b", 80.0, evals=True)
    env = runs_env(root, tmp_path / "profiles")
    (tmp_path / "profiles").mkdir()
    return root, env


def assert_others_readable(env) -> None:
    proc = tla(env, "status", "good-a", "good-b", "--json")
    assert proc.returncode == 0, proc.stderr
    shown = {st["run"]: st for st in json.loads(proc.stdout)}
    for name, acc in (("good-a", 70.0), ("good-b", 80.0)):
        st = shown[name]
        assert st["state"] == "COMPLETED" and st["best_acc1"] == acc and st["problems"] == [], st


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under ``folder`` with its content's digest ("dir" for folders); the empty lock files a
    command of a run takes (`tla resume`, `tla export`: one at a time) are not content and are left out."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if not (p.name.endswith(".lock") and p.stat().st_size == 0)}


# ------------------------------------------------------------------------------- damaged run files

GARBAGE = b"\x00\xff\xfe{not json\x89PNG"
DEEP = "[" * 100_000 + "]" * 100_000


def _rewrite_json(name: str, change):
    def damage(d: Path):
        value = json.loads((d / name).read_text())
        change(value)
        (d / name).write_text(json.dumps(value))
    return damage


def _write(name: str, content):
    def damage(d: Path):
        path = d / name
        if content is IsADirectoryError:
            path.unlink(missing_ok=True)
            path.mkdir()
            (path / "x").write_text("{}")
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return damage


def _truncate(name: str):
    def damage(d: Path):
        text = (d / name).read_bytes()
        (d / name).write_bytes(text[: len(text) // 2])
    return damage


def _sub(key, value):
    return _rewrite_json("run.json", lambda r: r["submissions"][0].__setitem__(key, value))


# (id, damage, what `tla status NAME` must say, whether the run lists as DAMAGED)
DAMAGES = [
    ("run-truncated", _truncate("run.json"), "run.json is not valid JSON", True),
    ("run-empty", _write("run.json", ""), "run.json is empty", True),
    ("run-list", _write("run.json", "[1, 2]"), "run.json is a list", True),
    ("run-null", _write("run.json", "null"), "run.json is null", True),
    ("run-number", _write("run.json", "42"), "run.json is int", True),
    ("run-string", _write("run.json", '"run"'), "run.json is a string", True),
    ("run-binary", _write("run.json", GARBAGE), "run.json is not text", True),
    ("run-deep", _write("run.json", DEEP), "run.json is not valid JSON", True),
    ("run-directory", _write("run.json", IsADirectoryError), "run.json is a directory", True),
    ("run-no-job-id", _rewrite_json("run.json", lambda r: r["submissions"][0].pop("job_id")), "has no job_id", True),
    ("run-int-job-id", _sub("job_id", 123), "has no job_id", True),
    ("run-empty-job-id", _sub("job_id", ""), "has no job_id", True),
    ("run-bad-executor", _sub("executor", "kubernetes"), "has executor 'kubernetes'", True),
    ("run-text-submitted", _sub("submitted", "yesterday"), "submitted time", True),
    ("run-submission-list", _rewrite_json("run.json", lambda r: r["submissions"].__setitem__(0, [1])),
     "submission 1 is a list", True),
    ("run-submissions-dict", _rewrite_json("run.json", lambda r: r.__setitem__("submissions", {"a": 1})),
     "submissions is an object, not a list", True),
    ("run-evals-text", _rewrite_json("run.json", lambda r: r.__setitem__("evals", "none")), "evals is a string", True),
    ("run-spec-list", _rewrite_json("run.json", lambda r: r.__setitem__("spec", [])), "spec is a list", True),
    ("run-no-spec", _rewrite_json("run.json", lambda r: r.pop("spec")), "has no spec", True),
    ("run-no-profile", _rewrite_json("run.json", lambda r: r.pop("profile")), "has no profile", True),
    ("run-epochs-text", _rewrite_json("run.json", lambda r: r["spec"].__setitem__("epochs", "many")),
     "spec.epochs", True),
    ("run-created-text", _rewrite_json("run.json", lambda r: r.__setitem__("created", "monday")), "created", True),
    ("run-created-nan", _write("run.json", '{"spec": {}, "profile": {}, "created": NaN}'), "created", True),
    ("run-name-number", _rewrite_json("run.json", lambda r: r.__setitem__("name", 7)), "name is not text", True),
    ("run-cancelled-text", _rewrite_json("run.json", lambda r: r.__setitem__("cancelled", "yes")), "cancelled", True),
    ("heartbeat-text-time", _rewrite_json("heartbeat.json", lambda h: h.__setitem__("time", "yesterday")),
     "heartbeat.json has no time", False),
    ("heartbeat-no-time", _rewrite_json("heartbeat.json", lambda h: h.pop("time")), "heartbeat.json has no time",
     False),
    ("heartbeat-list", _write("heartbeat.json", "[]"), "heartbeat.json is a list", False),
    ("heartbeat-truncated", _truncate("heartbeat.json"), "heartbeat.json is not valid JSON", False),
    ("heartbeat-empty", _write("heartbeat.json", ""), "heartbeat.json is empty", False),
    ("heartbeat-directory", _write("heartbeat.json", IsADirectoryError), "heartbeat.json is a directory", False),
    ("heartbeat-step-text", _rewrite_json("heartbeat.json", lambda h: h.__setitem__("step", "7")),
     "step is not a number", False),
    ("heartbeat-progress-list", _rewrite_json("heartbeat.json", lambda h: h.__setitem__("progress", [])),
     "progress is not an object", False),
    ("heartbeat-best-text", _rewrite_json("heartbeat.json", lambda h: h["progress"]["best"].__setitem__("acc1", "hi")),
     "progress.best", False),
    ("heartbeat-epochs-done-float",
     _rewrite_json("heartbeat.json", lambda h: h["progress"].__setitem__("epochs_done", 2.5)), "epochs_done", False),
    ("heartbeat-time-1e308", _rewrite_json("heartbeat.json", lambda h: h.__setitem__("time", 1e308)),
     "heartbeat.json has no time", False),
    ("heartbeat-mfu-text", _rewrite_json("heartbeat.json", lambda h: h.__setitem__("mfu", "high")),
     "heartbeat.json mfu is not a number", False),
    ("summary-list", _write("summary.json", "[]"), "summary.json is a list", False),
    ("summary-truncated", _truncate("summary.json"), "summary.json is not valid JSON", False),
    ("summary-directory", _write("summary.json", IsADirectoryError), "summary.json is a directory", False),
    ("attempts-garbage-line", _write("attempts.jsonl", '{"event": "start", "time": 1}\n{garbage\n'),
     "attempts.jsonl: 1 of 2 lines damaged", False),
    ("attempts-rows-not-objects", _write("attempts.jsonl", "[1]\n2\n"), "attempts.jsonl: 2 of 2 lines", False),
    ("attempts-resumed-text", _write("attempts.jsonl", '{"event": "start", "time": 1, "resumed_from": "x"}\n'),
     "attempts.jsonl: 1 of 1 rows unusable", False),
    ("attempts-time-text", _write("attempts.jsonl", '{"event": "start", "time": "noon"}\n'), "attempts.jsonl", False),
    ("attempts-binary", _write("attempts.jsonl", GARBAGE), "attempts.jsonl is not text", False),
    ("attempts-time-1e308", _write("attempts.jsonl", '{"event": "start", "time": 1e308}\n'), "attempts.jsonl", False),
    ("attempts-directory", _write("attempts.jsonl", IsADirectoryError), "attempts.jsonl is a directory", False),
    ("metrics-garbage-line", _write("metrics.jsonl", '{"epoch": 0, "acc1": 50.0}\n{"epoch": 1, "acc'),
     "metrics.jsonl: 1 of 2 lines damaged", False),
    ("metrics-text-acc", _write("metrics.jsonl", '{"epoch": 0, "acc1": "fifty"}\n'), "metrics.jsonl: 1 of 1 rows",
     False),
    ("metrics-negative-epoch", _write("metrics.jsonl", '{"epoch": -1, "acc1": 5.0}\n'), "metrics.jsonl", False),
    ("metrics-directory", _write("metrics.jsonl", IsADirectoryError), "metrics.jsonl is a directory", False),
    ("metrics-throughput-text", _write("metrics.jsonl", '{"epoch": 0, "acc1": 5.0, "images_per_s": "fast"}\n'),
     "metrics.jsonl: 1 of 1 rows", False),
]


# odd but not damaged: shown as they are, without a traceback
ODD = [
    ("eta-of-1e308-s", _rewrite_json("heartbeat.json", lambda h: h["progress"].__setitem__("mean_epoch_s", 1e308))),
    ("loss-nan", _write("metrics.jsonl", '{"epoch": 0, "acc1": 5.0, "val_loss": NaN, "train_loss": Infinity}\n')),
    ("resumed-from-without-epoch",
     _write("attempts.jsonl", '{"event": "start", "time": 1, "resumed_from": {"path": "/x/ckpt.pth"}}\n')),
    ("unknown-extra-keys", _rewrite_json("run.json", lambda r: r.__setitem__("added_by_a_later_version", {"x": 1}))),
    ("huge-epochs", _rewrite_json("run.json", lambda r: r["spec"].__setitem__("epochs", 10**30))),
]


@pytest.mark.parametrize("damage", [c[1] for c in ODD], ids=[c[0] for c in ODD])
def test_odd_values_are_shown_as_they_are(world, damage):
    root, env = world
    victim = make_run(root, "victim")
    beat = json.loads((victim / "heartbeat.json").read_text())
    beat["phase"] = "training"  # a live-looking run: ETA and the heartbeat line are shown
    (victim / "heartbeat.json").write_text(json.dumps(beat))
    damage(victim)
    for args in (["status"], ["status", "victim"], ["status", "--json"], ["report"], ["logs", "victim"]):
        proc = tla(env, *args)
        assert proc.returncode == 0 and not proc.stderr.strip(), (args, proc.stderr[-3000:])
    assert_others_readable(env)


def _damaged_world(world, case_id):
    root, env = world
    _, damage, _, _ = next(c for c in DAMAGES if c[0] == case_id)
    victim = make_run(root, "victim")
    # a heartbeat without progress makes status read metrics.jsonl (runs of older versions)
    if case_id.startswith("metrics"):
        beat = json.loads((victim / "heartbeat.json").read_text())
        beat.pop("progress")
        (victim / "heartbeat.json").write_text(json.dumps(beat))
    damage(victim)
    return env


@pytest.mark.parametrize("case_id, message, listed_damaged", [(c[0], c[2], c[3]) for c in DAMAGES],
                         ids=[c[0] for c in DAMAGES])
def test_damaged_run_file_is_reported_and_breaks_no_other_run(world, case_id, message, listed_damaged):
    env = _damaged_world(world, case_id)
    # the damaged run by name: says what is wrong, exits non-zero
    one_line_error(tla(env, "status", "victim"), message)
    # the listing: every run, the damaged one marked, one line on stderr naming it
    proc = tla(env, "status", "--json")
    line = one_line_error(proc, "victim")
    listed = {r["run"]: r for r in json.loads(proc.stdout)}
    assert set(listed) == {"good-a", "good-b", "victim"}, line
    assert listed["victim"]["problems"] and message.split(" (")[0].lower() in \
        " ".join(listed["victim"]["problems"]).lower()
    assert (listed["victim"]["state"] == "DAMAGED") == listed_damaged
    assert listed["good-a"]["state"] == "COMPLETED" and listed["good-a"]["problems"] == []
    table = tla(env, "status")
    one_line_error(table, "victim")
    assert "victim !" in table.stdout and "good-a " in table.stdout and "good-b " in table.stdout
    # report and logs: the others as usual, no traceback
    report = tla(env, "report", "--format", "json")
    assert "Traceback" not in report.stderr
    rows = {r["run"]: r for r in json.loads(report.stdout)}
    assert rows["good-b"]["best_acc1"] == 80.0 and rows["good-b"]["eval_acc1"] == 80.0
    logs = tla(env, "logs", "victim")
    assert "Traceback" not in logs.stderr and len([ln for ln in logs.stderr.splitlines() if ln.strip()]) <= 1


@pytest.mark.parametrize("content, message", [
    ('{"acc1": 1', "eval.json is not valid JSON"),
    ('{"acc1": "high", "time": 1}', "acc1 is not a number"),
    ("[]", "eval.json is a list"),
    (IsADirectoryError, "eval.json is a directory"),
])
def test_damaged_eval_result_is_marked_in_the_report(world, content, message):
    root, env = world
    victim = make_run(root, "victim", evals=True)
    _write("eval.json", content)(victim / "evals" / "eval-1")
    proc = tla(env, "report", "--format", "json")
    one_line_error(proc, message)
    rows = {r["run"]: r for r in json.loads(proc.stdout)}
    assert rows["victim"]["eval_acc1"] is None and rows["good-b"]["eval_acc1"] == 80.0
    assert "victim !" in tla(env, "report").stdout
    assert_others_readable(env)


def test_commands_on_a_damaged_run_refuse_it_in_one_line(world):
    root, env = world
    victim = make_run(root, "victim")
    _truncate("run.json")(victim)
    before = (victim / "run.json").read_bytes()
    for args in (["resume", "victim"], ["cancel", "victim"], ["eval", "checkpoint", "victim"],
                 ["signal", "victim"]):
        one_line_error(tla(env, *args), "victim")
    assert (victim / "run.json").read_bytes() == before  # nothing rewritten over the damaged record
    assert_others_readable(env)


@pytest.mark.parametrize("data", ["{tmp}/nowhere", "", "{tmp}/runs/good-a"])
def test_eval_job_with_a_data_path_that_is_no_dataset_is_not_queued(world, tmp_path, data):
    root, env = world
    (root / "good-a" / "checkpoint_last.pth").write_bytes(b"x")
    _rewrite_json("run.json", lambda r: r["spec"].__setitem__("dataset", "imagefolder"))(root / "good-a")
    one_line_error(tla(env, "eval", "checkpoint", "good-a", "--data-path", data.replace("{tmp}", str(tmp_path))),
                   "does not exist")
    assert json.loads((root / "good-a" / "run.json").read_text())["evals"] == []
    assert not (root / "good-a" / "evals").exists() and not (root / "good-a" / "submitit").exists()


def test_a_truncated_run_json_does_not_make_the_run_vanish(world):
    root, env = world
    for name in ("good-a", "good-b"):
        _truncate("run.json")(root / name)
    proc = tla(env, "status")
    one_line_error(proc, "2 run(s)")
    assert "no runs" not in proc.stdout and "good-a !" in proc.stdout and "DAMAGED" in proc.stdout


# ---------------------------------------------------------------------------------- bad arguments

# a regression trains one step, not 300 epochs
TRAIN = ["train", "--dataset", "digits", "--data-path", "{data}", "--output-dir", "{tmp}/out", "--epochs", "1",
         "--max-steps", "1", "--workers", "0"]
SUBMIT = ["submit", "train", "--name", "x", "--dataset", "digits", "--data-path", "{data}"]
SWEEP = ["submit", "sweep", "--name", "sw", "--dataset", "digits", "--data-path", "{data}", "--model", "tla_vit_nano"]

ARGS = [
    # trainer options: refused at parse time, naming the flag typed
    ([*TRAIN, "--min-lr", "nan"], "--min-lr"),
    ([*TRAIN, "--lr", "inf"], "--lr"),
    ([*TRAIN, "--lr", "-1"], "--lr"),
    ([*TRAIN, "--clip-grad", "-5"], "--clip-grad"),
    ([*TRAIN, "--clip-grad", "nan"], "--clip-grad"),
    ([*TRAIN, "--model-ema-decay", "7"], "--model-ema-decay"),
    ([*TRAIN, "--weight-decay", "inf"], "--weight-decay"),
    ([*TRAIN, "--warmup-lr", "nan"], "--warmup-lr"),
    ([*TRAIN, "--opt-eps", "0"], "--opt-eps"),
    ([*TRAIN, "--img-size", "7"], "--img-size"),
    ([*TRAIN, "--epochs", "0"], "--epochs"),
    ([*TRAIN, "--epochs", "-3"], "--epochs"),
    ([*TRAIN, "--epochs", "abc"], "--epochs"),
    ([*TRAIN, "--epochs", "1.5"], "--epochs"),
    ([*TRAIN, "--batch-size", "0"], "--batch-size"),
    ([*TRAIN, "--smoothing", "1.5"], "--smoothing"),
    ([*TRAIN, "--drop-path", "nan"], "--drop-path"),
    ([*TRAIN, "--reprob", "2"], "--reprob"),
    ([*TRAIN, "--crop-scale", "0"], "--crop-scale"),
    ([*TRAIN, "--mixup", "-1"], "--mixup"),
    ([*TRAIN, "--cutmix", "inf"], "--cutmix"),
    ([*TRAIN, "--warmup-epochs", "-1"], "--warmup-epochs"),
    ([*TRAIN, "--workers", "-2"], "--workers"),
    ([*TRAIN, "--checkpoint-every-min", "nan"], "--checkpoint-every-min"),
    ([*TRAIN, "--aa", "bogus-policy"], "--aa"),
    ([*TRAIN, "--amp", "fp8"], "--amp"),
    ([*TRAIN, "--dataset", "cifar"], "--dataset"),
    ([*TRAIN, "--no-such-flag"], "no such option"),
    # trainer checks that need no data: before anything is read or written
    ([*TRAIN, "--model", "resnet18"], "--model resnet18: TL-Align does not support"),
    ([*TRAIN, "--model", "convnext_tiny"], "--model convnext_tiny: TL-Align does not support"),
    ([*TRAIN, "--model", "vit_medium_patch16_gap_256"], "without a cls token"),
    ([*TRAIN, "--model", "deit_tiny_patch16_224", "--img-size", "100"], "--img-size 100 is not a multiple"),
    ([*TRAIN, "--model", "tla_swin_micro", "--img-size", "24"], "windows do not tile"),
    ([*TRAIN, "--model", "no_such_model"], "unknown model"),
    ([*TRAIN, "--model", "resnet18", "--no-tl-align", "--img-size", "64"], "--model resnet18 cannot be built"),
    ([*TRAIN, "--num-classes", "1", "--model", "tla_vit_nano"], "--num-classes"),
    ([*TRAIN, "--eval-only", "--model", "tla_vit_nano"], "--eval-only needs --resume"),
    ([*TRAIN, "--model", "tla_vit_nano", "--interpolation", "sharpest"], "--interpolation 'sharpest'"),
    ([*TRAIN, "--model", "tla_vit_nano", "--aa", "v0x"], "--aa 'v0x'"),
    ([*TRAIN, "--model", "tla_vit_nano", "--num-classes", "99999999999999999999999"], "--num-classes"),
    ([*SUBMIT, "--model", "tla_vit_nano", "--interpolation", "sharpest", "--dry-run"], "preflight failed: model"),
    # submission
    ([*SUBMIT, "--model", "resnet18"], "preflight failed: model: --model resnet18"),
    ([*SUBMIT, "--model", "resnet18", "--dry-run"], "preflight failed: model"),
    ([*SUBMIT, "--model", "tla_vit_nano", "--batch-size", "5000"], "preflight failed: batch: --batch-size 5000"),
    ([*SUBMIT, "--model", "tla_vit_nano", "--tasks-per-node", "2", "--batch-size", "1000", "--dry-run"],
     "preflight failed: batch: --batch-size 1000 x 2 rank(s)"),
    ([*SUBMIT, "--model", "tla_vit_nano", "--num-classes", "5"], "preflight failed: classes: --num-classes 5"),
    ([*SUBMIT, "--name", ""], "not a safe file name"),
    ([*SUBMIT, "--name", "../../etc"], "not a safe file name"),
    ([*SUBMIT, "--cluster", "no-such-profile"], "unknown cluster profile"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles"], "does not exist"),
    ([*SUBMIT, "--tasks-per-node", "0"], "--tasks-per-node"),
    ([*SUBMIT, "--cluster", str(PROFILES / "slurm-gpu.yaml"), "--time", "0", "--dry-run"], "--time:"),
    ([*SUBMIT, "--cluster", str(PROFILES / "slurm-gpu.yaml"), "--nodes", "-1", "--dry-run"], "--nodes"),
    ([*SUBMIT, "--time", "abc"], "--time"),
    ([*SWEEP, "--seeds", "0,0"], "--seeds gives 0 twice"),
    ([*SWEEP, "--seeds", "0,x"], "--seeds"),
    ([*SWEEP, "--seeds", ","], "--seeds is empty"),
    ([*SWEEP, "--arms", "tla,tl-align"], "--arms gives tl-align twice"),
    ([*SWEEP, "--arms", "mixmatch"], "unknown arm"),
    ([*SWEEP, "--models", "tla_vit_nano,tla_vit_nano"], "--models gives tla_vit_nano twice"),
    ([*SWEEP, "--models", "tla_vit_nano,resnet18", "--dry-run"], "preflight failed: model: --model resnet18"),
    # profiles
    ([*SUBMIT, "--cluster", "{tmp}/profiles/bool-time.yaml"], "slurm.time_min: input should be a valid integer"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles/dup.yaml"], "duplicate key 'nodes'"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles/inf.yaml"], "slurm.mem_gb"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles/text-nodes.yaml"], "slurm.nodes"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles/list.yaml"], "must be a mapping"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles/binary.yaml"], "not a text"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles/tabs.yaml"], "not valid YAML"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles/unknown.yaml"], "unknown key"),
    ([*SUBMIT, "--cluster", "{tmp}/profiles/runtime.yaml"], "container.runtime"),
    (["cluster", "check", "{tmp}/profiles/dup.yaml"], "duplicate key"),
    # reading commands
    (["status", "ghost"], "does not exist"),
    (["status", "--bogus"], "no such option"),
    (["logs", "ghost"], "does not exist"),
    (["logs", "good-a", "--rank", "3"], "--rank 3: run good-a has 1 rank"),
    (["logs", "good-a", "--rank", "-1"], "--rank"),
    (["report", "ghost"], "does not exist"),
    (["report", "--format", "xml"], "--format"),
    (["report", "--output", "{tmp}"], "--output"),
    (["report", "--plot", "{tmp}"], "--plot"),
    (["report", "--plot", "{tmp}/plot.gif"], "--plot"),
    (["report", "--sweep", "nope"], "no runs of a sweep"),
    (["report", "--sweep", ""], "no runs of a sweep"),
    (["eval", "checkpoint", "/nonexistent/ckpt.pth"], "does not exist"),
    (["eval", "checkpoint", "ghost"], "does not exist"),
    (["resume", "ghost"], "does not exist"),
    (["resume", "good-a", "--time", "0"], "--time"),
    (["cancel", "ghost"], "does not exist"),
    (["signal", "good-a", "--signal", "KILL"], "--signal"),
    (["data", "prepare", "imagenet", "{tmp}/d"], "imagenet"),
    (["no-such-command"], "no such command"),
]

PROFILE_FILES = {
    "bool-time.yaml": "executor: slurm\nslurm:\n  time_min: true\n",
    "dup.yaml": "executor: slurm\nslurm:\n  nodes: 1\n  nodes: 4\n",
    "inf.yaml": "executor: slurm\nslurm:\n  mem_gb: .inf\n",
    "text-nodes.yaml": "executor: slurm\nslurm:\n  nodes: '2'\n",
    "list.yaml": "- executor: slurm\n",
    "binary.yaml": b"\xff\xfe\x00executor",
    "tabs.yaml": "executor: slurm\nslurm:\n\tnodes: 2\n",
    "unknown.yaml": "executor: slurm\nsurm:\n  nodes: 2\n",
    "runtime.yaml": "container:\n  runtime: docker\n",
}


def _case(args: list[str], fragment: str):
    """The cases that build a model (timm and torch imported: seconds each) are `slow`: `make test`
    runs them, `make test-fast` leaves them out."""
    builds = "preflight failed" in fragment or (args[0] == "train" and "--model" in args)
    return pytest.param(args, fragment, id=" ".join(args[:1] + args[-2:]), marks=[pytest.mark.slow] if builds else [])


@pytest.mark.parametrize("args, fragment", [_case(a, f) for a, f in ARGS])
def test_bad_argument_is_one_line_and_writes_nothing(world, digits, tmp_path, args, fragment):
    root, env = world
    for name, text in PROFILE_FILES.items():
        path = tmp_path / "profiles" / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    before = snapshot(tmp_path)
    args = [a.replace("{data}", str(digits)).replace("{tmp}", str(tmp_path)) for a in args]
    one_line_error(tla(env, *args), fragment)
    # nothing added, removed or changed: every byte of the good runs is as it was (stronger than reading
    # them back with `tla status`, and no second process per case)
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------- bad data


def _png_header_claiming(path: Path, w: int, h: int) -> None:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def _one_image(data: Path, split="train", cls="3") -> Path:
    return sorted((data / split / cls).iterdir())[5]


def _cut_in_half(data):
    f = _one_image(data)
    b = f.read_bytes()
    f.write_bytes(b[: len(b) // 2])
    return f.name


def _bomb(data):
    _png_header_claiming(_one_image(data), 30000, 30000)
    return _one_image(data).name


def _over_limit(data):  # over PIL's limit but under its hard error: PIL only warns, the check refuses
    _png_header_claiming(_one_image(data), 12000, 12000)
    return "claims 12000x12000 pixels"


def _empty_file(data):
    _one_image(data, "val").write_bytes(b"")
    return _one_image(data, "val").name


def _text_as_png(data):
    _one_image(data).write_text("not an image")
    return _one_image(data).name


def _one_class(data):
    for split in ("train", "val"):
        for c in (data / split).iterdir():
            if c.name != "0":
                shutil.rmtree(c)
    return "at least two"


def _broken_link(data):
    (data / "train" / "3" / "zz.png").symlink_to(data / "nowhere.png")
    return "zz.png is a broken link"


def _no_val(data):
    shutil.rmtree(data / "val")
    return "val"


def _empty_class(data):
    for f in (data / "train" / "4").iterdir():
        f.unlink()
    return "has no images"


def _class_mismatch(data):
    (data / "val" / "9").rename(data / "val" / "nine")
    return "classes differ"


def _train_is_file(data):
    shutil.rmtree(data / "train")
    (data / "train").write_text("x")
    return "does not exist"


BAD_DATA = [_cut_in_half, _bomb, _over_limit, _empty_file, _text_as_png, _one_class, _broken_link, _no_val,
            _empty_class, _class_mismatch, _train_is_file]


@pytest.mark.parametrize("spoil", BAD_DATA, ids=[f.__name__.strip("_") for f in BAD_DATA])
def test_bad_data_is_refused_before_anything_is_queued(world, digits, tmp_path, spoil):
    root, env = world
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    (data / ".tla-dataset").unlink(missing_ok=True)  # an ImageFolder the user made, not a bundled one
    fragment = spoil(data)
    for dry in ([], ["--dry-run"]):
        proc = tla(env, "submit", "train", "--name", "d", "--model", "tla_vit_nano", "--data-path", data, *dry)
        one_line_error(proc, fragment)
        assert not (root / "d").exists()
    assert_others_readable(env)


@pytest.mark.parametrize("spoil", [_cut_in_half, _bomb, _one_class], ids=["cut-png", "bomb-png", "one-class"])
@pytest.mark.slow
def test_trainer_refuses_bad_data_at_start_not_at_step_n(digits, tmp_path, spoil):
    data = tmp_path / "data"
    shutil.copytree(digits, data)
    (data / ".tla-dataset").unlink(missing_ok=True)
    fragment = spoil(data)
    proc = run_tla("train", "--model", "tla_vit_nano", "--data-path", data, "--output-dir", tmp_path / "out",
                   "--epochs", "1", "--batch-size", "8", "--workers", "0", cwd=tmp_path)
    one_line_error(proc, fragment)
    assert not (tmp_path / "out").exists()  # refused before the run directory was made


def test_a_data_folder_removed_while_it_is_read_is_a_data_error(digits, tmp_path, monkeypatch):
    """A job that starts as its data is being deleted (seen on the SLURM suite) finds a class folder gone
    between listing and reading it: a DataError naming it, not a FileNotFoundError traceback. The
    removal is made to happen at that moment: the first listing of val/9 deletes it just before."""
    from tla_jobs.data import folders
    from tla_jobs.errors import DataError

    data = tmp_path / "data"
    shutil.copytree(digits, data)
    doomed, real_scandir = data / "val" / "9", os.scandir

    def scandir(path):
        if not isinstance(path, int) and Path(path) == doomed and doomed.exists():
            shutil.rmtree(doomed)
        return real_scandir(path)

    monkeypatch.setattr(folders.os, "scandir", scandir)
    with pytest.raises(DataError, match=f"{doomed} does not exist: the data folder changed while it was read"):
        folders.check_image_folder(data, verify_images=False)


# ------------------------------------------------------------------------ full and read-only disks


def _mount(path: Path, options: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {res.stderr.strip()}")


@pytest.fixture
def mounts(tmp_path):
    made = []

    def mount(name: str, options: str) -> Path:
        path = tmp_path / name
        _mount(path, options)
        made.append(path)
        return path

    yield mount
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(path: Path) -> None:
    """Fill the filesystem holding ``path`` to the last byte."""
    fd = os.open(path / ".filler", os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)


@pytest.mark.slow
def test_read_only_runs_root(world, digits, mounts):
    root, env = world
    ro = mounts("ro", "size=4m")
    shutil.copytree(root, ro / "runs")
    (ro / "runs" / "good-a" / "checkpoint_last.pth").write_bytes(b"x")
    subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
    env = {**env, "TLA_RUNS": str(ro / "runs")}
    before = sorted(str(p) for p in ro.rglob("*"))
    fast = ["--model", "tla_vit_nano", "--dataset", "digits", "--data-path", str(digits)]
    one_line_error(tla(env, "submit", "train", "--name", "new", *fast, "--dry-run"), "runs root")
    one_line_error(tla(env, "submit", "train", "--name", "new", *fast), "runs root")
    one_line_error(tla(env, "submit", "sweep", "--name", "sw", *fast), "runs root")
    one_line_error(tla(env, "resume", "good-a"))  # read-only (or refused: it has completed)
    one_line_error(tla(env, "eval", "checkpoint", "good-a"), "read-only")
    one_line_error(tla(env, "report", "--plot", ro / "plot.png"), f"{ro / 'plot.png'} is on a read-only")
    one_line_error(tla(env, "report", "--output", ro / "report.md"), f"{ro / 'report.md'} is on a read-only")
    one_line_error(tla(env, "train", *fast, "--output-dir", ro / "out", "--epochs", "1"), "read-only")
    one_line_error(tla(env, "data", "prepare", "digits", ro / "digits"), "read-only")
    cancel = tla(env, "cancel", "good-a")  # nothing live to stop: says so, or fails in one line
    assert "Traceback" not in cancel.stderr and len(cancel.stderr.strip().splitlines()) <= 1
    assert sorted(str(p) for p in ro.rglob("*")) == before
    assert tla(env, "status", "good-a").returncode == 0 and tla(env, "report").returncode == 0


@pytest.mark.slow
def test_full_disk(world, digits, mounts, tmp_path):
    root, env = world
    full = mounts("full", "size=512k")
    shutil.copytree(root, full / "runs")
    (full / "report.md").write_text("the previous report\n")
    _fill(full)
    env = {**env, "TLA_RUNS": str(full / "runs")}
    fast = ["--model", "tla_vit_nano", "--dataset", "digits", "--data-path", str(digits)]
    one_line_error(tla(env, "submit", "train", "--name", "new", *fast), "no space left")
    assert not (full / "runs" / "new").exists()  # no half-made run blocks the name
    one_line_error(tla(env, "submit", "sweep", "--name", "sw", "--seeds", "0,1", "--arms", "tla", *fast),
                   "no space left")
    assert sorted(p.name for p in (full / "runs").iterdir()) == ["good-a", "good-b"]
    one_line_error(tla(env, "report", "--output", full / "report.md"), "no space left")
    assert (full / "report.md").read_text() == "the previous report\n"  # replaced whole or not at all
    one_line_error(tla(env, "report", "--plot", full / "plot.png"), "no space left")
    one_line_error(tla(env, "resume", "good-a"))  # no space (or refused: it has completed)
    one_line_error(tla(env, "train", *fast, "--output-dir", full / "out", "--epochs", "1", "--workers", "0",
                       "--batch-size", "8"), "no space left")
    assert not list(full.rglob("*.tmp"))  # failed atomic writes leave no temporary files
    assert json.loads((full / "runs" / "good-a" / "run.json").read_text())["name"] == "good-a"
    assert tla(env, "status", "good-a").returncode == 0


# --------------------------------------------------------------------------------- logs and modes


def test_logs_show_each_trainer_line_once(world):
    root, env = world
    run = root / "good-a"
    trainer = ["2026-11-26 10:00:00 [rank 0] INFO resumed from checkpoint_last.pth",
               "2026-11-26 10:00:05 [rank 0] INFO epoch 1/3: top-1 70.00"]
    (run / "log_rank0.txt").write_text("\n".join(trainer) + "\n")
    sub = run / "submitit"
    sub.mkdir()
    (sub / f"{JOB}_0_log.err").write_text("\n".join(trainer) + "\nsubmitit WARNING something only here\n")
    (sub / f"{JOB}_0_log.out").write_text("submitit INFO job started\n")
    out = tla(env, "logs", "good-a", check=True).stdout.splitlines()
    for line in trainer:
        assert sum(line in o for o in out) == 1, out
    assert any("something only here" in o for o in out) and any("job started" in o for o in out)
    assert tla(env, "logs", "good-a", "--rank", "0", check=True).stdout.count("top-1 70.00") == 1
    one_line_error(tla(env, "logs", "good-a", "--rank", "1"), "--rank 1: run good-a has 1 rank")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_run_files_follow_the_umask(tmp_path, umask, mode):
    code = ("import os, sys; from pathlib import Path\n"
            f"os.umask({umask})\n"
            "from tla_jobs.fsutil import atomic_write_json, atomic_write_text\n"
            "from tla_jobs.jobs import records\n"
            "root = Path(sys.argv[1])\n"
            "records.create(root / 'r', {'spec': {}, 'profile': {}})\n"
            "atomic_write_text(root / 'r' / 'metrics.jsonl', '{}\\n')\n")
    subprocess.run([os.sys.executable, "-c", code, str(tmp_path)], check=True)
    for name in ("run.json", "metrics.jsonl"):
        assert (tmp_path / "r" / name).stat().st_mode & 0o777 == mode, name
