"""One optimisation step, written so that the host never waits for the device.

Mixing (host-side random boxes), the forward with TL-Align's labels, the soft-target loss,
backward, clipping and the optimizer step are all queued without reading a device value. The loss
is added to running sums on the device; the loop reads them (and whether any loss was not finite)
only every few steps, at the same moment it checks stop signals: one host-device synchronisation
per check, not three per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad

from tla_jobs.align import mixed_targets
from tla_jobs.train.mixing import BatchMixer


class PlainBackward:
    """timm's NativeScaler without loss scaling (fp32, bf16): the same call, so the step has one path."""

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None) -> None:
        loss.backward()
        if clip_grad is not None:
            dispatch_clip_grad(parameters, clip_grad)
        optimizer.step()

    def state_dict(self) -> None:  # nothing to checkpoint
        return None

    def load_state_dict(self, state) -> None:
        pass


@dataclass
class Models:
    """The model three ways: the timm model (checkpointed, evaluated), what trains (TL-Align's
    AlignedModel around it, in DDP, compiled), and its EMA copy (DeiT's baseline)."""

    model: torch.nn.Module
    net: torch.nn.Module
    ema: ModelEmaV3 | None = None


@dataclass
class Optimization:
    optimizer: torch.optim.Optimizer
    scheduler: object
    backward: NativeScaler | PlainBackward  # backward, unscale, clip, step
    clip_grad: float | None = None


class TrainStep:
    def __init__(self, models: Models, opt: Optimization, mixer: BatchMixer, autocast):
        self.models, self.opt, self.mixer, self.autocast = models, opt, mixer, autocast
        self.criterion = SoftTargetCrossEntropy()
        device = next(models.model.parameters()).device
        # running sums since the last read: loss, steps, non-finite losses, |w_cls - λ|, aligned steps
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self._shift = torch.zeros(2, dtype=torch.float64, device=device)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch, smoothing = self.mixer(images, targets), self.mixer.cfg.smoothing
        with self.autocast():
            if batch.patch_weights is not None:
                logits, w = self.models.net(batch.images, batch.patch_weights)
                soft = mixed_targets(targets, batch.partner, w, self.mixer.k, smoothing)
                # How far alignment moved the cls target from the area label λ (docs/results.md).
                shift = (w if w.ndim == 1 else w[:, 0]).double().sub(batch.patch_weights.double().mean(1))
                self._shift = torch.stack([shift.abs().mean(), torch.ones_like(shift[0])])
            else:
                logits = self.models.net(batch.images)
                soft = batch.targets
            if isinstance(logits, tuple):  # distilled DeiT: both heads, each on its own target
                heads = (soft[:, 0], soft[:, 1]) if soft.ndim == 3 else (soft, soft)
                return (self.criterion(logits[0], heads[0]) + self.criterion(logits[1], heads[1])) / 2
            return self.criterion(logits, soft)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        loss = self.loss(images, targets)
        opt, models = self.opt, self.models
        opt.optimizer.zero_grad(set_to_none=True)
        opt.backward(loss, opt.optimizer, clip_grad=opt.clip_grad, parameters=models.net.parameters())
        if models.ema is not None:
            models.ema.update(models.model, step=step)
        detached = loss.detach().double()
        self.sums += torch.cat([torch.stack([detached.nan_to_num(0.0, 0.0, 0.0), torch.ones_like(detached),
                                             (~torch.isfinite(detached)).double()]), self._shift])
        self._shift = self._shift.zero_()

    def read(self) -> list[float]:
        """[loss sum, steps, non-finite losses, |w - λ| sum, aligned steps] since the last read:
        the one synchronising call of the loop."""
        values = self.sums.tolist()
        self.sums.zero_()
        return values
