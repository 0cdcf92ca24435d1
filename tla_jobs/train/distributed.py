"""Process-group set-up from the environment: torchrun's variables, or SLURM/local tasks through
submitit's JobEnvironment. NCCL on GPUs, gloo on CPU; one process needs no group at all."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tla_jobs import envvars
from tla_jobs.errors import TlaError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def export_submitit_env() -> None:
    """Inside a submitit task (SLURM or local executor) and not under torchrun: export RANK,
    WORLD_SIZE, MASTER_ADDR (the job's first host), MASTER_PORT (seeded by the job id) etc."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ and "SLURM_JOB_ID" not in os.environ:
        return
    try:
        import submitit

        submitit.JobEnvironment()  # raises outside a submitit job
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except RuntimeError:
        return


def rendezvous_timeout_s() -> float:
    """How long ranks wait for each other (forming the group, then any collective): long enough for
    a slow node to start and for rank 0's checkpoint write, short enough that a job whose rank died
    before the group formed does not sit idle for half an hour (srun --kill-on-bad-exit ends the
    others when a rank exits; this bounds the case where one never starts)."""
    return envvars.rendezvous_timeout_s()


def expected_world_size() -> int:
    export_submitit_env()
    return envvars.world_size()


def init() -> DistInfo:
    export_submitit_env()
    world, rank, local_rank = envvars.world_size(), envvars.rank(), envvars.local_rank()
    local_world = envvars.local_world_size(world)
    if rank >= world:
        raise TlaError(f"environment: RANK={rank} is not below WORLD_SIZE={world}")
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
        # Share the cores between the processes of this node instead of oversubscribing them
        # (TLA_CPU_THREADS: set by a local sweep that runs several trainings side by side).
        threads = envvars.cpu_threads() or (os.cpu_count() or 1) // max(1, local_world)
        torch.set_num_threads(max(1, threads))
    if world > 1 and not dist.is_initialized():
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:  # torchrun and SLURM jobs set them; a hand-set WORLD_SIZE alone cannot rendezvous
            raise TlaError(f"environment: WORLD_SIZE={world} but {' and '.join(missing)} not set: the ranks need "
                           "an address to meet (torchrun and SLURM jobs set them)")
        try:
            dist.init_process_group(
                backend="nccl" if cuda else "gloo",
                init_method="env://",
                timeout=datetime.timedelta(seconds=rendezvous_timeout_s()),
                **({"device_id": device} if cuda else {}),
            )
        except dist.DistError as exc:
            raise TlaError(
                f"rank {rank}: the {world} ranks did not all meet at {os.environ.get('MASTER_ADDR')}:"
                f"{os.environ.get('MASTER_PORT')} within {rendezvous_timeout_s():.0f} s "
                f"(TLA_RENDEZVOUS_TIMEOUT_S): {str(exc).splitlines()[0][:200]}"
            ) from None
    return DistInfo(rank, world, local_rank, local_world, device)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when the flag is set on any rank (so every rank stops at the same step)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj, info: DistInfo) -> list:
    if not info.distributed:
        return [obj]
    out = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def shutdown(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.destroy_process_group()
