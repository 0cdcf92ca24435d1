"""Attention that also propagates token labels: out = softmax(qkᵀ·s + bias)·v and L' = Ā·L.

Ā is the softmax attention averaged over heads. Because Ā·L = mean_h(A_h·L), the labels can ride
through the very same ``F.scaled_dot_product_attention`` call as extra value channels (the fused
path): q and k get the same number of zero channels so their dot products, and the softmax, are
unchanged, and the N×N attention matrix is never materialised. The explicit path builds the
softmax matrix, as the reference implementation does, and is kept for checking and for
propagating full K-class label distributions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _label_channels(k: int, device: torch.device) -> int:
    # The GPU flash and memory-efficient kernels want q, k and v to share a head dim that is a
    # multiple of 8; on the CPU any width works and every extra channel is paid for.
    return -(-k // 8) * 8 if device.type == "cuda" else k


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    fused: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the attention output (B, H, N, D) and the head-averaged Ā·labels (B, N, K).

    ``labels`` is (B, N, K) and is treated as a constant: no gradient flows into or out of it.
    ``attn_mask`` is an additive float mask (or boolean keep-mask) broadcastable to (B, H, N, N),
    exactly what the timm module would pass to SDPA (relative-position bias, shifted-window mask).
    """
    labels = labels.detach()
    kdim = labels.shape[-1]
    # Labels are accumulated in at least float32 (autocast may run q, k, v in bfloat16), and in
    # float64 when the model runs in float64.
    work = torch.promote_types(torch.promote_types(labels.dtype, v.dtype), torch.float32)
    if not fused:
        attn = (q * scale) @ k.transpose(-2, -1)
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                attn = attn.masked_fill(~attn_mask, float("-inf"))
            else:
                attn = attn + attn_mask
        attn = attn.softmax(dim=-1)
        mean_attn = attn.detach().mean(dim=1)
        mixed = mean_attn.to(work) @ labels.to(work)
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        return attn @ v, mixed

    b, h, n, d = v.shape
    pad = _label_channels(kdim, v.device)
    lab = labels.to(v.dtype).unsqueeze(1).expand(b, h, n, kdim)
    if pad > kdim:
        lab = F.pad(lab, (0, pad - kdim))
    out = F.scaled_dot_product_attention(
        F.pad(q, (0, pad)),
        F.pad(k, (0, pad)),
        torch.cat([v, lab], dim=-1),
        attn_mask=attn_mask,
        dropout_p=dropout_p,
        scale=scale,
    )
    mixed = out[..., d : d + kdim].detach()
    if dropout_p > 0.0:
        # Labels follow the attention before dropout (as in the reference): one more no-grad call.
        with torch.no_grad():
            mixed = F.scaled_dot_product_attention(
                F.pad(q, (0, pad)), F.pad(k, (0, pad)), torch.cat([torch.zeros_like(v), lab], dim=-1),
                attn_mask=attn_mask, scale=scale,
            )[..., d : d + kdim]
    return out[..., :d], mixed.to(work).mean(dim=1)


def attend_packed(
    qkv: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: float,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused path from the (B, N, 3, H, D) output of a qkv projection (no q/k norm in between).

    One concatenation appends the label channels to q, k (zeros) and v (labels) at once, instead of
    three separate pads: on the CPU those copies, not the extra channel, are most of the cost.
    """
    labels = labels.detach()
    b, n, _, h, d = qkv.shape
    kdim = labels.shape[-1]
    pad = _label_channels(kdim, qkv.device)
    extra = qkv.new_zeros(b, n, 3, h, pad)
    extra[:, :, 2, :, :kdim] = labels.to(qkv.dtype).unsqueeze(2)
    q, k, v = torch.cat([qkv, extra], dim=-1).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    work = torch.promote_types(torch.promote_types(labels.dtype, qkv.dtype), torch.float32)
    if dropout_p > 0.0:
        with torch.no_grad():  # labels follow the attention before dropout, as in the reference
            mixed = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)[..., d : d + kdim]
    else:
        mixed = out[..., d : d + kdim].detach()
    return out[..., :d], mixed.to(work).mean(dim=1)
