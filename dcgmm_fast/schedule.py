"""The training order: which images each step takes, on one process or as one rank of many.

As the original: the images are shuffled once (seeded) and the same order of full batches (remainder dropped)
repeats every epoch; ``reshuffle=True`` draws a new seeded order each epoch instead. With ``world_size`` ranks,
``batch_size`` is the global batch and rank r takes slice r of each one (equal shares, in rank order: the
DistributedSampler idea, deterministic). ``Schedule`` is also a batch sampler, so a ``DataLoader`` over any map-style
dataset streams exactly the batches in-memory training takes::

    loader = DataLoader(dataset, batch_sampler=Schedule(len(dataset), 100, seed=0), num_workers=0)
"""
from __future__ import annotations

from typing import Iterator, List

import torch
from torch.utils.data import Sampler


class Schedule(Sampler):
    """Batches of indices into n images. ``batch(step)`` -> this rank's (batch_size // world_size,) int64 indices
    of global step ``step`` (epoch ``step // steps_per_epoch``); iterating yields one epoch of them as lists
    (``set_epoch`` picks which; each iteration then moves to the next epoch)."""

    def __init__(self, n: int, batch_size: int, seed: int, *, reshuffle: bool = False, rank: int = 0,
                 world_size: int = 1):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer, got {batch_size!r}")
        if n // batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} is larger than the {n} training images")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank: expected 0 <= rank < world_size, got rank {rank} of {world_size}")
        if batch_size % world_size != 0:
            raise ValueError(f"batch_size: the global batch of {batch_size} images does not split evenly over "
                             f"{world_size} processes; give a multiple of {world_size}")
        self.n, self.batch_size, self.seed, self.reshuffle = int(n), batch_size, int(seed), reshuffle
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // batch_size
        self.share = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.epoch, self.first_step = 0, 0
        self._cached = (-1, None)

    def order(self, epoch: int = 0) -> torch.Tensor:
        """(steps_per_epoch, batch_size // world_size) int64: this rank's indices of every step of ``epoch``."""
        key = epoch if self.reshuffle else 0
        if self._cached[0] != key:
            seed = self.seed if key == 0 else (self.seed * 1_000_003 + key) % 2**63
            g = torch.Generator().manual_seed(seed)
            full = torch.randperm(self.n, generator=g)[: self.steps_per_epoch * self.batch_size]
            self._cached = (key, full.view(self.steps_per_epoch, self.batch_size)[:, self.share].contiguous())
        return self._cached[1]

    def batch(self, step: int) -> torch.Tensor:
        return self.order(step // self.steps_per_epoch)[step % self.steps_per_epoch]

    def set_epoch(self, epoch: int, first_step: int = 0) -> None:
        """The next iteration yields epoch ``epoch`` from its step ``first_step`` on (a resumed run)."""
        self.epoch, self.first_step = int(epoch), int(first_step)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self) -> Iterator[List[int]]:
        order = self.order(self.epoch)[self.first_step:]
        self.epoch, self.first_step = self.epoch + 1, 0
        return iter(order.tolist())
