"""Label-restoration accuracy as torchmetrics ``Metric``s.

Each metric scores one batch over its C classes, then averages the per-batch
scores: the states are a sum of scores and a count of batches, both summed
across processes, so the result is right under DDP and resets per stage.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class _PerBatchMean(Metric):
    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state(
            "score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("batches", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def batch_scores(self, restored: torch.Tensor, true_counts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def update(self, restored: torch.Tensor, true_counts: torch.Tensor) -> None:
        """``restored``: counts (or a presence mask), ``true_counts``: counts; (C,) or (batches, C)."""
        restored = torch.atleast_2d(restored)
        true_counts = torch.atleast_2d(true_counts).to(restored.device)
        if restored.shape != true_counts.shape:
            raise ValueError(
                f"restored {tuple(restored.shape)} and true {tuple(true_counts.shape)} differ in shape"
            )
        scores = self.batch_scores(restored, true_counts).to(torch.float64)
        # NaN marks a batch with no defined score (say, LnAcc over no present class).
        self.score_sum += scores.nansum()
        self.batches += (~torch.isnan(scores)).sum()

    def compute(self) -> torch.Tensor:
        if int(self.batches) == 0:
            return torch.tensor(float("nan"), dtype=torch.float64)
        return self.score_sum / self.batches


class LabelExistenceAccuracy(_PerBatchMean):
    """LeAcc: fraction of classes whose presence is restored correctly."""

    def batch_scores(self, restored, true_counts):
        return ((restored > 0) == (true_counts > 0)).double().mean(dim=-1)


class LabelNumberAccuracy(_PerBatchMean):
    """LnAcc: fraction of classes whose count is restored exactly.

    ``present_only`` (the simplified setting) averages over the classes that are
    in the batch instead of all C.
    """

    def __init__(self, present_only: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.present_only = present_only

    def batch_scores(self, restored, true_counts):
        correct = (restored.long() == true_counts.long()).double()
        if not self.present_only:
            return correct.mean(dim=-1)
        present = (true_counts > 0).double()
        return (correct * present).sum(dim=-1) / present.sum(dim=-1)


class ExactCounts(_PerBatchMean):
    """Exact: 1 for a batch whose restored count vector equals the true one, else 0.

    The strictest score: one class off by one fails the whole batch. It is what a
    user of the labels (say, image reconstruction) needs, and unlike LnAcc it has
    no floor from the absent classes: predicting nothing scores 0.
    """

    def batch_scores(self, restored, true_counts):
        return (restored.long() == true_counts.long()).all(dim=-1).double()


class InstanceRecall(_PerBatchMean):
    """IRec: fraction of the K instances whose label is restored, sum_c min(k'_c, k_c) / K."""

    def batch_scores(self, restored, true_counts):
        hits = torch.minimum(restored.long(), true_counts.long()).sum(dim=-1).double()
        return hits / true_counts.long().sum(dim=-1).double()


class TargetLabelAccuracy(_PerBatchMean):
    """One sample's label, guessed by an attacker who knows every other label of the batch:
    the game differential privacy bounds (``attacks.dp_sgd.label_accuracy_bound``).

    With restored counts k' and true counts k, the attacker who knows the batch without the
    target (k - e_y) guesses the class where k' - (k - e_y) is largest (ties: each tied class
    with equal chance). Averaged over every sample of the batch as the target, so a batch
    scores sum_c k_c P[guess = c | target in class c] / K. An exact attack scores 1.
    """

    def batch_scores(self, restored, true_counts):
        restored, true_counts = restored.long(), true_counts.long()
        num_classes = true_counts.shape[-1]
        excess = (restored - true_counts).double()
        # guesses[b, c, :]: the attacker's scores when the target is of class c
        guesses = excess[:, None, :] + torch.eye(num_classes, dtype=torch.float64)
        best = guesses.max(dim=-1, keepdim=True).values
        tied = (guesses == best).sum(dim=-1)
        right = torch.diagonal(guesses, dim1=-2, dim2=-1) == best[..., 0]
        hits = right.double() / tied
        return (true_counts.double() * hits).sum(dim=-1) / true_counts.sum(dim=-1).double()


def metric_set(
    restores_counts: bool, simplified: bool = False, **metric_options
) -> dict[str, _PerBatchMean]:
    """The metrics a method is scored with: LeAcc always; LnAcc, LnAcc+, IRec and Exact with counts.

    LnAcc is the paper's (over all C classes, or over the present ones in the
    simplified setting); LnAcc+ always averages over the present classes only, so
    the absent classes that an attack predicting nothing gets right do not lift
    it. ``metric_options`` go to every ``Metric`` (e.g. ``sync_on_compute``).
    """
    metrics: dict[str, _PerBatchMean] = {"LeAcc": LabelExistenceAccuracy(**metric_options)}
    if restores_counts:
        metrics["LnAcc"] = LabelNumberAccuracy(present_only=simplified, **metric_options)
        metrics["LnAcc+"] = LabelNumberAccuracy(present_only=True, **metric_options)
        metrics["IRec"] = InstanceRecall(**metric_options)
        metrics["Exact"] = ExactCounts(**metric_options)
    return metrics
