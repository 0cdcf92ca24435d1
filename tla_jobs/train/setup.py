"""What a run is made of, built before the first step: the checks on the user's input (before any
process group), per-rank logging, and :func:`build_run` (model on the device, optimizer, scheduler,
EMA, mixed precision, the training module, batches on the device) into one :class:`Run`."""

from __future__ import annotations

import logging
import os
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.data import resolve_model_data_config
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, NativeScaler, random_seed
from torch.nn.parallel import DistributedDataParallel

from tla_jobs import envvars, rundir
from tla_jobs.align import AlignedModel, check_supported
from tla_jobs.align.attention import resolve_path
from tla_jobs.config import TrainConfig
from tla_jobs.data.device import DeviceTransform, EvalBatches, SyntheticBatches
from tla_jobs.data.folders import check_image_folder
from tla_jobs.data.loaders import eval_loader, train_batches
from tla_jobs.data.order import check_global_batch
from tla_jobs.data.prepare import prepare
from tla_jobs.errors import CheckpointError, DataError, TlaError
from tla_jobs.fsutil import open_for_append
from tla_jobs.train import distributed as tdist
from tla_jobs.train import throughput
from tla_jobs.train.curves import Curves, check_wandb
from tla_jobs.train.mixing import BatchMixer
from tla_jobs.train.models import build_model, check_model_name, model_input_size, model_patch_size
from tla_jobs.train.runlog import RunLog
from tla_jobs.train.signals import StopSignals
from tla_jobs.train.step import Models, Optimization, PlainBackward, TrainStep


def setup_logging(out: Path, rank: int) -> None:
    # Not timm's setup_default_logging: it has no rank in its format and writes no per-rank file, and
    # multi-node logs need the rank on every line (`tla logs` merges them by time).
    fmt = logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger("tla")
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    # the rank's log is opened by fsutil (never through a link out of the run directory, never a FIFO)
    log = os.fdopen(open_for_append(out / rundir.LOG_PATTERN.format(rank=rank)), "a", buffering=1)
    for handler in (logging.StreamHandler(sys.stderr), logging.StreamHandler(log)):
        handler.setFormatter(fmt)
        root.addHandler(handler)
    root.propagate = False


def resolve_data(cfg: TrainConfig) -> Path | None:
    if cfg.dataset == "synthetic":
        return None
    if not cfg.data_path:
        raise DataError("--data-path is required")
    path = Path(cfg.data_path).expanduser()
    if cfg.dataset != "imagefolder":
        # Bundled data are prepared on first use: one rank prepares (under a lock beside the folder),
        # the others wait and find it ready; a folder of another dataset is refused (check_prepared).
        prepare(cfg.dataset, path)
    return path


def preflight(cfg: TrainConfig) -> tuple[Path | None, int, torch.nn.Module]:
    """Everything that can fail on the user's input, before any process group or device:
    (data folder or None for synthetic data, number of classes, the model with its initial weights)."""
    envvars.check_trainer_env()  # TLA_CPU_THREADS, WORLD_SIZE, RANK, ...: one line, not a ValueError in a rank
    problem = cfg.schedule_error(tdist.expected_world_size())
    if problem:
        raise TlaError(problem)
    check_model_name(cfg.model)
    check_wandb(cfg)
    data = resolve_data(cfg)
    if data is None:
        num_classes = cfg.num_classes or 1000
    else:
        train_split, _ = check_image_folder(data)
        world = tdist.expected_world_size()
        global_batch = cfg.global_batch or cfg.batch_size * world
        if train_split.size < global_batch:  # before the ranks wait for each other
            raise DataError(f"{data / 'train'} has {train_split.size} images, fewer than one global batch "
                            f"({global_batch})")
        if cfg.global_batch:
            check_global_batch(cfg.global_batch, cfg.batch_size, world)
        num_classes = cfg.num_classes or len(train_split.classes)
        if num_classes < len(train_split.classes):
            raise DataError(f"--num-classes {num_classes} is fewer than the {len(train_split.classes)} "
                            "class folders")
    random_seed(cfg.seed)  # the initial weights are a function of the seed
    model = build_model(cfg.model, num_classes, cfg.drop_path, cfg.img_size)
    if cfg.tl_align:
        check_supported(model)
    return data, num_classes, model


def say_warnings(cfg: TrainConfig, is_main: bool) -> None:
    """The recipe's warnings (TrainConfig.warnings: allowed, but probably not meant), one line each in
    the run's log (and so on stderr), by rank 0, as training starts: after every check that refuses
    input, so that a refusal stays one line."""
    if is_main:
        for line in cfg.warnings():
            logging.getLogger("tla").warning(line)


def output_dir(cfg: TrainConfig) -> Path:
    """The run folder (created): --output-dir, or for --eval-only the checkpoint's folder."""
    out = Path(cfg.output_dir).expanduser() if cfg.output_dir else None
    if cfg.eval_only:
        if not cfg.resume:
            raise CheckpointError("--eval-only needs --resume CKPT")
        out = out or Path(cfg.resume).expanduser().parent
    elif out is None:
        raise TlaError("--output-dir is required")
    out.mkdir(parents=True, exist_ok=True)
    return out


def amp(cfg: TrainConfig, device: torch.device):
    """(autocast context factory, the backward pass: timm's NativeScaler for fp16, else PlainBackward,
    the resolved mode)."""
    mode = cfg.amp
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else "off"
    if mode == "off":
        return nullcontext, PlainBackward(), mode
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    backward = NativeScaler(device=device.type) if mode == "fp16" else PlainBackward()
    return (lambda: torch.autocast(device.type, dtype=dtype)), backward, mode


def normalise(model: torch.nn.Module, device: torch.device, reprob: float = 0.0) -> DeviceTransform:
    """uint8 batches → the model's normalisation (timm's data config of the model), on the device."""
    dc = resolve_model_data_config(model)
    return DeviceTransform(device, dc["mean"], dc["std"], reprob)


def val_batches(cfg: TrainConfig, model, data: Path | None, num_classes: int, info: tdist.DistInfo):
    transform = normalise(model, info.device)
    img_size = model_input_size(model)
    if data is None:
        return SyntheticBatches(transform, cfg.batch_size, img_size, num_classes, 2, cfg.seed, info.rank, train=False)
    _, loader = eval_loader(cfg, data, img_size, info.rank, info.world_size)
    return EvalBatches(loader, transform)


@dataclass
class Run:
    """Everything the training loop works with."""

    cfg: TrainConfig
    info: tdist.DistInfo
    out: Path
    data: Path | None  # None: --dataset synthetic
    num_classes: int
    models: Models
    opt: Optimization
    step: TrainStep
    mix_gen: torch.Generator  # BatchMixer's boxes (checkpointed per rank)
    train: object  # LoaderBatches | SyntheticBatches
    val: object  # EvalBatches | SyntheticBatches
    images: int  # per epoch, all ranks
    lr: float
    flops_per_image: float | None
    peak_tflops: float | None
    runlog: RunLog
    stop: StopSignals
    curves: Curves | None = None  # set by loop.fit, which knows the step it starts from
    global_batch: int = 0  # images per optimizer step, all ranks (tla_jobs.data.order)

    @property
    def accumulation(self) -> int:
        """Micro-batches per rank and optimizer step."""
        return max(1, self.global_batch // (self.cfg.batch_size * self.info.world_size))

    def rates(self, images_per_s: float) -> dict:
        return throughput.rates(images_per_s, self.info.world_size, self.flops_per_image, self.peak_tflops)


def build_run(cfg: TrainConfig, model, data: Path | None, num_classes: int, out: Path, info: tdist.DistInfo,
              stop: StopSignals) -> Run:
    device = info.device
    random_seed(cfg.seed, info.rank)
    img_size, patch = model_input_size(model), model_patch_size(model)
    if hasattr(model, "set_distilled_training"):
        model.set_distilled_training(True)  # both heads train (each on its own aligned target)
    flops = throughput.train_flops_per_image(model, img_size) if info.is_main else None
    model.to(device)
    global_batch = cfg.global_batch or cfg.batch_size * info.world_size  # a resumed run's: keep_global_batch
    lr = cfg.lr or 5e-4 * global_batch / 512
    optimizer = create_optimizer_v2(
        model, opt="adamw", lr=lr, weight_decay=cfg.weight_decay, eps=cfg.opt_eps, filter_bias_and_bn=True,
        **({"fused": True} if device.type == "cuda" else {}),  # one kernel for all parameters
    )
    scheduler, _ = create_scheduler_v2(
        optimizer, sched="cosine", num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, cooldown_epochs=cfg.cooldown_epochs,
    )
    autocast, backward, amp_mode = amp(cfg, device)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    mix_gen = torch.Generator().manual_seed(cfg.seed * 1000 + info.rank)
    net = AlignedModel(model, path=resolve_path(cfg.align_path, device))
    if info.distributed:
        net = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    models, opt = Models(model, net, ema), Optimization(optimizer, scheduler, backward, cfg.clip_grad)
    step = TrainStep(models, opt, BatchMixer(cfg, num_classes, patch, mix_gen), autocast)
    transform = normalise(model, device, cfg.reprob)
    if data is None:
        steps = max(1, cfg.synthetic_images // global_batch)
        train = SyntheticBatches(transform, cfg.batch_size, img_size, num_classes, steps, cfg.seed, info.rank)
        train.accumulation = check_global_batch(global_batch, cfg.batch_size, info.world_size)
        images = steps * global_batch
    else:
        images, train = train_batches(cfg, data, img_size, info.rank, info.world_size, transform, global_batch)
    return Run(cfg, info, out, data, num_classes, models, opt, step, mix_gen, train,
               val_batches(cfg, model, data, num_classes, info), images, lr, flops,
               throughput.peak_tflops(device, amp_mode, cfg.peak_tflops),
               RunLog(out, info.is_main, info.world_size, cfg.epochs), stop, global_batch=global_batch)


def keep_global_batch(run: Run, p) -> None:
    """After the resume: the run keeps the global batch it started with (its checkpoint's), on any
    number of ranks, by accumulating micro-batches (batch x world size x accumulation = global batch);
    the lr and its schedule come back with the optimizer's and scheduler's state."""
    cfg, saved = run.cfg, p.global_batch
    if saved and saved != run.global_batch:
        if cfg.global_batch:
            raise CheckpointError(f"--global-batch {cfg.global_batch} differs from this run's global batch {saved} "
                                  "(its checkpoint): leave it out to keep the run's, or start a new run")
        check_global_batch(saved, cfg.batch_size, run.info.world_size)
        run.global_batch = saved
        if hasattr(run.train, "set_global_batch"):
            run.train.set_global_batch(saved)
        else:  # synthetic data
            run.train.accumulation = run.accumulation
        run.lr = cfg.lr or 5e-4 * saved / 512
    p.global_batch = run.global_batch
