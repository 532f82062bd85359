"""K labels drawn uniformly at random: the floor any attack must beat."""

from __future__ import annotations

import torch

from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack


@register_attack("random")
class RandomGuess:
    restores_counts = True
    #: takes ``generator=`` per call
    randomised = True

    def __init__(self, seed: int = 0):
        # Its own generator: guessing must not disturb (or depend on) the global RNG.
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def from_options(cls, seed: int = 0, **_):
        return cls(seed=seed)

    def __call__(
        self, shared: SharedGradients, generator: torch.Generator | None = None
    ) -> Restoration:
        """``generator`` (a CPU one) replaces the attack's own stream, which is seeded once and
        consumed call after call: the attack experiment gives each try its own."""
        labels = torch.randint(
            shared.num_classes, (shared.num_images,), generator=generator or self.generator
        )
        counts = torch.bincount(labels, minlength=shared.num_classes).to(shared.bias_grad.device)
        return Restoration.from_counts(counts, counts)
