"""RLU (Chen & Vikalo, ICML 2024): label counts by least squares on the output layer's update.

Each sample of class j adds p - onehot(j) to K grad_b, and that error times its
embedding to K grad_W. Their expectations per class, measured on the server's
auxiliary data (``attacks.auxiliary``), make the gradient a linear function of
the counts; RLU solves it in the least-squares sense:

    [ P^T - I ]        [ K grad_b        ]
    [ s B^T   ]  k  =  [ s K grad_W.sum(1) ]      k >= 0,  sum(k) = K

with P the per-class mean softmax (confidence on the diagonal, erroneous
confidence off it) and B the per-class mean error times the embedding sum. The
bias rows need no assumption on the embeddings; the weight rows add C equations
that weigh each sample by its embedding's size, which separates classes whose
erroneous confidences look alike. ``s`` puts both blocks on one scale. The
sum is held by a heavily weighted row of ones, the non-negativity by NNLS, and
the real solution becomes counts summing to K by largest remainders.

Where it fails: the statistics are means over held-out samples. A trained model
is more confident on the batch it trained on than on held-out data, so the
measured (1 - confidence) is too large and its counts run low for the classes it
fits best; the rounding to K then gives the missing labels to classes with the
largest remainders.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import nnls

from attacks.auxiliary import AuxiliaryAttack, AuxiliaryData
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack

#: weight of the sum-to-K row beside the largest column of the system: enforced, not fitted
SUM_ROW_WEIGHT = 1e3


def round_to_total(values: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integers summing to ``total``, each within one of ``values`` (largest remainders)."""
    values = values.clamp_min(0)
    floors = values.floor()
    counts = floors.long()
    missing = total - int(counts.sum())
    fraction = values - floors
    if missing > 0:
        counts[torch.topk(fraction, missing).indices] += 1
    while missing < 0:
        # More than K in the floors (a sum row that held loosely): take from the smallest remainders.
        fraction = torch.where(counts > 0, fraction, torch.inf)
        take = torch.topk(fraction, min(-missing, int((counts > 0).sum())), largest=False).indices
        counts[take] -= 1
        fraction[take] = torch.inf
        missing += take.numel()
    return counts


def least_squares_counts(
    matrix: torch.Tensor, target: torch.Tensor, num_images: int
) -> torch.Tensor:
    """argmin |matrix k - target| over k >= 0 with sum(k) = K (held by a weighted row), in float64."""
    # A diverged model (NaN outputs on the auxiliary data) or gradient leaves those entries
    # without information: zeros, so the answer is still K labels.
    matrix = torch.nan_to_num(matrix.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    target = torch.nan_to_num(target.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    matrix, target = matrix.cpu().numpy(), target.cpu().numpy()
    weight = SUM_ROW_WEIGHT * max(float(np.abs(matrix).sum(axis=0).max()), 1e-300)
    system = np.vstack([matrix, np.full((1, matrix.shape[1]), weight)])
    rhs = np.concatenate([target, [weight * num_images]])
    solution, _ = nnls(system, rhs, maxiter=50 * system.shape[1])
    return torch.from_numpy(solution)


@register_attack("RLU")
class RLU(AuxiliaryAttack):
    """RLU's single-step estimate; ``use_weights=False`` keeps only the bias equations."""

    def __init__(self, auxiliary: AuxiliaryData | None, use_weights: bool = True, **kw):
        super().__init__(auxiliary, **kw)
        self.use_weights = use_weights

    def __call__(self, shared: SharedGradients) -> Restoration:
        num_classes, num_images = shared.num_classes, shared.num_images
        stats = self.statistics(shared.model, num_classes)
        bias_grad = torch.nan_to_num(shared.bias_grad.detach().to(torch.float64).cpu())
        blocks = [stats.probabilities.T - torch.eye(num_classes, dtype=torch.float64)]
        targets = [num_images * bias_grad]
        if self.use_weights:
            row_sums = shared.weight_grad.detach().to(torch.float64).sum(dim=1).cpu()
            weights_block = stats.weighted_errors.T
            # Equal say for both blocks: scale the weight rows to the bias rows' size.
            scale = blocks[0].norm() / weights_block.norm().clamp_min(1e-300)
            blocks.append(scale * weights_block)
            targets.append(scale * num_images * torch.nan_to_num(row_sums))
        estimate = least_squares_counts(torch.cat(blocks), torch.cat(targets), num_images)
        counts = round_to_total(estimate, num_images).to(shared.bias_grad.device)
        return Restoration.from_counts(counts, counts)
