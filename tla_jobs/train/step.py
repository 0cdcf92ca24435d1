"""One optimisation step, written so that the host never waits for the device.

Mixing (host-side random boxes), the forward with TL-Align's labels, the soft-target loss,
backward, clipping and the optimizer step are all queued without reading a device value. The loss
is added to running sums on the device; the loop reads them (and whether any loss was not finite)
only every few steps, at the same moment it checks stop signals: one host-device synchronisation
per check, not three per step.
"""

from __future__ import annotations

import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3, NativeScaler, dispatch_clip_grad

from tla_jobs.align import mixed_targets
from tla_jobs.train.mixing import BatchMixer


def _no_sync(net: torch.nn.Module):
    """DDP's no_sync (gradients kept local until the last micro-batch), through torch.compile's wrapper."""
    ddp = getattr(net, "_orig_mod", net)
    return ddp.no_sync() if isinstance(ddp, torch.nn.parallel.DistributedDataParallel) else nullcontext()


class PlainBackward:
    """timm's NativeScaler without loss scaling (fp32, bf16): the same call, so the step has one path."""

    def __call__(self, loss, optimizer, clip_grad=None, parameters=None, need_update=True) -> None:
        loss.backward()
        if not need_update:  # a micro-batch before the last of an accumulated step
            return
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
        self.device = device = next(models.model.parameters()).device
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

    def __call__(self, micro: list[tuple[torch.Tensor, torch.Tensor, int]], step: int) -> None:
        """One optimizer step over this rank's micro-batches (images, targets, seed): gradients
        accumulated over them (DDP synchronises only on the last), each drawing its random numbers
        from its own seed, so that the step is the same on any number of ranks (tla_jobs.data.order)."""
        opt, models = self.opt, self.models
        opt.optimizer.zero_grad(set_to_none=True)
        n = len(micro)
        for a, (images, targets, seed) in enumerate(micro):
            self.reseed(seed)
            last = a == n - 1
            with nullcontext() if last else _no_sync(models.net):
                loss = self.loss(images, targets)
                scaled = loss / n if n > 1 else loss
                if last:
                    opt.backward(scaled, opt.optimizer, clip_grad=opt.clip_grad, parameters=models.net.parameters())
                else:
                    opt.backward(scaled, opt.optimizer, need_update=False)
            detached = loss.detach().double()
            self.sums += torch.cat([torch.stack([detached.nan_to_num(0.0, 0.0, 0.0), torch.ones_like(detached),
                                                 (~torch.isfinite(detached)).double()]), self._shift])
            self._shift = self._shift.zero_()
        if models.ema is not None:
            models.ema.update(models.model, step=step)

    def reseed(self, seed: int) -> None:
        """Every generator a micro-batch draws from (mixing boxes, timm's Mixup through numpy, drop-path
        on the device), seeded from the micro-batch's own seed instead of carried from rank to rank."""
        seed %= 2**63
        self.mixer.gen.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)  # not torch.manual_seed: no lazy CUDA seeding queued
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)  # CUDA is initialised by now: seeded at once, cheaply

    def read(self) -> list[float]:
        """[loss sum, steps, non-finite losses, |w - λ| sum, aligned steps] since the last read:
        the one synchronising call of the loop."""
        values = self.sums.tolist()
        self.sums.zero_()
        return values
