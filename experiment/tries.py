"""The tries of an attack experiment as a data set, and their share of each process.

One item is one try: its index and the indices of its composed batch (a
``ComposedBatchSampler`` batch). The images are not loaded here: a try loads
them itself, ``--max_size`` at a time, and again where a defense or an
extension needs the batch, so an item stays a few hundred integers however
large the images are.
"""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler


class Tries(Dataset):
    """``tries[i]`` is ``(i, indices of batch i)``."""

    def __init__(self, batches: list[list[int]]):
        self.batches = [torch.tensor(batch, dtype=torch.long) for batch in batches]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor]:
        return index, self.batches[index]


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
        self.indices = list(range(rank, num_tries, world_size))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
