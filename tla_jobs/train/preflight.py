"""Trainer-side checks that need no data and no compute, run before anything is queued.

`tla submit` (and `tla train`, before its process group) builds the model on torch's ``meta``
device (no memory, no initialisation cost: a ViT-H takes under a second) and runs one forward
through it, the label-carrying one when TL-Align is on. That finds what would otherwise stop a job
on the cluster after it waited in the queue: an unknown model, a model TL-Align cannot run
(resnet18, convnext_tiny, a ViT without a cls token), an input size the model cannot take or
whose token grid Swin's windows do not tile, options that contradict each other.
"""

from __future__ import annotations

import warnings

from tla_jobs.config import TrainConfig
from tla_jobs.errors import TlaError


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split("\n")[0].split())
    return text or type(exc).__name__


def check_config(cfg: TrainConfig, num_classes: int | None = None) -> None:
    """Raise TlaError (one line, naming the option) for a config the trainer would refuse or crash on."""
    if cfg.eval_only and not cfg.resume:
        raise TlaError("--eval-only needs --resume CKPT (the checkpoint to evaluate)")
    classes = num_classes or cfg.num_classes
    if classes is not None and classes < 2:
        raise TlaError(f"--num-classes {classes}: a classifier needs at least 2 classes")
    check_model(cfg, classes or 1000)
    check_transforms(cfg)


def check_transforms(cfg: TrainConfig) -> None:
    """Build the train and eval transforms (timm's, as the loaders do) and run them on a small blank
    image: an unknown --interpolation or --aa policy fails here, not when the first batch loads."""
    from PIL import Image

    from tla_jobs.data.loaders import build_transforms

    image = Image.new("RGB", (40, 40))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            build_transforms(cfg.model_copy(update={"aa": None}), 32)[1](image)
        except (KeyError, AssertionError, ValueError, TypeError, RuntimeError) as exc:
            raise TlaError(f"--interpolation {cfg.interpolation!r} is not one timm knows (bicubic, bilinear, "
                           f"nearest, ...): {_first_line(exc)}") from None
        try:
            build_transforms(cfg, 32)[0](image)
        except (KeyError, AssertionError, ValueError, TypeError, RuntimeError, IndexError) as exc:
            raise TlaError(f"--aa {cfg.aa!r} is not an augmentation policy timm can build "
                           f"(e.g. rand-m9-mstd0.5-inc1, or none): {_first_line(exc)}") from None


def check_model(cfg: TrainConfig, num_classes: int = 1000) -> None:
    """Build ``cfg.model`` on the meta device and run one (aligned) forward of a batch of two."""
    import timm
    import torch

    from tla_jobs.train.models import check_model_name, model_input_size, model_patch_size

    check_model_name(cfg.model)
    kwargs = dict(pretrained=False, num_classes=num_classes, drop_path_rate=cfg.drop_path)
    size_opt = f" at --img-size {cfg.img_size}" if cfg.img_size else ""
    if cfg.img_size:
        kwargs["img_size"] = cfg.img_size
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")
            model = timm.create_model(cfg.model, **kwargs)
    except TypeError as exc:
        raise TlaError(f"--model {cfg.model} cannot be built{size_opt}: {_first_line(exc)}") from None
    except (RuntimeError, ValueError, AssertionError, ZeroDivisionError) as exc:
        raise TlaError(f"--model {cfg.model} cannot be built{size_opt}: {_first_line(exc)}") from None
    if cfg.tl_align:
        from tla_jobs.align import check_supported

        try:
            check_supported(model)
        except TlaError as exc:  # UnsupportedModelError: says what is missing and what is supported
            raise TlaError(f"--model {cfg.model}: {exc} (or train it without TL-Align: --no-tl-align)") from None
    model.eval()
    size = cfg.img_size or model_input_size(model)
    if cfg.cutmix > 0 and cfg.cutmix_grid and hasattr(model, "patch_embed"):
        patch = model_patch_size(model)
        if size % patch:
            raise TlaError(f"--img-size {size} is not a multiple of {cfg.model}'s patch size {patch} "
                           "(CutMix boxes are cut on the patch grid)")
    try:
        images = torch.empty(2, 3, size, size, device="meta")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            if cfg.tl_align:
                from tla_jobs.align import aligned_forward

                n = getattr(model.patch_embed, "num_patches", None) or (size // model_patch_size(model)) ** 2
                aligned_forward(model, images, torch.empty(2, n, device="meta"))
            else:
                model(images)
    except TlaError as exc:
        raise TlaError(f"--model {cfg.model}{size_opt}: {exc}") from None
    except (RuntimeError, ValueError, AssertionError, TypeError, AttributeError, IndexError) as exc:
        raise TlaError(f"--model {cfg.model} cannot run{size_opt or f' at its input size {size}'}: "
                       f"{_first_line(exc)}") from None


def check_spec(spec: dict) -> None:
    """`check_config` for a spec as stored in run.json."""
    check_config(TrainConfig(**spec))
