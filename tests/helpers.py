"""Small victims and hand-made batches whose gradients the tests know exactly."""

from __future__ import annotations

import torch
from torch import nn

from attacks.gradients import batch_gradients, chunked, share

#: what --compare runs besides iLRG on data with a held-out split, in table order
COMPARED_METHODS = [
    "iLRG",
    "decompose",
    "iDLG",
    "GI",
    "RLG",
    "LLG",
    "bias",
    "random",
    "zeros",
    "RLU",
    "LLBG",
    "RLU+",
]
#: the scores of a method that restores counts
COUNT_METRICS = ("LeAcc", "LnAcc", "LnAcc+", "IRec", "Exact")


class TinyVictim(nn.Module):
    """ReLU features then a linear classifier: non-negative embeddings, as the prior attacks assume."""

    def __init__(self, in_dim: int = 12, dim: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def labels_from_counts(counts) -> torch.Tensor:
    counts = torch.as_tensor(counts)
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


def shared_for(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, max_size=None, known=None
):
    grads = batch_gradients(model, chunked(inputs, labels, max_size), labels.numel())
    return share(model, grads, labels.numel(), known_classes=known)
