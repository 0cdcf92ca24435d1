"""One order of the training samples per epoch, whatever the number of ranks (elastic exact resume).

An epoch is one sequence of sample indices, a function of (seed, epoch) only: a permutation of all
samples (numpy's PCG64 from the two), with repeated augmentation as DeiT's RASampler does it (each
index three times in a row, the epoch cut to the same length as without repeats, rounded down to a
multiple of 256). Global step s trains on positions [s·G, (s+1)·G) of that sequence, G the run's
global batch. The step is cut into M = G / B micro-batches of B samples; micro-batch k takes the
positions s·G + k + M·j (j < B), so the copies of one repeated image go to different micro-batches
(to different GPUs, as DeiT's strided split sends them). Rank r of W, with A = M / W accumulation
steps, trains micro-batches k = a·W + r for a = 0..A-1. A 2-rank run and a 1-rank run that
accumulates 2 micro-batches per step therefore form the same micro-batches from the same samples.

Each sample's augmentation is seeded by (seed, epoch, its position in the sequence), each
micro-batch's random draws (mixing boxes, random erasing, drop-path) by (seed, epoch, step, k):
nothing depends on the rank, the world size or the loader workers.

Written here, not taken from a library: timm's RepeatAugSampler and torch's DistributedSampler
split the epoch by rank (the order changes with the world size) and cannot start mid-epoch; Mosaic
Streaming does this for its own MDS format only (see docs/architecture.md).
This module imports no torch (the sampler in tla_jobs.data.loaders wraps it).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tla_jobs.errors import TlaError

NUM_REPEATS = 3  # DeiT's repeated augmentation
SELECTED_ROUND = 256  # RASampler's epoch length: the dataset size rounded down to a multiple of this


def epoch_sequence(n: int, seed: int, epoch: int, repeated: bool) -> np.ndarray:
    """The epoch's sample indices in training order (int64), independent of ranks and workers."""
    perm = np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)
    if not repeated:
        return perm
    length = n // SELECTED_ROUND * SELECTED_ROUND if n >= SELECTED_ROUND else n
    return np.repeat(perm, NUM_REPEATS)[:length]


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the sample at ``position`` of the epoch's sequence."""
    return (((seed * 1_000_003 + epoch) * 10_007) * 100_003 + position) % 2**63


def check_global_batch(global_batch: int, batch_size: int, world_size: int) -> int:
    """The accumulation steps A with batch x world size x A = global batch; a clear error otherwise."""
    per_step = batch_size * world_size
    if global_batch % per_step:
        raise TlaError(f"the global batch {global_batch} is not a multiple of --batch-size {batch_size} x "
                       f"{world_size} rank(s): run on a number of ranks that divides {global_batch // batch_size} "
                       "(or give the --batch-size the run started with)")
    return global_batch // per_step


@dataclass
class GlobalOrder:
    """Which samples a rank trains, step by step, in one epoch."""

    num_samples: int
    seed: int
    repeated: bool
    batch_size: int  # per micro-batch
    world_size: int
    rank: int
    global_batch: int

    def __post_init__(self) -> None:
        self.accumulation = check_global_batch(self.global_batch, self.batch_size, self.world_size)
        self.micro_batches = self.global_batch // self.batch_size  # M

    def epoch_length(self) -> int:
        if not self.repeated:
            return self.num_samples
        return self.num_samples // SELECTED_ROUND * SELECTED_ROUND if self.num_samples >= SELECTED_ROUND \
            else self.num_samples

    @property
    def steps_per_epoch(self) -> int:
        return self.epoch_length() // self.global_batch

    def micro_index(self, a: int) -> int:
        """k of this rank's a-th micro-batch of a step."""
        return a * self.world_size + self.rank

    def positions(self, step: int, k: int) -> np.ndarray:
        """The sequence positions of micro-batch k of global step ``step``."""
        return step * self.global_batch + k + self.micro_batches * np.arange(self.batch_size)

    def samples(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, int]]:
        """(index, augmentation seed) of this rank's samples from ``start_step`` on, micro-batch after
        micro-batch (A of them per step)."""
        seq = epoch_sequence(self.num_samples, self.seed, epoch, self.repeated)
        for step in range(start_step, self.steps_per_epoch):
            for a in range(self.accumulation):
                for pos in self.positions(step, self.micro_index(a)).tolist():
                    yield int(seq[pos]), sample_seed(self.seed, epoch, pos)

    def keys(self, epoch: int, step: int) -> list[int]:
        """Every sample index of global step ``step`` (all ranks), by micro-batch: what tests compare."""
        seq = epoch_sequence(self.num_samples, self.seed, epoch, self.repeated)
        return [int(seq[p]) for k in range(self.micro_batches) for p in self.positions(step, k)]
