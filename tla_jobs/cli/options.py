"""Trainer options generated once from TrainConfig, for `tla train` and `tla submit train`.

Typer builds a command from its function's signature; giving a wrapper a signature made of one
typer.Option per TrainConfig field keeps the two commands (and the config's own defaults and
help texts) from drifting apart.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path

import typer

from tla_jobs.config import TrainConfig
from tla_jobs.errors import TlaError

HIDDEN = {"step_delay", "step_delay_once", "fail_at_step"}  # test knobs
# Help for the fields whose own description (config.py) is missing or too terse for --help.
HELP = {
    "model": "timm model name (deit_tiny_patch16_224, deit_small_distilled_patch16_224, swin_tiny_patch4_window7_224, "
             "or the small tla_vit_nano / tla_vit_micro / tla_swin_micro / tla_swin_micro_h1).",
    "dataset": "imagefolder (DATA/train/CLASS/*, DATA/val/CLASS/*) or a bundled one: fashion-mnist, digits "
               "(prepared into --data-path on first use).",
    "tl_align": "Token-Label Alignment on (default) or off (DeiT's baseline: mixup 0.8 + CutMix 1.0, EMA on).",
    "amp": "Mixed precision: auto (bf16 on GPU, off on CPU), bf16, fp16, off.",
    "resume": "Checkpoint to start from; by default the run resumes from its own newest good checkpoint.",
    "eval_only": "Evaluate --resume CKPT on the val split and write eval.json.",
    "output_dir": "Run directory: checkpoints, metrics.jsonl, heartbeat.json, logs.",
    "data_path": "Dataset root: an ImageFolder (train/ and val/) or a folder of `tla data pack` shards.",
    "cutmix": "CutMix alpha (0 = off).",
    "mix_mode": "How mixing partners and λ are drawn: per batch or per sample (elem).",
    "mixup_switch_prob": "Without TL-Align: the chance of mixup instead of CutMix for a batch.",
    "smoothing": "Label smoothing, inside the (aligned) targets.",
    "epochs": "Epochs to train.",
    "min_lr": "The cosine schedule's final learning rate.",
    "warmup_lr": "Learning rate at the start of the warm-up.",
    "warmup_epochs": "Epochs of linear warm-up.",
    "cooldown_epochs": "Epochs at --min-lr after the cosine decay.",
    "weight_decay": "AdamW weight decay.",
    "opt_eps": "AdamW epsilon.",
    "drop_path": "Stochastic depth rate.",
    "aa": "RandAugment policy (timm's syntax, e.g. rand-m9-mstd0.5-inc1), or none.",
    "reprob": "Random erasing probability.",
    "repeated_aug": "DeiT's repeated augmentation sampler (3 augmented copies of each image per epoch).",
    "color_jitter": "Colour jitter strength.",
    "interpolation": "Resize interpolation of the train transforms.",
    "model_ema": "Keep an EMA of the weights and evaluate it each epoch (default: on without TL-Align).",
    "model_ema_decay": "EMA decay per step.",
    "seed": "Random seed (model init, data order, augmentations, mixing).",
    "workers": "Data-loading worker processes per rank.",
    "dist_eval": "Evaluate on every rank's share of the val set (else rank 0 evaluates all of it).",
}
# The spellings of timm's train.py and DeiT's main.py, accepted as well: a recipe copied from either
# runs unchanged.
ALIASES = {
    "mix_mode": ["--mixup-mode"],
    "img_size": ["--input-size"],
    "dataset": ["--data-set"],
    "data_path": ["--data_path"],
    "output_dir": ["--output_dir", "--output"],
    "workers": ["--num-workers", "--num_workers", "-j"],
    "batch_size": ["-b"],
    "interpolation": ["--train-interpolation"],
    "eval_only": ["--eval"],
    "keep_best": ["--checkpoint-hist"],  # timm's: the N best by the eval metric
}


def _annotation(ann):
    """Typer-friendly type for a pydantic annotation: Literal → str (pydantic checks the value)."""
    origin = typing.get_origin(ann)
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if origin is typing.Literal:
        return str
    if origin in (typing.Union, types.UnionType) and args:
        inner = _annotation(args[0])
        return typing.Optional[inner]  # noqa: UP045 (typer inspects typing.Optional)
    return ann


def train_parameters() -> list[inspect.Parameter]:
    params = []
    for name, field in TrainConfig.model_fields.items():
        ann = _annotation(field.annotation)
        flag = "--" + name.replace("_", "-")
        base = typing.get_args(ann)[0] if typing.get_origin(ann) is typing.Union else ann
        decls = [f"{flag}/--no-{flag[2:]}"] if base is bool else [flag]
        decls += ALIASES.get(name, [])
        help_text = HELP.get(name) or field.description or ""
        choices = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is typing.Literal:
            help_text = f"{help_text} One of: {', '.join(choices)}.".strip()
        option = typer.Option(field.default, *decls, help=help_text, hidden=name in HIDDEN, show_default=True,
                              rich_help_panel="Trainer options")
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=ann))
    return params


def _with_options(fn, params: list[inspect.Parameter], into: str, after: str | None = None):
    """``fn`` with ``params`` added to its own options (after its option ``after``, else at the end);
    ``fn`` receives their values as one dict argument named ``into``."""
    own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in inspect.signature(fn).parameters.values()
           if p.name != into]
    names = {p.name for p in params}
    at = next((i + 1 for i, p in enumerate(own) if p.name == after), len(own))

    @functools.wraps(fn)
    def wrapper(**kwargs):
        values = {k: kwargs.pop(k) for k in list(kwargs) if k in names}
        return fn(**kwargs, **{into: values})

    wrapper.__signature__ = inspect.Signature(own[:at] + params + own[at:])
    del wrapper.__wrapped__  # inspect.signature must see the new signature, not fn's
    return wrapper


CONFIG_HELP = ("A YAML recipe of trainer options (field names: batch_size: 128, model: ...; a run's config.yaml "
               "repeats that run); options typed on the command line override the file.")


def _typed(ctx, name: str) -> bool:
    """The option was given on the command line (not its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name not in ("DEFAULT", "DEFAULT_MAP")


def _same_dir(a: Path, b: Path) -> bool:
    try:
        return a.expanduser().resolve() == b.expanduser().resolve()
    except OSError:
        return False


def _holds_run(folder: Path) -> bool:
    """A folder a run was trained or submitted in (its config.yaml, run.json or checkpoint)."""
    from tla_jobs import rundir

    folder = folder.expanduser()
    return any((folder / n).exists() for n in (rundir.CONFIG_YAML, rundir.RUN_JSON, rundir.CHECKPOINT_LAST))


def with_train_options(fn=None, *, not_from_file: tuple[str, ...] = ()):
    """Append the trainer options and --config FILE to ``fn``'s own; ``fn`` receives them as
    ``train_kwargs``: the defaults, the file's values over them (except ``not_from_file``), the
    options typed on the command line over both."""
    if fn is None:
        return functools.partial(with_train_options, not_from_file=not_from_file)

    @functools.wraps(fn)
    def merged(*, train_kwargs: dict, **kwargs):
        ctx, config = train_kwargs.pop("ctx"), train_kwargs.pop("config")
        if config is not None:
            from tla_jobs.config import load_config_file

            recipe = {k: v for k, v in load_config_file(config).items() if k not in not_from_file}
            typed = {k: v for k, v in train_kwargs.items() if _typed(ctx, k)}
            own = recipe.get("output_dir")
            if own and "output_dir" not in typed and _holds_run(Path(str(own))):
                # a run's config.yaml, or a copy of it: its output_dir is that run's folder, which a repeat
                # (even with an option edited) must not train into unasked
                whose = "the config of" if _same_dir(Path(str(own)), Path(config).parent) else "a config naming"
                raise TlaError(f"{config} is {whose} the run in {own}: add --output-dir NEW to repeat "
                               f"that run (or --output-dir {own} to continue it)")
            train_kwargs = {**train_kwargs, **recipe, **typed}
        return fn(**kwargs, train_kwargs=train_kwargs)

    option = typer.Option(None, "--config", help=CONFIG_HELP, rich_help_panel="Trainer options")
    extra = [inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context),
             inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=option,
                               annotation=typing.Optional[Path])]  # noqa: UP045 (typer inspects typing.Optional)
    return _with_options(merged, extra + train_parameters(), "train_kwargs")


# Resource overrides of `submit train`, `submit sweep` and `resume`: (parameter, flag, help); the values
# are checked by the profile model, which gives bad ones a one-line error.
RESOURCES = [
    ("nodes", int, "--nodes", "Override the profile's node count."),
    ("gpus_per_node", int, "--gpus-per-node", "Override the profile's GPUs per node."),
    ("tasks_per_node", int, "--tasks-per-node", "Override tasks (ranks) per node."),
    ("time_min", int, "--time", "Override the time limit of one attempt (minutes)."),
    ("partition", str, "--partition", "Override the SLURM partition."),
]


def with_resource_options(fn):
    """Add the resource overrides after ``fn``'s --cluster; ``fn`` receives them as ``overrides``."""
    params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=ann,
                                default=typer.Option(None, flag, help=help_text))
              for name, ann, flag, help_text in RESOURCES]
    return _with_options(fn, params, "overrides", after="cluster")
