"""Forward passes of timm models that carry token labels alongside the features.

Each walker runs the model's own submodules in the order its ``forward`` does (so the logits are
exactly ``model(images)``) and swaps only the attention call for :func:`attend`, which also returns
Ā·L. timm offers no hook that exposes the attention weights of a fused block, so the block bodies
are restated here; every model, block and attention type is checked first and anything these
walkers do not restate faithfully is refused with a clear error instead of being mis-propagated.

Labels L have shape (B, tokens, K): K = 1 for TL-Align's scalar weight w (all a two-label mix
needs), K = number of classes for the reference's full label distributions.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import (
    PatchMerging,
    SwinTransformer,
    SwinTransformerBlock,
    WindowAttention,
    window_partition,
    window_reverse,
)
from timm.models.vision_transformer import Block, VisionTransformer

from tla_jobs.align.attention import attend, label_channels, resolve_path
from tla_jobs.errors import TlaError


class UnsupportedModelError(TlaError):
    """The model (or one of its parts) is not one whose label propagation is implemented."""


def _unsupported(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"TL-Align does not support {what}; supported: timm VisionTransformer with a cls token "
        "(deit_*, vit_*), VisionTransformerDistilled (deit_*_distilled_*) and SwinTransformer (swin_*)"
    )


def _mix(labels: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    # The reference's block rule: a plain average of the attention branch and the residual, whatever
    # the branch's norm, LayerScale or DropPath; MLP and norms act per token and leave labels alone.
    return torch.lerp(labels.to(mixed.dtype), mixed, 0.5)  # one kernel (the cast is a no-op after block 1)


# ----------------------------------------------------------------------------------------- ViT / DeiT


def _check_vit(model: VisionTransformer) -> None:
    if model.cls_token is None:
        raise _unsupported("a VisionTransformer without a cls token")
    if model.global_pool not in ("token", "avg"):
        raise _unsupported(f"a VisionTransformer with global_pool={model.global_pool!r}")
    if not isinstance(model.patch_drop, nn.Identity):
        raise _unsupported("patch dropout (it drops tokens and their labels at random)")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) is not Attention:
            raise _unsupported(f"block {i} of type {type(blk).__name__}/{type(blk.attn).__name__}")


def _vit_attention(attn: Attention, x: torch.Tensor, labels: torch.Tensor, path: str):
    """timm.layers.Attention.forward with the label channel (no mask: ViT blocks pass none)."""
    b, n, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    packed = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim)
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
        out, mixed = attend(packed, labels, scale=attn.scale, dropout_p=dropout_p, path=path)
    else:
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out, mixed = attend((q, k, v), labels, scale=attn.scale, dropout_p=dropout_p, path=path)
    out = attn.norm(out.transpose(1, 2).reshape(b, n, attn.attn_dim))
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out)), mixed


def _vit_tokens(model: VisionTransformer, images: torch.Tensor, labels: torch.Tensor, path: str):
    """Features after the final norm, and the labels of every token (prefix tokens first)."""
    x = model.patch_embed(images)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    if x.shape[1] != labels.shape[1]:
        raise ValueError(
            f"{labels.shape[1] - model.num_prefix_tokens} patch weights given for "
            f"{x.shape[1] - model.num_prefix_tokens} patches: is the patch size "
            f"{model.patch_embed.patch_size} the one used for CutMix?"
        )
    for blk in model.blocks:
        branch, mixed = _vit_attention(blk.attn, blk.norm1(x), labels, path)
        x = x + blk.drop_path1(blk.ls1(branch))
        labels = _mix(labels, mixed)
        x = x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
    return model.norm(x), labels


def _vit_initial(model: VisionTransformer, patch_labels: torch.Tensor) -> torch.Tensor:
    # Prefix tokens (cls, distillation, registers) start with the image's mixed label: the mean of
    # its patches' labels (= λ·y_a + (1-λ)·y_b), as the reference's cls row.
    prefix = patch_labels.mean(dim=1, keepdim=True).expand(-1, model.num_prefix_tokens, -1)
    return torch.cat([prefix, patch_labels], dim=1)


# ----------------------------------------------------------------------------------------------- Swin


def _check_swin(model: SwinTransformer) -> None:
    for si, stage in enumerate(model.layers):
        if not isinstance(stage.downsample, (nn.Identity, PatchMerging)):
            raise _unsupported(f"stage {si} downsampling of type {type(stage.downsample).__name__}")
        for bi, blk in enumerate(stage.blocks):
            if type(blk) is not SwinTransformerBlock or type(blk.attn) is not WindowAttention:
                raise _unsupported(f"Swin stage {si} block {bi} of type {type(blk).__name__}")
    if getattr(model.head, "global_pool", None) is not None and "avg" not in str(model.head.global_pool):
        raise _unsupported("a Swin head that does not average-pool its tokens")


def _window_attention(attn: WindowAttention, x: torch.Tensor, labels: torch.Tensor, mask, path: str):
    """timm WindowAttention.forward with the label channel; x is (windows·B, N, C)."""
    b_, n, _ = x.shape
    packed = attn.qkv(x).reshape(b_, n, 3, attn.num_heads, -1)
    bias = attn._get_rel_pos_bias()
    if mask is not None:
        nw = mask.shape[0]
        bias = (bias + mask.view(1, nw, 1, n, n).expand(b_ // nw, -1, attn.num_heads, -1, -1)
                .reshape(-1, attn.num_heads, n, n))
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    out, mixed = attend(packed, labels, scale=attn.scale, attn_mask=bias, dropout_p=dropout_p, path=path)
    out = attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(b_, n, -1)))
    return out, mixed


def _swin_block(blk: SwinTransformerBlock, x: torch.Tensor, labels: torch.Tensor, path: str):
    b, h, w, c = x.shape
    ws = blk.window_size
    if h % ws[0] or w % ws[1]:
        raise _unsupported(f"a Swin stage of {h}x{w} tokens that the {ws} windows do not tile")
    shift = tuple(blk.shift_size)
    y = blk.norm1(x)
    if any(shift):
        # Features and labels take the same cyclic shift, so each window sees matching tokens.
        y = torch.roll(y, shifts=(-shift[0], -shift[1]), dims=(1, 2))
        lab = torch.roll(labels, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    else:
        lab = labels
    area = ws[0] * ws[1]
    mask = blk.get_attn_mask(y) if getattr(blk, "dynamic_mask", False) else blk.attn_mask
    out, mixed = _window_attention(
        blk.attn,
        window_partition(y, ws).view(-1, area, c),
        window_partition(lab, ws).view(-1, area, lab.shape[-1]),
        mask,
        path,
    )
    out = window_reverse(out.view(-1, ws[0], ws[1], c), ws, h, w)
    mixed = window_reverse(mixed.view(-1, ws[0], ws[1], lab.shape[-1]), ws, h, w)
    if any(shift):
        out = torch.roll(out, shifts=shift, dims=(1, 2))
        mixed = torch.roll(mixed, shifts=shift, dims=(1, 2))
    x = x + blk.drop_path1(out)
    labels = _mix(labels, mixed)
    x = x.reshape(b, -1, c)
    x = x + blk.drop_path2(blk.mlp(blk.norm2(x)))
    return x.reshape(b, h, w, c), labels


def _merge_labels(labels: torch.Tensor) -> torch.Tensor:
    # PatchMerging concatenates each 2x2 group of tokens into one: its label is the group's mean.
    b, h, w, k = labels.shape
    if h % 2 or w % 2:
        raise _unsupported(f"patch merging of an odd {h}x{w} token grid")
    return labels.reshape(b, h // 2, 2, w // 2, 2, k).mean(dim=(2, 4))


def _swin_tokens(model: SwinTransformer, images: torch.Tensor, patch_labels: torch.Tensor, path: str):
    x = model.patch_embed(images)  # (B, H, W, C)
    b, h, w, _ = x.shape
    if patch_labels.shape[1] != h * w:
        raise ValueError(f"{patch_labels.shape[1]} patch weights given for {h * w} patches")
    labels = patch_labels.reshape(b, h, w, -1)
    for stage in model.layers:
        if isinstance(stage.downsample, PatchMerging):
            labels = _merge_labels(labels)
        x = stage.downsample(x)
        for blk in stage.blocks:
            x, labels = _swin_block(blk, x, labels, path)
    return model.norm(x), labels


# --------------------------------------------------------------------------------------------- public


def propagate_labels(
    model: nn.Module, images: torch.Tensor, patch_labels: torch.Tensor, path: str = "auto"
) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Run ``model`` on ``images`` while propagating per-patch labels (B, N_patches, K).

    ``path`` is how Ā·L is computed (tla_jobs.align.attention: auto, second, fused, explicit).

    Returns the logits (as ``model(images)`` gives them; both heads for a distilled DeiT) and the
    final labels of every token: (B, prefix + patches, K) for a ViT, (B, H', W', K) for Swin.
    """
    if patch_labels.ndim != 3 or patch_labels.shape[0] != images.shape[0]:
        raise ValueError(f"patch labels must be (B, N_patches, K), got {tuple(patch_labels.shape)}")
    path = resolve_path(path, images.device)
    kdim = patch_labels.shape[-1]
    if path == "second" and label_channels(kdim, images.device) > kdim:
        # Pad once here (zero channels stay zero) rather than in every block's attention call.
        logits, labels = propagate_labels(
            model, images, F.pad(patch_labels, (0, label_channels(kdim, images.device) - kdim)), path
        )
        return logits, labels[..., :kdim]
    if isinstance(model, VisionTransformer):
        _check_vit(model)
        feats, labels = _vit_tokens(model, images, _vit_initial(model, patch_labels), path)
        if isinstance(model, VisionTransformerDistilled):
            logits = (model.head(model.head_drop(feats[:, 0])), model.head_dist(model.head_drop(feats[:, 1])))
        else:
            logits = model.forward_head(feats)
        return logits, labels
    if isinstance(model, SwinTransformer):
        _check_swin(model)
        feats, labels = _swin_tokens(model, images, patch_labels, path)
        return model.forward_head(feats), labels
    raise _unsupported(f"a model of type {type(model).__name__}")


def aligned_forward(
    model: nn.Module, images: torch.Tensor, patch_weights: torch.Tensor, path: str = "auto"
) -> tuple[torch.Tensor | tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Logits and, per sample, the aligned weight of its own label.

    ``patch_weights`` (B, N_patches) in raster order, as :func:`token_cutmix` returns them (any
    values in [0, 1]: a mixup batch is uniform λ). The target weight is the cls token's (shape
    (B,)); for a distilled DeiT the cls and distillation tokens' (B, 2) with the logits of both
    heads as a tuple; for a Swin (which average-pools) the mean over the final tokens (B,); likewise
    for a ViT with ``global_pool='avg'``. The weights carry no gradient.
    """
    if patch_weights.ndim != 2:
        raise ValueError(f"patch_weights must be (B, N_patches), got {tuple(patch_weights.shape)}")
    logits, labels = propagate_labels(model, images, patch_weights.unsqueeze(-1), path=path)
    w = labels[..., 0]
    if isinstance(model, VisionTransformerDistilled):
        target = w[:, :2]
    elif isinstance(model, VisionTransformer):
        target = w[:, model.num_prefix_tokens :].mean(1) if model.global_pool == "avg" else w[:, 0]
    else:
        target = w.flatten(1).mean(1)
    return logits, target.clamp(0.0, 1.0).detach()


class AlignedModel(nn.Module):
    """Wraps a timm model so that DistributedDataParallel sees one forward.

    ``forward(images)`` is the plain model; ``forward(images, patch_weights)`` is
    :func:`aligned_forward`. DDP must run the forward that builds the graph, so the label-carrying
    walk has to live inside a module that DDP wraps.
    """

    def __init__(self, model: nn.Module, path: str = "auto"):
        super().__init__()
        self.model = model
        self.path = path

    def forward(self, images: torch.Tensor, patch_weights: torch.Tensor | None = None):
        if patch_weights is None:
            return self.model(images)
        return aligned_forward(self.model, images, patch_weights, path=self.path)


def check_supported(model: nn.Module) -> None:
    """Raise UnsupportedModelError early (before any data is touched) for a model TL-Align can't run."""
    if isinstance(model, VisionTransformer):
        _check_vit(model)
    elif isinstance(model, SwinTransformer):
        _check_swin(model)
    else:
        raise _unsupported(f"a model of type {type(model).__name__}")
