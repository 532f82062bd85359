"""The tries of an attack experiment as a data set, and their share of each process.

One item is one try: its index and the indices of its composed batch
(``ComposedBatchSampler.batch(index)``, drawn when the item is asked for, in
O(K), so neither the start nor the memory of a run grows with its number of
tries). The images are not loaded here: a try loads
them itself, ``--max_size`` at a time, and again where a defense or an
extension needs the batch, so an item stays a few hundred integers however
large the images are.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, Sampler

if TYPE_CHECKING:
    from datamodules.composition import ComposedBatchSampler


class Tries(Dataset):
    """``tries[i]`` is ``(i, indices of batch i)`` of a :class:`ComposedBatchSampler`."""

    def __init__(self, batches: ComposedBatchSampler):
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.batches.batch(index)


class ShareOfTries(Sampler[int]):
    """Process ``rank`` of ``world_size`` takes tries rank, rank + world_size, ...

    By index, not by a shuffled split (as Lightning's ``DistributedSampler`` would
    do, padding the last round with repeats): every try is run exactly once, and
    which process ran it changes nothing, since its randomness comes from its
    index (``experiment.seeding``).
    """

    def __init__(self, num_tries: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not one of the {world_size} processes")
        # a range, not a list: a share of 100,000 tries is three integers
        self.indices = range(rank, num_tries, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
