"""Batch composition: exact label mixes, valid distinct indices, seeding and errors."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from datamodules.composition import (
    DISTRIBUTIONS,
    BatchComposer,
    ComposedBatchSampler,
    check_composition,
    class_counts,
    compose_batch,
    keyed_generator,
)
from user_errors import CompositionError, DataError, UserError


def shuffled_targets(class_sizes, seed=0):
    """Labels with the given number of samples per class, in a shuffled order."""
    sizes = torch.as_tensor(class_sizes)
    labels = torch.repeat_interleave(torch.arange(sizes.numel()), sizes)
    order = torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed))
    return labels[order]


TEN_BY_100 = [100] * 10
HUNDRED_BY_100 = [100] * 100
# 100 classes from 0 to 99 samples: class 0 is empty, class c holds c samples.
UNEQUAL_100 = list(range(100))


def draw(class_sizes, num_images, distribution, seed=0, **options):
    targets = shuffled_targets(class_sizes)
    generator = torch.Generator().manual_seed(seed)
    indices = compose_batch(
        targets, len(class_sizes), num_images, distribution, generator, **options
    )
    return targets, indices


def assert_valid(targets, indices, num_images):
    assert indices.dtype == torch.long
    assert indices.shape == (num_images,)
    assert indices.unique().numel() == num_images
    assert int(indices.min()) >= 0 and int(indices.max()) < targets.numel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_custom_imbalanced_counts(seed):
    targets, indices = draw(HUNDRED_BY_100, 24, "custom_imbalanced", seed)
    assert_valid(targets, indices, 24)
    expected = torch.zeros(100, dtype=torch.long)
    expected[[0, 18, 92]] = torch.tensor([1, 22, 1])
    assert torch.equal(class_counts(targets, indices, 100), expected)


def test_custom_imbalanced_on_unequal_sizes_needs_class_0():
    sizes = [1] + UNEQUAL_100[1:]
    targets, indices = draw(sizes, 20, "custom_imbalanced")
    counts = class_counts(targets, indices, 100)
    assert (counts[0], counts[18], counts[92]) == (1, 18, 1)
    assert int(counts.sum()) == 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_custom_balanced_counts(seed):
    targets, indices = draw(HUNDRED_BY_100, 24, "custom_balanced", seed)
    assert_valid(targets, indices, 24)
    expected = torch.zeros(100, dtype=torch.long)
    expected[[0, 18, 92]] = 8
    assert torch.equal(class_counts(targets, indices, 100), expected)


@pytest.mark.parametrize("class_sizes", [TEN_BY_100, HUNDRED_BY_100, UNEQUAL_100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_balanced_counts(class_sizes, seed):
    targets, indices = draw(class_sizes, 24, "balanced", seed, num_uniform_cls=8)
    assert_valid(targets, indices, 24)
    counts = class_counts(targets, indices, len(class_sizes))
    assert int((counts == 3).sum()) == 8
    assert int((counts > 0).sum()) == 8


@pytest.mark.parametrize("class_sizes", [TEN_BY_100, HUNDRED_BY_100, UNEQUAL_100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unique_counts(class_sizes, seed):
    targets, indices = draw(class_sizes, 10, "unique", seed)
    assert_valid(targets, indices, 10)
    counts = class_counts(targets, indices, len(class_sizes))
    assert int((counts == 1).sum()) == 10
    assert int(counts.max()) == 1


def test_unique_uses_k_classes_of_100():
    targets, indices = draw(HUNDRED_BY_100, 64, "unique")
    counts = class_counts(targets, indices, 100)
    assert int((counts == 1).sum()) == 64 and int(counts.max()) == 1


@pytest.mark.parametrize("class_sizes", [TEN_BY_100, HUNDRED_BY_100, UNEQUAL_100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_extreme_counts(class_sizes, seed):
    targets, indices = draw(class_sizes, 24, "extreme", seed)
    assert_valid(targets, indices, 24)
    counts = class_counts(targets, indices, len(class_sizes))
    assert int((counts > 0).sum()) == 1
    assert int(counts.max()) == 24


def test_extreme_picks_only_classes_large_enough_and_all_of_them():
    targets = shuffled_targets(UNEQUAL_100)
    generator = torch.Generator().manual_seed(0)
    chosen = set()
    for _ in range(300):
        indices = compose_batch(targets, 100, 95, "extreme", generator)
        chosen.add(int(targets[indices[0]]))
    # Only classes 95..99 hold 95 samples.
    assert chosen == {95, 96, 97, 98, 99}


def test_balanced_picks_only_classes_large_enough():
    targets = shuffled_targets(UNEQUAL_100)
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        indices = compose_batch(targets, 100, 80, "balanced", generator, num_uniform_cls=4)
        counts = class_counts(targets, indices, 100)
        assert int((counts == 20).sum()) == 4
        assert int(counts[:20].sum()) == 0


@pytest.mark.parametrize("class_sizes", [TEN_BY_100, HUNDRED_BY_100, UNEQUAL_100])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random2_counts(class_sizes, seed):
    targets, indices = draw(class_sizes, 24, "random2", seed, num_target_cls=5)
    assert_valid(targets, indices, 24)
    counts = class_counts(targets, indices, len(class_sizes))
    assert int((counts > 0).sum()) == 5
    assert int(counts.sum()) == 24


def test_random2_with_ten_target_classes_of_100():
    targets, indices = draw(HUNDRED_BY_100, 64, "random2", num_target_cls=10)
    counts = class_counts(targets, indices, 100)
    assert int((counts >= 1).sum()) == 10 and int(counts.sum()) == 64


def test_random2_split_varies_and_is_uniform():
    # Two classes and K = 5: the splits 1+4, 2+3, 3+2, 4+1 are equally likely,
    # so the multisets {1, 4} and {2, 3} each come up half of the time.
    targets = shuffled_targets(TEN_BY_100)
    generator = torch.Generator().manual_seed(0)
    draws = 2000
    smaller_part = []
    for _ in range(draws):
        indices = compose_batch(targets, 10, 5, "random2", generator, num_target_cls=2)
        counts = class_counts(targets, indices, 10)
        parts = counts[counts > 0]
        assert parts.numel() == 2 and int(parts.sum()) == 5
        smaller_part.append(int(parts.min()))
    ones = smaller_part.count(1) / draws
    # Standard deviation of the fraction is 0.011; allow about 5 of them.
    assert 0.44 < ones < 0.56
    assert set(smaller_part) == {1, 2}


def test_random2_only_uses_classes_that_can_supply_their_part():
    # Classes 1..9 hold a single sample, class 0 holds 100: with K = 40 over two
    # classes, class 0 must take 39 and the other class 1.
    sizes = [100] + [1] * 9
    targets = shuffled_targets(sizes)
    generator = torch.Generator().manual_seed(0)
    partners = set()
    for _ in range(100):
        indices = compose_batch(targets, 10, 40, "random2", generator, num_target_cls=2)
        counts = class_counts(targets, indices, 10)
        assert int(counts[0]) == 39 and int(counts.sum()) == 40
        partners.add(int(counts[1:].argmax()) + 1)
    assert partners == set(range(1, 10))


def test_random2_gives_up_with_one_line_when_splits_almost_never_fit():
    # Only the exact split 1+2+...+10 over the matching classes fits.
    targets = shuffled_targets(list(range(1, 11)))
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(CompositionError) as raised:
        compose_batch(targets, 10, 55, "random2", generator, num_target_cls=10)
    message = str(raised.value)
    assert "\n" not in message
    assert message == (
        "distribution 'random2' found no random split of 55 images over 10 classes "
        "that the class sizes can supply in 2048 tries (largest class holds 10); "
        "use fewer images or more target classes"
    )


@pytest.mark.parametrize("class_sizes", [TEN_BY_100, UNEQUAL_100])
def test_random_counts(class_sizes):
    targets, indices = draw(class_sizes, 64, "random")
    assert_valid(targets, indices, 64)
    assert int(class_counts(targets, indices, len(class_sizes)).sum()) == 64


def test_random_covers_classes_uniformly():
    targets = shuffled_targets(TEN_BY_100)
    generator = torch.Generator().manual_seed(0)
    draws, k = 2000, 10
    total = torch.zeros(10, dtype=torch.long)
    for _ in range(draws):
        total += class_counts(targets, compose_batch(targets, 10, k, "random", generator), 10)
    expected = draws * k / 10
    # Each count has a standard deviation below sqrt(20000 * 0.1 * 0.9) = 42.4.
    assert (total.float() - expected).abs().max() < 5 * 42.4


def test_random_covers_samples_of_a_whole_split():
    targets = shuffled_targets([30, 20, 10])
    generator = torch.Generator().manual_seed(0)
    seen = torch.zeros(60, dtype=torch.bool)
    for _ in range(60):
        seen[compose_batch(targets, 3, 6, "random", generator)] = True
    assert bool(seen.all())


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_reproducible_under_a_seed_and_different_under_another(distribution):
    first = draw(HUNDRED_BY_100, 24, distribution, seed=7)[1]
    again = draw(HUNDRED_BY_100, 24, distribution, seed=7)[1]
    other = draw(HUNDRED_BY_100, 24, distribution, seed=8)[1]
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("distribution", DISTRIBUTIONS)
def test_global_rng_is_left_alone(distribution):
    torch.manual_seed(123)
    state = torch.get_rng_state()
    draw(HUNDRED_BY_100, 24, distribution)
    assert torch.equal(torch.get_rng_state(), state)


def test_class_counts():
    targets = torch.tensor([2, 0, 2, 1, 2])
    assert class_counts(targets, torch.tensor([0, 2, 3]), 4).tolist() == [0, 1, 2, 0]


def test_labels_outside_the_classes_are_a_data_error():
    with pytest.raises(DataError, match=r"labels must lie in 0\.\.9, found 0\.\.10"):
        compose_batch(torch.arange(11), 10, 2, "random", torch.Generator())


def make_sampler(distribution="balanced", num_batches=5, seed=3, **options):
    targets = shuffled_targets(HUNDRED_BY_100)
    sampler = ComposedBatchSampler(targets, 100, 24, distribution, num_batches, seed, **options)
    return targets, sampler


def test_sampler_with_dataloader_yields_composed_batches_again_and_again():
    targets, sampler = make_sampler(num_uniform_cls=4)
    images = torch.arange(targets.numel(), dtype=torch.float32).unsqueeze(1)
    loader = DataLoader(TensorDataset(images, targets), batch_sampler=sampler)
    assert len(sampler) == 5 and len(loader) == 5

    first = [(x.clone(), y.clone()) for x, y in loader]
    second = list(loader)
    assert len(first) == 5
    for (x, y), (x2, y2) in zip(first, second):
        assert torch.equal(x, x2) and torch.equal(y, y2)
        counts = torch.bincount(y, minlength=100)
        assert int((counts == 6).sum()) == 4 and int(counts.sum()) == 24
        assert torch.equal(targets[x.squeeze(1).long()], y)
    assert len({tuple(x.squeeze(1).tolist()) for x, _ in first}) == 5


def test_sampler_batch_i_is_compose_batch_with_the_generator_keyed_by_seed_and_i():
    targets, sampler = make_sampler("random2", num_target_cls=6)
    batches = list(sampler)
    for index in (0, 3):
        expected = compose_batch(
            targets, 100, 24, "random2", keyed_generator(3, index), num_target_cls=6
        )
        assert batches[index] == expected.tolist() == sampler.batch(index).tolist()
    # any batch on its own, in any order: the same as in the whole sequence
    assert sampler.batch(4).tolist() == batches[4]
    with pytest.raises(IndexError, match="batch 5 is not one of the 5 batches"):
        sampler.batch(5)


def test_sampler_seed_changes_the_batches():
    assert list(make_sampler(seed=0)[1]) != list(make_sampler(seed=1)[1])


def test_random_draws_every_ordered_pair_equally_often():
    # K = 2 of N = 5: each of the 20 ordered pairs has probability 1/20.
    composer = BatchComposer(torch.arange(5), 5, 2, "random")
    generator = torch.Generator().manual_seed(0)
    draws = 20000
    pairs = torch.stack([composer.draw(generator) for _ in range(draws)])
    codes = torch.bincount(pairs[:, 0] * 5 + pairs[:, 1], minlength=25)
    assert codes[torch.arange(5) * 6].sum() == 0  # never one sample twice
    observed = codes[codes > 0].double()
    assert observed.numel() == 20
    chi2 = float(((observed - draws / 20) ** 2 / (draws / 20)).sum())
    # chi-square with 19 degrees of freedom: P(chi2 > 43.8) = 0.001
    assert chi2 < 43.8


def test_a_class_draw_takes_every_sample_of_its_class_equally_often():
    # extreme, K = 3 of a class of 6: each sample is in the batch with probability 1/2.
    targets = shuffled_targets([6, 6])
    composer = BatchComposer(targets, 2, 3, "extreme")
    generator = torch.Generator().manual_seed(1)
    hits = torch.zeros(12)
    draws = 6000
    for _ in range(draws):
        batch = composer.draw(generator)
        assert targets[batch].unique().numel() == 1 and batch.unique().numel() == 3
        hits[batch] += 1
    # each of the 12 samples is chosen in half of its class's draws (about draws / 4):
    # a binomial's standard deviation is below sqrt(6000 * 0.25) = 38.7
    assert (hits - draws / 4).abs().max() < 5 * 38.7


def test_a_draw_costs_the_batch_not_the_split(monkeypatch):
    """The composer sorts the split once; a draw then touches K positions: drawing 24 of
    a million samples builds no random tensor of the split's size (a randperm of it would)."""
    targets = torch.randint(0, 1000, (1_000_000,), generator=torch.Generator().manual_seed(0))
    sizes = []
    for name in ("randperm", "rand", "tensor"):
        original = getattr(torch, name)

        def recorded(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            sizes.append(out.numel())
            return out

        monkeypatch.setattr(torch, name, recorded)
    for distribution in ("random", "balanced", "extreme", "unique"):
        composer = BatchComposer(targets, 1000, 24, distribution)
        sizes.clear()
        batch = composer.draw(torch.Generator().manual_seed(0))
        assert batch.numel() == 24 and batch.unique().numel() == 24
        # at most the classes (a random pick of 1000) and the batch
        assert sizes and max(sizes) <= 1000, (distribution, sizes)


def test_sampler_validates_in_its_constructor():
    targets = shuffled_targets(TEN_BY_100)
    with pytest.raises(CompositionError, match="distribution 'unique' needs one class per image"):
        ComposedBatchSampler(targets, 10, 24, "unique", num_batches=3)
    with pytest.raises(CompositionError, match="num_batches must be at least 1, got 0"):
        ComposedBatchSampler(targets, 10, 4, "unique", num_batches=0)


IMPOSSIBLE = [
    (
        TEN_BY_100,
        24,
        "uniform",
        {},
        "unknown batch distribution 'uniform'; valid: random, random2, balanced, extreme, "
        "unique, custom_imbalanced, custom_balanced",
    ),
    (TEN_BY_100, 0, "random", {}, "num_images must be at least 1, got 0"),
    ([3, 0, 2], 6, "random", {}, "6 images requested but the split holds only 5 samples"),
    (
        TEN_BY_100,
        24,
        "random2",
        {"num_target_cls": 0},
        "distribution 'random2' needs num_target_cls >= 1, got 0",
    ),
    (
        [5, 0, 5, 5],
        12,
        "random2",
        {"num_target_cls": 4},
        "distribution 'random2' needs 4 target classes but only 3 classes have samples",
    ),
    (
        TEN_BY_100,
        4,
        "random2",
        {"num_target_cls": 5},
        "distribution 'random2' needs at least one image per target class: 4 images for 5 classes",
    ),
    (
        [10, 3, 20, 1],
        32,
        "random2",
        {"num_target_cls": 2},
        "distribution 'random2' cannot fit 32 images into 2 classes: "
        "the 2 largest classes hold only 30 samples",
    ),
    (
        TEN_BY_100,
        24,
        "balanced",
        {"num_uniform_cls": 0},
        "distribution 'balanced' needs num_uniform_cls >= 1, got 0",
    ),
    (
        TEN_BY_100,
        24,
        "balanced",
        {"num_uniform_cls": 12},
        "distribution 'balanced' needs 12 classes but only 10 classes have samples",
    ),
    (
        TEN_BY_100,
        25,
        "balanced",
        {"num_uniform_cls": 8},
        "distribution 'balanced' needs num_images divisible by num_uniform_cls: "
        "25 images over 8 classes",
    ),
    (
        [2, 2, 5, 5, 9, 1],
        12,
        "balanced",
        {"num_uniform_cls": 4},
        "distribution 'balanced' needs 4 classes with 3 samples each "
        "but only 3 classes have that many",
    ),
    (
        [10, 23, 5],
        24,
        "extreme",
        {},
        "distribution 'extreme' needs one class with 24 samples but the largest holds 23",
    ),
    (
        TEN_BY_100,
        24,
        "unique",
        {},
        "distribution 'unique' needs one class per image: 24 images but only 10 classes",
    ),
    (
        [4, 0, 4, 4],
        4,
        "unique",
        {},
        "distribution 'unique' needs one class per image: 4 images but only 3 classes",
    ),
    (
        TEN_BY_100,
        24,
        "custom_imbalanced",
        {},
        "distribution 'custom_imbalanced' uses classes 0, 18 and 92 "
        "but the split has only 10 classes",
    ),
    (
        HUNDRED_BY_100,
        2,
        "custom_imbalanced",
        {},
        "distribution 'custom_imbalanced' needs at least 3 images "
        "(1, K - 2 and 1 of classes 0, 18 and 92), got 2",
    ),
    (
        UNEQUAL_100,
        24,
        "custom_imbalanced",
        {},
        "distribution 'custom_imbalanced' needs 1 sample of class 0 but the split holds 0",
    ),
    (
        [1] + UNEQUAL_100[1:],
        24,
        "custom_imbalanced",
        {},
        "distribution 'custom_imbalanced' needs 22 samples of class 18 but the split holds 18",
    ),
    (
        [1] * 92 + [0] * 8,
        3,
        "custom_imbalanced",
        {},
        "distribution 'custom_imbalanced' needs 1 sample of class 92 but the split holds 0",
    ),
    (
        HUNDRED_BY_100,
        25,
        "custom_balanced",
        {},
        "distribution 'custom_balanced' needs num_images divisible by 3 "
        "(classes 0, 18 and 92), got 25",
    ),
    (
        [100] * 92,
        24,
        "custom_balanced",
        {},
        "distribution 'custom_balanced' uses classes 0, 18 and 92 "
        "but the split has only 92 classes",
    ),
    (
        [100] * 92 + [7] * 8,
        24,
        "custom_balanced",
        {},
        "distribution 'custom_balanced' needs 8 samples of class 92 but the split holds 7",
    ),
]


@pytest.mark.parametrize(
    ("class_sizes", "num_images", "distribution", "options", "message"),
    IMPOSSIBLE,
    ids=[f"{case[2]}-{i}" for i, case in enumerate(IMPOSSIBLE)],
)
def test_impossible_requests_name_the_reason(
    class_sizes, num_images, distribution, options, message
):
    sizes = torch.tensor(class_sizes)
    with pytest.raises(CompositionError) as raised:
        check_composition(sizes, num_images, distribution, **options)
    assert str(raised.value) == message
    assert isinstance(raised.value, UserError)

    # compose_batch refuses the same request before drawing anything.
    targets = shuffled_targets(class_sizes)
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    with pytest.raises(CompositionError) as raised:
        compose_batch(targets, len(class_sizes), num_images, distribution, generator, **options)
    assert str(raised.value) == message
    assert torch.equal(generator.get_state(), state)
