"""Per-try random streams: try i's randomness comes from (seed, i) alone.

A try that drew from a stream shared by the whole run would depend on how many
tries came before it, so the tries could not be spread over processes (or one of
them rerun on its own) and give the same numbers. Each randomised part of a try
(the ``random`` attack's guesses, the dp defense's noise, the FedAvg client's
shuffles) gets its own generator, seeded from the run's seed, the try's index and
the stream's name through numpy's ``SeedSequence``, whose outputs for nearby
inputs are uncorrelated (seed 1, try 0 is not seed 0, try 1).

The batches themselves come from ``ComposedBatchSampler.batch(i)``, whose generator is
keyed by (seed, i) the same way (``datamodules.composition.keyed_generator``): a process
draws only its own tries' batches, each in O(K), when it reaches them.
"""

from __future__ import annotations

import numpy as np
import torch

#: the randomised parts of a try, each with its own stream
STREAMS = ("guess", "defense", "client")


def try_seed(seed: int, index: int, stream: str) -> int:
    """A 64-bit seed for ``stream`` of try ``index`` of a run seeded with ``seed``."""
    if stream not in STREAMS:
        raise ValueError(f"unknown random stream {stream!r}; known: {', '.join(STREAMS)}")
    # SeedSequence takes non-negative entropy; a negative --seed is its 64-bit two's complement.
    entropy = seed & (2**64 - 1)
    sequence = np.random.SeedSequence(entropy, spawn_key=(index, STREAMS.index(stream)))
    high, low = sequence.generate_state(2, dtype=np.uint32)
    return int(high) << 32 | int(low)


def try_generator(seed: int, index: int, stream: str) -> torch.Generator:
    """A CPU generator for ``stream`` of try ``index``; the same on every process and device."""
    return torch.Generator().manual_seed(try_seed(seed, index, stream))
