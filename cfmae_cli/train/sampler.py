"""Deterministic data order and per-sample / per-micro-batch seeds, independent of how work is split.

One optimizer step consumes a *global batch* of ``batch × world × accum`` images, cut into chunks of
``batch`` images. Rank ``r`` at micro-batch ``a`` of the step takes chunk ``c = a·world + r``. So 2 processes
with batch B and 1 accumulation step see exactly the images (in the same order) that 1 process with batch B
and 2 accumulation steps sees; every augmentation and mask is seeded from (seed, epoch, index) or
(seed, epoch, step, chunk), so the two runs are the same computation up to float summation order. A resumed
run restarts the order at any micro-batch of an epoch.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler

from cfmae_cli.seeding import mix_seed


class ChunkedSampler(Sampler):
    """Yields ``(epoch, index)`` keys for one rank: the epoch's permutation, cut as described above.

    ``set_epoch(epoch, start_micro)`` chooses the epoch and the first micro-batch (for a mid-epoch resume).
    The remainder of the dataset that does not fill a global batch is left out of the epoch.
    """

    def __init__(self, size: int, batch: int, world: int, rank: int, accum: int, seed: int):
        self.size, self.batch, self.world, self.rank, self.accum, self.seed = size, batch, world, rank, accum, seed
        self.steps = size // (batch * world * accum)
        self.epoch, self.start_micro = 0, 0

    def set_epoch(self, epoch: int, start_micro: int = 0) -> None:
        self.epoch, self.start_micro = epoch, start_micro

    def __len__(self) -> int:
        return (self.steps * self.accum - self.start_micro) * self.batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        perm = torch.randperm(self.size, generator=g).tolist()
        per_step = self.batch * self.world * self.accum
        for micro in range(self.start_micro, self.steps * self.accum):
            step, a = divmod(micro, self.accum)
            start = step * per_step + (a * self.world + self.rank) * self.batch
            for index in perm[start:start + self.batch]:
                yield self.epoch, index


def chunk_id(micro_in_step: int, world: int, rank: int) -> int:
    """The chunk of the global batch that this rank's micro-batch holds (see the module doc)."""
    return micro_in_step * world + rank
