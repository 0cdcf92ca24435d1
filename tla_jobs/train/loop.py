"""The training loop: DeiT's recipe through timm, TL-Align's labels, DDP, exact resume.

Read top to bottom: ``Trainer.run`` (checks that need no process group, then the group) →
``_setup`` (model, optimizer, scheduler, EMA, scaler, data on the device) → ``_resume`` →
``_train`` (epochs of steps; every few steps one *check*: the only moment the host waits for the
device, where losses are read, stop signals and the checkpoint clock are agreed across ranks,
and the heartbeat is written) → evaluation, metrics, checkpoints → summary.

The pieces live beside this file: step.py (one optimisation step), evaluate.py, checkpoint.py
(files, state, RNG), progress.py (where training stands; when to check), runlog.py (attempts,
heartbeat, metrics, summary, fencing), throughput.py, signals.py, distributed.py; the data on the
device in tla_jobs/data/device.py.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import resolve_model_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, random_seed
from torch.nn.parallel import DistributedDataParallel

from tla_jobs import __version__, rundir
from tla_jobs.align import AlignedModel, check_supported
from tla_jobs.align.attention import resolve_path
from tla_jobs.config import TrainConfig
from tla_jobs.data.device import DeviceTransform, EvalBatches, SyntheticBatches
from tla_jobs.data.folders import check_image_folder
from tla_jobs.data.loaders import eval_loader, train_batches
from tla_jobs.data.prepare import prepare
from tla_jobs.errors import CheckpointError, DataError, TlaError
from tla_jobs.fsutil import atomic_write_json, read_jsonl
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train import distributed as tdist
from tla_jobs.train import signals, throughput
from tla_jobs.train.evaluate import evaluate
from tla_jobs.train.mixing import BatchMixer
from tla_jobs.train.models import build_model, check_model_name, model_input_size, model_patch_size
from tla_jobs.train.progress import CheckClock, EpochClock, Progress
from tla_jobs.train.runlog import RunLog, Superseded, waiting_for_ranks
from tla_jobs.train.step import TrainStep

log = logging.getLogger("tla.train")
HEARTBEAT_EVERY_S = 2.0
# One host-device synchronisation per heartbeat: a stop signal is acted on within about this long
# (plus one step), and each check can write the heartbeat with fresh figures.
CHECK_EVERY_S = HEARTBEAT_EVERY_S


class Interrupted(Exception):
    """Raised after the stop-signal checkpoint is on disk."""

    def __init__(self, signame: str):
        super().__init__(signame)
        self.signame = signame


@dataclass
class Parts:
    """What _setup builds and the loop uses."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: NativeScaler | None
    ema: ModelEmaV3 | None
    step: TrainStep
    mix_gen: torch.Generator
    train: object  # LoaderBatches | SyntheticBatches
    val: object
    images: int
    lr: float
    flops_per_image: float | None
    peak_tflops: float | None


# ------------------------------------------------------------------------------------------ helpers


def _setup_logging(out: Path | None, rank: int) -> None:
    # timm's setup_default_logging has no rank in its format; multi-node logs need it on every line.
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


def resolve_data(cfg: TrainConfig) -> Path | None:
    if cfg.dataset == "synthetic":
        return None
    if not cfg.data_path:
        raise DataError("--data-path is required")
    path = Path(cfg.data_path).expanduser()
    if cfg.dataset != "imagefolder" and not (path / ".tla-dataset").is_file():
        # Bundled data are prepared on first use; prepare() renames a finished folder into place,
        # so ranks racing here are harmless.
        prepare(cfg.dataset, path)
    return path


def _amp(cfg: TrainConfig, device: torch.device):
    """(autocast context factory, timm NativeScaler for fp16 or None, the resolved mode)."""
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return nullcontext, None, mode
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = NativeScaler(device=device.type) if mode == "fp16" else None
    return (lambda: torch.autocast(device.type, dtype=dtype)), scaler, mode


def weights_checksum(model: torch.nn.Module) -> str:
    import hashlib

    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------------------- the trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, max_stalled_attempts: int = 0):
        self.cfg = cfg
        self.max_stalled_attempts = max_stalled_attempts
        self.stop = signals.StopSignals()
        self.info: tdist.DistInfo | None = None
        self.runlog: RunLog | None = None

    # ---- set-up ----------------------------------------------------------------------------------
    def _preflight(self):
        """Everything that can fail on the user's input, before any process group or device."""
        cfg = self.cfg
        check_model_name(cfg.model)
        data = resolve_data(cfg)
        if data is None:
            num_classes = cfg.num_classes or 1000
        else:
            train_split, _ = check_image_folder(data)
            world = tdist.expected_world_size()
            if train_split.size < cfg.batch_size * world:  # before the ranks wait for each other
                raise DataError(f"{data / 'train'} has {train_split.size} images, fewer than one global batch "
                                f"({cfg.batch_size} x {world})")
            num_classes = cfg.num_classes or len(train_split.classes)
            if num_classes < len(train_split.classes):
                raise DataError(f"--num-classes {num_classes} is fewer than the {len(train_split.classes)} "
                                "class folders")
        random_seed(cfg.seed)  # the initial weights are a function of the seed
        model = build_model(cfg.model, num_classes, cfg.drop_path, cfg.img_size)
        if cfg.tl_align:
            check_supported(model)
        return data, num_classes, model

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

    def _val_batches(self, model, data: Path | None, num_classes: int, transform: DeviceTransform):
        cfg, info = self.cfg, self.info
        img_size = model_input_size(model)
        if data is None:
            return SyntheticBatches(transform, cfg.batch_size, img_size, num_classes, 2, cfg.seed, info.rank,
                                    train=False)
        _, loader = eval_loader(cfg, data, img_size, info.rank, info.world_size)
        return EvalBatches(loader, transform)

    # ---- the run ---------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        data, num_classes, model = self._preflight()
        out = Path(cfg.output_dir).expanduser() if cfg.output_dir else None
        if cfg.eval_only:
            if not cfg.resume:
                raise CheckpointError("--eval-only needs --resume CKPT")
            if out is None:
                out = Path(cfg.resume).expanduser().parent
        elif out is None:
            raise TlaError("--output-dir is required")
        out.mkdir(parents=True, exist_ok=True)
        world = tdist.expected_world_size()
        if world > 1 and int(os.environ.get("RANK", "0")) == 0 and not cfg.eval_only:
            waiting_for_ranks(out, world)
        self.info = info = tdist.init()
        try:
            _setup_logging(out, info.rank)
            if cfg.eval_only:
                return self._eval_only(model, data, num_classes, out)
            return self._train(model, data, num_classes, out)
        finally:
            self.stop.restore()
            tdist.shutdown(info)

    def _eval_only(self, model, data: Path | None, num_classes: int, out: Path) -> dict:
        payload, digest, path = self._resume_payload(None)
        self._check_compatible(payload, path, num_classes)
        model.load_state_dict(payload["model"])
        model.to(self.info.device)
        autocast, _, _ = _amp(self.cfg, self.info.device)
        dc = resolve_model_data_config(model)
        transform = DeviceTransform(self.info.device, dc["mean"], dc["std"])
        res = evaluate(model, self._val_batches(model, data, num_classes, transform), autocast, self.info,
                       reduce=self.cfg.dist_eval)
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
        log.info("eval of %s: top-1 %.2f top-5 %.2f loss %.4f on %d images",
                 path, res["acc1"], res["acc5"], res["loss"], res["images"])
        return result

    def _setup(self, model, data: Path | None, num_classes: int) -> Parts:
        cfg, info = self.cfg, self.info
        device = info.device
        random_seed(cfg.seed, info.rank)
        img_size, patch = model_input_size(model), model_patch_size(model)
        if hasattr(model, "set_distilled_training"):
            model.set_distilled_training(True)  # both heads train (each on its own aligned target)
        flops = throughput.train_flops_per_image(model, img_size) if info.is_main else None
        model.to(device)
        global_batch = cfg.batch_size * info.world_size
        lr = cfg.lr or 5e-4 * global_batch / 512
        optimizer = create_optimizer_v2(
            model, opt="adamw", lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps, filter_bias_and_bn=True,
            **({"fused": True} if device.type == "cuda" else {}),  # one kernel for all parameters
        )
        scheduler, _ = create_scheduler_v2(
            optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
            warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
        )
        autocast, scaler, amp_mode = _amp(cfg, device)
        ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
        mix_gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
        net = AlignedModel(model, path=resolve_path(cfg.align_path, device))
        if info.distributed:
            net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:
            net = torch.compile(net)
        step = TrainStep(net, optimizer, BatchMixer(cfg, num_classes, patch, mix_gen), autocast, scaler,
                         cfg.clip_grad, cfg.smoothing, ema, model, device)
        dc = resolve_model_data_config(model)
        transform = DeviceTransform(device, dc["mean"], dc["std"], cfg.reprob)
        if data is None:
            steps = max(1, cfg.synthetic_images // global_batch)
            train = SyntheticBatches(transform, cfg.batch_size, img_size, num_classes, steps, cfg.seed, info.rank)
            images = steps * global_batch
        else:
            images, train = train_batches(cfg, data, img_size, info.rank, info.world_size, transform)
        val = self._val_batches(model, data, num_classes, DeviceTransform(device, dc["mean"], dc["std"]))
        return Parts(model, net, optimizer, scheduler, scaler, ema, step, mix_gen, train, val, images, lr, flops,
                     throughput.peak_tflops(device, amp_mode, cfg.peak_tflops))

    def _resume(self, parts: Parts, out: Path, num_classes: int) -> tuple[Progress, dict | None]:
        resumed = self._resume_payload(out)
        if resumed is None:
            return Progress(), None
        payload, digest, path = resumed
        self._check_compatible(payload, path, num_classes)
        ckpt.restore(payload, path, parts.model, parts.optimizer, parts.scheduler, parts.scaler, parts.ema)
        p = Progress.from_payload(payload)
        states, info = payload["rng"], self.info
        if len(states) == info.world_size:
            ckpt.set_rng_state(states[info.rank]["global"])
            parts.mix_gen.set_state(states[info.rank]["mix"])
        else:
            log.warning("checkpoint has RNG states of %d ranks, this run has %d: reseeding", len(states),
                        info.world_size)
        log.info("resumed from %s (sha256 %s…): epoch %d, step %d", path, digest[:12], p.epoch, p.step_in_epoch)
        return p, {"path": str(path), "sha256": digest, "epoch": p.epoch, "step": p.step_in_epoch}

    def _train(self, model, data: Path | None, num_classes: int, out: Path) -> dict:
        cfg, info = self.cfg, self.info
        parts = self._setup(model, data, num_classes)
        if info.is_main:
            ckpt.remove_orphans(out)
        p, resumed_info = self._resume(parts, out, num_classes)
        self.runlog = runlog = RunLog(out, info.is_main, info.world_size, cfg.epochs)
        runlog.take_ownership()
        steps_per_epoch = parts.train.steps_per_epoch
        runlog.metrics(p.history)
        runlog.record_attempt("start", resumed_from=resumed_info, epoch=p.epoch, step=p.step_in_epoch,
                              global_step=p.global_step, world_size=info.world_size, version=__version__)
        self._refuse_if_stalled(out, p.global_step)
        log.info(
            "training %s (%s, labels: %s) on %s: %d images, %d classes, %d epochs x %d steps, global batch %d, "
            "lr %.2e, %d process(es) on %s%s",
            cfg.model, cfg.mixing(), resolve_path(cfg.align_path, info.device), data or "synthetic data",
            parts.images, num_classes, cfg.epochs, steps_per_epoch, cfg.batch_size * info.world_size, parts.lr,
            info.world_size, info.device, ", compiled" if cfg.compile else "",
        )
        self.stop.install()
        end_reason = "completed"
        try:
            end_reason = self._epochs(parts, p, out, steps_per_epoch)
        except Interrupted as exc:
            self._interrupted(exc.signame, p, steps_per_epoch)
        except Superseded as exc:
            log.warning("%s: stopping without writing anything more", exc)
            raise SystemExit(rundir.EXIT_SUPERSEDED) from None
        except BaseException as exc:
            if not isinstance(exc, SystemExit) and runlog.owns_run():
                runlog.record_attempt("end", reason="error", error=f"{exc.__class__.__name__}: {exc}"[:500],
                                      epoch=p.epoch, step=p.step_in_epoch)
            raise

        # Every rank logs a checksum of its weights: replicas that drifted apart show up here.
        log.info("final weights checksum %s", weights_checksum(model))
        summary = self._summary(p, end_reason, num_classes)
        runlog.summary(summary)
        runlog.heartbeat("finished", p, steps_per_epoch)
        runlog.record_attempt("end", reason=end_reason, epoch=p.epoch, global_step=p.global_step)
        return summary

    def _interrupted(self, signame: str, p: Progress, steps_per_epoch: int) -> None:
        """After the stop-signal checkpoint: record the end, then leave the way the scheduler expects."""
        log.warning("stopped by %s at epoch %d step %d; checkpoint written", signame, p.epoch, p.step_in_epoch)
        try:
            self.runlog.heartbeat("interrupted", p, steps_per_epoch)
            self.runlog.record_attempt("end", reason=f"signal:{signame}", epoch=p.epoch, step=p.step_in_epoch,
                                       global_step=p.global_step)
        except Superseded as exc:
            log.warning("%s: stopping without writing anything more", exc)
            raise SystemExit(rundir.EXIT_SUPERSEDED) from None
        tdist.barrier(self.info)
        if signame == "SIGUSR2" and self.stop.submitit_requeue():
            pass  # on rank 0 submitit requeued and exited; other ranks fall through
        elif signals.must_wait_for_kill(signame):
            signals.wait_for_kill()
        raise SystemExit(rundir.EXIT_INTERRUPTED)

    def _epochs(self, parts: Parts, p: Progress, out: Path, steps_per_epoch: int) -> str:
        """The epoch loop; returns why it ended ('completed' or 'max_steps')."""
        cfg, info = self.cfg, self.info
        check = CheckClock(info, CHECK_EVERY_S)
        last_ckpt, last_beat = time.monotonic(), 0.0
        while p.epoch < cfg.epochs:
            parts.scheduler.step(p.epoch)
            parts.net.train()
            lr = parts.optimizer.param_groups[0]["lr"]
            clock = EpochClock(p.step_in_epoch, steps_per_epoch, cfg.batch_size * info.world_size)
            limit = False
            for images, targets in parts.train.epoch(p.epoch, p.step_in_epoch):
                parts.step(images, targets, p.global_step)
                p.step_in_epoch += 1
                p.global_step += 1
                clock.stepped(p.step_in_epoch)
                if cfg.step_delay:
                    time.sleep(cfg.step_delay)
                limit = cfg.max_steps is not None and p.global_step >= cfg.max_steps
                end = p.step_in_epoch >= steps_per_epoch
                due = cfg.checkpoint_every_min > 0 and time.monotonic() - last_ckpt >= 60 * cfg.checkpoint_every_min
                if not check.now(self.stop.received is not None or due, force=limit or end):
                    continue
                stop, due = self._check(parts, p, check, due)
                now = time.monotonic()
                if now - last_beat >= HEARTBEAT_EVERY_S:
                    last_beat = now
                    self.runlog.heartbeat("training", p, steps_per_epoch, lr, self._rates(clock.rate(now), parts))
                if stop or due or (limit and not end):
                    self._save(out, parts, p)
                    last_ckpt = time.monotonic()
                if stop:
                    raise Interrupted(self.stop.received or "signal on another rank")
                if limit:
                    break
            if limit and p.step_in_epoch < steps_per_epoch:
                return "max_steps"
            self._end_epoch(parts, p, out, steps_per_epoch, clock, lr)
            last_ckpt = time.monotonic()
            if limit:
                return "max_steps"
        return "completed"

    def _check(self, parts: Parts, p: Progress, check: CheckClock, due: bool) -> tuple[bool, bool]:
        """The loop's one synchronisation point: read the device's sums, agree on stop and checkpoint
        (and whether rank 0 lost the run to another attempt), and set when the next check comes."""
        info = self.info
        superseded = info.is_main and not self.runlog.owns_run()
        flags = [self.stop.received is not None, due and info.is_main, superseded, check.step_seconds()]
        if info.distributed:
            t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=info.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            values = torch.cat([t, parts.step.sums]).tolist()
            parts.step.sums.zero_()
            flags, sums = values[:4], values[4:]
        else:
            sums = parts.step.read()
        check.agreed(flags[3])
        if flags[2]:
            if info.is_main:
                self.runlog.check_owner()  # raises Superseded with who took over
            raise Superseded("rank 0's attempt was superseded")
        if sums[2]:
            raise TlaError(f"{int(sums[2])} non-finite loss value(s) before step {p.global_step}: training diverged "
                           "(try a lower --lr or --amp off)")
        p.fold(sums)
        return bool(flags[0]), bool(flags[1])

    def _rates(self, images_per_s: float, parts: Parts) -> dict:
        return throughput.rates(images_per_s, self.info.world_size, parts.flops_per_image, parts.peak_tflops)

    def _end_epoch(self, parts: Parts, p: Progress, out: Path, steps_per_epoch: int, clock, lr: float) -> None:
        cfg, info = self.cfg, self.info
        self.runlog.heartbeat("evaluating", p, steps_per_epoch, lr)
        seconds = time.monotonic() - clock.start
        steady = clock.rate(time.monotonic())

        def abort() -> bool:  # a stop signal during evaluation (agreed across ranks)
            return tdist.any_rank(self.stop.received is not None, info)

        res = evaluate(parts.model, parts.val, parts.step.autocast, info, reduce=cfg.dist_eval, should_abort=abort)
        if res is None:  # a stop signal came during evaluation: the epoch's training is saved
            self._save(out, parts, p)
            raise Interrupted(self.stop.received or "signal on another rank")
        sums = torch.tensor([p.loss_sum, p.loss_count, p.shift_sum, p.shift_count], dtype=torch.float64,
                            device=info.device)
        loss_sum, loss_count, shift_sum, shift_count = tdist.all_reduce_sum(sums, info).tolist()
        row = {
            "epoch": p.epoch,
            "train_loss": loss_sum / max(loss_count, 1),
            "lr": lr,
            "val_loss": res["loss"],
            "acc1": res["acc1"],
            "acc5": res["acc5"],
            "w_shift": shift_sum / shift_count if shift_count else None,
            **self._rates(clock.images / max(seconds, 1e-9), parts),
            "images_per_s_steady": steady,
            "epoch_s": seconds,
            "global_step": p.global_step,
            "time": time.time(),
        }
        p.history.append(row)
        is_best = res["acc1"] > p.best_acc1
        p.best_acc1 = max(p.best_acc1, res["acc1"])
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, top-1 %.2f, top-5 %.2f (best %.2f), %.0f img/s%s",
            p.epoch + 1, cfg.epochs, row["train_loss"], res["loss"], res["acc1"], res["acc5"], p.best_acc1,
            row["images_per_s"], f", {row['tflops_per_device']:.1f} TFLOP/s per device"
            if row.get("tflops_per_device", 0) >= 0.05 else "",  # a CPU's toy model would read 0.0
        )
        p.epoch, p.step_in_epoch, p.loss_sum, p.loss_count, p.shift_sum, p.shift_count = p.epoch + 1, 0, 0.0, 0, 0.0, 0
        extra = [ckpt.BEST] if is_best else []
        if cfg.checkpoint_every_epochs and p.epoch % cfg.checkpoint_every_epochs == 0:
            extra.append(rundir.CHECKPOINT_EPOCH.format(epoch=p.epoch))
        self._save(out, parts, p, extra)
        self.runlog.metrics(p.history)
        self.runlog.heartbeat("training", p, steps_per_epoch, lr)

    def _refuse_if_stalled(self, out: Path, global_step: int) -> None:
        """Stop a requeue loop that never advances: N+1 attempts starting at the same step."""
        n = self.max_stalled_attempts
        if not n:
            return
        starts = [e.get("global_step") for e in read_jsonl(out / rundir.ATTEMPTS) if e.get("event") == "start"]
        if len(starts) > n and len(set(starts[-(n + 1):])) == 1:
            msg = f"no progress in the last {n} attempts (all stopped before step {global_step + 1}); not continuing"
            self.runlog.record_attempt("end", reason="stalled", error=msg, global_step=global_step)
            raise TlaError(msg)

    # ---- files -----------------------------------------------------------------------------------
    def _save(self, out: Path, parts: Parts, p: Progress, extra_names=()) -> None:
        info, cfg = self.info, self.cfg
        rng = tdist.gather_objects({"global": ckpt.rng_state(), "mix": parts.mix_gen.get_state()}, info)
        if info.is_main:
            self.runlog.check_owner()
            meta = {"version": __version__, "model_name": cfg.model, "num_classes": parts.step.mixer.k,
                    "config": cfg.model_dump()}
            data, digest = ckpt.serialize(ckpt.payload(meta, parts.model, parts.optimizer, parts.scheduler,
                                                       parts.scaler, parts.ema, p.as_payload(), rng))
            ckpt.write(out, ckpt.LAST, data, digest, keep_previous=True)
            for name in extra_names:
                ckpt.write(out, name, data, digest)
        tdist.barrier(info)

    def _summary(self, p: Progress, reason: str, num_classes: int) -> dict:
        history = p.history
        best = max(history, key=lambda r: r["acc1"]) if history else None
        last = history[-1] if history else None
        return {
            "model": self.cfg.model,
            "mixing": self.cfg.mixing(),
            "tl_align": self.cfg.tl_align,
            "num_classes": num_classes,
            "epochs": self.cfg.epochs,
            "epochs_done": p.epoch,
            "global_step": p.global_step,
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


def train(cfg: TrainConfig, max_stalled_attempts: int = 0) -> dict:
    """Run training (or --eval-only evaluation) in this process; returns the summary / eval result.
    max_stalled_attempts: give up after this many attempts in a row with no new step (0 = never); the
    cluster profile's policy, passed by the job entry point."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    return Trainer(cfg, max_stalled_attempts).run()
