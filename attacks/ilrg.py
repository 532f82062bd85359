"""iLRG: instance-wise Batch Label Restoration from Gradients (Ma et al., ICLR 2023).

For the last layer z = W e + b and the mean cross-entropy over K samples,
grad_b = (1/K) sum_n (p_n - y_n) and grad_W = (1/K) sum_n (p_n - y_n) e_n^T.
If all samples of class c share one embedding, grad_W[c] / grad_b[c] is that
embedding; its softmax p_c then stands in for every sample of the class, and
the bias gradient becomes linear in the unknown counts k:

    sum_j k_j p_j[i] - k_i = K grad_b[i]   for every class i,     sum_j k_j = K.

Everything below is one tensor expression over the C classes; the only solve is
a (C+1) x C least-squares problem.
"""

from __future__ import annotations

import torch

from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack


def class_embeddings(weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """e_c = grad_W[c] / grad_b[c] in float64, and which classes allow it.

    A class whose bias gradient is exactly zero or whose gradient row is not
    finite carries no usable embedding; its row is set to zero and it is
    reported as unusable instead of producing inf/nan. Float32 gradients divide
    safely in float64: the largest quotient (3e38 / 1e-45) is far from overflow,
    so no rescaling tricks are needed.
    """
    weight_grad = weight_grad.to(torch.float64)
    bias_grad = bias_grad.to(torch.float64)
    usable = torch.isfinite(bias_grad) & torch.isfinite(weight_grad).all(dim=1) & (bias_grad != 0)
    safe_bias = torch.where(usable, bias_grad, torch.ones_like(bias_grad))
    embeddings = torch.where(usable[:, None], weight_grad / safe_bias[:, None], 0.0)
    return embeddings, usable


def class_probabilities(
    embeddings: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """Row c is p_c = softmax(alpha * (W e_c + b)): the model's output for class c's embedding."""
    logits = embeddings @ weight.to(torch.float64).T + bias.to(torch.float64)
    return torch.softmax(alpha * logits, dim=1)


def unstable_rows(embeddings: torch.Tensor, usable: torch.Tensor, norm_guard: float) -> torch.Tensor:
    """Classes whose restored embedding is blown up: norm above ``norm_guard`` x the median.

    e_c = grad_W[c] / grad_b[c] is a weighted mean of the batch's embeddings whose
    weights (p_n[c] - y_n[c]) / (K grad_b[c]) sum to one. When k_c is close to
    sum_n p_n[c] (common once K is several times C: K = 1024, C = 100 gives
    about 10 of each with p about 0.01) grad_b[c] is nearly zero, the weights
    explode and so does e_c: its softmax becomes arbitrary and spoils every
    equation it enters. ``norm_guard = 0`` finds none (the published method).
    """
    if norm_guard <= 0 or int(usable.sum()) < 2:
        return torch.zeros_like(usable)
    norms = embeddings.norm(dim=1)
    return usable & (norms > norm_guard * norms[usable].median())


def fallback_rows(
    probabilities: torch.Tensor, replace: torch.Tensor, trusted: torch.Tensor, bias: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Give the ``replace`` classes a stand-in probability row.

    The stand-in is the mean row of the ``trusted`` classes; with none trusted,
    the model's output for a zero embedding, softmax(alpha b) (exact when W = 0,
    where every sample has that output).
    """
    if not bool(replace.any()):
        return probabilities
    if bool(trusted.any()):
        stand_in = probabilities[trusted].mean(dim=0)
    else:
        stand_in = torch.softmax(alpha * bias.to(torch.float64), dim=0)
    return torch.where(replace[:, None], stand_in, probabilities)


def solve_counts(
    probabilities: torch.Tensor,
    bias_grad: torch.Tensor,
    num_images: int,
    unknowns: torch.Tensor,
    equations: torch.Tensor,
) -> torch.Tensor:
    """Least-squares counts k (float64, length C, zero outside ``unknowns``).

    ``probabilities[j]`` is p_j; the system has one row per class in
    ``equations`` plus the row sum_j k_j = K, and one column per class in
    ``unknowns``.
    """
    num_classes = probabilities.shape[0]
    counts = torch.zeros(num_classes, dtype=torch.float64, device=probabilities.device)
    if not bool(unknowns.any()) or not bool(equations.any()):
        return counts
    # A[i, j] = p_j[i] - [i == j]: sample mass of class j that lands on output i, minus its label.
    system = probabilities.T - torch.eye(num_classes, dtype=torch.float64, device=probabilities.device)
    system = system[equations][:, unknowns]
    system = torch.cat([system, torch.ones_like(system[:1])], dim=0)
    target = torch.cat(
        [num_images * bias_grad.to(torch.float64)[equations], bias_grad.new_tensor([num_images], dtype=torch.float64)]
    )
    # Normal equations with a Cholesky solve: the system is tall and well conditioned
    # (A ~ P^T - I), and this is several times faster than QR/SVD at C = 1000.
    gram = system.T @ system
    rhs = system.T @ target
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs[:, None], factor)[:, 0]
    else:  # rank deficient (e.g. two classes with identical p): fall back to a minimum-norm solve
        solution = torch.linalg.lstsq(system.cpu(), target.cpu()[:, None], driver="gelsd").solution[:, 0]
        solution = solution.to(probabilities.device)
    counts[unknowns] = torch.nan_to_num(solution, nan=0.0, posinf=0.0, neginf=0.0)
    return counts


def round_counts(raw: torch.Tensor, num_images: int) -> torch.Tensor:
    """Negative -> 0, round, anything above K -> 0 (the paper's post-processing)."""
    counts = torch.round(raw.clamp(min=0)).to(torch.long)
    return torch.where(counts > num_images, torch.zeros_like(counts), counts)


def adjust_to_total(
    raw: torch.Tensor, counts: torch.Tensor, num_images: int, eligible: torch.Tensor | None = None
) -> torch.Tensor:
    """Counts that sum exactly to K, changing the entries whose rounding moved them most.

    If the rounded counts fall short, the ``eligible`` classes rounded down the
    most gain one each (round-robin if more is missing than there are classes);
    if they overshoot, the classes rounded up the most lose one each, never
    below zero. With no eligible class the counts are returned unchanged.
    """
    adjusted = counts.clone()
    if eligible is None:
        eligible = torch.ones_like(counts, dtype=torch.bool)
    # How far rounding moved each entry down (positive) or up (negative).
    residual = raw.clamp(min=0).to(torch.float64) - adjusted.to(torch.float64)
    missing = num_images - int(adjusted.sum())
    candidates = torch.nonzero(eligible).flatten()
    if missing > 0 and candidates.numel() > 0:
        order = candidates[torch.argsort(residual[candidates], descending=True, stable=True)]
        per_class, extra = divmod(missing, order.numel())
        adjusted[order] += per_class
        adjusted[order[:extra]] += 1
    while missing < 0:
        candidates = torch.nonzero(adjusted > 0).flatten()
        order = candidates[torch.argsort(residual[candidates], stable=True)]
        take = order[: min(-missing, order.numel())]
        adjusted[take] -= 1
        missing += take.numel()
    return adjusted


@register_attack("iLRG")
class ILRG:
    """Restores per-class counts; ``simplified`` uses the known present classes only."""

    restores_counts = True

    def __init__(self, alpha: float = 1.0, estimate: bool = False, simplified: bool = False, norm_guard: float = 3.0):
        self.alpha = alpha
        self.estimate = estimate
        self.simplified = simplified
        self.norm_guard = norm_guard

    @classmethod
    def from_options(
        cls, alpha: float = 1.0, estimate: bool = False, simplified: bool = False, norm_guard: float = 3.0, **_
    ):
        return cls(alpha=alpha, estimate=estimate, simplified=simplified, norm_guard=norm_guard)

    def __call__(self, shared: SharedGradients) -> Restoration:
        num_classes = shared.num_classes
        embeddings, usable = class_embeddings(shared.weight_grad, shared.bias_grad)
        # A class with a finite but exactly-zero bias gradient (sum_n p_n[c] == k_c) keeps its
        # unknown count and gets a stand-in probability row; a non-finite one is left out.
        finite = torch.isfinite(shared.bias_grad) & torch.isfinite(shared.weight_grad).all(dim=1)
        if self.estimate:
            probabilities = torch.full(
                (num_classes, num_classes), 1.0 / num_classes, dtype=torch.float64, device=embeddings.device
            )
        else:
            probabilities = class_probabilities(embeddings, shared.weight, shared.bias, self.alpha)
            unstable = unstable_rows(embeddings, usable, self.norm_guard)
            probabilities = fallback_rows(
                probabilities, (finite & ~usable) | unstable, usable & ~unstable, shared.bias, self.alpha
            )
        equations = torch.isfinite(shared.bias_grad)
        unknowns = finite
        if self.simplified:
            if shared.known_classes is None:
                raise ValueError("simplified iLRG needs the known present classes")
            known = shared.known_classes.to(device=usable.device, dtype=torch.bool)
            unknowns = unknowns & known
            equations = equations & known
        raw = solve_counts(probabilities, shared.bias_grad, shared.num_images, unknowns, equations)
        counts = round_counts(raw, shared.num_images)
        adjusted = adjust_to_total(raw, counts, shared.num_images, eligible=unknowns)
        return Restoration.from_counts(counts, adjusted, undetermined=~usable)
