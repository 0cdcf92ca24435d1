"""The `tla` CLI on the local profile (real submitit local jobs, real tiny training runs), the
dry-run scripts for SLURM/Pyxis/Apptainer against expected files, and the bad-input catalog."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FAST, ROOT, assert_clean_error, runs_env, tla, wait_for
from conftest import status as status_json
from typer.testing import CliRunner

GOLDEN = ROOT / "tests" / "golden"


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A fresh runs root and the test profiles, for subprocesses and in-process calls alike."""
    env = runs_env(tmp_path / "runs")
    for k, v in env.items():
        if k != "runs":
            monkeypatch.setenv(k, v)
    return env


def test_help_and_fast_commands_do_not_import_torch(env):
    for args in (["--help"], ["status"], ["report"], ["status", "--json"], ["logs", "no-such-run"]):
        code = (f"import sys; from tla_jobs.cli import app; sys.argv=['tla', *{args!r}]\n"
                "try:\n    app()\nexcept SystemExit:\n    pass\n"
                "bad=[m for m in ('torch','timm') if m in sys.modules]\n"
                "print('IMPORTED', bad) if bad else print('CLEAN')")
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env={**os.environ, **{k: v for k, v in env.items() if k != "runs"}})
        assert "CLEAN" in proc.stdout, (args, proc.stdout, proc.stderr)


# ------------------------------------------------------------------------------------ local, real


@pytest.mark.slow
def test_submit_status_report_and_eval_job_on_local_profile(env, digits):
    proc = tla(env, "submit", "train", "--name", "r1", *FAST, "--data-path", digits, "--epochs", "2",
               "--step-delay", "0.02", "--json", check=True)
    sub = json.loads(proc.stdout)
    assert sub["executor"] == "local" and sub["job_id"].isdigit()
    seen = wait_for(lambda: (s := status_json(env, "r1"))["state"] in ("RUNNING", "COMPLETED") and s)
    if seen["state"] == "RUNNING":  # the process table says so, not a stale file
        assert seen["source"] == "process table" and [j["state"] for j in seen["jobs"]] == ["RUNNING"], seen
    final = wait_for(lambda: (s := status_json(env, "r1"))["state"] == "COMPLETED" and s, timeout=300)
    (attempt,) = final["attempts"]  # one attempt, run by the job submitted, which ended as the trainer said
    assert attempt["start"]["job_id"] == sub["job_id"] and attempt["end"]["reason"] == "completed", attempt
    assert final["job_ids"] == [sub["job_id"]] and final["epoch"] == 2
    record = json.loads((env["runs"] / "r1" / "run.json").read_text())
    assert record["submissions"][0]["job_id"] == sub["job_id"] and record["spec"]["model"] == "tla_vit_nano"
    report = json.loads(tla(env, "report", "r1", "--format", "json", check=True).stdout)
    assert report[0]["best_acc1"] > 10 and report[0]["mixing"] == "tl-align" and report[0]["eval_acc1"] is None
    tla(env, "eval", "checkpoint", "r1", check=True)
    report = wait_for(lambda: (r := json.loads(tla(env, "report", "r1", "--format", "json").stdout))[0]["eval_acc1"]
                      is not None and r, timeout=120)
    metrics = [json.loads(x) for x in (env["runs"] / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert report[0]["eval_acc1"] == pytest.approx(metrics[-1]["acc1"])
    csv = tla(env, "report", "--format", "csv", "--plot", env["runs"] / "plot.png", check=True).stdout
    assert csv.splitlines()[0].startswith("run,state,model") and (env["runs"] / "plot.png").stat().st_size > 1000
    md = tla(env, "report", "--format", "md", "--paper", check=True).stdout
    assert "| r1 | COMPLETED | tla_vit_nano | tl-align |" in md


@pytest.mark.slow
def test_preemption_signal_requeues_and_resumes_monotonically(env, digits):
    tla(env, "submit", "train", "--name", "pre", *FAST, "--data-path", digits, "--epochs", "2",
        "--step-delay", "0.1", "--checkpoint-every-min", "0", check=True)
    run = env["runs"] / "pre"
    wait_for(lambda: (run / "heartbeat.json").exists()
             and json.loads((run / "heartbeat.json").read_text()).get("global_step", 0) >= 6)
    tla(env, "signal", "pre", check=True)  # USR2, as SLURM sends before a preemption or time limit
    final = wait_for(lambda: (s := status_json(env, "pre"))["state"] in ("COMPLETED", "FAILED") and s, timeout=300)
    assert final["state"] == "COMPLETED"
    attempts = final["attempts"]
    assert len(attempts) == 2
    assert attempts[0]["end"]["reason"] == "signal:SIGUSR2"
    stopped = attempts[0]["end"]["global_step"]
    assert attempts[1]["start"]["resumed_from"]["step"] == stopped >= 6
    assert attempts[1]["start"]["job_id"] == attempts[0]["start"]["job_id"]  # requeued, same job
    epochs = [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [0, 1]
    detail = tla(env, "status", "pre", check=True).stdout
    assert "signal:SIGUSR2" in detail and "checkpoint_last.pth" in detail


@pytest.mark.slow
def test_cancel_stops_the_job(env, digits):
    tla(env, "submit", "train", "--name", "c1", *FAST, "--data-path", digits, "--epochs", "50",
        "--step-delay", "0.1", check=True)
    run = env["runs"] / "c1"
    wait_for(lambda: (run / "heartbeat.json").exists())
    pid = json.loads((run / "heartbeat.json").read_text())["pid"]
    tla(env, "cancel", "c1", check=True)
    final = wait_for(lambda: (s := status_json(env, "c1"))["state"] == "CANCELLED" and s, timeout=60)
    assert final["state"] == "CANCELLED"
    wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2],
             timeout=30)


@pytest.mark.slow
def test_sweep_is_one_array_and_every_element_is_its_own_run(env, digits):
    proc = tla(env, "submit", "sweep", "--name", "sw", "--models", "tla_vit_nano", "--arms", "tla,grid",
               "--seeds", "0,1", *FAST, "--data-path", digits, "--epochs", "1", "--max-steps", "3", "--json",
               check=True)
    subs = json.loads(proc.stdout)
    assert len(subs) == 4 and len({s["run"] for s in subs}) == 4
    for s in subs:
        wait_for(lambda s=s: status_json(env, s["run"])["state"] == "COMPLETED", timeout=300)
        spec = json.loads((env["runs"] / s["run"] / "run.json").read_text())["spec"]
        assert spec["tl_align"] == ("-tl-align-" in s["run"])  # NAME-MODEL-ARM-sSEED
        assert (env["runs"] / s["run"] / "checkpoint_last.pth").exists()


# ----------------------------------------------------------------------------------------- dry runs


def _normalise(text: str, env, data: Path) -> str:
    return (text.replace(str(env["runs"]), "<RUNS>").replace(sys.executable, "<PYTHON>")
            .replace(str(data), "<DATA>"))


@pytest.mark.parametrize("profile", ["slurm-gpu", "pyxis", "apptainer", "podman"])
def test_dry_run_scripts_match_expected_files(env, digits, profile):
    from tla_jobs.jobs import profiles
    from tla_jobs.jobs.plan import Plan
    from tla_jobs.jobs.submit import render

    prof = profiles.load(profile)
    run_dir = env["runs"] / "dry"
    spec = {"model": "deit_small_patch16_224", "data_path": str(digits), "output_dir": str(run_dir)}
    script = _normalise(render(Plan("dry", run_dir, prof, [spec])), env, digits)
    golden = GOLDEN / f"{profile}.sbatch"
    if os.environ.get("UPDATE_GOLDEN"):  # an explicit action: rewrite, then fail so that nothing passes on it
        golden.write_text(script)
        pytest.fail(f"UPDATE_GOLDEN: rewrote {golden.relative_to(ROOT)}; review `git diff`, then run the test "
                    "again without UPDATE_GOLDEN")
    assert script == golden.read_text()
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid shell
    if profile != "slurm-gpu":
        assert "#SBATCH --signal=B:USR2@120" in script and "scontrol requeue" in script
    assert not run_dir.exists()


@pytest.mark.slow
def test_dry_run_prints_script_and_checks_and_writes_nothing(env, digits, tmp_path):
    # no SLURM commands on PATH: the script is still printed, the failed sinfo check makes the exit non-zero
    empty_bin = tmp_path / "bin"
    empty_bin.mkdir()
    proc = tla({**env, "PATH": str(empty_bin)}, "submit", "train", "--name", "d1", "--cluster", "pyxis", "--model",
               "deit_tiny_patch16_224", "--data-path", digits, "--nodes", "2", "--time", "90", "--dry-run")
    assert "#SBATCH --nodes=2" in proc.stdout and "#SBATCH --time=90" in proc.stdout
    assert "--container-image=/shared/images/tla.sqsh" in proc.stdout
    assert "srun --unbuffered" in proc.stdout and "preflight" in proc.stdout
    assert_clean_error(proc, "preflight failed: sinfo")
    assert not env["runs"].exists()


def test_local_dry_run_writes_nothing_and_the_real_submission_still_works(env, digits):
    """A dry run creates no run directory, no runs root, no .sweep-NAME: the same names stay free."""
    train = ["--dataset", "digits", "--data-path", digits, "--model", "tla_vit_nano"]
    proc = tla(env, "submit", "train", "--name", "d2", *train, "--dry-run", check=True)
    assert "submitit.local._local" in proc.stdout and "ok  model: tla_vit_nano" in proc.stdout
    proc = tla(env, "submit", "sweep", "--name", "sw", "--arms", "tla", "--seeds", "0,1", *train, "--dry-run",
               check=True)
    assert "sw-tla_vit_nano-tl-align-s1" in proc.stdout
    assert not env["runs"].exists()
    assert "does not exist" in tla(env, "status", "d2").stderr


@pytest.mark.parametrize("args, fragment, submit_too", [
    (["--model", "resnet18"], "--model resnet18: TL-Align does not support", True),
    (["--model", "convnext_tiny"], "--model convnext_tiny: TL-Align does not support", False),
    (["--model", "vit_medium_patch16_gap_256"], "without a cls token", False),
    (["--model", "deit_tiny_patch16_224", "--img-size", "20"], "--img-size 20 is not a multiple", True),
    (["--model", "tla_swin_micro", "--img-size", "24"], "windows do not tile", False),
    (["--model", "resnet18", "--no-tl-align", "--img-size", "64"], "--model resnet18 cannot be built", False),
])
@pytest.mark.slow
def test_dry_run_with_a_failed_check_exits_non_zero(env, digits, args, fragment, submit_too):
    """Preflight runs the trainer's model checks (meta device): a job TL-Align cannot run is never queued,
    and a dry run that fails a check says so on stderr and exits non-zero, after printing its checks.
    (A real submission runs the same checks: tried for two of the cases, each costs seconds of timm.)"""
    proc = tla(env, "submit", "train", "--name", "bad", "--data-path", digits, *args, "--dry-run")
    assert "FAIL  model" in proc.stdout
    assert_clean_error(proc, fragment)
    if submit_too:
        proc = tla(env, "submit", "train", "--name", "bad", "--data-path", digits, *args)
        assert_clean_error(proc, fragment)
    assert not env["runs"].exists()


def test_shell_metacharacters_in_paths_stay_data(env, tmp_path, digits):
    """A data path full of shell syntax reaches the container command as one argument, runs nothing."""
    import shutil

    evil = tmp_path / "d $(touch PWNED) `touch PWNED2`; touch PWNED3 'q\" & |"
    shutil.copytree(digits, evil)
    from tla_jobs.jobs import profiles
    from tla_jobs.jobs.plan import Plan
    from tla_jobs.jobs.submit import render

    run_dir = env["runs"] / "meta"
    script = render(Plan("meta", run_dir, profiles.load("podman"), [{"model": "m", "data_path": str(evil)}]))
    line = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    # run the step line with srun replaced by printf: the shell parses it exactly as sbatch would
    out = subprocess.run(["bash", "-c", "printf '%s\\n' " + line.split(" ", 1)[1]], capture_output=True,
                         text=True, cwd=tmp_path, check=True).stdout.splitlines()
    assert f"{evil}:{evil}" in out
    assert not list(tmp_path.glob("PWNED*"))
    assert shlex.split(line)[0] == "srun"


# ---------------------------------------------------------------------------------------- bad input


BAD = [
    (["submit", "train", "--name", "x", "--cluster", "nope"], "unknown cluster profile"),
    (["submit", "train", "--name", "x", "--cluster", "malformed"], "not valid YAML"),
    (["submit", "train", "--name", "x", "--cluster", "unknown-key"], "slurm.partitionn: unknown key"),
    (["submit", "train", "--name", "x", "--cluster", "negative"], "slurm.nodes"),
    (["submit", "train", "--name", "x", "--cluster", "slurm-gpu", "--nodes", "0"], "--nodes"),
    (["submit", "train", "--name", "../evil"], "not a safe file name"),
    (["submit", "train", "--name", "a;rm -rf ~"], "not a safe file name"),
    (["submit", "train", "--name", "x", "--model", "nope_model"], "unknown model"),
    (["submit", "train", "--name", "x", "--data-path", "/nonexistent/data"], "does not exist"),
    (["submit", "train", "--name", "x", "--epochs", "-3"], "epochs"),
    (["eval", "checkpoint", "/nonexistent/ckpt.pth"], "does not exist"),
    (["status", "ghost"], "does not exist"),
    (["logs", "ghost"], "does not exist"),
    (["cancel", "ghost"], "does not exist"),
    (["resume", "ghost"], "does not exist"),
    (["report", "ghost"], "does not exist"),
    (["report", "--format", "xml"], "--format"),
    (["cluster", "check", "unknown-key"], "unknown key"),
]


@pytest.mark.parametrize("args, message", BAD, ids=[" ".join(a[:3]) + " " + m for a, m in BAD])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(env, digits, args, message):
    env["runs"].mkdir(parents=True, exist_ok=True)
    (env["runs"] / "keep").mkdir()
    (env["runs"] / "keep" / "file.txt").write_text("precious")
    before = sorted(p.relative_to(env["runs"]) for p in env["runs"].rglob("*"))
    if args[:2] == ["submit", "train"] and "--data-path" not in args:
        args = [*args, "--data-path", str(digits)]
    runner = CliRunner()
    from tla_jobs.cli import app

    result = runner.invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert message.lower() in result.output.lower() or message.lower() in (result.stderr or "").lower()
    assert sorted(p.relative_to(env["runs"]) for p in env["runs"].rglob("*")) == before
    assert (env["runs"] / "keep" / "file.txt").read_text() == "precious"


def test_bad_input_as_subprocess_has_no_traceback(env, digits):
    proc = tla(env, "submit", "train", "--name", "x", "--cluster", "unknown-key", "--data-path", digits)
    assert_clean_error(proc, "unknown key")


def test_existing_run_needs_resume(env, digits):
    from tla_jobs.jobs import records

    records.create(records.run_dir("taken"), {"spec": {}, "profile": {}})
    before = (env["runs"] / "taken" / "run.json").read_text()
    proc = tla(env, "submit", "train", "--name", "taken", "--data-path", digits)
    assert_clean_error(proc, "already exists")
    assert (env["runs"] / "taken" / "run.json").read_text() == before


def test_concurrent_record_updates_do_not_lose_writes(env):
    from tla_jobs.jobs import records

    path = records.run_dir("conc")
    records.create(path, {"spec": {}, "profile": {}})
    code = ("import sys; from pathlib import Path; from tla_jobs.jobs import records\n"
            "for i in range(25):\n"
            "    records.update(Path(sys.argv[1]), lambda r: r['evals'].append(\n"
            "        {'job_id': f'{sys.argv[2]}-{i}', 'executor': 'local', 'w': sys.argv[2], 'i': i}))\n")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(path), str(w)]) for w in range(4)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    record = json.loads((path / "run.json").read_text())
    assert len(record["evals"]) == 100


def test_status_benchmark_shape(env):
    """`tla status` reads many runs without touching torch (the benchmark times it; this checks it works)."""
    from tla_jobs.jobs import records

    for i in range(30):
        records.create(records.run_dir(f"syn{i:03d}"), {"spec": {"epochs": 10, "model": "m"}, "profile": {}})
    proc = tla(env, "status", "--json", check=True)
    assert len(json.loads(proc.stdout)) == 30
    assert re.search(r"NOT SUBMITTED", tla(env, "status", check=True).stdout)
