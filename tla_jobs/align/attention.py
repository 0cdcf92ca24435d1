"""Attention that also propagates token labels: out = softmax(qkᵀ·s + bias)·v and L' = Ā·L.

Ā is the softmax attention averaged over heads, and Ā·L = mean_h(A_h·L), so Ā·L never needs the
N×N matrix: any ``F.scaled_dot_product_attention`` call whose values are the labels gives it.
Three ways to make that call, chosen per device by :func:`resolve_path`:

- ``second`` (GPU default): the model's own SDPA call is left untouched, and a second, no-grad
  SDPA call with the same q and k and the labels as (narrow) values computes A·L. On an H100 the
  labels-as-extra-channels trick below costs +56% per attention call, because head dim 72 is not
  one of the kernels' tile sizes and the padded copies of q, k, v are paid forward and backward;
  the second call costs +12% of one call (a forward only, no autograd state).
- ``fused`` (CPU default): the labels ride through the very same SDPA call as extra value
  channels; q and k get the same number of zero channels so their dot products, and the softmax,
  are unchanged. On the CPU a second call would recompute qkᵀ, which is what costs there.
- ``explicit``: the softmax matrix is built, as the reference implementation does; kept as the
  reference for the tests and for propagating full K-class label distributions cheaply on a CPU.

Labels are always returned (and accumulated by the caller) in at least float32, also when autocast
runs q, k, v in bfloat16; the kernels themselves accumulate A·L in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATHS = ("auto", "second", "fused", "explicit")


def resolve_path(path: str, device: torch.device | str) -> str:
    """``auto`` → ``second`` on CUDA, ``fused`` elsewhere (measured: docs/benchmarks.md)."""
    if path not in PATHS:
        raise ValueError(f"unknown label path {path!r}; one of {', '.join(PATHS)}")
    if path != "auto":
        return path
    return "second" if torch.device(device).type == "cuda" else "fused"


def label_channels(k: int, device: torch.device) -> int:
    """Channels to carry K labels in: the GPU kernels want head dims that are multiples of 8 (the
    walkers pad once, before the first block, so no block pads again); on the CPU every extra
    channel is paid for."""
    return -(-k // 8) * 8 if device.type == "cuda" else k


def _work_dtype(labels: torch.Tensor, x: torch.Tensor) -> torch.dtype:
    # float32 at least (autocast may run attention in bfloat16); float64 when the model runs in it.
    return torch.promote_types(torch.promote_types(labels.dtype, x.dtype), torch.float32)


def _label_values(labels: torch.Tensor, b: int, h: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, K) labels as (B, H, N, K') values for an SDPA call, K' padded for the GPU kernels."""
    kdim = labels.shape[-1]
    pad = label_channels(kdim, labels.device)
    lab = labels.to(dtype)
    if pad > kdim:
        lab = F.pad(lab, (0, pad - kdim))
    return lab.unsqueeze(1).expand(b, h, n, pad)


def _second_call(q, k, labels, scale, attn_mask) -> torch.Tensor:
    """Ā·L from a no-grad SDPA call with the labels as values (dropout never applies to labels).
    Few operations on purpose: on small models the host's launch time, not the GPU, sets the pace."""
    b, h, n, _ = q.shape
    kdim = labels.shape[-1]
    with torch.no_grad():
        out = F.scaled_dot_product_attention(
            q.detach(), k.detach(), _label_values(labels, b, h, n, q.dtype), attn_mask=attn_mask, scale=scale
        )
        if out.shape[-1] > kdim:
            out = out[..., :kdim]
        return out.mean(dim=1, dtype=_work_dtype(labels, q))


def _with_label_channels(qkv, labels: torch.Tensor):
    """q, k, v for the fused path: ``labels`` appended to v as extra channels, as many zero
    channels appended to q and k (their dot products, and so the softmax, stay the same). A packed
    (B, N, 3, H, D) projection gets them in one concatenation instead of three separate pads: on
    the CPU those copies, not the extra channel, are most of the cost."""
    kdim = labels.shape[-1]
    if isinstance(qkv, torch.Tensor):
        b, n, _, h, _ = qkv.shape
        pad = label_channels(kdim, qkv.device)
        extra = qkv.new_zeros(b, n, 3, h, pad)
        extra[:, :, 2, :, :kdim] = labels.to(qkv.dtype).unsqueeze(2)
        return torch.cat([qkv, extra], dim=-1).permute(2, 0, 3, 1, 4).unbind(0)
    q, k, v = qkv
    b, h, n, _ = v.shape
    pad = label_channels(kdim, v.device)
    return F.pad(q, (0, pad)), F.pad(k, (0, pad)), torch.cat([v, _label_values(labels, b, h, n, v.dtype)], dim=-1)


def attend(
    qkv: torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    labels: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    path: str = "second",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the attention output (B, H, N, D) and the head-averaged Ā·labels (B, N, K).

    ``qkv`` is either the (B, N, 3, H, D) output of a qkv projection (no q/k norm in between), or
    q, k, v as a tuple of (B, H, N, D) tensors. ``labels`` is (B, N, K) and is treated as a
    constant: no gradient flows into or out of it. ``attn_mask`` is an additive float mask (or
    boolean keep-mask) broadcastable to (B, H, N, N), exactly what the timm module would pass to
    SDPA (relative-position bias, shifted-window mask).
    """
    labels = labels.detach()
    packed = isinstance(qkv, torch.Tensor)
    path = resolve_path(path, qkv.device if packed else qkv[2].device)
    if path == "fused":
        d = qkv.shape[-1] if packed else qkv[2].shape[-1]
        q, k, v = _with_label_channels(qkv, labels)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
        if dropout_p > 0.0:  # labels follow the attention before dropout, as in the reference
            return out[..., :d], _second_call(q, k, labels, scale, attn_mask)
        return out[..., :d], out[..., d : d + labels.shape[-1]].detach().to(_work_dtype(labels, v)).mean(dim=1)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0) if packed else qkv
    if path == "explicit":
        attn = (q * scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn = attn.masked_fill(~attn_mask, float("-inf"))
            else:
                attn = attn + attn_mask
        attn = attn.softmax(dim=-1)
        work = _work_dtype(labels, v)
        mixed = attn.detach().mean(dim=1).to(work) @ labels.to(work)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v, mixed
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    return out, _second_call(q, k, labels, scale, attn_mask)
