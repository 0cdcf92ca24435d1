"""Cluster profiles for a `tla` installed without the checkout: the packaged examples by name, the
user's profile directory, `tla cluster list`, and `tla cluster init` from sinfo (its refusals
anywhere, and on the real one-machine SLURM cluster what it writes, checks and runs)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
from pathlib import Path

import pytest
import yaml
from conftest import CLUSTER, FAST, assert_clean_error, cluster_env, sh, status, tla, wait_for

from tla_jobs.jobs import cluster_init as ci
from tla_jobs.jobs import profiles

EXAMPLES = ["apptainer", "deit-repro", "local", "pyxis", "slurm"]


@pytest.fixture
def world(tmp_path) -> dict:
    """Not the checkout: the working folder is tmp_path/work (no ./cluster_configs there),
    $TLA_CLUSTER_CONFIGS unset (empty), HOME and XDG_CONFIG_HOME inside tmp_path."""
    (tmp_path / "work").mkdir()
    runs = tmp_path / "work" / "runs"
    return {"TLA_RUNS": str(runs), "TLA_CLUSTER_CONFIGS": "", "HOME": str(tmp_path / "home"),
            "XDG_CONFIG_HOME": str(tmp_path / "config"), "runs": runs}


def user_dir(world) -> Path:
    return Path(world["XDG_CONFIG_HOME"]) / "tla" / "clusters"


def rows(world) -> dict:
    """`tla cluster list --json` by name; it exits 3 (one line naming them) when a profile does not load."""
    proc = tla(world, "cluster", "list", "--json")
    listed = {r["name"]: r for r in json.loads(proc.stdout)}
    bad = sorted(n for n, r in listed.items() if r["error"])
    assert proc.returncode == (3 if bad else 0), proc.stderr
    if bad:
        assert proc.stderr.count("\n") == 1 and ", ".join(bad) in proc.stderr, proc.stderr
    return listed


def no_slurm(world, tmp_path) -> dict:
    """The same world with a PATH that has no SLURM command (tla runs as `python -m`, by full path)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir(exist_ok=True)
    return {**world, "PATH": str(empty)}


# ------------------------------------------------------------------ the packaged examples and the user's folder


def test_packaged_examples_load_by_name_outside_the_checkout(world, tmp_path):
    listed = rows(world)
    assert sorted(listed) == EXAMPLES
    assert all(r["source"] == "built-in" and r["shadows"] == [] and r["error"] is None for r in listed.values())
    assert listed["slurm"]["executor"] == "slurm" and listed["local"]["executor"] == "local"
    # each loads by name: `cluster check` loads the profile first (a failure there is exit 2), then
    # checks the cluster, which without sinfo on PATH fails (exit 3, a check found a problem) for the
    # SLURM ones
    env = no_slurm(world, tmp_path)
    for name in EXAMPLES:
        proc = tla(env, "cluster", "check", name, "--json")
        checks = json.loads(proc.stdout)
        executor = listed[name]["executor"]
        assert checks[0] == {**checks[0], "name": "profile", "ok": True, "detail": f"{name}: {executor}"}, checks
        if executor == "local":
            assert proc.returncode == 0 and proc.stderr == "", proc.stderr
        else:
            assert proc.returncode == 3 and proc.stderr == "tla: error: 1 of 3 checks failed: sinfo\n", proc.stderr
    table = tla(world, "cluster", "list", check=True).stdout
    assert "built-in" in table and "deit-repro" in table


def test_a_user_profile_shadows_the_built_in_one(world, tmp_path):
    user_dir(world).mkdir(parents=True)
    mine = user_dir(world) / "slurm.yaml"
    mine.write_text("executor: local\ndescription: my own [b]slurm[/b]\n")
    (user_dir(world) / "broken.yaml").write_text("executor: [\n")
    listed = rows(world)
    assert listed["slurm"]["source"] == str(mine) and listed["slurm"]["shadows"] == ["built-in"]
    assert listed["slurm"]["executor"] == "local" and listed["pyxis"]["source"] == "built-in"
    assert listed["broken"]["executor"] is None and "not valid YAML" in listed["broken"]["error"]
    check = json.loads(tla(world, "cluster", "check", "slurm", "--json", check=True).stdout)
    assert check[0]["detail"] == "slurm: local"
    proc = tla(world, "cluster", "list")
    table = " ".join(proc.stdout.split())
    assert "my own [b]slurm[/b]" in table and "invalid" in table  # shown as written, not as markup
    assert proc.returncode == 3 and "1 profile(s) do not load: broken" in proc.stderr
    os.mkfifo(user_dir(world) / "fifo.yaml")  # listed as a profile that does not load, never read forever
    assert "is a FIFO" in rows(world)["fifo"]["error"]
    assert "is a FIFO" in tla(world, "cluster", "check", "fifo").stderr
    (user_dir(world) / "fifo.yaml").unlink()

    # ./cluster_configs comes before the user's folder; both are listed as shadowed
    work = Path(world["TLA_RUNS"]).parent / "cluster_configs"
    work.mkdir()
    (work / "slurm.yaml").write_text("executor: local\ndescription: the project's\n")
    assert rows(world)["slurm"]["shadows"] == [str(mine), "built-in"]

    # without XDG_CONFIG_HOME: ~/.config/tla/clusters
    home_dir = Path(world["HOME"]) / ".config" / "tla" / "clusters"
    home_dir.mkdir(parents=True)
    (home_dir / "h.yaml").write_text("executor: local\n")
    assert rows({**world, "XDG_CONFIG_HOME": ""})["h"]["source"] == str(home_dir / "h.yaml")
    # $TLA_CLUSTER_CONFIGS set: its entries are searched and its first one is the user's folder (tests
    # and CI pin their profiles this way: nothing of the real user's folder leaks in)
    other = tmp_path / "pinned"
    other.mkdir()
    (other / "p.yaml").write_text("executor: local\n")
    pinned = rows({**world, "TLA_CLUSTER_CONFIGS": str(other)})
    assert pinned["p"]["source"] == str(other / "p.yaml") and "broken" not in pinned and "h" not in pinned


# ------------------------------------------------------------------ `tla cluster init`: what it refuses


def test_init_without_sinfo_is_one_line_and_writes_nothing(world, tmp_path):
    proc = tla(no_slurm(world, tmp_path), "cluster", "init", "mine")
    assert_clean_error(proc, "sinfo is not installed")
    assert not user_dir(world).exists() and proc.stdout == ""


@pytest.mark.skipif(shutil.which("sinfo") is None, reason="sinfo is not installed")
@pytest.mark.slow
def test_init_when_the_controller_does_not_answer(world, tmp_path):
    """A real sinfo against a controller that is not there (port 9 on this machine): one line, exit 2."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=dead\nSlurmctldHost=localhost\nSlurmctldPort=9\nAuthType=auth/munge\n")
    proc = tla({**world, "SLURM_CONF": str(conf)}, "cluster", "init", "mine", timeout=120)
    assert_clean_error(proc, "sinfo failed")
    assert "controller" in proc.stderr and not user_dir(world).exists()


@pytest.mark.slow
def test_init_refuses_an_existing_file_bad_names_and_unknown_examples(world, tmp_path):
    env = no_slurm(world, tmp_path)  # each is refused before sinfo is asked
    user_dir(world).mkdir(parents=True)
    mine = user_dir(world) / "mine.yaml"
    mine.write_text("executor: local  # mine, hand-written\n")
    proc = tla(env, "cluster", "init", "mine")
    assert_clean_error(proc, "already exists: pass --force")
    assert mine.read_text() == "executor: local  # mine, hand-written\n"
    other = tmp_path / "elsewhere"
    other.mkdir()
    (other / "x.yaml").write_text("kept\n")
    assert_clean_error(tla(env, "cluster", "init", "x", "--dir", other), "already exists")
    assert (other / "x.yaml").read_text() == "kept\n"
    for bad in ["a/b", "../up", ".hidden", "x.yaml", "a b", "", "-x", "é"]:
        proc = tla(env, "cluster", "init", "--", bad)
        assert_clean_error(proc, "not a plain name")
    for source in ["local", "deit-repro", "bogus"]:
        assert_clean_error(tla(env, "cluster", "init", "y", "--from", source), "--from must be one of")
    assert sorted(p.name for p in user_dir(world).iterdir()) == ["mine.yaml"]


def test_cluster_commands_do_not_import_torch(world, tmp_path):
    for args in (["cluster", "list"], ["cluster", "init", "z"], ["cluster", "--help"]):
        code = (f"import sys; from tla_jobs.cli import app; sys.argv=['tla', *{args!r}]\n"
                "try:\n    app()\nexcept SystemExit:\n    pass\n"
                "print([m for m in ('torch', 'timm') if m in sys.modules])")
        proc = sh(sys.executable, "-c", code, env={k: v for k, v in no_slurm(world, tmp_path).items() if k != "runs"},
                  check=False, cwd=tmp_path)
        assert proc.stdout.splitlines()[-1] == "[]", (args, proc.stdout, proc.stderr)


# ------------------------------------------------------------------ reading sinfo, filling the examples


def test_sinfo_lines_gres_and_time_limits():
    text = ("gpu*|up|2-00:00:00|4|64|515000|gpu:a100:8(S:0-1)\n"
            "gpu*|up|2-00:00:00|2|48|380000+|gpu:a100:4(S:0,1),mps:400\n"
            "cpu|drain|infinite|10|128|1|(null)\n"
            "mixed|up|30:00|1|8|16000|gpu:a100:2,gpu:v100:2\n"
            "junk line\n")
    parts = ci.parse_sinfo(text)
    assert list(parts) == ["gpu", "cpu", "mixed"]
    gpu = parts["gpu"]
    assert (gpu.default, gpu.nodes, gpu.cpus, gpu.mem_mb, gpu.gpus, gpu.mixed) == (True, 6, 48, 380000, 4, True)
    assert parts["cpu"].gpus == 0 and not parts["cpu"].default and parts["mixed"].gpus == 4
    assert ci.pick(parts, None).name == "gpu" and ci.pick(parts, "cpu").name == "cpu"
    assert [ci.gres_gpus(g) for g in ("gpu", "gpu:h100", "gpu:0", "gres/gpu:2", "shard:8", "")] == [1, 1, 0, 0, 0, 0]
    limits = {"infinite": None, "UNLIMITED": None, "n/a": None, "30": 30, "30:59": 30, "4:00:00": 240,
              "1-00:00:00": 1440, "2-12": 3600, "1-00:30": 1470, "0:00:59": 0}
    assert {k: ci.limit_minutes(k) for k in limits} == limits


@pytest.mark.parametrize("source", ci.FROM)
def test_every_example_filled_for_a_gpu_partition_validates(source):
    p = ci.parse_sinfo("gpu*|up|2-00:00:00|4|64|515000|gpu:a100:8(S:0-1)\n")["gpu"]
    example = profiles.parse(profiles.packaged_text(source), "x", source)
    values, notes = ci.values_for(p, example)
    assert values == {**values, "partition": "gpu", "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 8,
                      "mem_gb": 452, "time_min": 1440}
    assert any("capped at 1440" in n for n in notes)
    setup = ["source '/opt/my envs/tla/bin/activate'"] if source == "slurm" else None
    text = ci.fill(profiles.packaged_text(source), values, setup, ["# made here"])
    prof = profiles.parse(text, "filled", "filled")
    assert prof.slurm.partition == "gpu" and prof.slurm.gpus_per_node == 8 and prof.slurm.mem_gb == 452
    assert prof.container.runtime == example.container.runtime and prof.container.image == example.container.image
    if setup:
        assert prof.slurm.setup == setup
    # the example's comments are all still there
    comments = [ln.split("#", 1)[1] for ln in profiles.packaged_text(source).splitlines() if "#" in ln]
    assert all(c in text for c in comments)


# ------------------------------------------------------------------ on the real test cluster


@pytest.fixture(scope="module")
def cluster():
    sh("bash", CLUSTER, "up", timeout=900)
    yield
    # left up for the next module; `make test` brings it down at the end


@pytest.fixture
def on_cluster(world, cluster) -> dict:
    return {**world, **cluster_env()}


def activate_line() -> str:
    return f"source {shlex.quote(str(Path(sys.prefix) / 'bin' / 'activate'))}"


@pytest.mark.slurm
@pytest.mark.slow
def test_init_on_the_cluster_checks_and_runs(on_cluster, digits):
    env = on_cluster
    out = tla(env, "cluster", "init", "mine", "--from", "slurm", check=True).stdout
    path = user_dir(env) / "mine.yaml"
    assert str(path) in " ".join(out.split()) and "tla cluster check mine" in out
    data = yaml.safe_load(path.read_text())
    assert data["slurm"] == {**data["slurm"], "partition": "debug", "gpus_per_node": 0, "tasks_per_node": 1,
                             "cpus_per_task": 4, "mem_gb": 7, "time_min": 240, "setup": [activate_line()]}
    assert "# sinfo -s lists yours" in path.read_text()  # the example's comments are kept
    assert rows(env)["mine"]["source"] == str(path)
    tla(env, "cluster", "check", "mine", check=True)
    train = ["submit", "train", "--cluster", "mine", *FAST, "--data-path", digits, "--epochs", "1", "--max-steps", "3"]
    dry = tla(env, *train, "--name", "m1", "--dry-run", check=True).stdout
    assert "#SBATCH --partition=debug" in dry and "#SBATCH --cpus-per-task=4" in dry, dry
    assert activate_line() in " ".join(dry.split()) and not (env["runs"] / "m1").exists()
    tla(env, *train, "--name", "m1", check=True)

    def finished():
        st = status(env, "m1")
        return st if st["state"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None

    st = wait_for(finished, timeout=300, every=1, what=lambda: tla(env, "logs", "m1").stdout[-3000:])
    assert st["state"] == "COMPLETED", tla(env, "logs", "m1").stdout[-3000:]


@pytest.mark.slurm
@pytest.mark.slow
def test_init_on_the_cluster_with_a_partition(on_cluster):
    env = on_cluster
    res = json.loads(tla(env, "cluster", "init", "lowq", "--partition", "low", "--json", check=True).stdout)
    assert res["partition"]["name"] == "low" and not res["partition"]["default"] and res["values"]["nodes"] == 1
    assert profiles.parse(Path(res["path"]).read_text(), res["path"], "lowq").slurm.partition == "low"
    tla(env, "cluster", "check", "lowq", check=True)
    assert_clean_error(tla(env, "cluster", "init", "other", "--partition", "nope"), "partition 'nope' is not in")
    assert_clean_error(tla(env, "cluster", "init", "lowq", "--partition", "high"), "already exists")
    res = json.loads(tla(env, "cluster", "init", "lowq", "--from", "pyxis", "--partition", "high", "--force",
                         "--json", check=True).stdout)
    prof = profiles.parse(Path(res["path"]).read_text(), res["path"], "lowq")
    assert prof.slurm.partition == "high" and prof.container.runtime == "pyxis"
    assert any("container.image" in n for n in res["notes"])
