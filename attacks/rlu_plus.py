"""RLU+ (this project): presence from the weight gradient's rows, the rest by a whitened MAP estimate.

RLU (``attacks.rlu``) reads counts off the bias gradient with one statistic per
class. On a model that fits its batch that statistic misses by orders of
magnitude: each memorised sample adds 1e-6 to 1e-3 of the gradient where the
auxiliary mean says 0.05. RLU+ keeps the auxiliary data's per-class statistics
(``attacks.auxiliary.ClassStatistics``: mean softmax, per-sample spread) and
asks of them only what they can carry; the class docstring says how.

Under FedAvg (``shared.local_update``) it takes the statistics averaged along
a simulated local training of the auxiliary data (``statistics_for`` of the base
class, ``attacks.auxiliary.trajectory_statistics``), as LLBG does.
"""

from __future__ import annotations

import math

import torch
from scipy.optimize import nnls

from attacks.auxiliary import AuxiliaryAttack
from attacks.gradinversion import GradInversionLabels
from attacks.ilrg import adjust_to_total
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack
from attacks.rlg import rounding_of

#: weight of the sum-to-K row beside the largest column of the system: enforced, not fitted
SUM_ROW_WEIGHT = 1e3


def round_to_total(values: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integers summing to ``total``, each within one of ``values``: the floors,
    then iLRG's ``adjust_to_total`` (largest remainders; evenly where nothing is finite)."""
    values = torch.nan_to_num(values.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    values = values.clamp_min(0)
    return adjust_to_total(values, values.floor().long(), total)


def with_total(system: torch.Tensor, wanted: torch.Tensor, total: float):
    """``system`` and ``wanted`` with a row of ones that holds the sum at ``total``.

    Weighted far above every column, the row is enforced rather than fitted:
    with the scale left free, a column near zero (a class the model is sure
    of) would take any count at no cost.
    """
    weight = SUM_ROW_WEIGHT * float(system.abs().sum(dim=0).max().clamp_min(1e-300))
    ones = torch.full((1, system.shape[1]), weight, dtype=torch.float64)
    return torch.cat([system, ones]), torch.cat(
        [wanted, torch.tensor([weight * total], dtype=torch.float64)]
    )


def least_squares_counts(matrix: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """argmin |matrix m - target| over m >= 0, in float64."""
    # A diverged model (NaN outputs on the auxiliary data) or gradient leaves those entries
    # without information: zeros, so the answer is still K labels.
    matrix = torch.nan_to_num(matrix.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    target = torch.nan_to_num(target.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    solution, _ = nnls(matrix.cpu().numpy(), target.cpu().numpy(), maxiter=50 * matrix.shape[1])
    return torch.from_numpy(solution)


@register_attack("RLU+")
class RLUPlus(AuxiliaryAttack):
    """RLU given the classes the weight gradient shows present, weighing what the counts can explain.

    This project's successor of RLU for models that fit their batch. Two things
    change:

    Presence. A sample the model fits with p_y = 0.9999 adds 1e-4 of its
    class's bias gradient, less than the erroneous confidence other samples put
    there, so the bias gradient's sign misses it. With non-negative embeddings
    (a ReLU before the layer; checked on the auxiliary data) grad_W[c] still has
    a negative entry only where a sample of class c contributes, however small
    (GradInversion's row test). Every class so shown gets one label.

    The other K - n labels (n present classes). Per class, the auxiliary data
    gives not only the mean contribution of a sample to K grad_b but also its
    spread. On a trained model that spread is heavy-tailed (most samples add
    1e-6, a few 1e-2), so the gradient says little about how many samples a
    class holds. The estimate is the maximum a posteriori one: the bias
    equations whitened by the covariance of the sum of per-sample deviations
    (as if each present class held K / n samples), plus the prior of K - n labels
    drawn uniformly from the present classes (mean (K - n) / n, variance
    (K - n)(1/n)(1 - 1/n) each). On an untrained model the spread is small and
    the equations decide; on a memorised batch it is large and the prior does.
    """

    def __call__(self, shared: SharedGradients) -> Restoration:
        num_classes, num_images = shared.num_classes, shared.num_images
        present = self.present_classes(shared)
        extra = torch.zeros(num_classes, dtype=torch.float64)
        count = int(present.sum())
        if 0 < count < num_images:
            extra[present] = self.spread_remaining(shared, present)
        counts = round_to_total(present.double() + extra, num_images)
        return Restoration.from_counts(
            counts.to(shared.bias_grad.device), counts.to(shared.bias_grad.device)
        )

    def spread_remaining(self, shared: SharedGradients, present: torch.Tensor) -> torch.Tensor:
        """The K - n labels beyond one per present class, as real numbers >= 0 summing to K - n."""
        num_classes, num_images = shared.num_classes, shared.num_images
        stats = self.statistics_for(shared)
        count = int(present.sum())
        remaining = num_images - count
        classes = torch.nonzero(present).flatten()
        mean_errors = stats.probabilities.T - torch.eye(num_classes, dtype=torch.float64)
        columns = torch.nan_to_num(mean_errors[:, classes])
        bias_grad = torch.nan_to_num(shared.bias_grad.detach().to(torch.float64).cpu())
        # After one label each: what the other labels have to explain.
        residual = num_images * bias_grad - columns.sum(dim=1)
        whitening = self.whitening(shared, stats, classes, num_images / count)
        prior_mean = remaining / count
        prior_std = max(math.sqrt(remaining * (1 / count) * (1 - 1 / count)), 1.0 / count)
        system = torch.cat([whitening @ columns, torch.eye(count, dtype=torch.float64) / prior_std])
        wanted = torch.cat(
            [
                whitening @ residual,
                torch.full((count,), prior_mean / prior_std, dtype=torch.float64),
            ]
        )
        return least_squares_counts(*with_total(system, wanted, remaining))

    def whitening(
        self, shared: SharedGradients, stats, classes: torch.Tensor, per_class: float
    ) -> torch.Tensor:
        """N^(-1/2) for N the covariance of K grad_b's deviation from its mean given the counts.

        N = sum over present classes j of (K / n) Cov_j, Cov_j the covariance of
        p - onehot(j) over the auxiliary samples of class j; its eigenvalues are
        floored at the gradient's own rounding (K eps |grad_b|)^2, so that an
        untrained model, where every sample of a class adds the same, is fitted
        to the gradient's precision and not beyond.
        """
        deviations = stats.deviations
        rows = torch.isin(stats.labels, classes)
        scale = torch.sqrt(per_class / stats.samples[stats.labels[rows]].double())
        spread = deviations[rows] * scale[:, None]
        covariance = torch.nan_to_num(spread.T @ spread)
        bias_grad = torch.nan_to_num(shared.bias_grad.detach().to(torch.float64).cpu())
        rounding = shared.num_images * rounding_of(shared.bias_grad) * float(bias_grad.abs().max())
        values, vectors = torch.linalg.eigh(covariance)
        # The rounding of the gradient, and float64's own resolution of this eigen-decomposition.
        resolution = float(values.max().clamp_min(0)) * len(values) * torch.finfo(torch.float64).eps
        floor = max(rounding**2, resolution, torch.finfo(torch.float64).tiny)
        return vectors @ torch.diag(values.clamp_min(floor).rsqrt()) @ vectors.T

    def present_classes(self, shared: SharedGradients) -> torch.Tensor:
        num_images = shared.num_images
        bias_grad = torch.nan_to_num(shared.bias_grad.detach().to(torch.float64).cpu(), nan=0.0)
        stats = self.statistics_for(shared)
        if stats.non_negative_embeddings:
            present = GradInversionLabels()(shared).present.cpu()
        else:
            present = bias_grad < 0
        if int(present.sum()) > num_images or not bool(present.any()):
            # Noise (a defense) can make every row look present: keep the classes with the most
            # negative bias gradients, as many as are negative, at least one, at most K.
            keep = min(num_images, max(int((bias_grad < 0).sum()), 1))
            present = torch.zeros_like(present)
            present[torch.topk(bias_grad, keep, largest=False).indices] = True
        return present
