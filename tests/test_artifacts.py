"""What runs produce, as users handle it (issue 13): `tla export` by run name or checkpoint and its
refusals, `tla eval checkpoint --which` with every eval kept beside the checkpoint it used, the
report's columns, and `--config` recipes; on real short runs (digits, tla_vit_nano, local executor)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import FAST, assert_clean_error, runs_env, status, tla, wait_for

from tla_jobs.checkpoint_files import read_sidecar
from tla_jobs.train.export import read_metadata

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("artifacts")]


@pytest.fixture(scope="module")
def world(digits, tmp_path_factory) -> dict:
    """A finished submitted run with EMA and a checkpoint per epoch (ema), and a `tla train` run
    without EMA whose options came from a recipe (plain)."""
    root = tmp_path_factory.mktemp("artifacts")
    env = runs_env(root / "runs")
    tla(env, "submit", "train", "--name", "ema", *FAST, "--data-path", digits, "--epochs", "2",
        "--checkpoint-every-epochs", "1", "--model-ema", check=True)
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"model": "tla_vit_nano", "dataset": "digits", "data_path": str(digits),
                                      "batch_size": 16, "epochs": 5, "workers": 0, "lr": 1e-3}))
    plain = root / "plain"
    tla(env, "train", "--config", recipe, "--epochs", "1", "--max-steps", "4", "--output-dir", plain, check=True)
    wait_for(lambda: status(env, "ema")["state"] == "COMPLETED", timeout=400, what="the EMA run to finish")
    return {**env, "root": root, "plain": plain, "recipe": recipe}


def test_config_file_with_command_line_overrides_and_a_run_repeated_from_its_config(world):
    resolved = yaml.safe_load((world["plain"] / "config.yaml").read_text())
    assert resolved["batch_size"] == 16 and resolved["lr"] == 1e-3  # from the file
    assert resolved["epochs"] == 1 and resolved["max_steps"] == 4  # typed: over the file
    runs = world["runs"]
    tla(world, "submit", "train", "--name", "again", "--config", runs / "ema" / "config.yaml", "--json", check=True)
    tla(world, "cancel", "again")
    first, again = (json.loads((runs / n / "run.json").read_text())["spec"] for n in ("ema", "again"))
    assert again.pop("output_dir") == str(runs / "again") and first.pop("output_dir") == str(runs / "ema")
    assert again == first
    proc = tla(world, "train", "--config", world["root"] / "nope.yaml")
    assert_clean_error(proc, "does not exist")
    # a run's own config.yaml without --output-dir would continue that run, not repeat it
    before = sorted((p.name, p.stat().st_mtime_ns) for p in world["plain"].iterdir())
    proc = tla(world, "train", "--config", world["plain"] / "config.yaml", "--epochs", "2")
    assert_clean_error(proc, "add --output-dir NEW to repeat that run")
    assert sorted((p.name, p.stat().st_mtime_ns) for p in world["plain"].iterdir()) == before


@pytest.mark.parametrize("which, name, fmt", [(None, "checkpoint_best.pth", "safetensors"),
                                             ("epoch:1", "checkpoint_epoch1.pth", "pth"),
                                             ("ema", "checkpoint_last.pth", "safetensors")])
def test_export_by_run_name(world, tmp_path, which, name, fmt):
    out = tmp_path / f"model.{fmt}"
    args = ["--which", which] if which else []
    got = json.loads(tla(world, "export", "ema", out, *args, "--json", check=True).stdout)
    meta = read_metadata(out)
    assert got["metadata"] == meta and Path(got["out"]) == out.resolve() and got["format"] == fmt
    ckpt = world["runs"] / "ema" / name
    assert meta["source_checkpoint"] == str(ckpt) and meta["source_sha256"] == read_sidecar(ckpt)
    assert meta["weights"] == ("ema" if which == "ema" else "model")
    assert got["load_line"].startswith("timm.create_model(") and f"checkpoint_path={str(out)!r}" in got["load_line"]
    text = tla(world, "export", world["runs"] / "ema" / name, out, "--force", check=True).stdout
    assert "load it with plain timm" in text and "checkpoint_path=" in text and str(out) in text


def _damaged(tmp_path: Path, world) -> Path:
    bad = tmp_path / "checkpoint_last.pth"
    src = world["runs"] / "ema" / "checkpoint_last.pth"
    bad.write_bytes(src.read_bytes()[:-16])
    shutil.copy(src.with_name(src.name + ".sha256"), tmp_path)
    return bad


REFUSED = [
    (lambda w, t: ["ghost", t / "x.safetensors"], "does not exist"),
    (lambda w, t: ["ema", t / "x.safetensors", "--which", "epoch:7"], "no checkpoint_epoch7.pth"),
    (lambda w, t: ["ema", t / "x.safetensors", "--which", "newest"], "--which"),
    (lambda w, t: [w["plain"], t / "x.safetensors", "--which", "ema"], "no ema weights"),
    (lambda w, t: [_damaged(t, w), t / "x.safetensors"], "damaged"),
    (lambda w, t: ["ema", t / "missing" / "x.safetensors"], "does not exist"),
    (lambda w, t: ["ema", t / "x.bin"], "must end in .safetensors or .pth"),
    (lambda w, t: ["ema", t / "x.safetensors", "--format", "pth"], "does not match"),
    (lambda w, t: ["ema", t / "kept.safetensors"], "already exists"),
]


@pytest.mark.parametrize("args, message", REFUSED, ids=[m for _, m in REFUSED])
def test_export_refusals_are_one_line_and_write_nothing(world, tmp_path, args, message):
    (tmp_path / "kept.safetensors").write_bytes(b"precious")
    argv = args(world, tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert_clean_error(tla(world, "export", *argv), message)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "kept.safetensors").read_bytes() == b"precious"


def test_eval_which_keeps_every_eval_with_its_checkpoint(world, tmp_path):
    runs = world["runs"]
    export = tmp_path / "best.safetensors"
    tla(world, "export", "ema", export, check=True)
    for args in (["ema", "--which", "best"], ["ema", "--which", "epoch:1"], ["ema", "--which", "ema"], [export]):
        tla(world, "eval", "checkpoint", *args, check=True)
    assert_clean_error(tla(world, "eval", "checkpoint", "ema", "--which", "epoch:9"), "no checkpoint_epoch9.pth")
    final = wait_for(lambda: (s := status(world, "ema")) and all(e["state"] == "COMPLETED" for e in s["evals"])
                     and len(s["evals"]) >= 4 and s, timeout=300, what="the eval jobs")
    evals = {e["which"]: e for e in final["evals"]}
    metrics = [json.loads(x) for x in (runs / "ema" / "metrics.jsonl").read_text().splitlines()]
    for which, name in (("best", "checkpoint_best.pth"), ("epoch:1", "checkpoint_epoch1.pth"),
                        ("ema", "checkpoint_last.pth")):
        ev = evals[which]
        assert ev["checkpoint"] == str(runs / "ema" / name) and ev["sha256"] == read_sidecar(runs / "ema" / name)
    assert evals["epoch:1"]["epoch"] == 1 and evals["epoch:1"]["acc1"] == pytest.approx(metrics[0]["acc1"])
    assert evals["ema"]["weights"] == "ema" and evals["ema"]["acc1"] == pytest.approx(metrics[-1]["ema_acc1"])
    assert evals["export"]["acc1"] == pytest.approx(evals["best"]["acc1"])
    record = json.loads((runs / "ema" / "run.json").read_text())
    assert {e["which"]: e["checkpoint_sha256"] for e in record["evals"]}["epoch:1"] == evals["epoch:1"]["sha256"]
    text = tla(world, "status", "ema", check=True).stdout
    for which in ("best", "epoch:1", "ema", "export"):
        assert f" {which} " in text
    assert evals["epoch:1"]["sha256"][:12] in text and f"{evals['best']['acc1']:.2f}" in text
    assert f"EMA weights: best_acc1 {max(m['ema_acc1'] for m in metrics):.2f}" in text
    (row,) = json.loads(tla(world, "report", "ema", "--format", "json", check=True).stdout)
    assert row["epochs"] == 2 and row["epochs_done"] == 2 and row["seed"] == 0
    assert row["global_batch"] == 32 and row["lr"] == pytest.approx(1.5e-3) and row["mixing"] == "tl-align"
    newest = evals[row["eval_which"]]  # the eval jobs run side by side: any may end last
    assert row["eval_epoch"] == newest["epoch"] and row["eval_acc1"] == pytest.approx(newest["acc1"])
    csv = tla(world, "report", "ema", "--format", "csv", check=True).stdout.splitlines()
    assert dict(zip(csv[0].split(","), csv[1].split(",")))["epochs"] == "2"
    # DeiT reports the EMA weights' accuracy beside the model's
    assert row["best_ema_acc1"] == pytest.approx(max(m["ema_acc1"] for m in metrics))
    assert row["last_ema_acc1"] == pytest.approx(metrics[-1]["ema_acc1"])
    assert "best_ema_acc1" in tla(world, "report", "ema", "--format", "md", check=True).stdout


def test_eval_refusals(world, tmp_path):
    assert_clean_error(tla(world, "eval", "checkpoint", world["plain"] / "checkpoint_last.pth"), "no run.json")
    outside = tmp_path / "x.safetensors"
    tla(world, "export", world["plain"] / "checkpoint_last.pth", outside, check=True)
    assert_clean_error(tla(world, "eval", "checkpoint", outside), "not inside a tla run directory")
    assert_clean_error(tla(world, "eval", "checkpoint", outside, "--which", "ema"), "not EMA ones")
    assert_clean_error(tla(world, "eval", "checkpoint", outside, "--which", "best"), "give the run instead")


def test_checkpoints_table_matches_the_files_and_prune_keeps_what_resumes(world, tmp_path):
    listed = json.loads(tla(world, "checkpoints", "--run", "ema", "--verify", "--json", check=True).stdout)
    run = world["runs"] / "ema"
    on_disk = sorted(p.name for p in run.glob("*.pth"))
    rows = {Path(r["path"]).name: r for r in listed["checkpoints"]}
    assert sorted(rows) == on_disk and {"checkpoint_last.pth", "checkpoint_best.pth"} <= set(rows)
    for name, r in rows.items():
        assert r["bytes"] == (run / name).stat().st_size and r["sha256"] == read_sidecar(run / name)
        assert r["verified"] is True and r["ema"] is True
    assert rows["checkpoint_epoch1.pth"]["epoch"] == 1 and rows["checkpoint_epoch1.pth"]["acc1"] is not None
    assert listed["total"]["bytes"] == sum(r["bytes"] for r in rows.values()) == listed["runs"]["ema"]["bytes"]
    text = tla(world, "checkpoints", "--run", "ema", check=True).stdout
    assert "epoch 1" in text and "total:" in text and "not checked" in text
    assert_clean_error(tla(world, "checkpoints", "--sweep", "nope"), "no runs of a sweep named")
    # runs by name as `tla status` takes them, and a `tla train --output-dir` folder (no run.json)
    both = json.loads(tla(world, "checkpoints", "ema", world["plain"], "--json", check=True).stdout)
    assert set(both["runs"]) == {"ema", "plain"}
    assert sorted(Path(r["path"]).name for r in both["checkpoints"] if r["run"] == "ema") == on_disk
    assert {Path(r["path"]) for r in both["checkpoints"] if r["run"] == "plain"} == set(world["plain"].glob("*.pth"))

    copy = runs_env(tmp_path / "runs")  # pruning works on a copy: the other tests read the run's files
    shutil.copytree(run, copy["runs"] / "ema")
    periodic = sorted(p.name for p in (copy["runs"] / "ema").glob("checkpoint_epoch*.pth"))
    assert len(periodic) >= 2, periodic
    before = sorted(p.name for p in (copy["runs"] / "ema").iterdir())
    dry = json.loads(tla(copy, "checkpoints", "prune", "ema", "--keep-last", "1", "--dry-run", "--json",
                         check=True).stdout)
    assert sorted(p.name for p in (copy["runs"] / "ema").iterdir()) == before
    assert [Path(r["path"]).name for r in dry["removed"]] == periodic[:-1]
    done = json.loads(tla(copy, "checkpoints", "prune", "ema", "--keep-last", "1", "--json", check=True).stdout)
    left = sorted(p.name for p in (copy["runs"] / "ema").glob("*.pth"))
    assert [Path(r["path"]).name for r in done["removed"]] == periodic[:-1]
    assert {"checkpoint_last.pth", "checkpoint_best.pth", periodic[-1]} <= set(left)
    assert not any((copy["runs"] / "ema" / (n + ".sha256")).exists() for n in periodic[:-1])
