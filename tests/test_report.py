"""`tla report` across runs: per-arm mean ± std (an ablation's table), sweep selection, the paper
column and the per-arm plot, on real run directories as a finished sweep leaves them."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest
from conftest import run_tla

from tla_jobs.rundir import metrics_summary

ARMS = {  # the spec fields `tla submit sweep` writes for each arm
    "tla": {"tl_align": True},
    "grid": {"tl_align": False, "mixup": 0.0, "cutmix_grid": True, "model_ema": False},
}
ACC = {("tla", 0): 71.0, ("tla", 1): 73.0, ("tla", 2): 75.0, ("grid", 0): 70.0, ("grid", 1): 70.5,
       ("grid", 2): 71.5}


def _run(root, name, model, arm, seed, sweep, acc):
    d = root / name
    d.mkdir(parents=True)
    spec = {"model": model, "epochs": 3, "seed": seed, "batch_size": 64, "lr": None, **ARMS[arm]}
    # a local job whose process has ended (no such pid), as a finished sweep leaves it
    record = {"name": name, "spec": spec, "sweep": sweep, "profile": {"executor": "local"},
              "submissions": [{"job_id": "4999999", "executor": "local", "submitted": time.time()}],
              "evals": []}
    (d / "run.json").write_text(json.dumps(record))
    rows = [{"epoch": e, "acc1": acc - 2 + e, "acc5": 95.0 + e, "val_loss": 2.0 - e / 2, "epoch_s": 10.0,
             # the trainer logs mean |w_cls - λ| for TL-Align runs only
             **({"w_shift": 0.02 * (e + 1)} if arm == "tla" else {})} for e in range(3)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "heartbeat.json").write_text(json.dumps({"phase": "finished", "epoch": 3, "epochs": 3, "time": time.time(),
                                                  "progress": metrics_summary(rows)}))
    (d / "summary.json").write_text(json.dumps({"state": "completed", "best_acc1": acc}))
    who = {"job_id": "4999999", "restart_count": 0, "executor": "local"}  # as the trainer records its attempts
    (d / "attempts.jsonl").write_text(json.dumps({"event": "start", "epoch": 0, "global_step": 0, "time": time.time(),
                                                  "world_size": 4, **who})
                                      + "\n" + json.dumps({"event": "end", "reason": "completed", "epoch": 3, **who})
                                      + "\n")


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for (arm, seed), acc in ACC.items():
        _run(root, f"abl-{arm}-s{seed}", "deit_tiny_patch16_224", arm, seed, "abl", acc)
    _run(root, "other-tla-s0", "deit_tiny_patch16_224", "tla", 0, "other", 10.0)  # another sweep: left out
    return {"TLA_RUNS": str(root)}


def test_by_arm_gives_mean_and_sample_std_per_arm(runs):
    proc = run_tla("report", "--sweep", "abl", "--by-arm", "--paper", "--format", "json", env=runs, check=True)
    table = {r["mixing"]: r for r in json.loads(proc.stdout)}
    assert set(table) == {"tl-align", "grid-cutmix"}
    for arm, mixing in (("tla", "tl-align"), ("grid", "grid-cutmix")):
        accs = [ACC[(arm, s)] for s in range(3)]  # best = last epoch = acc
        row = table[mixing]
        assert row["runs"] == 3
        assert row["best_acc1"] == pytest.approx(statistics.mean(accs))
        assert row["best_acc1_std"] == pytest.approx(statistics.stdev(accs))
        assert row["last_acc1"] == pytest.approx(statistics.mean(accs))
    assert table["tl-align"]["paper_acc1"] == 73.2 and table["grid-cutmix"]["paper_acc1"] == 72.2


def test_by_arm_markdown_and_plot(runs, tmp_path):
    plot = tmp_path / "arms.png"
    proc = run_tla("report", "--sweep", "abl", "--by-arm", "--format", "md", "--plot", plot, env=runs, check=True)
    assert "73.00 ± 2.00" in proc.stdout  # tla: 71, 73, 75
    assert "other" not in proc.stdout
    assert "ema" not in proc.stdout  # no run has EMA weights: no empty EMA columns for people (JSON keeps them)
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000


def test_by_arm_pairs_each_arm_with_the_control_seed_by_seed(runs, tmp_path):
    from scipy import stats as S

    diffs = [ACC[("tla", s)] - ACC[("grid", s)] for s in range(3)]  # +1.0, +2.5, +3.5
    table = {r["mixing"]: r for r in json.loads(run_tla("report", "--sweep", "abl", "--by-arm", "--format", "json",
                                                         env=runs, check=True).stdout)}
    tla, grid = table["tl-align"], table["grid-cutmix"]
    assert tla["against"] == "grid-cutmix" and tla["metric"] == "best_acc1" and tla["pairs"] == 3
    assert tla["diffs"] == pytest.approx(diffs) and tla["diff_mean"] == pytest.approx(statistics.mean(diffs))
    ref = S.ttest_rel([ACC[("tla", s)] for s in range(3)], [ACC[("grid", s)] for s in range(3)])
    ci = ref.confidence_interval()
    assert tla["p_t"] == pytest.approx(ref.pvalue)
    assert (tla["diff_ci95_low"], tla["diff_ci95_high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    assert tla["p_sign_flip"] == pytest.approx(2 / 8)  # all three positive: 2 of the 8 sign patterns
    assert grid["against"] is None and grid["pairs"] is None  # the control itself
    # the same numbers for people, and in CSV
    md = run_tla("report", "--sweep", "abl", "--by-arm", "--format", "md", env=runs, check=True).stdout
    assert "| deit_tiny_patch16_224 | tl-align | grid-cutmix | best_acc1 | 0 1 2 | +1.00 +2.50 +3.50 |" in md
    assert f"+2.33 [{ci.low:+.2f}, {ci.high:+.2f}]" in md and f"| {ref.pvalue:.3f} | 0.250 |" in md
    csv = run_tla("report", "--sweep", "abl", "--by-arm", "--format", "csv", env=runs, check=True).stdout
    assert "1.0 2.5 3.5" in csv
    # against another arm, on another metric; a seed run twice in an arm is not a pair
    _run(Path(runs["TLA_RUNS"]), "abl-tla-s2-again", "deit_tiny_patch16_224", "tla", 2, "abl", 60.0)
    table = {r["mixing"]: r for r in json.loads(run_tla(
        "report", "--sweep", "abl", "--by-arm", "--format", "json", "--against", "tl-align", "--metric", "last_acc1",
        env=runs, check=True).stdout)}
    grid = table["grid-cutmix"]
    assert grid["against"] == "tl-align" and grid["metric"] == "last_acc1" and grid["pairs"] == 2
    assert grid["diffs"] == pytest.approx([-1.0, -2.5])
    bad = run_tla("report", "--by-arm", "--metric", "acc", env=runs)
    assert bad.returncode == 2 and "--metric must be" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_sweep_is_one_line(runs):
    proc = run_tla("report", "--sweep", "nope", env=runs)
    assert proc.returncode == 2 and "no runs of a sweep named 'nope'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_status_hides_runs_that_ended_long_ago_unless_all(runs):
    old = Path(runs["TLA_RUNS"]) / "abl-grid-s0"
    beat = json.loads((old / "heartbeat.json").read_text())
    beat["time"] = time.time() - 30 * 86400
    (old / "heartbeat.json").write_text(json.dumps(beat))
    record = json.loads((old / "run.json").read_text())
    record["created"] = record["submissions"][0]["submitted"] = beat["time"]
    (old / "run.json").write_text(json.dumps(record))
    shown = {r["run"]: r["state"] for r in json.loads(run_tla("status", "--json", env=runs, check=True).stdout)}
    assert "abl-grid-s0" not in shown and "abl-tla-s0" in shown and shown["abl-tla-s0"] == "COMPLETED"
    everything = json.loads(run_tla("status", "--all", "--json", env=runs, check=True).stdout)
    assert "abl-grid-s0" in {r["run"] for r in everything}
    table = run_tla("status", env=runs, check=True).stdout
    assert "1 run(s) that ended over 14 days ago are not shown" in table
    assert "abl-grid-s0" in run_tla("status", "abl-grid-s0", env=runs, check=True).stdout  # named: always shown


def test_json_and_csv_give_numbers_the_run_s_recipe_and_the_checkpoint_evaluated(runs):
    run = Path(runs["TLA_RUNS"]) / "abl-tla-s1"
    out = run / "evals" / "eval-1"
    out.mkdir(parents=True)
    (out / "eval.json").write_text(json.dumps({"acc1": 72.5, "acc5": 96.0, "time": time.time(), "epoch": 2,
                                               "checkpoint": str(run / "checkpoint_epoch2.pth"), "weights": "ema"}))
    record = json.loads((run / "run.json").read_text())
    record["spec"]["lr"] = 1e-3
    record["evals"].append({"eval_id": "eval-1", "job_id": "4999998", "executor": "local", "output_dir": str(out),
                            "checkpoint": str(run / "checkpoint_epoch2.pth"), "which": "epoch:2", "weights": "ema"})
    (run / "run.json").write_text(json.dumps(record))
    table = {r["run"]: r for r in json.loads(run_tla("report", "--format", "json", env=runs, check=True).stdout)}
    row, other = table["abl-tla-s1"], table["abl-grid-s0"]
    assert row["epochs"] == 3 and row["epochs_done"] == 3 and row["seed"] == 1 and row["mixing"] == "tl-align"
    assert row["global_batch"] == 256 and row["lr"] == 1e-3  # 64 per rank x 4 ranks; the spec's lr
    assert other["lr"] == pytest.approx(5e-4 * 256 / 512)  # none given: the trainer's default for the global batch
    assert (row["eval_which"], row["eval_epoch"], row["eval_acc1"]) == ("epoch:2 ema", 2, 72.5)
    assert other["eval_which"] is None and other["eval_epoch"] is None
    assert row["best_ema_acc1"] is None and row["last_ema_acc1"] is None  # trained without --model-ema
    lines = run_tla("report", "abl-tla-s1", "--format", "csv", env=runs, check=True).stdout.splitlines()
    csv = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert csv["epochs"] == "3" and csv["epochs_done"] == "3" and csv["global_batch"] == "256"
    assert csv["eval_which"] == "epoch:2 ema" and csv["seed"] == "1"


def test_plot_has_two_or_three_panels_integer_epochs_a_labelled_band_and_says_where_its_axis_starts(runs, monkeypatch):
    import matplotlib.pyplot as plt

    from tla_jobs.jobs import records
    from tla_jobs.jobs.report import figure
    from tla_jobs.jobs.state import collect

    monkeypatch.setenv("TLA_RUNS", runs["TLA_RUNS"])
    statuses = [st for st in collect(records.all_runs()) if st.record.get("sweep") == "abl"]
    fig = figure(statuses, by_arm=True)
    top1, loss, shift = fig.axes  # the third: TL-Align's label shift, which its runs logged
    assert top1.get_ylabel().startswith("val top-1 (%)") and loss.get_ylabel().startswith("val loss")
    assert shift.get_ylabel().startswith("mean |w_cls − λ|")
    assert [line.get_label() for line in shift.get_lines()] == ["deit_tiny_patch16_224 tl-align: mean of 3"]
    assert list(shift.get_lines()[0].get_ydata()) == pytest.approx([0.02, 0.04, 0.06])
    for ax in (top1, loss, shift):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    # top-1 runs from about 68 to 77: the axis cannot start at 0 without flattening it, and says so
    assert top1.get_ylim()[0] > 0 and "not 0" in top1.get_ylabel()
    labels = [t.get_text() for t in top1.get_legend().get_texts()]
    assert "deit_tiny_patch16_224 tl-align: mean of 3" in labels
    assert "deit_tiny_patch16_224 tl-align: ± 1 std" in labels
    # an arm keeps its colour in the panel that shows only it
    tla_top1 = next(ln for ln in top1.get_lines() if ln.get_label().startswith("deit_tiny_patch16_224 tl-align"))
    assert shift.get_lines()[0].get_color() == tla_top1.get_color()
    plt.close(fig)
