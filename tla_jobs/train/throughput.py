"""Throughput a user can read before a long run: images/s, achieved TFLOP/s and MFU per device.

Model FLOPs are counted once, at start, with torch's own FLOP counter on a meta-device copy of the
model (no memory, no compute): one forward and backward of the plain model on one image, the
usual convention for MFU (TL-Align's label call and the optimizer are not counted).
"""

from __future__ import annotations

import copy
import logging

import torch

log = logging.getLogger("tla.train")

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; the first name found in
# torch.cuda.get_device_name() wins, so the more specific names come first.
PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("A40", 150.0),
    ("V100", 125.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)


def train_flops_per_image(model: torch.nn.Module, img_size: int) -> float | None:
    """FLOPs of one training image (forward + backward) of ``model``, or None if uncountable."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        meta = copy.deepcopy(model).to("meta")
        meta.train()
        x = torch.empty(1, 3, img_size, img_size, device="meta")
        with FlopCounterMode(display=False) as counter:
            out = meta(x)
            (out[0] if isinstance(out, tuple) else out).sum().backward()
        return float(counter.get_total_flops()) or None
    except Exception as exc:  # a counter gap must never stop training; throughput is a nicety
        log.warning("model FLOPs not counted (%s): no TFLOP/s or MFU in the metrics", exc.__class__.__name__)
        return None


def peak_tflops(device: torch.device, amp: str, override: float | None = None) -> float | None:
    """The device's peak for the precision in use: --peak-tflops, or the table for bf16/fp16 GPUs."""
    if override:
        return override
    if device.type != "cuda" or amp not in ("bf16", "fp16"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS if key in name), None)


def rates(images_per_s: float, world_size: int, flops_per_image: float | None, peak: float | None) -> dict:
    """Per-device figures for metrics.jsonl and the heartbeat."""
    per_device = images_per_s / max(world_size, 1)
    out = {"images_per_s": images_per_s, "images_per_s_per_device": per_device}
    if flops_per_image:
        tflops = per_device * flops_per_image / 1e12
        out["tflops_per_device"] = tflops
        if peak:
            out["mfu"] = tflops / peak
    return out
