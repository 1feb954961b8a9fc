"""The training sampler: a shuffled order that depends only on (seed, epoch), cut into global batches shared
by the processes, and resumable mid-epoch."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

__all__ = ["EpochSampler"]


class EpochSampler(Sampler[int]):
    """Shuffled indices that depend only on ``(seed, epoch)``, cut into global batches of ``batch_size``
    (the tail that fills no batch is dropped, ``drop_last``), of which this process takes its share.

    Global batch i is ``permutation[i * B:(i + 1) * B]`` whatever the number of processes; process r of K
    yields elements ``r * B/K`` to ``(r + 1) * B/K - 1`` of every batch (the role of
    ``DistributedSampler``), so K processes see together exactly the batches one process would. An epoch
    interrupted after k batches resumes exactly with ``set_epoch(epoch, skip=k * B)``.

    Args:
        num_samples: dataset length.
        seed: base seed (the same on every process).
        batch_size: global batch B (default 1: every index, one at a time).
        rank, world_size: this process and the number of processes; ``world_size`` must divide B.
    Raises:
        ValueError: ``world_size`` does not divide ``batch_size``, or ``rank`` is outside [0, world_size).
    """

    def __init__(self, num_samples: int, seed: int, batch_size: int = 1, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1 or world_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} must be a positive multiple of world_size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the permutation of ``epoch`` and drop its first ``skip`` indices (a multiple of the
        global batch)."""
        if not 0 <= skip <= self.num_samples or skip % self.batch_size:
            raise ValueError(f"skip must be a multiple of {self.batch_size} in [0, {self.num_samples}], got {skip}")
        self.epoch, self.skip = int(epoch), int(skip)

    def permutation(self, epoch: int) -> list[int]:
        """The full index order of ``epoch`` (the same on every process)."""
        mixed = np.random.SeedSequence([self.seed % 2**63, epoch]).generate_state(2, np.uint64)
        g = torch.Generator().manual_seed(int(mixed[0] % 2**63))
        return torch.randperm(self.num_samples, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        order, share = self.permutation(self.epoch), self.batch_size // self.world_size
        for start in range(self.skip, self.num_samples - self.batch_size + 1, self.batch_size):
            yield from order[start + self.rank * share:start + (self.rank + 1) * share]

    def __len__(self) -> int:
        batches = (self.num_samples - self.skip) // self.batch_size
        return batches * (self.batch_size // self.world_size)
