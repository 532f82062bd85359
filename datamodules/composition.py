"""Batch composition: which samples of a split form one attacked batch of K images.

The label distribution of the private batch is the experimental variable of a
label-leakage study, so it is drawn here, apart from the data sets:

``random``             K samples uniformly without replacement from the whole split.
``random2``            ``num_target_cls`` random classes and a uniformly random split
                       of K among them, at least one image each.
``balanced``           ``num_uniform_cls`` random classes with K / ``num_uniform_cls`` each.
``extreme``            all K images from one random class.
``unique``             K distinct random classes with one image each.
``custom_imbalanced``  classes 0, 18 and 92 with 1, K - 2 and 1 images.
``custom_balanced``    classes 0, 18 and 92 with K / 3 images each.

Impossible requests are refused by :func:`check_composition` with a one-line
:class:`~user_errors.CompositionError` before anything is drawn.
:func:`compose_batch` calls it on every call (a bincount and a few comparisons),
and :class:`BatchComposer` (so :class:`ComposedBatchSampler`) once, in its constructor.

All randomness comes from the ``torch.Generator`` passed in, and a draw costs
O(K) whatever the size of the split: :class:`BatchComposer` sorts the split's
indices by class once, and a draw picks K positions in it by a partial
Fisher-Yates shuffle that touches only the positions it picks. Batch ``i`` of
:class:`ComposedBatchSampler` comes from its own generator, seeded from
``(seed, i)`` alone (:func:`keyed_generator`), so any one batch is drawn without
the ones before it: a run of 100,000 tries starts as soon as one of 50, and
processes that split the tries draw only their own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Sampler

from user_errors import CompositionError, DataError

DISTRIBUTIONS = (
    "random",
    "random2",
    "balanced",
    "extreme",
    "unique",
    "custom_imbalanced",
    "custom_balanced",
)

# The classes of the paper's hand-picked compositions.
CUSTOM_CLASSES = (0, 18, 92)

# random2 draws (classes, split) pairs in blocks of this many and keeps the first
# pair whose classes can all supply their share; after the last block it gives up.
_RANDOM2_BLOCK = 256
_RANDOM2_BLOCKS = 8


def check_composition(
    class_sizes: torch.Tensor,
    num_images: int,
    distribution: str,
    num_target_cls: int = 10,
    num_uniform_cls: int = 8,
) -> None:
    """Raise :class:`CompositionError` if the batch cannot be drawn from the split.

    ``class_sizes`` is the (C,) number of samples of each class in the split.
    Only the option of the chosen distribution is checked (``num_target_cls`` for
    ``random2``, ``num_uniform_cls`` for ``balanced``).
    """
    if distribution not in DISTRIBUTIONS:
        raise CompositionError(
            f"unknown batch distribution {distribution!r}; valid: {', '.join(DISTRIBUTIONS)}"
        )
    if class_sizes.dim() != 1:
        raise ValueError(
            f"class_sizes must be one-dimensional, got shape {tuple(class_sizes.shape)}"
        )
    sizes = class_sizes.to(device="cpu", dtype=torch.long)
    num_samples = int(sizes.sum())
    k = num_images
    if k < 1:
        raise CompositionError(f"num_images must be at least 1, got {k}")
    if k > num_samples:
        raise CompositionError(
            f"{k} images requested but the split holds only {num_samples} samples"
        )
    _CHECKS[distribution](sizes, k, num_target_cls, num_uniform_cls)


def compose_batch(
    targets: torch.Tensor,
    num_classes: int,
    num_images: int,
    distribution: str,
    generator: torch.Generator,
    num_target_cls: int = 10,
    num_uniform_cls: int = 8,
) -> torch.Tensor:
    """Draw the indices of one batch of ``num_images`` samples with the given labels' mix.

    ``targets`` is the (N,) label of every sample of the split. Returns a
    LongTensor (K,) of distinct indices into ``targets`` in random order. The
    request is validated first (:func:`check_composition`), so an impossible one
    raises :class:`CompositionError` and draws nothing. ``generator`` must be a
    CPU generator. To draw many batches of one split, build a
    :class:`BatchComposer` once and call its ``draw``.
    """
    composer = BatchComposer(
        targets, num_classes, num_images, distribution, num_target_cls, num_uniform_cls
    )
    return composer.draw(generator)


def keyed_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator from ``seed`` and a key of non-negative integers alone (batch ``i`` of
    a sampler; a Flower round and client): the same whichever order the keys are met in.

    numpy's ``SeedSequence`` mixes them, so nearby keys give uncorrelated streams
    (seed 1, batch 0 is not seed 0, batch 1); a negative seed is taken as its 64-bit
    two's complement.
    """
    sequence = np.random.SeedSequence(seed & (2**64 - 1), spawn_key=key)
    return torch.Generator().manual_seed(int(sequence.generate_state(1, dtype=np.uint64)[0] >> 1))


class BatchComposer:
    """Draws composed batches of one split in O(K) each.

    The constructor validates the request (:func:`check_composition`) and sorts
    the split's indices by class, once: O(N log N) time and N integers of memory.
    """

    def __init__(
        self,
        targets: torch.Tensor,
        num_classes: int,
        num_images: int,
        distribution: str,
        num_target_cls: int = 10,
        num_uniform_cls: int = 8,
    ) -> None:
        targets = _as_labels(targets, num_classes)
        self.class_sizes = torch.bincount(targets, minlength=num_classes)
        check_composition(
            self.class_sizes, num_images, distribution, num_target_cls, num_uniform_cls
        )
        self.num_samples = targets.numel()
        self.num_images = num_images
        self.distribution = distribution
        self.num_target_cls = num_target_cls
        self.num_uniform_cls = num_uniform_cls
        # The split's indices grouped by class: class c's samples are
        # by_class[class_starts[c] : class_starts[c] + class_sizes[c]].
        self.by_class = torch.argsort(targets, stable=True)
        self.class_starts = torch.cumsum(self.class_sizes, 0) - self.class_sizes

    def draw(self, generator: torch.Generator) -> torch.Tensor:
        """The (K,) distinct indices of one batch, in random order."""
        k = self.num_images
        if self.distribution == "random":
            indices = _partial_shuffle(
                torch.arange(k), torch.full((k,), self.num_samples), generator
            )
        else:
            classes, counts = _CLASS_COUNTS[self.distribution](
                self.class_sizes, k, generator, self.num_target_cls, self.num_uniform_cls
            )
            # Batch position p takes the rank_in_class[p]-th pick of class classes[slot[p]].
            slot = torch.repeat_interleave(torch.arange(classes.numel()), counts)
            rank_in_class = torch.arange(k) - (torch.cumsum(counts, 0) - counts)[slot]
            starts = self.class_starts[classes][slot]
            ends = starts + self.class_sizes[classes][slot]
            indices = self.by_class[_partial_shuffle(starts + rank_in_class, ends, generator)]
        # The position of a sample in the batch should say nothing about its class.
        return indices[torch.randperm(k, generator=generator)]


def _partial_shuffle(
    lows: torch.Tensor, highs: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Distinct positions: position p is a uniform pick from ``[lows[p], highs[p])`` without
    the picks of the positions before it in the same segment.

    A Fisher-Yates shuffle of each segment ``[start, end)`` stopped after the positions
    asked for: step p swaps ``lows[p]`` with a uniform position of ``[lows[p], highs[p])``
    and keeps what lands at ``lows[p]``. Only the swapped positions are stored, so the
    cost is O(K), not the segment's length. The swaps depend on each other, which is
    why this one loop runs over the K samples in Python (a few microseconds each).
    """
    spans = highs - lows
    # float64 uniforms carry 53 random bits: the bias of floor(u * n) is below n / 2**53. The
    # product of the largest u below 1 and a large n can round up to n itself: clamped.
    uniforms = torch.rand(lows.numel(), dtype=torch.float64, generator=generator)
    picks = lows + torch.minimum((uniforms * spans).long(), spans - 1)
    moved: dict[int, int] = {}
    taken = []
    for low, pick in zip(lows.tolist(), picks.tolist()):
        taken.append(moved.get(pick, pick))
        moved[pick] = moved.get(low, low)
    return torch.tensor(taken, dtype=torch.long)


def class_counts(targets: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The (C,) number of samples of each class among ``targets[indices]``."""
    return torch.bincount(targets[indices].long(), minlength=num_classes)


class ComposedBatchSampler(Sampler[list[int]]):
    """A ``batch_sampler`` that yields ``num_batches`` composed batches of indices.

    Batch ``i`` is drawn from :func:`keyed_generator` ``(seed, i)`` alone
    (:meth:`batch`), so every iteration yields the same batches and any one of them
    can be drawn on its own. The request is validated here, in the constructor.
    Works with ``DataLoader(dataset, batch_sampler=...)`` for any data set whose
    ``targets`` were passed in.
    """

    def __init__(
        self,
        targets: torch.Tensor,
        num_classes: int,
        num_images: int,
        distribution: str,
        num_batches: int,
        seed: int = 0,
        num_target_cls: int = 10,
        num_uniform_cls: int = 8,
    ) -> None:
        super().__init__()
        self.composer = BatchComposer(
            targets, num_classes, num_images, distribution, num_target_cls, num_uniform_cls
        )
        if num_batches < 1:
            raise CompositionError(f"num_batches must be at least 1, got {num_batches}")
        self.num_batches = num_batches
        self.seed = seed

    def batch(self, index: int) -> torch.Tensor:
        """The (K,) indices of batch ``index``."""
        if not 0 <= index < self.num_batches:
            raise IndexError(f"batch {index} is not one of the {self.num_batches} batches")
        return self.composer.draw(keyed_generator(self.seed, index))

    def __iter__(self) -> Iterator[list[int]]:
        for index in range(self.num_batches):
            yield self.batch(index).tolist()

    def __len__(self) -> int:
        return self.num_batches


def _as_labels(targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be a one-dimensional integer tensor, got {targets.dtype} "
            f"of shape {tuple(targets.shape)}"
        )
    targets = targets.to(device="cpu", dtype=torch.long)
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise DataError(
            f"labels must lie in 0..{num_classes - 1}, found "
            f"{int(targets.min())}..{int(targets.max())}"
        )
    return targets


def _custom_counts(distribution: str, num_images: int) -> tuple[int, int, int]:
    """The images of classes 0, 18 and 92 in a custom composition of K images."""
    return _CUSTOM_COUNTS[distribution](num_images)


_CUSTOM_COUNTS: dict[str, Callable[[int], tuple[int, int, int]]] = {
    "custom_imbalanced": lambda k: (1, k - 2, 1),
    "custom_balanced": lambda k: (k // 3, k // 3, k // 3),
}


def _random_classes(
    class_sizes: torch.Tensor, min_size: int, how_many: int, generator: torch.Generator
) -> torch.Tensor:
    """``how_many`` distinct random classes among those with at least ``min_size`` samples."""
    able = torch.nonzero(class_sizes >= min_size).squeeze(1)
    return able[torch.randperm(able.numel(), generator=generator)[:how_many]]


def _random2_counts(class_sizes, num_images, generator, num_target_cls, num_uniform_cls):
    """Uniform over the (classes, split) pairs that the split can supply.

    A random composition of K into m parts (m - 1 distinct cut points in
    1..K-1) and m random classes are drawn in blocks of pairs; the first pair
    whose every class holds at least its part is kept. When every class holds K
    samples the first pair always fits.
    """
    k, m = num_images, num_target_cls
    filled = torch.nonzero(class_sizes > 0).squeeze(1)
    for _ in range(_RANDOM2_BLOCKS):
        keys = torch.rand(_RANDOM2_BLOCK, k - 1, generator=generator)
        cuts = torch.sort(keys.topk(m - 1, dim=1).indices + 1, dim=1).values
        edges = torch.cat(
            [
                torch.zeros(_RANDOM2_BLOCK, 1, dtype=torch.long),
                cuts,
                torch.full((_RANDOM2_BLOCK, 1), k, dtype=torch.long),
            ],
            dim=1,
        )
        parts = torch.diff(edges, dim=1)
        keys = torch.rand(_RANDOM2_BLOCK, filled.numel(), generator=generator)
        classes = filled[keys.topk(m, dim=1).indices]
        fits = torch.nonzero((class_sizes[classes] >= parts).all(dim=1)).squeeze(1)
        if fits.numel():
            return classes[fits[0]], parts[fits[0]]
    raise CompositionError(
        f"distribution 'random2' found no random split of {k} images over {m} classes "
        f"that the class sizes can supply in {_RANDOM2_BLOCK * _RANDOM2_BLOCKS} tries "
        f"(largest class holds {int(class_sizes.max())}); use fewer images or more target classes"
    )


def _balanced_counts(class_sizes, num_images, generator, num_target_cls, num_uniform_cls):
    per_class = num_images // num_uniform_cls
    classes = _random_classes(class_sizes, per_class, num_uniform_cls, generator)
    return classes, torch.full((num_uniform_cls,), per_class, dtype=torch.long)


def _extreme_counts(class_sizes, num_images, generator, num_target_cls, num_uniform_cls):
    classes = _random_classes(class_sizes, num_images, 1, generator)
    return classes, torch.tensor([num_images])


def _unique_counts(class_sizes, num_images, generator, num_target_cls, num_uniform_cls):
    classes = _random_classes(class_sizes, 1, num_images, generator)
    return classes, torch.ones(num_images, dtype=torch.long)


def _custom_imbalanced_counts(class_sizes, num_images, generator, num_target_cls, num_uniform_cls):
    counts = _custom_counts("custom_imbalanced", num_images)
    return torch.tensor(CUSTOM_CLASSES), torch.tensor(counts)


def _custom_balanced_counts(class_sizes, num_images, generator, num_target_cls, num_uniform_cls):
    counts = _custom_counts("custom_balanced", num_images)
    return torch.tensor(CUSTOM_CLASSES), torch.tensor(counts)


# distribution -> (class_sizes, K, generator, num_target_cls, num_uniform_cls) -> (classes, counts)
_CLASS_COUNTS: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {
    "random2": _random2_counts,
    "balanced": _balanced_counts,
    "extreme": _extreme_counts,
    "unique": _unique_counts,
    "custom_imbalanced": _custom_imbalanced_counts,
    "custom_balanced": _custom_balanced_counts,
}


# Per-distribution checks: (class_sizes, K, num_target_cls, num_uniform_cls) -> None.


def _check_random(sizes, k, num_target_cls, num_uniform_cls):
    """Nothing beyond the size of the split, which every distribution needs."""


def _check_random2(sizes, k, num_target_cls, num_uniform_cls):
    name, m = "distribution 'random2'", num_target_cls
    num_filled = int((sizes > 0).sum())
    if m < 1:
        raise CompositionError(f"{name} needs num_target_cls >= 1, got {m}")
    if m > num_filled:
        raise CompositionError(
            f"{name} needs {m} target classes but only {num_filled} classes have samples"
        )
    if k < m:
        raise CompositionError(
            f"{name} needs at least one image per target class: {k} images for {m} classes"
        )
    largest = int(sizes.topk(m).values.sum())
    if largest < k:
        raise CompositionError(
            f"{name} cannot fit {k} images into {m} classes: "
            f"the {m} largest classes hold only {largest} samples"
        )


def _check_balanced(sizes, k, num_target_cls, num_uniform_cls):
    name, u = "distribution 'balanced'", num_uniform_cls
    num_filled = int((sizes > 0).sum())
    if u < 1:
        raise CompositionError(f"{name} needs num_uniform_cls >= 1, got {u}")
    if u > num_filled:
        raise CompositionError(
            f"{name} needs {u} classes but only {num_filled} classes have samples"
        )
    if k % u:
        raise CompositionError(
            f"{name} needs num_images divisible by num_uniform_cls: {k} images over {u} classes"
        )
    per_class = k // u
    num_able = int((sizes >= per_class).sum())
    if num_able < u:
        raise CompositionError(
            f"{name} needs {u} classes with {per_class} samples each "
            f"but only {num_able} classes have that many"
        )


def _check_extreme(sizes, k, num_target_cls, num_uniform_cls):
    largest = int(sizes.max())
    if largest < k:
        raise CompositionError(
            f"distribution 'extreme' needs one class with {k} samples but the largest holds {largest}"
        )


def _check_unique(sizes, k, num_target_cls, num_uniform_cls):
    num_filled = int((sizes > 0).sum())
    if k > num_filled:
        raise CompositionError(
            f"distribution 'unique' needs one class per image: "
            f"{k} images but only {num_filled} classes"
        )


def _check_custom(distribution: str, sizes: torch.Tensor, k: int) -> None:
    name = f"distribution {distribution!r}"
    if sizes.numel() <= max(CUSTOM_CLASSES):
        raise CompositionError(
            f"{name} uses classes 0, 18 and 92 but the split has only {sizes.numel()} classes"
        )
    for cls, need in zip(CUSTOM_CLASSES, _custom_counts(distribution, k)):
        have = int(sizes[cls])
        if have < need:
            raise CompositionError(
                f"{name} needs {need} sample{'s' if need > 1 else ''} of class {cls} "
                f"but the split holds {have}"
            )


def _check_custom_imbalanced(sizes, k, num_target_cls, num_uniform_cls):
    if k < 3:
        raise CompositionError(
            "distribution 'custom_imbalanced' needs at least 3 images "
            f"(1, K - 2 and 1 of classes 0, 18 and 92), got {k}"
        )
    _check_custom("custom_imbalanced", sizes, k)


def _check_custom_balanced(sizes, k, num_target_cls, num_uniform_cls):
    if k % 3:
        raise CompositionError(
            "distribution 'custom_balanced' needs num_images divisible by 3 "
            f"(classes 0, 18 and 92), got {k}"
        )
    _check_custom("custom_balanced", sizes, k)


_CHECKS: dict[str, Callable[..., None]] = {
    "random": _check_random,
    "random2": _check_random2,
    "balanced": _check_balanced,
    "extreme": _check_extreme,
    "unique": _check_unique,
    "custom_imbalanced": _check_custom_imbalanced,
    "custom_balanced": _check_custom_balanced,
}
