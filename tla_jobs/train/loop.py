"""The training loop: DeiT's recipe through timm, TL-Align's labels, DDP, exact resume.

Read top to bottom: :func:`train` (checks that need no process group, then the group, the run's
parts, the resume) → :func:`fit` (the attempt's start record, the epochs, the end: summary and
records) → per epoch :func:`train_one_epoch` (steps; every few steps one :func:`check`, the only
moment the host waits for the device, where losses are read, stop signals and the checkpoint clock
are agreed across ranks, and the heartbeat is written) and :func:`end_epoch` (evaluation, metrics,
checkpoints).

The pieces live beside this file: setup.py (checks, logging, building a Run), step.py (one
optimisation step), evaluate.py (and --eval-only), checkpoint.py (files, save, resume), rng.py,
progress.py (where training stands; the loop's clocks), runlog.py (attempts, heartbeat, metrics,
summary, fencing), throughput.py, signals.py, distributed.py; the data on the device in
tla_jobs/data/device.py.
"""

from __future__ import annotations

import logging
import os
import time
from typing import NoReturn

import torch

from tla_jobs import __version__, envvars, rundir
from tla_jobs.align.attention import resolve_path
from tla_jobs.config import TrainConfig
from tla_jobs.errors import TlaError
from tla_jobs.train import checkpoint as ckpt
from tla_jobs.train import distributed as tdist
from tla_jobs.train import recipe, setup, signals
from tla_jobs.train.curves import Curves
from tla_jobs.train.evaluate import evaluate, evaluate_checkpoint
from tla_jobs.train.progress import CheckClock, EpochClock, Progress
from tla_jobs.train.runlog import Superseded, waiting_for_ranks
from tla_jobs.train.setup import Run

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


def train(cfg: TrainConfig, max_stalled_attempts: int = 0) -> dict:
    """Run training (or --eval-only evaluation) in this process; returns the summary / eval result.
    max_stalled_attempts: give up after this many attempts in a row with no new step (0 = never); the
    cluster profile's policy, passed by the job entry point."""
    os.environ.setdefault("PYTHONHASHSEED", "0")
    data, num_classes, model = setup.preflight(cfg)
    out = setup.output_dir(cfg)
    if not cfg.eval_only:
        rundir.refuse_linked_dirs(out)
        recipe.check_folder(cfg.model_dump(), out)  # before this attempt writes anything into the folder
    world = tdist.expected_world_size()
    if cfg.stage_data and data is not None and not cfg.eval_only:  # before the group: one rank per node copies
        from tla_jobs.data.staging import stage_for_run

        data = stage_for_run(cfg.stage_data, data, out, envvars.rank(), world)
    if world > 1 and envvars.rank() == 0 and not cfg.eval_only:
        waiting_for_ranks(out, world)
    info = tdist.init()
    stop = signals.StopSignals()
    try:
        setup.setup_logging(out, info.rank)
        if cfg.eval_only:
            return evaluate_checkpoint(cfg, model, data, num_classes, out, info)
        if cfg.stage_data and data is not None:
            log.info("reading the data from %s (--stage-data %s)", data, cfg.stage_data)
        run = setup.build_run(cfg, model, data, num_classes, out, info, stop)
        if info.is_main:
            ckpt.remove_orphans(out)
        p, resumed_from = ckpt.resume(run)
        setup.keep_global_batch(run, p)
        return fit(run, p, resumed_from, max_stalled_attempts)
    finally:
        stop.restore()
        tdist.shutdown(info)


def fit(run: Run, p: Progress, resumed_from: dict | None, max_stalled_attempts: int) -> dict:
    cfg, info, runlog = run.cfg, run.info, run.runlog
    runlog.take_ownership()
    runlog.config(cfg)
    runlog.metrics(p.history)
    runlog.record_attempt("start", p, resumed_from=resumed_from, world_size=info.world_size, version=__version__)
    runlog.refuse_if_stalled(max_stalled_attempts, p)
    log.info(
        "training %s (%s, labels: %s) on %s: %d images, %d classes, %d epochs x %d steps, global batch %d, "
        "lr %.2e, %d process(es) on %s%s%s",
        cfg.model, cfg.mixing(), resolve_path(cfg.align_path, info.device), run.data or "synthetic data",
        run.images, run.num_classes, cfg.epochs, run.train.steps_per_epoch, run.global_batch,
        run.lr, info.world_size, info.device, ", compiled" if cfg.compile else "",
        f", {run.accumulation} micro-batches of {cfg.batch_size} per rank and step" if run.accumulation > 1 else "",
    )
    setup.say_warnings(cfg, info.is_main)  # with the run's first lines: a refusal before them stays one line
    run.stop.install()
    run.curves = Curves(cfg, run.out, info.is_main, p.global_step)
    end_reason = "completed"
    try:
        clock = CheckClock(info, CHECK_EVERY_S, HEARTBEAT_EVERY_S, cfg.checkpoint_every_min)
        while p.epoch < cfg.epochs:
            run.opt.scheduler.step(p.epoch)
            lr = run.opt.optimizer.param_groups[0]["lr"]
            epoch_clock = EpochClock(p.step_in_epoch, run.train.steps_per_epoch, run.global_batch)
            run.train.waited = 0.0  # seconds this epoch waited for the loader (LoaderBatches adds to it)
            limit = train_one_epoch(run, p, clock, epoch_clock, lr)
            if limit and p.step_in_epoch < run.train.steps_per_epoch:
                end_reason = "max_steps"
                break
            end_epoch(run, p, epoch_clock, lr)
            clock.saved()
            if limit:
                end_reason = "max_steps"
                break
    except Interrupted as exc:
        interrupted(run, exc.signame, p)
    except Superseded as exc:
        superseded(exc)
    except BaseException as exc:
        if not isinstance(exc, SystemExit) and runlog.owns_run():
            runlog.record_attempt("end", p, reason="error", error=f"{exc.__class__.__name__}: {exc}"[:500])
        raise
    finally:
        run.curves.close()

    log.info("final weights checksum %s", ckpt.weights_checksum(run.models.model))
    summary = runlog.summary(p, end_reason, cfg, run.num_classes)
    runlog.heartbeat("finished", p, run.train.steps_per_epoch)
    runlog.record_attempt("end", p, reason=end_reason)
    return summary


def train_one_epoch(run: Run, p: Progress, clock: CheckClock, epoch_clock: EpochClock, lr: float) -> bool:
    """The epoch's remaining steps, with a check every few; True when --max-steps was reached."""
    cfg, steps_per_epoch = run.cfg, run.train.steps_per_epoch
    delay = step_delay(cfg)
    run.models.net.train()
    for micro in run.train.epoch(p.epoch, p.step_in_epoch):
        run.step(micro, p.global_step)
        p.step_in_epoch += 1
        p.global_step += 1
        epoch_clock.stepped(p.step_in_epoch)
        if delay:
            time.sleep(delay)
        if cfg.fail_at_step is not None and p.global_step == cfg.fail_at_step:
            raise RuntimeError(f"injected failure at step {p.global_step} (--fail-at-step, a test knob)")
        limit = cfg.max_steps is not None and p.global_step >= cfg.max_steps
        end = p.step_in_epoch >= steps_per_epoch
        due = clock.checkpoint_due()
        if not clock.now(run.stop.received is not None or due, force=limit or end):
            continue
        stop, due = check(run, p, clock, due)
        if clock.heartbeat_due():
            rates = {**run.rates(epoch_clock.rate(time.monotonic())), "data_wait": data_wait(run, epoch_clock)}
            run.runlog.heartbeat("training", p, steps_per_epoch, lr, rates)
            run.curves.step(p, rates)
        if stop or due or (limit and not end):
            ckpt.save(run, p)
            clock.saved()
        if stop:
            raise Interrupted(run.stop.received or "signal on another rank")
        if limit:
            return True
    return False


def data_wait(run: Run, epoch_clock: EpochClock) -> float:
    """The share of this epoch's time so far that the loop waited for the next batch (timm's data
    time, as a share): host clocks only, so it costs no host-device synchronisation. Near 0 when the
    loader keeps up; on a GPU the host runs ahead of the device, so a wait here is the device idle."""
    return min(run.train.waited / max(time.monotonic() - epoch_clock.start, 1e-9), 1.0)


def step_delay(cfg: TrainConfig) -> float:
    """--step-delay (a test knob); with --step-delay-once none once SLURM has requeued the job, so that a
    test which stops a run once does not wait for the slowed steps of the attempts after."""
    if cfg.step_delay_once and rundir.job_identity()["restart_count"] > 0:
        return 0.0
    return cfg.step_delay


def check(run: Run, p: Progress, clock: CheckClock, due: bool) -> tuple[bool, bool]:
    """The loop's one synchronisation point: read the device's sums, agree on stop and checkpoint
    (and whether rank 0 lost the run to another attempt), and set when the next check comes."""
    info = run.info
    superseded = info.is_main and not run.runlog.owns_run()
    flags = [run.stop.received is not None, due and info.is_main, superseded, clock.step_seconds()]
    if info.distributed:
        t = torch.tensor([float(f) for f in flags], dtype=torch.float64, device=info.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        values = torch.cat([t, run.step.sums]).tolist()
        run.step.sums.zero_()
        flags, sums = values[:4], values[4:]
    else:
        sums = run.step.read()
    clock.agreed(flags[3])
    if flags[2]:
        if info.is_main:
            run.runlog.check_owner()  # raises Superseded with who took over
        raise Superseded("rank 0's attempt was superseded")
    if sums[2]:
        raise TlaError(f"{int(sums[2])} non-finite loss value(s) before step {p.global_step}: training diverged "
                       "(try a lower --lr or --amp off)")
    p.fold(sums)
    return bool(flags[0]), bool(flags[1])


def end_epoch(run: Run, p: Progress, epoch_clock: EpochClock, lr: float) -> None:
    """Evaluate, append the epoch's metrics row, start the next epoch, checkpoint (best, every N)."""
    cfg, info, steps_per_epoch = run.cfg, run.info, run.train.steps_per_epoch
    run.runlog.heartbeat("evaluating", p, steps_per_epoch, lr)
    seconds = time.monotonic() - epoch_clock.start
    steady = epoch_clock.rate(time.monotonic())
    waited = data_wait(run, epoch_clock)

    def abort() -> bool:  # a stop signal during evaluation (agreed across ranks)
        return tdist.any_rank(run.stop.received is not None, info)

    res = evaluate(run.models.model, run.val, run.step.autocast, info, reduce=cfg.dist_eval, should_abort=abort)
    ema = run.models.ema
    if res is not None and ema is not None:  # DeiT reports the EMA weights' accuracy beside the model's
        res_ema = evaluate(ema.module, run.val, run.step.autocast, info, reduce=cfg.dist_eval, should_abort=abort)
        res = res_ema and {**res, "ema_acc1": res_ema["acc1"], "ema_acc5": res_ema["acc5"],
                           "ema_val_loss": res_ema["loss"]}
    if res is None:  # a stop signal came during evaluation: the epoch's training is saved
        ckpt.save(run, p)
        raise Interrupted(run.stop.received or "signal on another rank")
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
        **{k: res[k] for k in ("ema_acc1", "ema_acc5", "ema_val_loss") if k in res},
        "w_shift": shift_sum / shift_count if shift_count else None,
        **run.rates(epoch_clock.images / max(seconds, 1e-9)),
        "images_per_s_steady": steady,
        "data_wait": waited,
        "epoch_s": seconds,
        "global_step": p.global_step,
        "time": time.time(),
    }
    p.history.append(row)
    is_best = res["acc1"] > p.best_acc1
    p.best_acc1 = max(p.best_acc1, res["acc1"])
    log.info(
        "epoch %d/%d: train loss %.4f, val loss %.4f, top-1 %.2f, top-5 %.2f (best %.2f)%s, %.0f img/s%s, "
        "waiting for data %.0f%% of the time",
        p.epoch + 1, cfg.epochs, row["train_loss"], res["loss"], res["acc1"], res["acc5"], p.best_acc1,
        f", EMA top-1 {res['ema_acc1']:.2f}" if "ema_acc1" in res else "",
        row["images_per_s"], f", {row['tflops_per_device']:.1f} TFLOP/s per device"
        if row.get("tflops_per_device", 0) >= 0.05 else "",  # a CPU's toy model would read 0.0
        100 * waited,
    )
    p.next_epoch()
    extra = [ckpt.BEST] if is_best else []
    if cfg.checkpoint_every_epochs and p.epoch % cfg.checkpoint_every_epochs == 0:
        extra.append(rundir.CHECKPOINT_EPOCH.format(epoch=p.epoch))
    ckpt.save(run, p, extra)
    run.runlog.metrics(p.history)
    run.curves.epoch(row)
    run.runlog.heartbeat("training", p, steps_per_epoch, lr)


def superseded(exc: Superseded) -> NoReturn:
    log.warning("%s: stopping without writing anything more", exc)
    raise SystemExit(rundir.EXIT_SUPERSEDED) from None


def interrupted(run: Run, signame: str, p: Progress) -> None:
    """After the stop-signal checkpoint: record the end, then leave the way the scheduler expects."""
    log.warning("stopped by %s at epoch %d step %d; checkpoint written", signame, p.epoch, p.step_in_epoch)
    run.curves.close()  # before waiting to be killed
    try:
        run.runlog.heartbeat("interrupted", p, run.train.steps_per_epoch)
        run.runlog.record_attempt("end", p, reason=f"signal:{signame}")
    except Superseded as exc:
        superseded(exc)
    tdist.barrier(run.info)
    if signame == "SIGUSR2" and run.stop.submitit_requeue():
        pass  # on rank 0 submitit requeued and exited; other ranks fall through
    elif signals.must_wait_for_kill(signame):
        signals.wait_for_kill()
    raise SystemExit(rundir.EXIT_INTERRUPTED)
