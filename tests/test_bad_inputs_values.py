"""Bad values, through real `tla` subprocesses: nonsense numbers, contradicting options, strict
config files, a dataset name that is not the folder's, SLURM options on the local executor, odd
environment values, values that must reach SLURM quoted or escaped, and ranks racing to prepare data.

Every refusal: exit 2, exactly one line on stderr (`tla: error: ...` naming the option, file or
variable), no traceback, and not one file of the test's world changed. Nothing here talks to a SLURM
cluster: the batch scripts are built without submitting (and PATH has no SLURM commands).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import test_bad_inputs as bad_inputs
from conftest import PROFILES, fake_sbatch, run_tla, runs_env, tla

TIMEOUT = 120  # every subprocess: a hang fails the test
NANO = ["--model", "tla_vit_nano", "--workers", "0"]


@pytest.fixture()
def world(tmp_path, digits):
    """A runs root (empty), the shared digits data, a folder of the user's own images, and a PATH
    without SLURM's commands."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), "/usr/bin", "/bin"])
    env = runs_env(tmp_path / "runs", PATH=path)
    own = tmp_path / "own"
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (own / split / c).mkdir(parents=True)
            src = next((digits / split / "0").iterdir())
            (own / split / c / "a.png").write_bytes(src.read_bytes())
    return env, tmp_path, own


def snapshot(*roots: Path) -> dict:
    """Every file under ``roots``: its bytes' hash (and every folder): what must not change."""
    out = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() and not p.is_symlink() else "dir"
    return out


def one_line_error(proc: subprocess.CompletedProcess, fragment: str) -> str:
    return bad_inputs.one_line_error(proc, fragment, code=2)


def refused(world, args, fragment: str, extra_env: dict | None = None) -> str:
    """`tla ARGS` refused in one line, with nothing on disk changed."""
    env, root, _own = world
    before = snapshot(root)
    proc = tla({**env, **(extra_env or {})}, *args, timeout=TIMEOUT)
    line = one_line_error(proc, fragment)
    assert snapshot(root) == before, "a refused command changed files"
    return line


# --------------------------------------------------------------------------- numbers and their relations

NONSENSE = [
    (["--lr", "1e308"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "1e-3", "--min-lr", "5"], "--min-lr"),
    (["--lr", "1e-3", "--warmup-lr", "100"], "--warmup-lr"),
    (["--lr", "1e-3", "--warmup-lr", "0.01"], "--warmup-lr"),
    (["--mixup", "1e308"], "--mixup"),
    (["--cutmix", "1e308"], "--cutmix"),
    (["--color-jitter", "1e308"], "--color-jitter"),
    (["--weight-decay", "1e308"], "--weight-decay"),
    (["--smoothing", "5"], "--smoothing"),
    (["--drop-path", "2"], "--drop-path"),
    (["--workers", "100000"], "--workers"),
    (["--batch-size", "1000000000"], "--batch-size"),
    (["--epochs", "1000000000"], "--epochs"),
    (["--warmup-epochs", "1000000000"], "--warmup-epochs"),
    (["--clip-grad", "1e308"], "--clip-grad"),
    (["--num-classes", str(2**40)], "--num-classes"),
    (["--checkpoint-every-min", "1e308"], "--checkpoint-every-min"),
]


@pytest.mark.parametrize("args,flag", NONSENSE, ids=[" ".join(a) for a, _ in NONSENSE])
def test_nonsense_numbers_are_refused_naming_the_flag(world, digits, args, flag):
    _env, root, _ = world
    refused(world, ["train", "--output-dir", root / "out", "--dataset", "digits", "--data-path", digits, *NANO, *args],
            flag)
    assert not (root / "out").exists()


def test_min_lr_above_the_default_lr_is_refused(world, digits):
    _env, root, _ = world
    line = refused(world, ["train", "--output-dir", root / "out", "--dataset", "digits", "--data-path", digits, *NANO,
                           "--min-lr", "5", "--epochs", "1"], "--min-lr 5 is above the default --lr")
    assert "global batch 64" in line


def test_synthetic_data_with_absurd_classes_is_refused_before_queueing(world):
    env, _, _ = world
    refused(world, ["submit", "train", "--name", "syn", "--dataset", "synthetic", "--num-classes", str(2**40), *NANO],
            "--num-classes")
    assert not env["runs"].exists()


def test_a_warm_up_longer_than_the_run_is_one_warning_not_a_refusal(world, digits):
    env, _, _ = world
    proc = tla(env, "submit", "train", "--name", "warm", "--dataset", "digits", "--data-path", digits, *NANO,
               "--epochs", "1", "--warmup-epochs", "50", "--dry-run", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("tla: warning: --warmup-epochs 50"), proc.stderr
    proc = tla(env, "submit", "train", "--name", "warm", "--dataset", "digits", "--data-path", digits, *NANO,
               "--epochs", "1", "--warmup-epochs", "0", "--dry-run", timeout=TIMEOUT)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
    assert not env["runs"].exists()
    # the trainer says it once too, with the run's first lines (in its log as well)
    out = env["runs"].parent / "warm"
    proc = tla(env, "train", "--output-dir", out, "--dataset", "digits", "--data-path", digits, *NANO, "--epochs", "1",
               "--max-steps", "1", "--batch-size", "32", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if "--warmup-epochs 5 is not shorter than --epochs 1" in ln]
    assert len(said) == 1 and "WARNING" in said[0], proc.stderr


# --------------------------------------------------------------------------------------- config files

CONFIGS = [
    ("epochs: true\n", "epochs: true is a yes/no value"),
    ("batch_size: false\n", "batch_size"),
    ("tl_align: 1\n", "tl_align: 1 is not true or false"),
    ("epochs: 3\nlr: 1.0e-3\nepochs: 4\n", "duplicate key 'epochs'"),
    ("lr: [1, 2]\n", "lr"),
    ("lr: 1.0e+308\n", "--lr"),
]


@pytest.mark.parametrize("text,fragment", CONFIGS, ids=[c[1] for c in CONFIGS])
def test_config_files_are_strict(world, digits, text, fragment):
    _env, root, _ = world
    recipe = root / "recipe.yaml"
    recipe.write_text(text)
    refused(world, ["train", "--config", recipe, "--output-dir", root / "out", "--dataset", "digits",
                    "--data-path", digits, *NANO], fragment)


def test_a_config_file_with_numbers_as_yaml_writes_them_still_works(world, digits):
    """`lr: 1e-3` is a string to PyYAML (no dot): it stays accepted, as pydantic reads it."""
    env, root, _ = world
    recipe = root / "recipe.yaml"
    recipe.write_text("lr: 1e-3\nepochs: 1\nwarmup_epochs: 0\n")
    proc = tla(env, "submit", "train", "--name", "cfg", "--config", recipe, "--dataset", "digits", "--data-path",
               digits, *NANO, "--dry-run", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------- data and executor


def test_a_dataset_name_that_is_not_the_folders_is_refused(world, digits):
    env, root, own = world
    refused(world, ["train", "--output-dir", root / "out", "--dataset", "fashion-mnist", "--data-path", digits,
                    *NANO], "--dataset fashion-mnist, but")
    refused(world, ["submit", "train", "--name", "fm", "--dataset", "fashion-mnist", "--data-path", digits, *NANO],
            "holds digits")
    refused(world, ["submit", "train", "--name", "own", "--dataset", "digits", "--data-path", own, *NANO],
            "--dataset imagefolder")
    assert not env["runs"].exists()
    # the user's own ImageFolder, and the prepared folder read as an ImageFolder, stay accepted
    for data in (own, digits):
        proc = tla(env, "submit", "train", "--name", "ok", "--dataset", "imagefolder", "--data-path", data, *NANO,
                   "--batch-size", "2", "--warmup-epochs", "0", "--dry-run", timeout=TIMEOUT)
        assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("args,flags", [
    (["--time", "5"], "--time"),
    (["--nodes", "2"], "--nodes"),
    (["--partition", "gpu"], "--partition"),
    (["--gpus-per-node", "1", "--time", "9"], "--gpus-per-node, --time"),
])
def test_slurm_options_on_the_local_executor_are_refused(world, digits, args, flags):
    env, _, _ = world
    line = refused(world, ["submit", "train", "--name", "loc", "--dataset", "digits", "--data-path", digits, *NANO,
                           *args, "--dry-run"], flags)
    assert "local executor" in line
    assert not env["runs"].exists()


@pytest.mark.parametrize("args,flag", [
    (["--tasks-per-node", "100000"], "--tasks-per-node"),  # that many processes on this machine
    (["--cluster", str(PROFILES / "slurm-gpu.yaml"), "--nodes", "10000000"], "--nodes"),
    (["--cluster", str(PROFILES / "slurm-gpu.yaml"), "--time", "99999999"], "--time"),
])
def test_absurd_resources_are_refused(world, digits, args, flag):
    env, _, _ = world
    refused(world, ["submit", "train", "--name", "res", "--dataset", "digits", "--data-path", digits, *NANO, *args,
                    "--dry-run"], flag)
    assert not env["runs"].exists()


# --------------------------------------------------------------------------------------- environment

ENV_CASES = [
    ({"TLA_CPU_THREADS": "abc"}, "TLA_CPU_THREADS"),
    ({"TLA_CPU_THREADS": "1e9"}, "TLA_CPU_THREADS"),
    ({"TLA_CPU_THREADS": "0"}, "TLA_CPU_THREADS"),
    ({"TLA_CPU_THREADS": "-1"}, "TLA_CPU_THREADS"),
    ({"TLA_CPU_THREADS": "100000"}, "TLA_CPU_THREADS"),
    ({"WORLD_SIZE": "abc"}, "WORLD_SIZE"),
    ({"RANK": "abc"}, "RANK"),
    ({"LOCAL_RANK": "abc"}, "LOCAL_RANK"),
    ({"SLURM_RESTART_COUNT": "abc"}, "SLURM_RESTART_COUNT"),
    ({"TLA_RENDEZVOUS_TIMEOUT_S": "soon"}, "TLA_RENDEZVOUS_TIMEOUT_S"),
]


@pytest.mark.parametrize("extra,name", ENV_CASES, ids=[f"{k}={v}" for e, _ in ENV_CASES for k, v in e.items()])
def test_odd_environment_values_are_one_line(world, digits, extra, name):
    _env, root, _ = world
    refused(world, ["train", "--output-dir", root / "out", "--dataset", "digits", "--data-path", digits, *NANO],
            f"environment variable {name}=", extra)
    assert not (root / "out").exists()


@pytest.mark.parametrize("extra,fragment", [
    ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR and MASTER_PORT not set"),
    ({"LOCAL_RANK": "7"}, "LOCAL_RANK=7 is not below LOCAL_WORLD_SIZE=1"),
], ids=["no-address", "local-rank"])
def test_ranks_that_cannot_meet_are_one_line(world, digits, extra, fragment):
    _env, root, _ = world
    refused(world, ["train", "--output-dir", root / "out", "--dataset", "digits", "--data-path", digits, *NANO],
            fragment, extra)
    assert not (root / "out").exists()


def test_odd_thread_count_is_refused_before_anything_is_queued(world, digits):
    env, _, _ = world
    refused(world, ["submit", "train", "--name", "thr", "--dataset", "digits", "--data-path", digits, *NANO],
            "TLA_CPU_THREADS", {"TLA_CPU_THREADS": "abc"})
    assert not env["runs"].exists()


def test_a_data_path_that_is_a_link_loop_is_one_line(world):
    env, root, _ = world
    (root / "loop1").symlink_to(root / "loop2")
    (root / "loop2").symlink_to(root / "loop1")
    refused(world, ["submit", "train", "--name", "lp", "--dataset", "digits", "--data-path", root / "loop1", *NANO],
            "--data-path")
    refused(world, ["train", "--output-dir", root / "out", "--dataset", "digits", "--data-path", root / "loop1",
                    *NANO], "loop1")


@pytest.mark.parametrize("key,value", [("slurm", "python: \"python '\""), ("container", "python: 'python \"'"),
                                       ("slurm", "python: '  '")])
def test_an_interpreter_that_cannot_be_split_is_refused_at_profile_load(world, digits, key, value):
    _env, root, _ = world
    prof = root / "bad.yaml"
    image = "  runtime: pyxis\n  image: /x.sqsh\n" if key == "container" else ""
    prof.write_text(f"executor: slurm\n{key}:\n{image}  {value}\n")
    refused(world, ["submit", "train", "--name", "py", "--cluster", prof, "--dataset", "digits", "--data-path", digits,
                    *NANO, "--dry-run"], f"profile {prof}: {key}:")


# ------------------------------------------------------------------------ values reaching the batch script


def _script(profile, run_dir: Path, data: Path) -> str:
    from tla_jobs.jobs.plan import Plan
    from tla_jobs.jobs.submit import render

    spec = {"model": "deit_small_patch16_224", "data_path": str(data), "output_dir": str(run_dir)}
    return render(Plan(run_dir.name, run_dir, profile, [spec]))


@pytest.mark.parametrize("runtime", ["pyxis", "apptainer", "podman"])
def test_container_python_is_quoted_word_by_word(tmp_path, digits, runtime):
    """`python; id #` reaches the step as three words for an interpreter named `python;`: run the
    script's srun line with `srun` a function that does nothing and an `id` on PATH that leaves a
    mark: the mark must not appear."""
    from tla_jobs.jobs import profiles

    prof = profiles.load(str(PROFILES / f"{runtime}.yaml"))
    prof = prof.model_copy(update={"container": prof.container.model_copy(update={"python": "python; id #"})})
    script = _script(prof, tmp_path / "runs" / "q", digits)
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    words = shlex.split(srun)
    assert "python;" in words and words[words.index("python;") + 1:][:2] == ["id", "#"], srun
    assert "PYTHONNOUSERSITE" in srun and "export PYTHONNOUSERSITE=1" in script  # the image's packages only
    bin_dir, mark = tmp_path / "bin", tmp_path / "id-ran"
    bin_dir.mkdir()
    (bin_dir / "id").write_text(f"#!/bin/sh\ntouch {shlex.quote(str(mark))}\n")
    (bin_dir / "id").chmod(0o755)
    proc = subprocess.run(["bash", "-c", f"srun() {{ :; }}\n{srun}\n"], capture_output=True, text=True,
                          timeout=TIMEOUT, env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"})
    assert proc.returncode == 0, proc.stderr
    assert not mark.exists(), "the container's python setting ran a command"


def test_a_percent_in_the_runs_root_is_escaped_on_output_and_error(tmp_path, digits):
    """sbatch and srun read '%' in --output/--error as a filename pattern ('%%' is a '%'): the
    runs root's own '%' is escaped there, submitit's %j/%t/%A_%a stay patterns, the folder given
    to the job stays as it is."""
    from tla_jobs.jobs import profiles

    root = tmp_path / "a%xb 50%"
    script = _script(profiles.load(str(PROFILES / "slurm-gpu.yaml")), root / "r", digits)
    escaped = str(root).replace("%", "%%")
    lines = script.splitlines()
    assert f"#SBATCH --output='{escaped}/r/submitit/%j_0_log.out'" in lines, script
    assert f"#SBATCH --error='{escaped}/r/submitit/%j_0_log.err'" in lines, script
    srun = shlex.split(next(ln for ln in lines if ln.startswith("srun ")))
    assert srun[srun.index("--output") + 1] == f"{escaped}/r/submitit/%j_%t_log.out"
    assert srun[srun.index("--error") + 1] == f"{escaped}/r/submitit/%j_%t_log.err"
    assert srun[-1] == f"{root}/r/submitit"  # the job's own folder argument: not a pattern, not escaped
    subprocess.run(["bash", "-n"], input=script, text=True, check=True, timeout=TIMEOUT)


def test_a_real_submission_escapes_the_percent_as_the_dry_run_does(tmp_path, digits, monkeypatch):
    """Through submitit's own submission (a stand-in `sbatch` on PATH that only answers with a job id):
    the script it writes has the runs root's '%' escaped, one job and a job array alike."""
    from submitit.core.utils import JobPaths

    from tla_jobs.jobs import profiles, submit
    from tla_jobs.jobs.plan import Plan

    monkeypatch.setenv("PATH", f"{fake_sbatch(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}")
    prof = profiles.load(str(PROFILES / "slurm-gpu.yaml"))
    root = tmp_path / "50%x"
    run_dir = root / "one"
    spec = {"model": "deit_small_patch16_224", "data_path": str(digits), "output_dir": str(run_dir)}
    ex = submit.executor_for(prof, run_dir / "submitit", "one", run_dir, [str(digits)], retry_dirs=[run_dir])
    job = ex.submit(print, "never runs")  # as submit_train submits it
    written = JobPaths(ex.folder, job.job_id).submission_file.read_text()
    assert written == submit.render(Plan("one", run_dir, prof, [spec]))
    assert f"#SBATCH --output={tmp_path}/50%%x/one/submitit/%j_0_log.out" in written.splitlines(), written
    sweep_dir = root / ".sweep-sw"
    ex = submit.executor_for(prof, sweep_dir, "sw", run_dir, [str(digits)] * 2, array_size=2)
    jobs = ex.map_array(print, ["a", "b"])
    written = JobPaths(ex.folder, jobs[0].job_id).submission_file.read_text()
    assert f"#SBATCH --error={tmp_path}/50%%x/.sweep-sw/%A_%a_0_log.err" in written.splitlines(), written
    assert f"--output {tmp_path}/50%%x/.sweep-sw/%A_%a_%t_log.out " in written


@pytest.mark.parametrize("tag", ["%j", "%t", "%A", "%a"])
def test_submitits_own_patterns_in_the_runs_root_are_refused(world, digits, tag):
    """submitit reads %j/%t/%A/%a in its folder as the job's ids, with no escape: refused."""
    _env, root, _ = world
    runs = root / f"a{tag}b"
    refused(world, ["submit", "train", "--name", "pct", "--dataset", "digits", "--data-path", digits, *NANO,
                    "--dry-run"], f"contains {tag}", {"TLA_RUNS": str(runs)})
    refused(world, ["submit", "train", "--name", "pct", "--cluster", PROFILES / "slurm-gpu.yaml", "--dataset",
                    "digits", "--data-path", digits, *NANO, "--dry-run"], f"contains {tag}", {"TLA_RUNS": str(runs)})
    assert not runs.exists()


# ----------------------------------------------------------------------------- ranks racing on set-up


def test_processes_racing_to_prepare_the_same_dataset_all_succeed(tmp_path):
    """Three `tla data prepare digits NEW` at once (as the ranks of a job whose data is not prepared
    yet): one prepares, the others wait and find it ready; the folder is whole, nothing half-made
    is left beside it."""
    dest = tmp_path / "data" / "digits"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    from conftest import TLA

    procs = [subprocess.Popen([*TLA, "data", "prepare", "digits", str(dest)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(3)]
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err
        assert "ready in" in out
    assert len(list(dest.rglob("*.png"))) == 1797
    assert sorted(p.name for p in (dest / "train").iterdir()) == [str(i) for i in range(10)]
    assert [p.name for p in dest.parent.iterdir() if "preparing" in p.name] == []
    # and a prepared folder asked for under another name is refused, not prepared over
    proc = run_tla("data", "prepare", "fashion-mnist", dest, timeout=TIMEOUT)
    one_line_error(proc, "holds digits")
