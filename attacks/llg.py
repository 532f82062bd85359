"""LLG (Wainakh et al., PoPETs 2022): label counts from the gradient's sign and magnitude.

Each label of class c pushes that class's gradient down by about the same
"impact" m. Every class with a negative gradient gets one label; then labels go,
one at a time, to the class whose gradient (with the impacts already given
subtracted) is lowest, until there are K.
"""

from __future__ import annotations

import torch

from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack


def impact_counts(
    class_signal: torch.Tensor, num_images: int, impact: torch.Tensor | None = None
) -> torch.Tensor:
    """LLG's two stages on one value per class (row sums of grad_W, or grad_b).

    ``impact`` (< 0) is the push of one label on its class's value, one per
    class or one for all; ``None`` estimates one for all from the negative values
    as LLG does. Stage 2 raises only the class that got a label (the breaching
    framework's version raised the loop's leftover index instead).
    """
    signal = torch.nan_to_num(class_signal.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    num_classes = signal.numel()
    negative = signal < 0
    if (
        int(negative.sum()) > num_images
    ):  # more negative classes than labels: keep the most negative
        keep = torch.topk(signal, num_images, largest=False).indices
        negative = torch.zeros_like(negative)
        negative[keep] = True
    counts = negative.long()
    if impact is None:
        # m < 0: the mean push of one label; subtracting it moves a class back towards zero.
        impact = signal[negative].sum() * (1 + 1 / num_classes) / num_images
    impact = torch.as_tensor(impact, dtype=torch.float64, device=signal.device).expand(num_classes)
    signal = signal - impact * negative
    remaining = num_images - int(counts.sum())
    if remaining > 0:
        # Greedy argmin with a fixed step per class is the same as taking the `remaining`
        # smallest values of {signal_c - t * impact_c : t = 0, 1, ...}, each sequence rising;
        # a stable sort keeps argmin's preference for the lower class index on ties.
        steps = torch.arange(remaining, dtype=torch.float64, device=signal.device)
        candidates = signal[:, None] - impact[:, None] * steps[None, :]
        chosen = torch.sort(candidates.flatten(), stable=True).indices[:remaining] // remaining
        counts += torch.bincount(chosen, minlength=num_classes)
    return counts


@register_attack("LLG")
class LLG:
    restores_counts = True

    @classmethod
    def from_options(cls, **_):
        return cls()

    def __call__(self, shared: SharedGradients) -> Restoration:
        counts = impact_counts(shared.weight_grad.to(torch.float64).sum(dim=1), shared.num_images)
        return Restoration.from_counts(counts, counts)
