"""The trainer's configuration: the DeiT recipe with TL-Align's changes as defaults.

Validated with pydantic (unknown keys are errors) and free of torch, so the CLI can build,
store and show it without importing the training stack. It is stored in run.json and in every
checkpoint, which is how a resumed run or an eval job knows what it is continuing; the trainer also
writes it as RUN/config.yaml, which :func:`load_config_file` reads back (`--config`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from tla_jobs.errors import TlaError

# The arms of `tla submit sweep`, by the names reports print (TrainConfig.mixing() gives them back):
# each sets the mixing fields; None leaves a field to the recipe's defaults (_recipe_defaults below).
ARMS: dict[str, dict] = {
    "tl-align": dict(tl_align=True, mixup=None, cutmix_grid=None, model_ema=None),
    "mixup+cutmix": dict(tl_align=False, mixup=None, cutmix_grid=None, model_ema=None),  # DeiT's baseline
    "grid-cutmix": dict(tl_align=False, mixup=0.0, cutmix_grid=True, model_ema=False),
    "none": dict(tl_align=False, mixup=0.0, cutmix=0.0, cutmix_grid=False, model_ema=False),
}
# The short spellings `--arms` also takes (and took before the arms had the reports' names).
ARM_ALIASES = {"tla": "tl-align", "base": "mixup+cutmix", "grid": "grid-cutmix"}


def arm_name(arm: str) -> str:
    """An arm's own name, from it or its short spelling; unknown names as they are."""
    return ARM_ALIASES.get(arm, arm)


def arm_slug(arm: str) -> str:
    """The arm in a run's name (NAME-MODEL-SLUG-sSEED): run names have no '+'."""
    return arm.replace("+", "-")


# The control arm an ablation pairs the others with (`tla report --by-arm`): TL-Align's own boxes
# with area labels, so that a difference is the labels' alone.
CONTROL_MIXING = "grid-cutmix"

# Upper bounds of the recipe's numbers (NaN and infinity are refused by the model itself): a finite
# but absurd value (--lr 1e308, --workers 100000, --num-classes 2**40) is a typo, refused with the
# bound named rather than trained or queued. Each bound is far above any published recipe:
MAX_LR = 10.0  # AdamW's learning rates are ~1e-3 (DeiT: 5e-4 x batch/512); 10 already diverges
MAX_ALPHA = 10.0  # mixup/CutMix Beta(α, α): 0.8 and 1.0 in DeiT; past ~10 λ is 0.5 every time
MAX_EPOCHS = 100_000
MAX_WORKERS = 256  # data-loading processes per rank (torch's DataLoader, one process each)
MAX_CLASSES = 100_000  # ImageNet-21k has 21,841; 2**40 would be a head of terabytes
_SCHEDULE = {"min_lr": "the schedule decays from --lr down to --min-lr",
             "warmup_lr": "the warm-up climbs from --warmup-lr up to --lr"}
RETIRED_KEYS = frozenset({"run_dir", "max_stalled_attempts"})
DATASETS = ("imagefolder", "fashion-mnist", "digits", "synthetic")
LABEL_PATHS = ("auto", "second", "fused", "explicit")  # tla_jobs.align.attention.PATHS, without torch


class TrainConfig(BaseModel):
    # NaN and infinity are refused everywhere: no option of the recipe means anything with them.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)

    # what to train, on what
    model: str = "deit_small_patch16_224"
    dataset: Literal["imagefolder", "fashion-mnist", "digits", "synthetic"] = "imagefolder"
    data_path: str = ""
    output_dir: str = ""
    stage_data: str = Field("", description="copy the packed --data-path (`tla data pack`) to this node-local folder "
                            "at job start, once per node (e.g. a local SSD, or '$SLURM_TMPDIR': variables are "
                            "expanded on the node); read in place when it has no room")
    img_size: int | None = Field(None, ge=8, le=4096, description="input size; default: the model's own")
    num_classes: int | None = Field(None, gt=1, le=MAX_CLASSES, description="default: the number of class folders "
                                    "(1000 with --dataset synthetic)")
    synthetic_images: int = Field(12800, gt=0, le=10**9, description="images per epoch of --dataset synthetic (random "
                                  "images and labels made on the device: a throughput smoke test, no files)")

    # TL-Align and mixing
    tl_align: bool = True
    align_path: Literal["auto", "second", "fused", "explicit"] = Field(
        "auto", description="How Ā·w is computed: auto (second on GPUs, fused on CPUs), second (a second no-grad "
        "attention call), fused (extra value channels of the same call), explicit (the attention matrix).")
    mixup: float | None = Field(None, ge=0, le=MAX_ALPHA,
                                description="mixup alpha; default 0.0 with TL-Align, 0.8 without")
    cutmix: float = Field(1.0, ge=0, le=MAX_ALPHA)
    cutmix_grid: bool | None = Field(None, description="snap CutMix to the patch grid; default: on with TL-Align")
    mix_mode: Literal["batch", "elem"] = "batch"
    mixup_switch_prob: float = Field(0.5, ge=0, le=1)
    smoothing: float = Field(0.1, ge=0, lt=1)

    # optimisation (DeiT)
    epochs: int = Field(300, gt=0, le=MAX_EPOCHS)
    batch_size: int = Field(64, gt=0, le=65536, description="per process")
    global_batch: int | None = Field(None, gt=0, le=2**24, description="images per optimizer step, all ranks "
                                     "together; default: --batch-size x the ranks of the first start. Kept when the "
                                     "run resumes on fewer ranks (gradient accumulation), so the lr and the sample "
                                     "order stay")
    lr: float | None = Field(None, gt=0, le=MAX_LR, description="default 5e-4 x global batch / 512")
    min_lr: float = Field(1e-5, ge=0, le=MAX_LR)
    warmup_lr: float = Field(1e-6, ge=0, le=MAX_LR)
    warmup_epochs: int = Field(5, ge=0, le=MAX_EPOCHS)
    cooldown_epochs: int = Field(10, ge=0, le=MAX_EPOCHS)
    weight_decay: float = Field(0.05, ge=0, le=10)
    opt_eps: float = Field(1e-8, gt=0, le=1)
    clip_grad: float | None = Field(None, gt=0, le=1e6, description="clip the gradient norm to this")
    drop_path: float = Field(0.1, ge=0, lt=1)

    # augmentation (DeiT)
    aa: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = Field(0.25, ge=0, le=1)
    repeated_aug: bool = True
    color_jitter: float = Field(0.4, ge=0, le=1)
    interpolation: str = "bicubic"
    crop_scale: float = Field(0.08, gt=0, le=1, description="smallest area share of RandomResizedCrop")

    # model EMA: DeiT's baseline keeps it, TL-Align's recipe turns it off
    model_ema: bool | None = None
    model_ema_decay: float = Field(0.99996, gt=0, lt=1)

    # run mechanics
    amp: Literal["auto", "bf16", "fp16", "off"] = "auto"
    compile: bool = Field(False, description="torch.compile the model, label propagation included")
    peak_tflops: float | None = Field(None, gt=0, le=1e6,
                                      description="the device's peak TFLOP/s for MFU; default: known "
                                      "for common GPUs (bf16/fp16 dense)")
    seed: int = Field(0, ge=0, lt=2**31)
    workers: int = Field(4, ge=0, le=MAX_WORKERS)
    data_device: Literal["auto", "cpu", "cuda", "batch"] = Field(
        "auto", description="where the train augmentation runs: cpu (PIL in the loader workers), cuda (workers "
        "decode and crop; resize, flip and RandAugment run batched on the GPU, same parameters), batch (that path "
        "on whatever device trains, the CPU included), auto (cuda when training on a GPU, else cpu).")
    dist_eval: bool = False
    resume: str = ""
    eval_only: bool = False
    eval_weights: Literal["model", "ema"] = Field("model", description="--eval-only: the checkpoint's model weights "
                                                  "or its EMA weights (saved by runs with --model-ema)")
    checkpoint_every_min: float = Field(10.0, ge=0, le=7 * 24 * 60, description="0 = only at epoch ends")
    checkpoint_every_epochs: int = Field(20, ge=0, le=MAX_EPOCHS,
                                         description="keep checkpoint_epoch{N}.pth every N; 0 = never")
    keep_last: int = Field(0, ge=0, le=MAX_EPOCHS,
                           description="keep only the newest N checkpoint_epoch{N}.pth files (older ones "
                           "are deleted after each save); 0 = no limit by age. checkpoint_last/prev/best are always "
                           "kept")
    keep_best: int = Field(0, ge=0, le=MAX_EPOCHS,
                           description="keep the K checkpoint_epoch{N}.pth files of the best top-1 (timm's "
                           "--checkpoint-hist, Lightning's save_top_k); with --keep-last, the newest N as well. "
                           "Both 0 (the default): every periodic checkpoint stays")
    tensorboard: bool = Field(True, description="write TensorBoard event files into RUN/tensorboard (needs the "
                              "tensorboard package: without it, one warning and none are written)")
    wandb: bool = Field(False, description="log the curves to Weights & Biases too (needs the wandb package; "
                        "project from WANDB_PROJECT, default tla; WANDB_MODE=offline on nodes without internet)")
    extend: bool = Field(False, description="continue the run in --output-dir with another --epochs (every other "
                         "option must be the run's own; the lr schedule is rebuilt for the new length)")
    max_steps: int | None = Field(None, gt=0, description="stop after this many optimizer steps (smoke runs)")
    step_delay: float = Field(0.0, ge=0, description="sleep after each step (tests that must catch a run mid-epoch)")
    fail_at_step: int | None = Field(None, ge=1, le=10**12, description="raise an error at this global step, in "
                                     "every attempt (tests of the failure requeue and the stall guard)")
    step_delay_once: bool = Field(False, description="with --step-delay: sleep only until SLURM first requeues the "
                                  "job (tests that stop a run once, then wait for it to finish)")

    @model_validator(mode="before")
    @classmethod
    def _drop_retired_keys(cls, data):
        # run.json files written before 0.4 carry these; the trainer no longer reads them (the stall
        # limit travels with the job, the run directory is output_dir), so an old run still resumes.
        if isinstance(data, dict) and RETIRED_KEYS & data.keys():
            data = {k: v for k, v in data.items() if k not in RETIRED_KEYS}
        return data

    @field_validator("aa")
    @classmethod
    def _aa(cls, v: str | None) -> str | None:
        if v is None or v.lower() in ("", "none", "off"):
            return None
        if not v.startswith(("rand", "augmix", "trivial", "v0", "original", "3a")):
            raise ValueError(f"unknown auto-augment policy {v!r} (e.g. rand-m9-mstd0.5-inc1, none)")
        return v

    @model_validator(mode="after")
    def _recipe_defaults(self) -> TrainConfig:
        if self.mixup is None:
            self.mixup = 0.0 if self.tl_align else 0.8
        if self.cutmix_grid is None:
            self.cutmix_grid = self.tl_align
        if self.model_ema is None:
            self.model_ema = not self.tl_align
        if self.tl_align and self.cutmix > 0 and not self.cutmix_grid:
            raise ValueError("TL-Align needs CutMix on the patch grid (--cutmix-grid)")
        return self

    @field_validator("max_steps", "step_delay")
    @classmethod
    def _bounded(cls, v, info: ValidationInfo):
        limit = {"max_steps": 10**12, "step_delay": 3600}[info.field_name]  # as the Field bounds above
        if v is not None and v > limit:
            raise ValueError(f"Input should be less than or equal to {limit}")
        return v

    @field_validator("min_lr", "warmup_lr")
    @classmethod
    def _below_lr(cls, v: float, info: ValidationInfo) -> float:
        # The schedule runs warmup_lr -> lr -> min_lr: a floor or a start above the peak is a swapped
        # pair of values. Checked against an explicit --lr only: the default lr scales with the global
        # batch (5e-4 x batch / 512), which is known once the ranks are.
        lr = info.data.get("lr")
        if lr is not None and v > lr:
            raise ValueError(f"{v:g} is above --lr {lr:g} ({_SCHEDULE[info.field_name]})")
        return v

    def schedule_error(self, world_size: int) -> str | None:
        """With the default --lr (5e-4 x global batch / 512, known once the ranks are): a --min-lr or
        --warmup-lr the user changed that is above it, as one line (None when the schedule is sound).
        Their own defaults are left alone: a batch of 8 has a default lr below the default min_lr."""
        if self.lr is not None:
            return None
        lr = 5e-4 * self.batch_size * world_size / 512
        for name in ("min_lr", "warmup_lr"):
            value = getattr(self, name)
            if value > lr and value != type(self).model_fields[name].default:
                return (f"--{name.replace('_', '-')} {value:g} is above the default --lr {lr:g} (5e-4 x global "
                        f"batch {self.batch_size * world_size} / 512; {_SCHEDULE[name]}): set --lr, or lower it")
        return None

    def warnings(self) -> list[str]:
        """What is allowed but probably not meant, one line each (the CLI prints them once, on
        stderr): a warm-up as long as the run is one (a smoke run of DeiT's recipe keeps its 5
        warm-up epochs, so this is no refusal)."""
        out = []
        if not self.eval_only and self.warmup_epochs >= self.epochs:
            out.append(f"--warmup-epochs {self.warmup_epochs} is not shorter than --epochs {self.epochs}: the "
                       "whole run is warm-up and the learning rate never reaches --lr's cosine decay")
        return out

    def mixing(self) -> str:
        """A short name of the label scheme, for reports."""
        if self.tl_align:
            return "tl-align"
        if self.mixup == 0 and self.cutmix == 0:
            return "none"
        if self.cutmix_grid and self.mixup == 0:
            return "grid-cutmix"
        return "mixup+cutmix" if self.mixup and self.cutmix else ("mixup" if self.mixup else "cutmix")


def load_config_file(path: str | Path) -> dict:
    """The TrainConfig fields of a YAML recipe (`--config FILE`, e.g. a run's config.yaml), not yet
    validated: the caller lays command-line options over them and builds the TrainConfig. Keys are
    field names (batch_size; batch-size as on the command line is accepted too); an empty file is
    an empty recipe. A missing or unreadable file, bad YAML, a top level that is not a mapping and an
    unknown key are one-line TlaErrors."""
    import yaml

    from tla_jobs.fsutil import MAX_TEXT, UnsafeFile, read_regular_text

    path = Path(path).expanduser()
    try:
        text = read_regular_text(path, MAX_TEXT)  # a FIFO or /dev/zero as --config: refused, never read forever
    except FileNotFoundError:
        raise TlaError(f"config file {path} does not exist") from None
    except UnsafeFile as exc:
        raise TlaError(f"config file {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TlaError(f"config file {path} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    from tla_jobs.jobs.profiles import UniqueKeyLoader

    try:
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 (a SafeLoader that refuses duplicate keys)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise TlaError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TlaError(f"config file {path} must be a mapping of option: value, not a {type(data).__name__}")
    out = {str(k).replace("-", "_"): v for k, v in data.items()}
    fields = set(TrainConfig.model_fields)
    unknown = sorted(k for k in out if k not in fields and k not in RETIRED_KEYS)
    if unknown:
        close = difflib.get_close_matches(unknown[0], fields, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise TlaError(f"config file {path}: unknown option(s) {', '.join(unknown)}{hint}")
    for key, value in out.items():
        problem = _file_type_problem(key, value)
        if problem:
            raise TlaError(f"config file {path}: {key}: {problem}")
    return out


def _file_type_problem(key: str, value) -> str | None:
    """Stricter than pydantic's lax mode, which the command line needs (typer hands it strings) but a
    YAML file does not: `epochs: true` would be 1 and `tl_align: 1` would be True. A bool where a
    number is expected and a number or a string where a bool is expected are refused; numbers
    written as strings stay accepted (PyYAML reads `1e-3`, without a dot, as a string)."""
    field = TrainConfig.model_fields.get(key)
    if field is None or value is None:
        return None
    import typing

    if typing.get_origin(field.annotation) is Literal:
        return None  # one of the named values: pydantic names them
    types = {a for a in typing.get_args(field.annotation) if a is not type(None)} or {field.annotation}
    if isinstance(value, bool) and bool not in types and str not in types:
        return f"{str(value).lower()} is a yes/no value; a number is expected"
    if bool in types and not isinstance(value, bool):
        return f"{value!r} is not true or false"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__} is not a single value"
    return None
