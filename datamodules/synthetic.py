"""Synthetic look-alikes of MNIST, CIFAR-100 and ImageNet, generated on demand.

Every image is a pure function of ``(seed, split, index)``: nothing but the
labels is kept in memory, and a batch does not depend on which other images
are loaded with it. The random numbers come from a counter-based integer hash
evaluated with tensor ops over the whole batch, so they do not depend on
torch's random streams (or their version) either.

Image of class ``c``: ``real mean + class prototype + per-sample smooth variation +
per-pixel noise``, clamped to ``[0, 1]``, then normalised with the real data
set's mean and std. The prototype is a smooth random pattern (an 8x8 random
grid upsampled bilinearly) that depends only on ``(seed, c)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from datamodules.base import (
    Augmentation,
    ImageClassificationDataModule,
    LabelledImageDataset,
)
from datamodules.cifar import CIFAR100DataModule
from datamodules.imagenet import ImageNetDataModule
from datamodules.mnist import MNISTGrayDataModule

MASK32 = 0xFFFFFFFF
SPLIT_CODES = {"train": 1, "val": 2}
# Salts that keep the hash streams of different purposes apart.
LABELS_SALT, PROTOTYPE_SALT, VARIATION_SALT, NOISE_SALT = (
    0x1B873593,
    0x5BD1E995,
    0x68E31DA4,
    0x27D4EB2F,
)
PROTOTYPE_GRID = 8
VARIATION_GRID = 4
PROTOTYPE_AMPLITUDE = 0.25
VARIATION_AMPLITUDE = 0.08
NOISE_AMPLITUDE = 0.1
CHUNK_ELEMENTS = 1 << 22  # bounds the int64 temporaries of one hash evaluation


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """``x * constant mod 2**32`` for int64 ``x`` in ``[0, 2**32)``, without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """A well-mixing bijection of 32-bit integers held in int64 (xorshift-multiply rounds)."""
    x = x & MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def combine(key: torch.Tensor | int, value: torch.Tensor | int) -> torch.Tensor:
    """Hash of the pair ``(key, value)``; broadcasts like ``key + value``."""
    key = torch.as_tensor(key, dtype=torch.long)
    value = torch.as_tensor(value, dtype=torch.long)
    return hash32(hash32(key) ^ (value & MASK32))


def uniform(keys: torch.Tensor) -> torch.Tensor:
    """Floats in ``[0, 1)`` from hashed keys (the top 24 bits)."""
    return (hash32(keys) >> 8).to(torch.float32) / float(1 << 24)


def seed_key(seed: int) -> int:
    """A 32-bit key that depends on all bits of an arbitrary Python int seed."""
    key = combine(0, 0)
    seed = int(seed)
    for word in (seed & MASK32, (seed >> 32) & MASK32, int(seed < 0)):
        key = combine(key, word)
    return int(key)


def balanced_labels(n: int, num_classes: int, key: int) -> torch.Tensor:
    """Labels ``i % num_classes`` in a seeded random order (a stable sort of hashes)."""
    order = torch.argsort(combine(key, torch.arange(n)), stable=True)
    return (torch.arange(n) % num_classes)[order]


class SyntheticImageDataset(LabelledImageDataset):
    """Class-dependent images generated from ``(seed, split, index)``; see the module notes.

    Args:
        split_sizes: ``{split: n}`` in order (``all`` is ``{"train": ..., "val": ...}``).
    """

    def __init__(
        self, num_classes: int, split_sizes: dict[str, int], seed: int, image_shape, **kwargs
    ) -> None:
        key = seed_key(seed)
        self.num_classes = num_classes
        self.split_keys = torch.tensor([int(combine(key, SPLIT_CODES[s])) for s in split_sizes])
        sizes = torch.tensor(list(split_sizes.values()), dtype=torch.long)
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.long), sizes.cumsum(0)])
        targets = torch.cat(
            [
                balanced_labels(n, num_classes, int(combine(split_key, LABELS_SALT)))
                for split_key, n in zip(self.split_keys.tolist(), split_sizes.values())
            ]
        )
        super().__init__(targets, image_shape=image_shape, **kwargs)
        channels = image_shape[0]
        grid = torch.arange(num_classes * channels * PROTOTYPE_GRID**2)
        prototype_keys = combine(combine(key, PROTOTYPE_SALT), grid)
        self.prototypes = (uniform(prototype_keys) * 2 - 1).view(
            num_classes, channels, PROTOTYPE_GRID, PROTOTYPE_GRID
        )
        self.variation_keys = combine(VARIATION_SALT, torch.arange(channels * VARIATION_GRID**2))
        # One 32-bit hash gives the 8-bit noise of four pixels.
        self.noise_keys = combine(
            NOISE_SALT, torch.arange((channels * image_shape[1] * image_shape[2] + 3) // 4)
        )

    def _pixels(self, index: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.image_shape
        out = torch.empty((index.numel(), channels, height, width))
        chunk = max(1, CHUNK_ELEMENTS // (channels * height * width))
        for start in range(0, index.numel(), chunk):
            part = index[start : start + chunk]
            out[start : start + chunk] = self._generate(part)
        return out

    def _generate(self, index: torch.Tensor) -> torch.Tensor:
        channels, height, width = self.image_shape
        part = torch.searchsorted(self.offsets[1:], index, right=True)
        sample_keys = combine(self.split_keys[part], index - self.offsets[part])[:, None]

        prototype = self.prototypes[self.targets[index]]
        variation = (uniform(sample_keys ^ self.variation_keys) * 2 - 1).view(
            -1, channels, VARIATION_GRID, VARIATION_GRID
        )
        smooth = F.interpolate(
            PROTOTYPE_AMPLITUDE * prototype,
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        ) + F.interpolate(
            VARIATION_AMPLITUDE * variation,
            size=(height, width),
            mode="bilinear",
            align_corners=False,
        )

        num_pixels = channels * height * width
        words = hash32(sample_keys ^ self.noise_keys)
        noise_bytes = torch.stack([(words >> shift) & 0xFF for shift in (0, 8, 16, 24)], dim=-1)
        noise = noise_bytes.view(len(index), -1)[:, :num_pixels].to(torch.float32)
        noise = (noise + 0.5) / 128.0 - 1.0
        base = self.mean  # centred on the real data set's mean, so normalised images are near 0
        image = base + smooth + NOISE_AMPLITUDE * noise.view(-1, channels, height, width)
        return image.clamp_(0.0, 1.0)


class SyntheticDataModule(ImageClassificationDataModule):
    """Base of the ``SYNTH_*`` data sets: the shapes, classes, mean/std and augmentation
    of ``real`` with seeded synthetic images; needs no files."""

    real: type[ImageClassificationDataModule]
    split_sizes: dict[str, int]
    is_synthetic = True

    @classmethod
    def train_augmentation(cls) -> Augmentation | None:
        return cls.real.train_augmentation()

    def _build_dataset(self, split: str) -> LabelledImageDataset:
        splits = ("train", "val") if split == "all" else (split,)
        return SyntheticImageDataset(
            num_classes=self.num_classes,
            split_sizes={s: self.split_sizes[s] for s in splits},
            seed=self.seed,
            image_shape=self.input_shape,
            mean=self.mean,
            std=self.std,
            source=f"synthetic (generated in memory, seed {self.seed})",
            augmentation=self.train_augmentation(),
        )


class SyntheticMNISTDataModule(SyntheticDataModule):
    name = "SYNTH_MNIST"
    real = MNISTGrayDataModule
    num_classes, input_shape = real.num_classes, real.input_shape
    mean, std = real.mean, real.std
    split_sizes = {"train": 60000, "val": 10000}


class SyntheticCIFAR100DataModule(SyntheticDataModule):
    name = "SYNTH_CIFAR100"
    real = CIFAR100DataModule
    num_classes, input_shape = real.num_classes, real.input_shape
    mean, std = real.mean, real.std
    split_sizes = {"train": 50000, "val": 10000}


class SyntheticImageNetDataModule(SyntheticDataModule):
    name = "SYNTH_IMAGENET"
    real = ImageNetDataModule
    num_classes, input_shape = real.num_classes, real.input_shape
    mean, std = real.mean, real.std
    split_sizes = {"train": 1300 * real.num_classes, "val": 50 * real.num_classes}
