"""Predict that no class is present: the floor of the count metrics.

LnAcc counts the absent classes a method gets right, so answering "nothing"
scores the share of absent classes (about 0.43 for K = 8 of 10 classes). Every
table shows this row so a reader sees what a method earns above it; its IRec,
LnAcc+ and Exact are 0.
"""

from __future__ import annotations

import torch

from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack


@register_attack("zeros")
class NothingPresent:
    restores_counts = True

    @classmethod
    def from_options(cls, **_):
        return cls()

    def __call__(self, shared: SharedGradients) -> Restoration:
        counts = torch.zeros(shared.num_classes, dtype=torch.long, device=shared.bias_grad.device)
        return Restoration.from_counts(counts, counts)
