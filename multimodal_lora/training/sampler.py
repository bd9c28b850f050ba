"""The order training examples are seen in: shuffled, reproducible, resumable, sharded.

Each epoch's order is a permutation drawn from ``seed + epoch`` alone, not from
a generator that advances as batches are drawn. So the order of epoch 5 is
known without replaying epochs 0–4, and a resumed run skips exactly the
micro-batches its checkpoint had consumed and sees the rest in the same order
as an uninterrupted run.

With several processes every global batch of ``batch_size × processes``
examples is cut into one slice per process; the last, short batch is topped up
from the start of the epoch's order so every process takes the same number of
steps (data-parallel processes must step together).
"""

from __future__ import annotations

import math

import torch


class EpochBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this process's lists of dataset indices for one epoch, from a given position.

    Args:
        size: number of examples.
        batch_size: examples per micro-batch per process.
        seed: the run's seed.
        rank, world: this process's index and the number of processes.

    Example:
        >>> sampler = EpochBatchSampler(10, 4, seed=0)
        >>> sampler.set_epoch(0, skip=1)   # resume after the first micro-batch
        >>> len(sampler)
        2
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.skip = 0

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(self.size / (self.batch_size * self.world))

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Choose the epoch's order, and how many of this epoch's micro-batches are already done."""
        self.epoch = epoch
        self.skip = skip

    def order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __len__(self) -> int:
        return self.batches_per_epoch - self.skip

    def __iter__(self):
        order = self.order(self.epoch)
        global_batch = self.batch_size * self.world
        for index in range(self.skip, self.batches_per_epoch):
            chunk = order[index * global_batch : (index + 1) * global_batch]
            while self.world > 1 and len(chunk) < global_batch:
                chunk = chunk + order[: global_batch - len(chunk)]
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            if mine:
                yield mine
