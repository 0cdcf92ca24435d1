"""DeiT's train augmentation as batched tensor ops on the training device (CUDA or CPU alike).

Loader workers send each image's crop box (cut, not resized: tla_jobs.data.crops) and its parameter
row (tla_jobs.data.params); here the crops are resized to the model's size (bicubic with
antialiasing), flipped, and put through RandAugment's ops, each sample with its own op and level,
reproducing the PIL ops timm calls:

- the images are float tensors that hold whole numbers in [0, 255], rounded or truncated after every
  op as PIL's 8-bit images are, so thresholds (solarize), bit masks (posterize) and histograms
  (equalize, autocontrast) see the values PIL would;
- point ops (invert, posterize, solarize, solarize-add, autocontrast, equalize, brightness, contrast)
  become a 256-entry lookup table per sample and channel, built the way PIL.ImageOps builds it;
- the blends (ImageEnhance: colour, contrast, brightness, sharpness) truncate as Pillow's
  ImagingBlend does, after its float32 arithmetic;
- the geometric ops (rotate, shear, translate) sample through PIL's affine matrix with PIL's bicubic
  (written here: torch's grid_sample has a different cubic, a = -0.75 against Pillow's a = -1 in
  Geometry.c, and no "fill outside the source" rule): one batched gather per layer for every sample
  whose op is geometric.

Samples are grouped by op within a layer, so a batch costs at most one kernel group per op and layer,
not one per sample. The parameter rows stay on the host (they choose the groups); only index
tensors and a few numbers per sample travel, without waiting for the device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from tla_jobs.data.params import HEAD, TrainParams

GEOMETRIC = {"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"}


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A small host tensor onto the device without waiting: a copy from pageable memory to a GPU can
    wait for the device's queue (the host would stall behind the previous step), one from pinned
    memory is queued like a kernel."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def affine_matrix(name: str, arg: float, width: int, height: int) -> tuple[float, ...]:
    """The (a, b, c, d, e, f) PIL's Image.transform gets from timm's op (and Image.rotate's own
    arithmetic for Rotate): source = (a x + b y + c, d x + e y + f) at output pixel centres."""
    if name == "ShearX":
        return (1.0, arg, 0.0, 0.0, 1.0, 0.0)
    if name == "ShearY":
        return (1.0, 0.0, 0.0, arg, 1.0, 0.0)
    if name == "TranslateXRel":
        return (1.0, 0.0, arg * width, 0.0, 1.0, 0.0)
    if name == "TranslateYRel":
        return (1.0, 0.0, 0.0, 0.0, 1.0, arg * height)
    # Pillow's Image.rotate (no centre, no translate, no expand), angle in degrees counter-clockwise
    angle = -math.radians(arg % 360.0)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2.0, height / 2.0
    return (a, b, a * -cx + b * -cy + cx, d, e, d * -cx + e * -cy + cy)


def _apply_lut(x: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """x (n, 3, H, W) of whole numbers 0..255, lut (n, 3, 256) → lut[x] per sample and channel."""
    n, c, h, w = x.shape
    return lut.to(x.dtype).gather(2, x.long().view(n, c, h * w)).view(n, c, h, w)


def _histogram(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device)
    return hist.scatter_add_(2, x.long().view(n, c, h * w), torch.ones(1, dtype=torch.long, device=x.device)
                             .expand(n, c, h * w))


def _grey(x: torch.Tensor) -> torch.Tensor:
    """PIL's RGB → L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16, exactly, as (n, 1, H, W)."""
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).to(x.dtype)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ImagingBlend(degenerate, x, factor): float32 arithmetic, clipped, truncated to 8 bits."""
    f = factor.to(device=x.device, dtype=torch.float32).view(-1, 1, 1, 1)
    out = degenerate.float() + f * (x.float() - degenerate.float())
    return out.clamp_(0, 255).floor_().to(x.dtype)


def _levels(n: int, device) -> torch.Tensor:
    return torch.arange(256, device=device, dtype=torch.float64).expand(n, 3, 256)


def invert(x, _arg):
    return 255 - x


def posterize(x, bits):
    # tla's posterize (tla_jobs.data.loaders): 8+ bits unchanged, 0 bits black (Pillow >= 12.1 refuses 0)
    bits = bits.to(torch.long)
    q = torch.pow(2.0, (8 - bits).clamp(0, 8).double()).to(x.device).view(-1, 1, 1)
    lut = torch.div(_levels(len(x), x.device), q, rounding_mode="floor") * q
    lut = torch.where((bits <= 0).to(x.device).view(-1, 1, 1), torch.zeros_like(lut), lut)
    return _apply_lut(x, lut)


def solarize(x, thresh):
    lv = _levels(len(x), x.device)
    return _apply_lut(x, torch.where(lv < thresh.to(x.device).view(-1, 1, 1), lv, 255 - lv))


def solarize_add(x, add):
    lv = _levels(len(x), x.device)
    return _apply_lut(x, torch.where(lv < 128, (lv + add.to(x.device).view(-1, 1, 1)).clamp(max=255), lv))


def auto_contrast(x, _arg):
    # ImageOps.autocontrast(cutoff=0): per channel lo/hi = the darkest/brightest value present;
    # lut = int(i * 255 / (hi - lo) - lo * 255 / (hi - lo)) clipped, in Python floats (float64)
    flat = x.view(len(x), 3, -1)
    lo, hi = flat.amin(2).double().unsqueeze(2), flat.amax(2).double().unsqueeze(2)
    scale = 255.0 / (hi - lo).clamp(min=1)
    lv = _levels(len(x), x.device)
    lut = torch.trunc(lv * scale + (-lo * scale)).clamp(0, 255)
    return _apply_lut(x, torch.where(hi > lo, lut, lv))


def equalize(x, _arg):
    # ImageOps.equalize: step = (pixels - count of the brightest present value) // 255,
    # lut[i] = (step // 2 + pixels below i) // step; identity with one value or step 0
    hist = _histogram(x)
    present = hist > 0
    last = 255 - present.flip(2).long().argmax(2, keepdim=True)
    step = (hist.sum(2, keepdim=True) - hist.gather(2, last)) // 255
    below = hist.cumsum(2) - hist
    lut = (step // 2 + below) // step.clamp(min=1)
    keep = (present.sum(2, keepdim=True) <= 1) | (step == 0)
    lut = torch.where(keep, torch.arange(256, device=x.device).expand_as(lut), lut.clamp(max=255))
    return _apply_lut(x, lut)


def brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


def contrast(x, factor):
    # ImageEnhance.Contrast: the grey image's mean, int(mean + 0.5), as a flat degenerate image
    mean = torch.floor(_grey(x).double().mean(dim=(1, 2, 3), keepdim=True) + 0.5).to(x.dtype)
    return _blend(mean.expand_as(x), x, factor)


def color(x, factor):
    return _blend(_grey(x).expand_as(x), x, factor)


def sharpness(x, factor):
    # ImageEnhance.Sharpness: blend with ImageFilter.SMOOTH (3x3, border pixels kept), rounded to 8 bits;
    # the kernel [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13 made on the device (no copy from the host)
    k = torch.ones(3, 1, 3, 3, device=x.device)
    k[:, :, 1, 1] = 5.0
    k /= 13.0
    smooth = F.conv2d(x.float(), k, groups=3).add_(0.5).floor_().clamp_(0, 255).to(x.dtype)
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, factor)


POINT_OPS = {
    "AutoContrast": auto_contrast, "Equalize": equalize, "Invert": invert,
    "Posterize": posterize, "PosterizeIncreasing": posterize, "PosterizeOriginal": posterize,
    "Solarize": solarize, "SolarizeIncreasing": solarize, "SolarizeAdd": solarize_add,
    "Color": color, "ColorIncreasing": color, "Contrast": contrast, "ContrastIncreasing": contrast,
    "Brightness": brightness, "BrightnessIncreasing": brightness,
    "Sharpness": sharpness, "SharpnessIncreasing": sharpness,
}


def _cubic(v1, v2, v3, v4, d):
    # Pillow's Geometry.c BICUBIC, in its Horner order (a weighted sum rounds differently, and a flat
    # region's exact integer would come out as x.99999 and be truncated a level lower)
    p2, p3, p4 = v3 - v1, 2 * (v1 - v2) + v3 - v4, v2 - v1 + v4 - v3
    return v2 + d * (p2 + d * (p3 + d * p4))


def affine(x: torch.Tensor, matrices: torch.Tensor, fill: tuple[int, int, int]) -> torch.Tensor:
    """Pillow's Image.transform(size, AFFINE, matrix, BICUBIC, fillcolor=fill) for each sample: the
    source of output pixel (x, y) is matrix · (x + 0.5, y + 0.5); a source outside the image gives
    ``fill``; inside, bicubic over 4x4 neighbours clipped to the border, clipped and truncated."""
    n, c, h, w = x.shape
    m = matrices.to(device=x.device, dtype=torch.float64).view(n, 6, 1, 1)
    ys = torch.arange(h, device=x.device, dtype=torch.float64).view(1, h, 1) + 0.5
    xs = torch.arange(w, device=x.device, dtype=torch.float64).view(1, 1, w) + 0.5
    sx = m[:, 0] * xs + m[:, 1] * ys + m[:, 2]
    sy = m[:, 3] * xs + m[:, 4] * ys + m[:, 5]
    inside = (sx >= 0) & (sx < w) & (sy >= 0) & (sy < h)
    sx, sy = sx - 0.5, sy - 0.5
    x0, y0 = sx.floor(), sy.floor()
    dx, dy = (sx - x0).unsqueeze(1), (sy - y0).unsqueeze(1)
    x0, y0 = x0.long() - 1, y0.long() - 1
    flat = x.double().view(n, c, h * w)
    cols = [(x0 + i).clamp(0, w - 1) for i in range(4)]

    def tap(j: int, i: int) -> torch.Tensor:
        idx = ((y0 + j).clamp(0, h - 1) * w + cols[i]).view(n, 1, h * w).expand(n, c, h * w)
        return flat.gather(2, idx).view(n, c, h, w)

    rows = [_cubic(tap(j, 0), tap(j, 1), tap(j, 2), tap(j, 3), dx) for j in range(4)]
    out = _cubic(*rows, dy)
    out = out.clamp_(0, 255).floor_()
    fill_t = to_device(torch.tensor(fill, dtype=torch.float64), x.device).view(1, c, 1, 1)
    return torch.where(inside.unsqueeze(1), out, fill_t).to(x.dtype)


PRECISION_BITS = 22  # Pillow's Resample.c for 8-bit images: 32 - 8 - 2
RESIZE_CHUNK = 32  # crops resized together (padded to the chunk's largest)
# Padded pixels of a chunk at most (x3 channels; its gather index is int64): ~64 crops of 512 x 512.
# ImageNet has a few photos of several thousand pixels a side; they are resized in chunks of their own.
RESIZE_BUDGET = 64 * 512 * 512


def _pillow_bicubic(x: torch.Tensor) -> torch.Tensor:
    # Resample.c bicubic_filter, a = -0.5, support 2
    x = x.abs()
    near = (1.5 * x - 2.5) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def _coefficients(sizes: torch.Tensor, out: int, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pillow's precompute_coeffs + normalize_coeffs_8bpc for each input size: (first input index
    (B, out), fixed-point coefficients (B, out, taps) as whole numbers in float64)."""
    scale = sizes.double().unsqueeze(1) / out
    filterscale = scale.clamp(min=1.0)
    support = 2.0 * filterscale
    center = (torch.arange(out, device=sizes.device, dtype=torch.float64) + 0.5) * scale
    xmin = torch.trunc(center - support + 0.5).clamp(min=0)
    count = torch.minimum(torch.trunc(center + support + 0.5), sizes.double().unsqueeze(1)) - xmin
    t = torch.arange(taps, device=sizes.device, dtype=torch.float64)
    w = _pillow_bicubic(((xmin.unsqueeze(2) + t) - center.unsqueeze(2) + 0.5) * (1.0 / filterscale).unsqueeze(2))
    w = torch.where(t < count.unsqueeze(2), w, torch.zeros_like(w))
    total = w.sum(2, keepdim=True)
    k = torch.where(total != 0, w / total, w) * (1 << PRECISION_BITS)
    return xmin.long(), torch.where(k < 0, torch.trunc(k - 0.5), torch.trunc(k + 0.5))


def _resample_last(x: torch.Tensor, first: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """One of Pillow's passes along the last dimension, in its int32 fixed point: sum of taps + 2^21,
    >> 22, clipped to 8 bits (the sums stay below 2^31: 255 x the coefficients' total of ~1.2 x 2^22)."""
    n, c, h, w = x.shape
    out = k.shape[1]
    k = k.to(torch.int32)
    acc = torch.full((n, c, h, out), 1 << (PRECISION_BITS - 1), dtype=torch.int32, device=x.device)
    for t in range(k.shape[2]):
        idx = (first + t).clamp(max=w - 1).view(n, 1, 1, out).expand(n, c, h, out)
        acc += x.gather(3, idx).to(torch.int32) * k[:, :, t].view(n, 1, 1, out)
    return acc.bitwise_right_shift_(PRECISION_BITS).clamp_(0, 255).to(torch.uint8)


def _chunks(shapes: list[tuple[int, int, int]]) -> list[list[int]]:
    """The crops' indices in chunks of similar sizes (sorted by area), each at most RESIZE_CHUNK crops and,
    padded to its largest height and width, at most RESIZE_BUDGET pixels (or one crop)."""
    order = sorted(range(len(shapes)), key=lambda i: (shapes[i][0] * shapes[i][1], i))
    chunks: list[list[int]] = []
    hmax = wmax = 0
    for i in order:
        h, w = max(hmax, shapes[i][0]), max(wmax, shapes[i][1])
        if chunks and len(chunks[-1]) < RESIZE_CHUNK and (len(chunks[-1]) + 1) * h * w <= RESIZE_BUDGET:
            chunks[-1].append(i)
            hmax, wmax = h, w
        else:
            chunks.append([i])
            hmax, wmax = shapes[i][0], shapes[i][1]
    return chunks


def resize_crops(flat: torch.Tensor, shapes: list[tuple[int, int, int]], size: tuple[int, int]) -> torch.Tensor:
    """Crops laid end to end in ``flat`` (each (h, w, 3) uint8) → (B, 3, *size), as Pillow's
    resize(BICUBIC) does it: its coefficients, in its fixed point, horizontal pass then vertical,
    8-bit between the two (written here: torch's antialiased bicubic rounds differently, by up to 7
    levels in float). Pillow 13 runs the vertical pass first for some shapes (not documented; seen
    by comparing with its two passes run one by one): those crops differ from it by the rounding of
    the intermediate image, a level or a few on some pixels. Batched: chunks of crops padded to
    the chunk's largest, and only the taps of each output pixel are read (no dense matrix)."""
    dev = flat.device
    out_h, out_w = size
    result = torch.empty(len(shapes), 3, out_h, out_w, dtype=torch.uint8, device=dev)
    offsets = [0]
    for h, w, c in shapes:
        offsets.append(offsets[-1] + h * w * c)
    for chunk in _chunks(shapes):
        hs = torch.tensor([shapes[i][0] for i in chunk])
        ws = torch.tensor([shapes[i][1] for i in chunk])
        hmax, wmax = int(hs.max()), int(ws.max())
        # the chunk padded to (hmax, wmax) by one gather from the flat buffer (edge pixels repeat; their
        # coefficients are zero)
        meta = to_device(torch.stack([torch.tensor([offsets[i] for i in chunk]), hs, ws, torch.tensor(chunk)]), dev)
        off, hs_d, ws_d = (m.view(-1, 1, 1, 1) for m in meta[:3])
        ys = torch.minimum(torch.arange(hmax, device=dev).view(1, 1, -1, 1), hs_d - 1)
        xs = torch.minimum(torch.arange(wmax, device=dev).view(1, 1, 1, -1), ws_d - 1)
        chans = torch.arange(3, device=dev).view(1, 3, 1, 1)
        x = flat[off + (ys * ws_d + xs) * 3 + chans]
        taps_w = int(math.ceil(2.0 * max(float(ws.max()) / out_w, 1.0))) * 2 + 1
        taps_h = int(math.ceil(2.0 * max(float(hs.max()) / out_h, 1.0))) * 2 + 1
        first, k = _coefficients(meta[2], out_w, taps_w)
        x = _resample_last(x, first, k)  # (n, 3, hmax, out_w)
        first, k = _coefficients(meta[1], out_h, taps_h)
        x = _resample_last(x.transpose(2, 3), first, k).transpose(2, 3)
        result[meta[3]] = x
    return result


class DeviceAugment:
    """Crops + parameter rows → the augmented uint8 batch (B, 3, H, W) on the crops' device."""

    def __init__(self, params: TrainParams):
        self.size, self.op_names, self.fill, self.layers = params.size, params.op_names, params.fill, params.layers

    def __call__(self, flat: torch.Tensor, shapes: torch.Tensor, rows: torch.Tensor,
                 device: torch.device | None = None) -> torch.Tensor:
        """flat: the batch's crops, each (h, w, 3) uint8, end to end; shapes: (B, 3) of (h, w, 3) on the
        host; rows: (B, K) parameter rows on the host."""
        device = device or flat.device
        x = resize_crops(flat.to(device, non_blocking=True), [tuple(s) for s in shapes.tolist()], self.size)
        return self.augment(x, rows)

    def augment(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Flip and RandAugment of a resized uint8 batch (B, 3, H, W) by the parameter rows (host)."""
        rows = rows.cpu()
        x = self._subset(x, rows[:, 4] > 0, lambda sub, _: sub.flip(-1), rows[:, 4])
        work = x.float()  # whole numbers 0..255 through the ops; one conversion back at the end
        for k in range(self.layers):
            ops, args = rows[:, HEAD + 2 * k].long(), rows[:, HEAD + 2 * k + 1]
            geo = torch.zeros(len(rows), dtype=torch.bool)
            for i, name in enumerate(self.op_names):
                mask = ops == i
                if not mask.any():
                    continue
                if name in GEOMETRIC:
                    geo |= mask
                else:
                    work = self._subset(work, mask, POINT_OPS[name], args)
            if geo.any():
                h, w = work.shape[-2:]
                mats = torch.tensor([affine_matrix(self.op_names[int(o)], float(a), w, h)
                                     for o, a in zip(ops[geo], args[geo], strict=True)], dtype=torch.float64)
                work = self._subset(work, geo, lambda sub, m: affine(sub, m, self.fill), None, mats)
        return work.to(torch.uint8)

    @staticmethod
    def _subset(x, mask, op, args, extra=None):
        """op(the samples of ``mask``, their arguments), written back; the mask and the arguments are on
        the host (no device value is read to choose the samples)."""
        idx = mask.nonzero().squeeze(1)
        if len(idx) == 0:
            return x
        sub_args = extra if extra is not None else args[idx]
        moved = to_device(torch.cat([idx.double(), sub_args.reshape(-1).double()]), x.device)
        dev_idx, dev_args = moved[:len(idx)].long(), moved[len(idx):].view(sub_args.shape)
        out = op(x.index_select(0, dev_idx), dev_args)
        return x.index_copy_(0, dev_idx, out.to(x.dtype))  # in place: x is this batch's own tensor
