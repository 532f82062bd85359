"""The tries as a data set, each process's share of them, and their random streams."""

import pytest
import torch

from datamodules.composition import ComposedBatchSampler
from experiment.seeding import STREAMS, try_generator, try_seed
from experiment.tries import ShareOfTries, Tries


@pytest.mark.parametrize("num_tries,world_size", [(5, 2), (6, 3), (2, 4), (7, 1)])
def test_the_shares_hold_every_try_once(num_tries, world_size):
    shares = [list(ShareOfTries(num_tries, rank, world_size)) for rank in range(world_size)]
    assert sorted(i for share in shares for i in share) == list(range(num_tries))
    # by index: rank r holds r, r + W, ...; lengths differ by at most one
    assert shares[0] == list(range(0, num_tries, world_size))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1
    assert [len(ShareOfTries(num_tries, r, world_size)) for r in range(world_size)] == [
        len(share) for share in shares
    ]


def test_a_rank_outside_the_processes_is_refused():
    with pytest.raises(ValueError, match="rank 2 is not one of the 2 processes"):
        ShareOfTries(5, 2, 2)


def test_tries_are_the_composed_batches_with_their_index():
    targets = torch.arange(40) % 10
    sampler = ComposedBatchSampler(targets, 10, 8, "random", 4, seed=3)
    batches = list(sampler)
    tries = Tries(sampler)
    assert len(tries) == 4
    # in any order (as a process's share asks for them): try i is batch i
    for index in (3, 0, 2, 1):
        got_index, indices = tries[index]
        assert got_index == index and indices.tolist() == batches[index]
        assert indices.dtype == torch.long


def test_a_hundred_thousand_tries_are_drawn_only_when_asked_for():
    targets = torch.arange(60000) % 10
    sampler = ComposedBatchSampler(targets, 10, 24, "random", 100_000, seed=0)
    tries = Tries(sampler)
    share = ShareOfTries(len(tries), 1, 2)
    assert len(share) == 50_000 and isinstance(share.indices, range)
    index, indices = tries[99_999]
    assert index == 99_999 and indices.tolist() == sampler.batch(99_999).tolist()


def test_streams_depend_on_seed_index_and_name_only():
    seeds = {try_seed(s, i, name) for s in (0, 1) for i in (0, 1) for name in STREAMS}
    assert len(seeds) == 12  # seed 1, try 0 is not seed 0, try 1; no stream shares a seed
    assert try_seed(5, 3, "client") == try_seed(5, 3, "client")
    assert all(0 <= seed < 2**64 for seed in seeds)
    a = torch.rand(4, generator=try_generator(7, 2, "guess"))
    b = torch.rand(4, generator=try_generator(7, 2, "guess"))
    assert torch.equal(a, b)
    # negative seeds are valid --seed values
    assert try_seed(-1, 0, "guess") != try_seed(1, 0, "guess")
    with pytest.raises(ValueError, match="unknown random stream 'shuffle'"):
        try_seed(0, 0, "shuffle")
