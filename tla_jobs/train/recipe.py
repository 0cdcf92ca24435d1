"""A run folder holds one recipe: a trainer pointed at a folder that another recipe trained refuses.

`tla train --output-dir runs/A --lr 0.5`, or a copy of runs/A/config.yaml with other epochs, would
otherwise continue A's checkpoint under a recipe A never had, and rewrite its checkpoints, metrics
and attempts. The recipe a folder was trained with is known twice: config.yaml (written by every
attempt at its start, read cheaply before anything is written) and the config inside each
checkpoint (the proof, checked when the checkpoint is restored). Fields that change how a run is
carried out but not what it computes (where the data and checkpoints live, workers, logging,
checkpoint cadence, test hooks) may differ between attempts; every other field must be equal.

Torch-free: compared on plain dicts (TrainConfig.model_dump() and the YAML of config.yaml).
"""

from __future__ import annotations

from pathlib import Path

from tla_jobs import rundir
from tla_jobs.errors import TlaError

# What an attempt may change without changing the run (the rest is the recipe).
MECHANICS = frozenset({
    "data_path", "output_dir", "resume", "eval_only", "eval_weights", "workers", "dist_eval", "compile",
    "align_path",  # the paths compute the same Ā·w (tests/test_align.py holds them to each other)
    "peak_tflops", "checkpoint_every_min", "checkpoint_every_epochs", "keep_last", "keep_best", "tensorboard",
    "wandb", "max_steps", "step_delay", "step_delay_once", "fail_at_step", "extend",
    "data_device", "stage_data",  # how the same samples are read and augmented, not which
})


def differences(cfg: dict, reference: dict, extend: bool = False) -> list[str]:
    """The recipe fields of ``cfg`` that differ from ``reference`` ("lr 0.5 (was 0.001)"). A field the
    reference lacks (written by an older tla) is not compared. ``extend``: epochs may differ."""
    out = []
    for key in sorted(cfg):
        if key in MECHANICS or key not in reference or (extend and key == "epochs"):
            continue
        if key == "global_batch" and None in (cfg[key], reference[key]):
            continue  # unset: the run's own, which every checkpoint keeps (and the trainer restores)
        if cfg[key] != reference[key]:
            out.append(f"{key} {cfg[key]!r} (was {reference[key]!r})")
    return out


def refuse_other_recipe(cfg: dict, reference: dict, folder: Path, source: str) -> None:
    """TlaError naming the differences when ``cfg`` is not the recipe ``reference`` (read from
    ``source``) trained ``folder`` with."""
    diff = differences(cfg, reference, bool(cfg.get("extend")))
    if diff:
        hint = ("; only --epochs may change with --extend" if not cfg.get("extend") and
                [d for d in diff if d.startswith("epochs ")] == diff else "")
        raise TlaError(f"{folder} holds a run trained with another recipe ({source}): {'; '.join(diff)}{hint}. "
                       "Train it into a new --output-dir (--resume CKPT starts from one of its checkpoints)")


def check_folder(cfg: dict, folder: Path) -> None:
    """Before anything is written into ``folder``: its config.yaml (when there) has this recipe; a damaged
    one is refused (rundir.read_config), since the recipe that trained the folder is then unknown."""
    reference = rundir.read_config(folder)
    if reference is not None:
        refuse_other_recipe(cfg, reference, folder, rundir.CONFIG_YAML)
