"""GradInversion's label step (Yin et al., CVPR 2021): a class is present if any
entry of its weight-gradient row is negative (for non-negative embeddings only a
sample of that class can make one negative)."""

from __future__ import annotations

import torch

from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack


@register_attack("GI")
class GradInversionLabels:
    restores_counts = False

    @classmethod
    def from_options(cls, **_):
        return cls()

    def __call__(self, shared: SharedGradients) -> Restoration:
        row_min = torch.nan_to_num(shared.weight_grad.to(torch.float64), nan=0.0).amin(dim=1)
        return Restoration(present=row_min < 0)
