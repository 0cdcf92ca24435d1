"""Accuracy reports across runs: table, Markdown, CSV, JSON, and a plot of val top-1 per epoch."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

from tla_jobs.config import CONTROL_MIXING
from tla_jobs.fsutil import atomic_write_bytes
from tla_jobs.jobs import damage
from tla_jobs.jobs.state import RunStatus

# ImageNet-1k top-1 after 300 epochs: (baseline, TL-Align), from the TL-Align README.
PAPER = {
    "deit_tiny_patch16_224": (72.2, 73.2),
    "deit_small_patch16_224": (79.8, 80.6),
    "deit_base_patch16_224": (81.8, 82.3),
    "swin_tiny_patch4_window7_224": (81.2, 81.4),
    "swin_small_patch4_window7_224": (83.0, 83.4),
    "swin_base_patch4_window7_224": (83.5, 83.7),
}
COLUMNS = ["run", "state", "model", "mixing", "epochs_done", "epochs", "lr", "global_batch", "seed", "best_acc1",
           "best_acc5", "last_acc1", "last_acc5", "best_ema_acc1", "last_ema_acc1", "eval_which", "eval_epoch",
           "eval_acc1", "eval_acc5", "gpu_hours"]
# Shown to people only when some run has them (runs without --model-ema have no EMA accuracy).
EMA_COLUMNS = ("best_ema_acc1", "last_ema_acc1")


def _latest_eval(st: RunStatus) -> tuple[dict, dict]:
    """The newest finished eval job of the run: (its run.json entry, its eval.json); empty dicts for none."""
    best: tuple[dict, dict] = ({}, {})
    for ev in st.record.get("evals", []):
        if not ev.get("output_dir"):
            continue
        res, problem = damage.eval_result(Path(ev["output_dir"]))
        if problem and problem not in st.problems:
            st.problems.append(problem)
        if res is not None and res.get("time", 0) >= best[1].get("time", 0):
            best = (ev, res)
    return best


def world_size(st: RunStatus) -> int | None:
    """Ranks of the run's newest attempt (as the trainer recorded them), else what its newest
    submission asked for; None for neither."""
    for a in reversed(st.attempts):
        if isinstance(a["start"].get("world_size"), int):
            return a["start"]["world_size"]
    sub = (st.record.get("submissions") or [None])[-1]
    if isinstance(sub, dict) and isinstance(sub.get("nodes"), int) and isinstance(sub.get("tasks_per_node"), int):
        return sub["nodes"] * sub["tasks_per_node"]
    return None


def _training(st: RunStatus) -> dict:
    """lr (the spec's, else the trainer's default 5e-4 x global batch / 512), global batch and seed."""
    spec, world = st.spec, world_size(st)
    batch = spec.get("batch_size")
    global_batch = batch * world if isinstance(batch, int) and world else None
    lr = spec.get("lr") or (5e-4 * global_batch / 512 if global_batch else None)
    return {"lr": lr, "global_batch": global_batch, "seed": spec.get("seed")}


def rows(statuses: list[RunStatus], paper: bool = False) -> list[dict]:
    out = []
    for st in statuses:
        spec = st.spec
        best = st.progress["best"] or {}
        last = st.progress["last"] or {}
        entry, ev = _latest_eval(st)
        row = {
            "run": st.name, "state": st.state, "model": spec.get("model", ""), "mixing": _mixing(st),
            "epochs_done": st.epoch, "epochs": spec.get("epochs"), **_training(st),
            "best_acc1": best.get("acc1"), "best_acc5": best.get("acc5"), "last_acc1": last.get("acc1"),
            "last_acc5": last.get("acc5"), "best_ema_acc1": (st.progress.get("best_ema") or {}).get("ema_acc1"),
            "last_ema_acc1": last.get("ema_acc1"), "eval_which": _which(entry, ev),
            "eval_epoch": ev.get("epoch") if isinstance(ev.get("epoch"), int) else None,
            "eval_acc1": ev.get("acc1"), "eval_acc5": ev.get("acc5"), "gpu_hours": round(st.gpu_hours, 3),
        }
        if paper:
            ref = PAPER.get(spec.get("model", ""))
            row["paper_acc1"] = (ref[1] if spec.get("tl_align", True) else ref[0]) if ref else None
        out.append(row)
    return out


def _which(entry: dict, ev: dict) -> str | None:
    """What the eval evaluated: best, last, ema, epoch:N, export... (with " ema" for the EMA weights
    of another choice); None without an eval."""
    if not ev:
        return None
    from tla_jobs.jobs.artifacts import label

    which = entry.get("which") or label(Path(str(ev.get("checkpoint") or entry.get("checkpoint", ""))).name)
    return which + (" ema" if (ev.get("weights") or entry.get("weights")) == "ema" and which != "ema" else "")


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample std (0 for a single run, None for none)."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def grouped(table: list[dict]) -> list[dict]:
    """One row per (model, mixing): the number of runs and mean ± sample std of their accuracies
    (seeds of the same arm, as an ablation reports them)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in table:
        groups.setdefault((r["model"], r["mixing"]), []).append(r)
    out = []
    for (model, mixing), rs in groups.items():
        row = {"model": model, "mixing": mixing, "runs": len(rs),
               "finished": sum(r["state"] == "COMPLETED" for r in rs)}
        for key in ("best_acc1", "best_acc5", "last_acc1", "last_acc5", *EMA_COLUMNS):
            mean, std = _mean_std([r[key] for r in rs if r[key] is not None])
            row[key], row[f"{key}_std"] = mean, std
        if "paper_acc1" in rs[0]:
            row["paper_acc1"] = rs[0]["paper_acc1"]
        out.append(row)
    return out


PAIRED = ("against", "metric", "pairs", "diff_mean", "diff_ci95_low", "diff_ci95_high", "p_t", "p_sign_flip", "diffs")


def paired(table: list[dict], metric: str = "best_acc1", against: str = CONTROL_MIXING) -> list[dict]:
    """Every other arm of a model against its ``against`` arm, run by run on the seeds both have
    (one run per seed and arm; a seed run twice in an arm is left out of the pairs): the per-seed
    differences of ``metric`` (arm − control), their mean with a 95% confidence interval, the paired
    t-test and the exact sign-flip test (jobs/stats.py)."""
    from tla_jobs.jobs import stats

    by: dict[tuple[str, str], dict] = {}
    for r in table:
        if r.get(metric) is not None and r.get("seed") is not None:
            seeds = by.setdefault((r["model"], r["mixing"]), {})
            seeds[r["seed"]] = None if r["seed"] in seeds else r[metric]
    out = []
    for (model, mixing), seeds in by.items():
        control = by.get((model, against))
        if mixing == against or control is None:
            continue
        common = sorted(s for s in seeds if seeds[s] is not None and control.get(s) is not None)
        if not common:
            continue
        res = stats.paired([seeds[s] - control[s] for s in common])
        out.append({"model": model, "mixing": mixing, "against": against, "metric": metric, "pairs": res["n"],
                    "seeds": common, "diff_mean": res["mean"], "diff_ci95_low": res["ci95_low"],
                    "diff_ci95_high": res["ci95_high"], "p_t": res["p_t"], "p_sign_flip": res["p_sign_flip"],
                    "diffs": res["diffs"]})
    return out


def with_paired(arms: list[dict], pairs: list[dict]) -> list[dict]:
    """The arm rows with their paired comparison (empty for the control and unpaired arms), for
    CSV and JSON: one flat row per arm."""
    found = {(p["model"], p["mixing"]): p for p in pairs}
    return [{**r, **{k: found.get((r["model"], r["mixing"]), {}).get(k) for k in PAIRED}} for r in arms]


def paired_for_people(pairs: list[dict]) -> list[dict]:
    """Paired rows as a table shows them: signed per-seed differences, 'mean [low, high]'."""
    def signed(v: float) -> str:
        return f"{v:+.2f}"

    def interval(p: dict) -> str:
        low, high = p["diff_ci95_low"], p["diff_ci95_high"]
        return signed(p["diff_mean"]) + ("" if low is None else f" [{signed(low)}, {signed(high)}]")

    return [{"model": p["model"], "arm": p["mixing"], "against": p["against"], "metric": p["metric"],
             "seeds": " ".join(str(s) for s in p["seeds"]),
             "per-seed difference": " ".join(signed(d) for d in p["diffs"]), "mean [95% CI]": interval(p),
             "paired t p": _p(p["p_t"]), "sign-flip p": _p(p["p_sign_flip"])} for p in pairs]


def _p(v: float | None) -> str | None:
    return None if v is None else f"{v:.3f}"


def for_people(table: list[dict]) -> list[dict]:
    """The table without the EMA columns when no run has EMA weights (CSV and JSON keep them all)."""
    empty = {k for k in EMA_COLUMNS if all(r.get(k) is None for r in table)}
    return [{k: v for k, v in r.items() if k not in empty and k.removesuffix("_std") not in empty} for r in table]


def with_std(table: list[dict]) -> list[dict]:
    """Grouped rows for people: 'mean ± std' strings instead of separate columns."""
    out = []
    for r in table:
        row = {k: v for k, v in r.items() if not k.endswith("_std")}
        for k in list(row):
            if f"{k}_std" in r and row[k] is not None:
                row[k] = f"{row[k]:.2f} ± {r[k + '_std']:.2f}"
        out.append(row)
    return out


def _mixing(st: RunStatus) -> str:
    """The run's mixing as its summary.json names it; before there is one, as its spec would."""
    if isinstance((st.summary or {}).get("mixing"), str):
        return st.summary["mixing"]
    spec = st.spec
    if not spec:
        return ""
    from tla_jobs.config import TrainConfig

    try:
        return TrainConfig(**spec).mixing()
    except Exception:
        return "tl-align" if spec.get("tl_align") else "?"


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, list):
        return " ".join(fmt(x) for x in v)
    if isinstance(v, float):
        return f"{v:.2g}" if 0 < abs(v) < 0.01 else f"{v:.2f}"  # a learning rate, not 0.00
    return str(v)


def as_markdown(table: list[dict]) -> str:
    cols = list(table[0].keys()) if table else COLUMNS
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in table]
    return "\n".join(lines) + "\n"


def as_csv(table: list[dict]) -> str:
    buf = io.StringIO()
    cols = list(table[0].keys()) if table else COLUMNS
    w = csv.DictWriter(buf, fieldnames=cols)
    w.writeheader()
    for r in table:
        w.writerow({k: " ".join(str(x) for x in v) if isinstance(v, list) else v for k, v in r.items()})
    return buf.getvalue()


def as_json(table: list[dict]) -> str:
    return json.dumps(table, indent=2)


PANELS = (("acc1", "val top-1 (%)"), ("val_loss", "val loss"))
# A third panel where a run aligned its labels: how far TL-Align's cls target moved from λ (train batches).
SHIFT_PANEL = ("w_shift", "mean |w_cls − λ| (train)")


def plot(statuses: list[RunStatus], out: Path, by_arm: bool = False) -> Path:
    """Draw :func:`figure` into ``out`` (the format from its suffix)."""
    import matplotlib.pyplot as plt

    fig = figure(statuses, by_arm)
    buf = io.BytesIO()
    fig.savefig(buf, format=out.suffix.lstrip(".").lower() or "png")
    plt.close(fig)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())  # a full disk leaves the previous plot, not half a new one
    return out


def _plain(text: str) -> str:
    """A label matplotlib prints as it is: a '$' would start mathtext (a run named `$\\frac{$` crashed the plot)."""
    return str(text).replace("$", r"\$")


def figure(statuses: list[RunStatus], by_arm: bool = False):
    """Two panels, val top-1 and val loss per epoch (a third, mean |w_cls − λ|, when a run aligned
    its labels): one line per run, or with `by_arm` the mean over each (model, mixing) group's runs
    with a labelled band of ± one sample std. Epoch ticks are integers; an axis that does not start
    at 0 says so, so that noise does not read as a cliff."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = PANELS + ((SHIFT_PANEL,) if any(m.get("w_shift") is not None for st in statuses for m in st.metrics)
                       else ())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=120)
    # one colour per arm (or run) in every panel, also where a panel shows only some of them
    names = sorted({f"{st.spec.get('model', '')} {_mixing(st)}" for st in statuses}) if by_arm else \
        [st.name for st in statuses]
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colour = {name: cycle[i % len(cycle)] for i, name in enumerate(names)}
    for ax, (key, label) in zip(axes, panels):
        if by_arm:
            groups: dict[str, list[list[float]]] = {}
            for st in statuses:
                if st.metrics and all(m.get(key) is not None for m in st.metrics):  # (w_shift: TL-Align runs)
                    groups.setdefault(f"{st.spec.get('model', '')} {_mixing(st)}", []).append(
                        [m[key] for m in st.metrics])
            for name, curves in sorted(groups.items()):
                n = min(len(c) for c in curves)
                stats = [_mean_std([c[e] for c in curves]) for e in range(n)]
                xs, mean = list(range(1, n + 1)), [m for m, _ in stats]
                ax.plot(xs, mean, marker="o", ms=3, color=colour[name], label=_plain(f"{name}: mean of {len(curves)}"))
                ax.fill_between(xs, [m - sd for m, sd in stats], [m + sd for m, sd in stats], color=colour[name],
                                alpha=0.15, label=_plain(f"{name}: ± 1 std") if len(curves) > 1 else None)
        else:
            for st in statuses:
                rows = [m for m in st.metrics if m.get(key) is not None]
                if rows:
                    ax.plot([m["epoch"] + 1 for m in rows], [m[key] for m in rows], marker="o", ms=3,
                            color=colour[st.name], label=_plain(f"{st.name} ({_mixing(st)})"))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        bottom = ax.get_ylim()[0]
        ax.set_ylabel(label if bottom <= 0 else f"{label} (axis from {bottom:.3g}, not 0)")
        ax.set_title(f"{label.split(' (')[0]} per epoch")
        ax.grid(alpha=0.3)
    if any(st.progress["epochs_done"] for st in statuses):
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    return fig
