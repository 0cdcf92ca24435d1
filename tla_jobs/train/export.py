"""Weights a colleague (or plain timm, without tla installed) can load: `tla export`.

A training checkpoint holds optimizer, scheduler and RNG state of every rank and is a pickle; an
export holds one set of weights (the model's or its EMA's) and what it takes to use them: the timm
call that builds the architecture, the class names, input size, mean/std and crop. Safetensors is
the default (no pickle at all); .pth is a plain ``{"state_dict", "metadata"}`` dict that timm's
``load_checkpoint`` reads.

The small ``tla_*`` models are registered by tla only, so their export names the timm architecture
they are an instance of (VisionTransformer / SwinTransformer) with every argument spelled out; the
export then builds that plain-timm model, loads the weights strictly and compares its logits with
the trained model's, so a file that would not load identically is never written.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from timm.data import resolve_model_data_config
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torchvision.datasets.folder import find_classes

from tla_jobs.errors import CheckpointError, TlaError
from tla_jobs.fsutil import atomic_write_bytes
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train.models import build_model

FORMAT = "tla-export/1"
WEIGHTS = ("model", "ema")
FORMATS = ("safetensors", "pth")
CROP_PCT = 0.875  # the trainer's eval transform (tla_jobs.data.loaders.build_transforms)


def timm_recipe(name: str, model: torch.nn.Module, num_classes: int, img_size: int) -> tuple[str, dict]:
    """(timm model name, keyword arguments) that build ``model``'s architecture with timm alone."""
    if not name.startswith("tla_"):
        return name, {"num_classes": num_classes, "img_size": img_size}
    if isinstance(model, VisionTransformer):
        blk = model.blocks[0]
        return "vit_tiny_patch16_224", {
            "num_classes": num_classes, "img_size": img_size, "patch_size": model.patch_embed.patch_size[0],
            "embed_dim": model.embed_dim, "depth": len(model.blocks), "num_heads": blk.attn.num_heads,
            "mlp_ratio": blk.mlp.fc1.out_features / model.embed_dim,
        }
    if isinstance(model, SwinTransformer):
        layers = list(model.layers)
        return "swin_tiny_patch4_window7_224", {
            "num_classes": num_classes, "img_size": img_size, "patch_size": model.patch_embed.patch_size[0],
            "window_size": layers[0].blocks[0].window_size[0], "embed_dim": model.embed_dim,
            "depths": [len(layer.blocks) for layer in layers],
            "num_heads": [layer.blocks[0].attn.num_heads for layer in layers],
            "mlp_ratio": layers[0].blocks[0].mlp.fc1.out_features / model.embed_dim,
        }
    raise TlaError(f"cannot describe {name} ({type(model).__name__}) for plain timm")


def load_line(meta: dict, path: str) -> str:
    """The one line that loads an export with timm (the README shows it too)."""
    kwargs = ", ".join(f"{k}={v!r}" for k, v in json.loads(meta["timm_kwargs"]).items())
    return f"timm.create_model({meta['timm_model']!r}, {kwargs}, checkpoint_path={path!r})"


def _class_names(config: dict, num_classes: int) -> list[str]:
    """The training split's class folders in the order torchvision's ImageFolder numbered them."""
    data = Path(config.get("data_path") or "")
    if (data / "classes.json").is_file() and (data / "index.json").is_file():  # packed (tla data pack)
        names = json.loads((data / "classes.json").read_text())
        return names if len(names) == num_classes else [str(i) for i in range(num_classes)]
    try:
        names = find_classes(str(data / "train"))[0]
    except (FileNotFoundError, NotADirectoryError):  # a synthetic run, or data moved since
        names = []
    return names if len(names) == num_classes else [str(i) for i in range(num_classes)]


def export(checkpoint: str | Path, out: str | Path, weights: str = "model", fmt: str | None = None,
           force: bool = False) -> dict:
    """Write ``out`` from a verified checkpoint; returns its metadata (strings, as safetensors keeps them).
    Without ``force`` an existing ``out`` is never replaced, also one another export creates meanwhile."""
    checkpoint, out = Path(checkpoint), Path(out)
    fmt = fmt or ("pth" if out.suffix == ".pth" else "safetensors")
    if weights not in WEIGHTS or fmt not in FORMATS:
        raise TlaError(f"export: weights must be one of {WEIGHTS} and format one of {FORMATS}")
    if not out.parent.is_dir():
        raise TlaError(f"export: folder {out.parent} does not exist")
    payload, digest = ckpt.load(checkpoint)
    state = payload.get(weights)
    if not state:
        raise CheckpointError(f"{checkpoint} has no {weights} weights (EMA is saved only by runs with --model-ema)")
    state = {k.removeprefix("_orig_mod."): v.detach().contiguous() for k, v in state.items()}  # torch.compile
    config, name, num_classes = payload.get("config", {}), payload["model_name"], payload["num_classes"]
    model = build_model(name, num_classes, img_size=config.get("img_size")).eval()
    model.load_state_dict(state)
    img_size = int(model.patch_embed.img_size[0])
    timm_name, kwargs = timm_recipe(name, model, num_classes, img_size)
    plain = timm.create_model(timm_name, pretrained=False, **kwargs).eval()
    plain.load_state_dict(state, strict=True)
    probe = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if not torch.equal(model(probe), plain(probe)):
            raise TlaError(f"plain timm's {timm_name} does not reproduce {name}; not exporting")
    dc = resolve_model_data_config(model)
    meta = {
        "format": FORMAT,
        "model_name": name,
        "timm_model": timm_name,
        "timm_kwargs": json.dumps(kwargs),
        "weights": weights,
        "num_classes": str(num_classes),
        "class_names": json.dumps(_class_names(config, num_classes)),
        "input_size": json.dumps([3, img_size, img_size]),
        "mean": json.dumps(list(dc["mean"])),
        "std": json.dumps(list(dc["std"])),
        "crop_pct": str(CROP_PCT),
        "interpolation": config.get("interpolation", "bicubic"),
        "epoch": str(payload.get("epoch", "")),
        "source_checkpoint": str(checkpoint.resolve()),
        "source_sha256": digest,
    }
    if fmt == "safetensors":
        from safetensors.torch import save

        data = save(state, metadata=meta)
    else:
        data, _ = ckpt.serialize({"state_dict": state, "metadata": meta})
    try:  # an interrupted export leaves no half file under the name asked for
        atomic_write_bytes(out, data, replace=force)
    except FileExistsError:
        raise TlaError(f"{out} already exists (written meanwhile by another export?); --force replaces it") from None
    return meta


def read_metadata(path: str | Path) -> dict:
    """An export's metadata (without loading its tensors for safetensors)."""
    path = Path(path)
    try:
        if path.suffix == ".pth":
            meta = torch.load(path, map_location="cpu", weights_only=True).get("metadata")
        else:
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable export: {exc.__class__.__name__}: {exc}") from None
    if not meta or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a tla export")
    return meta
