"""One optimisation step, written so that the host never waits for the device.

Mixing (host-side random boxes), the forward with TL-Align's labels, the soft-target loss,
backward, clipping and the optimizer step are all queued without reading a device value. The loss
is added to running sums on the device; the loop reads them (and whether any loss was not finite)
only every few steps, at the same moment it checks stop signals: one host-device synchronisation
per check, not three per step.
"""

from __future__ import annotations

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.utils import dispatch_clip_grad

from tla_jobs.align import mixed_targets
from tla_jobs.train.mixing import BatchMixer


class TrainStep:
    def __init__(self, net, optimizer, mixer: BatchMixer, autocast, scaler=None, clip_grad: float | None = None,
                 smoothing: float = 0.1, ema=None, model=None, device: torch.device | None = None):
        self.net, self.optimizer, self.mixer, self.autocast = net, optimizer, mixer, autocast
        self.scaler, self.clip_grad, self.smoothing, self.ema, self.model = scaler, clip_grad, smoothing, ema, model
        self.criterion = SoftTargetCrossEntropy()
        # running sums since the last read: loss, steps, non-finite losses, |w_cls - λ|, aligned steps
        self.sums = torch.zeros(5, dtype=torch.float64, device=device)
        self._shift = torch.zeros(2, dtype=torch.float64, device=device)

    def loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch = self.mixer(images, targets)
        with self.autocast():
            if batch.patch_weights is not None:
                logits, w = self.net(batch.images, batch.patch_weights)
                soft = mixed_targets(targets, batch.partner, w, self.mixer.k, self.smoothing)
                # How far alignment moved the cls target from the area label λ (docs/results.md).
                shift = (w if w.ndim == 1 else w[:, 0]).double().sub(batch.patch_weights.double().mean(1))
                self._shift = torch.stack([shift.abs().mean(), torch.ones_like(shift[0])])
            else:
                logits = self.net(batch.images)
                soft = batch.targets
            if isinstance(logits, tuple):  # distilled DeiT: both heads, each on its own target
                heads = (soft[:, 0], soft[:, 1]) if soft.ndim == 3 else (soft, soft)
                return (self.criterion(logits[0], heads[0]) + self.criterion(logits[1], heads[1])) / 2
            return self.criterion(logits, soft)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, step: int) -> None:
        loss = self.loss(images, targets)
        self.optimizer.zero_grad(set_to_none=True)
        params = self.net.parameters()
        if self.scaler is not None:  # fp16: timm's NativeScaler does backward, unscale, clip, step
            self.scaler(loss, self.optimizer, clip_grad=self.clip_grad, parameters=params)
        else:
            loss.backward()
            if self.clip_grad:
                dispatch_clip_grad(params, self.clip_grad)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model, step=step)
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
