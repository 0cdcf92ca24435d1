"""The training loop: DeiT's recipe through timm, TL-Align's labels, DDP, exact resume.

Order of a run: checks that need no process group (model name, data) → process group → model,
optimizer, scheduler, EMA, scaler → resume from the newest good checkpoint → epochs of steps,
each step followed by a (cross-rank) look at stop signals and the mid-epoch checkpoint clock →
evaluation, metrics, checkpoints → summary.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3
from torch.nn.parallel import DistributedDataParallel

from tla_jobs import __version__, rundir
from tla_jobs.align import AlignedModel, check_supported, mixed_targets
from tla_jobs.data.folders import check_image_folder
from tla_jobs.data.loaders import eval_loader, train_loader
from tla_jobs.data.prepare import prepare
from tla_jobs.errors import CheckpointError, DataError, TlaError
from tla_jobs.fsutil import atomic_write_json, atomic_write_text
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train import distributed as tdist
from tla_jobs.train.config import TrainConfig
from tla_jobs.train.mixing import BatchMixer
from tla_jobs.train.models import build_model, check_model_name, model_input_size, model_patch_size
from tla_jobs.train.signals import StopSignals

log = logging.getLogger("tla.train")
HEARTBEAT_EVERY_S = 2.0


@dataclass
class Progress:
    """Where training stands; all of it goes into every checkpoint."""

    epoch: int = 0
    step_in_epoch: int = 0  # batches of this epoch already trained (the sampler resumes after them)
    global_step: int = 0
    loss_sum: float = 0.0  # this epoch's running train loss, so a resumed epoch reports the same mean
    loss_count: int = 0
    best_acc1: float = -1.0
    history: list = field(default_factory=list)  # metrics.jsonl rows, rewritten from here on resume

    _KEYS = {"train_loss_sum": "loss_sum", "train_loss_count": "loss_count", "metrics": "history"}

    def as_payload(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {next((k for k, v in self._KEYS.items() if v == name), name): val for name, val in d.items()}

    @classmethod
    def from_payload(cls, payload: dict) -> Progress:
        names = {f.name for f in fields(cls)}
        kw = {cls._KEYS.get(k, k): v for k, v in payload.items() if cls._KEYS.get(k, k) in names}
        kw["history"] = list(kw.get("history", []))
        return cls(**kw)


class Interrupted(Exception):
    """Raised after the stop-signal checkpoint is on disk."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


# ------------------------------------------------------------------------------------------ helpers


def _setup_logging(out: Path | None, rank: int) -> None:
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("tla")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    if out is not None:
        fh = logging.FileHandler(out / rundir.LOG_PATTERN.format(rank=rank))
        fh.setFormatter(fmt)
        root.addHandler(fh)
    root.propagate = False


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_data(cfg: TrainConfig) -> Path:
    if not cfg.data_path:
        raise DataError("--data-path is required")
    path = Path(cfg.data_path).expanduser()
    if cfg.dataset != "imagefolder" and not (path / ".tla-dataset").is_file():
        # Bundled data are prepared on first use; prepare() renames a finished folder into place,
        # so ranks racing here are harmless.
        prepare(cfg.dataset, path)
    return path


def _amp(cfg: TrainConfig, device: torch.device):
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return nullcontext, None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler(device.type) if mode == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler


def _accuracy_counts(logits: torch.Tensor, targets: torch.Tensor, topk=(1, 5)) -> list[int]:
    k = min(max(topk), logits.shape[1])
    pred = logits.topk(k, dim=1).indices
    hit = pred.eq(targets.view(-1, 1))
    return [int(hit[:, : min(t, k)].any(dim=1).sum()) for t in topk]


# ---------------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.stop = StopSignals()
        self.info: tdist.DistInfo | None = None

    # ---- set-up ----------------------------------------------------------------------------------
    def _preflight(self):
        cfg = self.cfg
        check_model_name(cfg.model)
        data = resolve_data(cfg)
        train_split, _ = check_image_folder(data)
        num_classes = cfg.num_classes or len(train_split.classes)
        if num_classes < len(train_split.classes):
            raise DataError(f"--num-classes {num_classes} is fewer than the {len(train_split.classes)} class folders")
        _seed_everything(cfg.seed)  # the initial weights are a function of the seed
        model = build_model(cfg.model, num_classes, cfg.drop_path, cfg.img_size)
        if cfg.tl_align:
            check_supported(model)
        return data, train_split, num_classes, model

    def _resume_payload(self, out: Path | None):
        cfg = self.cfg
        if cfg.resume:
            payload, digest = ckpt.load(Path(cfg.resume).expanduser())
            return payload, digest, Path(cfg.resume).expanduser()
        if out is not None and out.is_dir():
            return ckpt.load_latest(out)
        return None

    def _check_compatible(self, payload: dict, path: Path, num_classes: int) -> None:
        cfg = self.cfg
        if payload.get("model_name") != cfg.model or payload.get("num_classes") != num_classes:
            raise CheckpointError(
                f"checkpoint {path} is a {payload.get('model_name')} with {payload.get('num_classes')} classes; "
                f"this run is a {cfg.model} with {num_classes} classes"
            )

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        data, train_split, num_classes, model = self._preflight()
        out = Path(cfg.output_dir).expanduser() if cfg.output_dir else None
        if cfg.eval_only:
            if not cfg.resume:
                raise CheckpointError("--eval-only needs --resume CKPT")
            if out is None:
                out = Path(cfg.resume).expanduser().parent
        elif out is None:
            raise TlaError("--output-dir is required")
        self.info = info = tdist.init()
        try:
            if info.is_main:
                out.mkdir(parents=True, exist_ok=True)
            tdist.barrier(info)
            _setup_logging(out, info.rank)
            if cfg.eval_only:
                return self._eval_only(model, data, num_classes, out)
            return self._train(model, data, num_classes, out)
        finally:
            self.stop.restore()
            tdist.shutdown(info)

    def _eval_only(self, model, data: Path, num_classes: int, out: Path) -> dict:
        payload, digest, path = self._resume_payload(None)
        self._check_compatible(payload, path, num_classes)
        model.load_state_dict(payload["model"])
        model.to(self.info.device)
        img_size = model_input_size(model)
        res = self._evaluate(model, data, img_size)
        result = {
            **res,
            "checkpoint": str(path.resolve()),
            "checkpoint_sha256": digest,
            "epoch": payload["epoch"],
            "model": self.cfg.model,
            "time": time.time(),
            "version": __version__,
        }
        if self.info.is_main:
            atomic_write_json(out / rundir.EVAL, result)
        log.info(
            "eval of %s: top-1 %.2f top-5 %.2f loss %.4f on %d images",
            path,
            res["acc1"],
            res["acc5"],
            res["loss"],
            res["images"],
        )
        return result

    def _evaluate(self, model, data: Path, img_size: int, abortable: bool = False) -> dict | None:
        cfg, info = self.cfg, self.info
        _, loader = eval_loader(cfg, data, img_size, info.rank, info.world_size)
        autocast, _ = _amp(cfg, info.device)
        crit = torch.nn.CrossEntropyLoss(reduction="sum")
        sums = torch.zeros(4, dtype=torch.float64, device=info.device)  # loss, top1, top5, n
        was_training = model.training
        model.eval()
        with torch.no_grad():
            for images, targets in loader:
                if abortable and tdist.any_rank(self.stop.received is not None, info):
                    model.train(was_training)
                    return None
                images, targets = images.to(info.device, non_blocking=True), targets.to(info.device)
                with autocast():
                    logits = model(images)
                c1, c5 = _accuracy_counts(logits.float(), targets)
                sums += torch.tensor(
                    [crit(logits.float(), targets).item(), c1, c5, len(targets)],
                    dtype=torch.float64,
                    device=info.device,
                )
        model.train(was_training)
        if cfg.dist_eval:
            tdist.all_reduce_sum(sums, info)
        loss, c1, c5, n = sums.tolist()
        return {"loss": loss / n, "acc1": 100.0 * c1 / n, "acc5": 100.0 * c5 / n, "images": int(n)}

    def _train(self, model, data: Path, num_classes: int, out: Path) -> dict:
        cfg, info = self.cfg, self.info
        _seed_everything(cfg.seed + info.rank)
        device = info.device
        img_size = model_input_size(model)
        patch = model_patch_size(model)
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # both heads train (each on its own aligned target)
        model.to(device)
        global_batch = cfg.batch_size * info.world_size
        lr = cfg.lr or 5e-4 * global_batch / 512
        optimizer = create_optimizer_v2(
            model, opt="adamw", lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps, filter_bias_and_bn=True
        )
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched="cosine",
            num_epochs=cfg.epochs,
            warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr,
            min_lr=cfg.min_lr,
            cooldown_epochs=cfg.cooldown_epochs,
        )
        autocast, scaler = _amp(cfg, device)
        ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        mix_gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
        mixer = BatchMixer(cfg, num_classes, patch, mix_gen)
        criterion = SoftTargetCrossEntropy()
        net = AlignedModel(model, path=cfg.align_path)
        if info.distributed:
            net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

        # ---- resume ----
        p = Progress()
        resumed = self._resume_payload(out)
        if resumed is not None:
            payload, digest, path = resumed
            self._check_compatible(payload, path, num_classes)
            try:
                model.load_state_dict(payload["model"])
                optimizer.load_state_dict(payload["optimizer"])
                scheduler.load_state_dict(payload["scheduler"])
                if scaler is not None and payload.get("scaler"):
                    scaler.load_state_dict(payload["scaler"])
                if ema is not None and payload.get("ema"):
                    ema.module.load_state_dict(payload["ema"])
            except (RuntimeError, ValueError, KeyError) as exc:
                raise CheckpointError(
                    f"checkpoint {path} does not fit this model: {str(exc).splitlines()[0]}"
                ) from None
            p = Progress.from_payload(payload)
            states = payload["rng"]
            if len(states) == info.world_size:
                _set_rng_state(states[info.rank]["global"])
                mix_gen.set_state(states[info.rank]["mix"])
            else:
                log.warning(
                    "checkpoint has RNG states of %d ranks, this run has %d: reseeding", len(states), info.world_size
                )
            log.info("resumed from %s (sha256 %s…): epoch %d, step %d", path, digest[:12], p.epoch, p.step_in_epoch)
            resumed_info = {"path": str(path), "sha256": digest, "epoch": p.epoch, "step": p.step_in_epoch}
        else:
            resumed_info = None

        ds, sampler, loader = train_loader(cfg, data, img_size, info.rank, info.world_size)
        steps_per_epoch = len(sampler.base) // cfg.batch_size
        if info.is_main:
            self._write_metrics(out, p.history)
            rundir.append_event(
                out / rundir.ATTEMPTS,
                {
                    "event": "start",
                    **rundir.job_identity(),
                    "resumed_from": resumed_info,
                    "epoch": p.epoch,
                    "step": p.step_in_epoch,
                    "global_step": p.global_step,
                    "world_size": info.world_size,
                    "version": __version__,
                },
            )
        self._refuse_if_stalled(out, p.global_step)
        log.info(
            "training %s (%s) on %s: %d images, %d classes, %d epochs x %d steps, global batch %d, lr %.2e, "
            "%d process(es) on %s",
            cfg.model,
            cfg.mixing(),
            data,
            len(ds),
            num_classes,
            cfg.epochs,
            steps_per_epoch,
            global_batch,
            lr,
            info.world_size,
            device,
        )
        self.stop.install()
        state = dict(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            ema=ema,
            mix_gen=mix_gen,
            num_classes=num_classes,
        )
        last_ckpt_time = time.monotonic()
        last_beat = 0.0
        end_reason = "completed"
        try:
            while p.epoch < cfg.epochs:
                scheduler.step(p.epoch)
                sampler.set_epoch(p.epoch, p.step_in_epoch * cfg.batch_size)
                net.train()
                t_epoch, n_images = time.monotonic(), 0
                for images, targets in loader if p.step_in_epoch < steps_per_epoch else []:
                    images = images.to(device, non_blocking=True)
                    targets = targets.to(device, non_blocking=True)
                    loss = self._step(net, mixer, criterion, optimizer, scaler, autocast, images, targets)
                    if ema is not None:
                        ema.update(model, step=p.global_step)
                    p.step_in_epoch += 1
                    p.global_step += 1
                    p.loss_sum += loss
                    p.loss_count += 1
                    n_images += images.shape[0] * info.world_size
                    if cfg.step_delay:
                        time.sleep(cfg.step_delay)
                    now = time.monotonic()
                    if info.is_main and now - last_beat >= HEARTBEAT_EVERY_S:
                        last_beat = now
                        self._heartbeat(
                            out,
                            "training",
                            p,
                            steps_per_epoch,
                            optimizer.param_groups[0]["lr"],
                            n_images / max(now - t_epoch, 1e-9),
                        )
                    due = cfg.checkpoint_every_min > 0 and now - last_ckpt_time >= 60 * cfg.checkpoint_every_min
                    stop, due, limit = self._agree(due, cfg.max_steps is not None and p.global_step >= cfg.max_steps)
                    if stop or due or limit:
                        self._save(out, state, p)
                        last_ckpt_time = time.monotonic()
                    if stop:
                        raise Interrupted(self.stop.received or "signal on another rank")
                    if limit:
                        end_reason = "max_steps"
                        break
                if end_reason == "max_steps" and p.step_in_epoch < steps_per_epoch:
                    break
                # ---- end of p.epoch: evaluate, record, checkpoint ----
                if info.is_main:
                    self._heartbeat(out, "evaluating", p, steps_per_epoch, optimizer.param_groups[0]["lr"])
                seconds = time.monotonic() - t_epoch
                res = self._evaluate(model, data, img_size, abortable=True)
                if res is None:  # a stop signal came during evaluation: the p.epoch's training is saved
                    self._save(out, state, p)
                    raise Interrupted(self.stop.received or "signal on another rank")
                train_loss = torch.tensor([p.loss_sum, p.loss_count], dtype=torch.float64, device=device)
                tdist.all_reduce_sum(train_loss, info)
                row = {
                    "epoch": p.epoch,
                    "train_loss": train_loss[0].item() / max(train_loss[1].item(), 1),
                    "lr": optimizer.param_groups[0]["lr"],
                    "val_loss": res["loss"],
                    "acc1": res["acc1"],
                    "acc5": res["acc5"],
                    "images_per_s": n_images / max(seconds, 1e-9),
                    "epoch_s": seconds,
                    "global_step": p.global_step,
                    "time": time.time(),
                }
                p.history.append(row)
                is_best = res["acc1"] > p.best_acc1
                p.best_acc1 = max(p.best_acc1, res["acc1"])
                log.info(
                    "epoch %d/%d: train loss %.4f, val loss %.4f, top-1 %.2f, top-5 %.2f (best %.2f), %.0f img/s",
                    p.epoch + 1,
                    cfg.epochs,
                    row["train_loss"],
                    res["loss"],
                    res["acc1"],
                    res["acc5"],
                    p.best_acc1,
                    row["images_per_s"],
                )
                p.epoch, p.step_in_epoch, p.loss_sum, p.loss_count = p.epoch + 1, 0, 0.0, 0
                extra = [ckpt.BEST] if is_best else []
                if cfg.checkpoint_every_epochs and p.epoch % cfg.checkpoint_every_epochs == 0:
                    extra.append(f"checkpoint_epoch{p.epoch}.pth")
                self._save(out, state, p, extra)
                last_ckpt_time = time.monotonic()
                if info.is_main:
                    self._write_metrics(out, p.history)
                    self._heartbeat(out, "training", p, steps_per_epoch, optimizer.param_groups[0]["lr"])
                if end_reason == "max_steps":
                    break
        except Interrupted as exc:
            log.warning(
                "stopped by %s at p.epoch %d step %d; checkpoint written", exc.signame, p.epoch, p.step_in_epoch
            )
            if info.is_main:
                self._heartbeat(out, "interrupted", p, steps_per_epoch)
                rundir.append_event(
                    out / rundir.ATTEMPTS,
                    {
                        "event": "end",
                        "reason": f"signal:{exc.signame}",
                        "epoch": p.epoch,
                        "step": p.step_in_epoch,
                        "global_step": p.global_step,
                        **rundir.job_identity(),
                    },
                )
            tdist.barrier(info)
            if exc.signame == "SIGUSR2" and self.stop.submitit_requeue():
                pass  # on rank 0 submitit requeued and exited; other ranks fall through
            raise SystemExit(rundir.EXIT_INTERRUPTED) from None
        except BaseException as exc:
            if info.is_main and not isinstance(exc, SystemExit):
                rundir.append_event(
                    out / rundir.ATTEMPTS,
                    {
                        "event": "end",
                        "reason": "error",
                        "error": f"{exc.__class__.__name__}: {exc}"[:500],
                        "epoch": p.epoch,
                        "step": p.step_in_epoch,
                        **rundir.job_identity(),
                    },
                )
            raise

        # Every rank logs a checksum of its weights: replicas that drifted apart show up here.
        log.info("final weights checksum %s", weights_checksum(model))
        summary = self._summary(p, end_reason, num_classes)
        if info.is_main:
            atomic_write_json(out / rundir.SUMMARY, summary)
            self._heartbeat(out, "finished", p, steps_per_epoch)
            rundir.append_event(
                out / rundir.ATTEMPTS,
                {
                    "event": "end",
                    "reason": end_reason,
                    "epoch": p.epoch,
                    "global_step": p.global_step,
                    **rundir.job_identity(),
                },
            )
        return summary

    def _refuse_if_stalled(self, out: Path, global_step: int) -> None:
        """Stop a requeue loop that never advances: N+1 attempts starting at the same step."""
        n = self.cfg.max_stalled_attempts
        if not n:
            return
        from tla_jobs.fsutil import read_jsonl

        starts = [e.get("global_step") for e in read_jsonl(out / rundir.ATTEMPTS) if e.get("event") == "start"]
        if len(starts) > n and len(set(starts[-(n + 1) :])) == 1:
            msg = f"no progress in the last {n} attempts (all stopped before step {global_step + 1}); not continuing"
            if self.info.is_main:
                rundir.append_event(
                    out / rundir.ATTEMPTS,
                    {
                        "event": "end",
                        "reason": "stalled",
                        "error": msg,
                        "global_step": global_step,
                        **rundir.job_identity(),
                    },
                )
            raise TlaError(msg)

    # ---- pieces of a step ------------------------------------------------------------------------
    def _step(self, net, mixer, criterion, optimizer, scaler, autocast, images, targets) -> float:
        batch = mixer(images, targets)
        with autocast():
            if batch.patch_weights is not None:
                logits, w = net(batch.images, batch.patch_weights)
                soft = mixed_targets(targets, batch.partner, w, mixer.k, self.cfg.smoothing)
            else:
                logits = net(batch.images)
                soft = batch.targets
            if isinstance(logits, tuple):  # distilled DeiT: both heads, each on its own target
                if soft.ndim == 3:
                    loss = (criterion(logits[0], soft[:, 0]) + criterion(logits[1], soft[:, 1])) / 2
                else:
                    loss = (criterion(logits[0], soft) + criterion(logits[1], soft)) / 2
            else:
                loss = criterion(logits, soft)
        if not math.isfinite(loss.item()):
            raise TlaError(f"loss is {loss.item()}: training diverged (try a lower --lr or --amp off)")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if self.cfg.clip_grad:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if self.cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(net.parameters(), self.cfg.clip_grad)
            optimizer.step()
        return float(loss.item())

    def _agree(self, due: bool, limit: bool) -> tuple[bool, bool, bool]:
        """One all-reduce: did any rank get a stop signal; is rank 0's checkpoint clock due."""
        info = self.info
        flags = torch.tensor(
            [1.0 if self.stop.received else 0.0, 1.0 if (due and info.is_main) else 0.0, 1.0 if limit else 0.0],
            device=info.device,
        )
        if info.distributed:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        return bool(flags[0] > 0), bool(flags[1] > 0), bool(flags[2] > 0)

    # ---- files -----------------------------------------------------------------------------------
    def _save(self, out: Path, state: dict, p: Progress, extra_names=()) -> None:
        info, cfg = self.info, self.cfg
        rng = tdist.gather_objects({"global": _rng_state(), "mix": state["mix_gen"].get_state()}, info)
        if info.is_main:
            payload = {
                "format": ckpt.FORMAT,
                "version": __version__,
                "model_name": cfg.model,
                "num_classes": state["num_classes"],
                "config": cfg.model_dump(),
                "model": state["model"].state_dict(),
                "optimizer": state["optimizer"].state_dict(),
                "scheduler": state["scheduler"].state_dict(),
                "scaler": state["scaler"].state_dict() if state["scaler"] is not None else None,
                "ema": state["ema"].module.state_dict() if state["ema"] is not None else None,
                **p.as_payload(),
                "rng": rng,
                "time": time.time(),
            }
            data, digest = ckpt.serialize(payload)
            ckpt.write(out, ckpt.LAST, data, digest, keep_previous=True)
            for name in extra_names:
                ckpt.write(out, name, data, digest)
        tdist.barrier(info)

    def _write_metrics(self, out: Path, history: list[dict]) -> None:
        import json

        atomic_write_text(out / rundir.METRICS, "".join(json.dumps(r) + "\n" for r in history))

    def _heartbeat(
        self, out: Path, phase: str, p: Progress, steps_per_epoch: int, lr: float = 0.0, ips: float = 0.0
    ) -> None:
        atomic_write_json(
            out / rundir.HEARTBEAT,
            {
                "phase": phase,
                "epoch": p.epoch,
                "epochs": self.cfg.epochs,
                "step": p.step_in_epoch,
                "steps_per_epoch": steps_per_epoch,
                "global_step": p.global_step,
                "train_loss": p.loss_sum / max(p.loss_count, 1),
                "lr": lr,
                "images_per_s": ips,
                "time": time.time(),
                "world_size": self.info.world_size,
                "progress": rundir.metrics_summary(p.history),
                **rundir.job_identity(),
            },
        )

    def _summary(self, p: Progress, reason: str, num_classes: int) -> dict:
        history, epoch, global_step = p.history, p.epoch, p.global_step
        best = max(history, key=lambda r: r["acc1"]) if history else None
        last = history[-1] if history else None
        return {
            "model": self.cfg.model,
            "mixing": self.cfg.mixing(),
            "tl_align": self.cfg.tl_align,
            "num_classes": num_classes,
            "epochs": self.cfg.epochs,
            "epochs_done": epoch,
            "global_step": global_step,
            "end_reason": reason,
            "best_acc1": best["acc1"] if best else None,
            "best_epoch": best["epoch"] if best else None,
            "best_acc5": best["acc5"] if best else None,
            "last_acc1": last["acc1"] if last else None,
            "last_acc5": last["acc5"] if last else None,
            "world_size": self.info.world_size,
            "time": time.time(),
            "version": __version__,
        }


def weights_checksum(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train(cfg: TrainConfig) -> dict:
    """Run training (or --eval-only evaluation) in this process; returns the summary / eval result."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return Trainer(cfg).run()
