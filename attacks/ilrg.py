"""iLRG: instance-wise Batch Label Restoration from Gradients (Ma et al., ICLR 2023).

For the last layer z = W e + b and the mean cross-entropy over K samples,
grad_b = (1/K) sum_n (p_n - y_n) and grad_W = (1/K) sum_n (p_n - y_n) e_n^T.
If all samples of class c share one embedding, grad_W[c] / grad_b[c] is that
embedding; its softmax p_c then stands in for every sample of the class, and
the bias gradient becomes linear in the unknown counts k:

    sum_j k_j p_j[i] - k_i = K grad_b[i]   for every class i,     sum_j k_j = K.

Everything below is one tensor expression over the C classes; the only solve is
a (C+1) x C least-squares problem.

Cost, at ImageNet scale (C = 1000, d = 2048, K = 24): two products dominate,
the logits W e_c of all classes (C x d x C) and the solve (C^3). grad_W has rank
at most K, so the logits are taken through a basis of its row space (C x d x K)
wherever that reproduces every row to the gradient's own precision; and since
the equations sum to zero, the least-squares solution is that of one square
system, an LU solve instead of forming and factoring the normal equations.
"""

from __future__ import annotations

import torch

from attacks.cpu_threads import one_cpu_thread
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack

#: extra columns of the random sketch of grad_W's row space beyond its rank bound K
SKETCH_OVERSAMPLING = 10
#: an LU pivot this small beside the largest marks the square system as (nearly) singular
SINGULAR_PIVOT_RATIO = 1e-8


def class_embeddings(
    weight_grad: torch.Tensor, bias_grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """e_c = grad_W[c] / grad_b[c] in float64, and which classes allow it.

    A class whose bias gradient is exactly zero or whose gradient row is not
    finite carries no usable embedding; its row is set to zero and it is
    reported as unusable instead of producing inf/nan. Float32 gradients divide
    safely in float64: the largest quotient (3e38 / 1e-45) is far from overflow,
    so no rescaling tricks are needed.
    """
    finite = torch.isfinite(bias_grad) & finite_rows(weight_grad)
    return embeddings_of_finite(weight_grad, bias_grad, finite)


def embeddings_of_finite(
    weight_grad: torch.Tensor, bias_grad: torch.Tensor, finite: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``class_embeddings`` given which classes have a finite bias gradient and gradient row."""
    bias_grad = bias_grad.to(torch.float64)
    usable = finite & (bias_grad != 0)
    embeddings = weight_grad.to(torch.float64, copy=True)
    embeddings.div_(torch.where(usable, bias_grad, 1.0)[:, None]).masked_fill_(
        ~usable[:, None], 0.0
    )
    return embeddings, usable


def finite_rows(matrix: torch.Tensor) -> torch.Tensor:
    """Which rows hold only finite numbers.

    A row with a NaN or an infinity has a non-finite sum; a finite row's sum is
    finite unless it overflows, so only rows whose sum is not finite are looked
    at entry by entry. One reduction is several times cheaper than a boolean
    array of all C x d entries.
    """
    finite = torch.isfinite(matrix.sum(dim=1))
    suspect = torch.nonzero(~finite).flatten()
    if suspect.numel():
        finite[suspect] = torch.isfinite(matrix[suspect]).all(dim=1)
    return finite


def class_probabilities(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    alpha: float = 1.0,
    *,
    rank: int | None = None,
    tolerance: float = 0.0,
) -> torch.Tensor:
    """Row c is p_c = softmax(alpha * (W e_c + b)): the model's output for class c's embedding.

    ``rank`` (a bound on the rank of ``embeddings``, K for one batch) and
    ``tolerance`` > 0 allow the products W e_c through a basis of the rows'
    span; see ``embedding_products``.
    """
    logits = embedding_products(embeddings, weight.to(torch.float64), rank, tolerance)
    logits += bias.to(torch.float64)
    if alpha != 1.0:
        logits *= alpha
    # softmax in place: the logits are a new C x C array, and a second one costs more
    # in fresh memory pages than the arithmetic.
    logits -= logits.amax(dim=1, keepdim=True)
    return logits.exp_().div_(logits.sum(dim=1, keepdim=True))


def embedding_products(
    embeddings: torch.Tensor, weight: torch.Tensor, rank: int | None = None, tolerance: float = 0.0
) -> torch.Tensor:
    """``embeddings @ weight.T``, through a basis of the rows' span where that is exact enough and cheaper.

    grad_W = (1/K) sum_n (p_n - y_n) e_n^T has rank at most K, and so has the
    matrix of class embeddings (its rows rescaled). A random sketch gives an
    orthonormal basis Q of (d x K + 10) of the span of the rows; then
    e_c W^T = (e_c Q)(W Q)^T for every row that lies in it, at a cost of
    C x d x (K + 10) instead of C x d x C. A row whose distance to the span is
    more than ``tolerance`` times its norm (the float32 rounding of the
    gradient leaves about 1e-7; a defense's noise far more) is multiplied out
    in full, so every row of the result is within ``tolerance`` x |e_c| |w_j|
    of the plain product. When a quarter of the rows miss, or the bound is not
    small beside C and d, it is the plain product.
    """
    num_rows, dim = embeddings.shape
    if rank is None or tolerance <= 0:
        return embeddings @ weight.T
    width = rank + SKETCH_OVERSAMPLING
    # Sketch, basis, the two thin products and the check: about 3 d + C multiply-adds
    # per row and column of the basis, against d per row and class for the plain product.
    if width * (3 * dim + weight.shape[0]) * 2 > dim * weight.shape[0] or width >= dim:
        return embeddings @ weight.T
    norms = embeddings.norm(dim=1)
    generator = torch.Generator(device=embeddings.device).manual_seed(0)
    sketch = torch.randn(
        width, num_rows, generator=generator, dtype=embeddings.dtype, device=embeddings.device
    )
    # Every row weighs the same in the sketch, however large its embedding.
    sketch /= torch.where(norms > 0, norms, 1.0)
    # Thin products as (width x n) @ (n x m): about twice as fast as the transposed layout with MKL.
    basis = torch.linalg.qr((sketch @ embeddings).T).Q.T.contiguous()
    coordinates = basis @ embeddings.T
    # |e_c - e_c Q Q^T|^2 = |e_c|^2 - |e_c Q|^2 for an orthonormal Q.
    captured = coordinates.norm(dim=0)
    # (Written so that a NaN counts as a miss.)
    missing = (norms > 0) & ~(norms.square() - captured.square() <= (tolerance * norms).square())
    products = coordinates.T @ (basis @ weight.T)
    misses = torch.nonzero(missing).flatten()
    if misses.numel() * 4 > num_rows:
        return embeddings @ weight.T
    if misses.numel():
        products[misses] = embeddings[misses] @ weight.T
    return products


def unstable_rows(
    embeddings: torch.Tensor, usable: torch.Tensor, norm_guard: float
) -> torch.Tensor:
    """Classes whose restored embedding is blown up: norm above ``norm_guard`` x the median.

    e_c = grad_W[c] / grad_b[c] is a weighted mean of the batch's embeddings whose
    weights (p_n[c] - y_n[c]) / (K grad_b[c]) sum to one. When k_c is close to
    sum_n p_n[c] (common once K is several times C: K = 1024, C = 100 gives
    about 10 of each with p about 0.01) grad_b[c] is nearly zero, the weights
    explode and so does e_c: its softmax becomes arbitrary and spoils every
    equation it enters. ``norm_guard = 0`` finds none (the published method).
    """
    count = int(usable.sum()) if norm_guard > 0 else 0
    if count < 2:
        return torch.zeros_like(usable)
    norms = embeddings.norm(dim=1)
    median = norms.median() if count == usable.numel() else norms[usable].median()
    return usable & (norms > norm_guard * median)


def fallback_rows(
    probabilities: torch.Tensor,
    replace: torch.Tensor,
    trusted: torch.Tensor,
    bias: torch.Tensor,
    alpha: float,
) -> torch.Tensor:
    """Give the ``replace`` classes a stand-in probability row.

    The stand-in is the mean row of the ``trusted`` classes; with none trusted,
    the model's output for a zero embedding, softmax(alpha b) (exact when W = 0,
    where every sample has that output).
    """
    if not bool(replace.any()):
        return probabilities
    if bool(trusted.any()):
        weights = trusted.to(probabilities.dtype)
        stand_in = (weights @ probabilities) / weights.sum()
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
    ``unknowns``. With every class in both (the usual case) it is solved as the
    equivalent square system of ``solve_square``; otherwise, or when that is
    singular, through the normal equations.
    """
    num_classes = probabilities.shape[0]
    if bool((unknowns & equations).all()):
        solution = solve_square(probabilities, bias_grad, num_images)
        if solution is not None:
            return solution.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=probabilities.device)
    if not bool(unknowns.any()) or not bool(equations.any()):
        return counts
    # A[i, j] = p_j[i] - [i == j]: sample mass of class j that lands on output i, minus its label.
    system = probabilities.T - torch.eye(
        num_classes, dtype=torch.float64, device=probabilities.device
    )
    system = system[equations][:, unknowns]
    system = torch.cat([system, torch.ones_like(system[:1])], dim=0)
    target = torch.cat(
        [
            num_images * bias_grad.to(torch.float64)[equations],
            bias_grad.new_tensor([num_images], dtype=torch.float64),
        ]
    )
    # Normal equations with a Cholesky solve: the system is tall and well conditioned
    # (A ~ P^T - I), and this is several times faster than QR/SVD at C = 1000.
    gram = system.T @ system
    rhs = system.T @ target
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        solution = torch.cholesky_solve(rhs[:, None], factor)[:, 0]
    else:  # rank deficient (e.g. two classes with identical p): fall back to a minimum-norm solve
        fitted = torch.linalg.lstsq(system.cpu(), target.cpu()[:, None], driver="gelsd")
        solution = fitted.solution[:, 0].to(probabilities.device)
    counts[unknowns] = torch.nan_to_num(solution, nan=0.0, posinf=0.0, neginf=0.0)
    return counts


def solve_square(
    probabilities: torch.Tensor, bias_grad: torch.Tensor, num_images: int
) -> torch.Tensor | None:
    """The least-squares counts when every class is an unknown and an equation, or None if singular.

    Each row p_j sums to one, so each column p_j - e_j of A = P^T - I sums to
    zero: A's columns lie in the plane 1^T v = 0. A^T t then ignores the mean of
    the target t = K grad_b, and when A has rank C - 1 (the normal equations are
    regular exactly then) the centred target lies in A's column space: the
    least-squares solution solves A k = t - mean(t) and 1^T k = K exactly. Those
    are the C equations (A + 1 1^T) k = t - mean(t) + K (sum them to see
    1^T k = K): one LU solve of C x C, a third of the multiply-adds of the
    normal equations, with the condition number of A instead of its square.
    Returns None when a pivot is under ``SINGULAR_PIVOT_RATIO`` of the largest,
    for the caller's general least-squares path.
    """
    system = probabilities.T + 1.0
    system.diagonal().sub_(1.0)
    target = num_images * bias_grad.to(torch.float64)
    rhs = target.sub_(target.mean() - num_images)
    factor, pivots, info = torch.linalg.lu_factor_ex(system)
    smallest, largest = factor.diagonal().abs().aminmax()
    if not bool((info == 0) & (smallest > SINGULAR_PIVOT_RATIO * largest)):
        return None
    return torch.linalg.lu_solve(factor, pivots, rhs[:, None])[:, 0]


def round_counts(raw: torch.Tensor, num_images: int) -> torch.Tensor:
    """Negative -> 0, round, anything above K -> 0 (the paper's post-processing)."""
    counts = torch.round(raw.clamp(min=0)).to(torch.long)
    return counts.masked_fill_(counts > num_images, 0)


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
    missing = num_images - int(adjusted.sum())
    if missing == 0:
        return adjusted
    if eligible is None:
        eligible = torch.ones_like(counts, dtype=torch.bool)
    # How far rounding moved each entry down (positive) or up (negative).
    residual = raw.clamp(min=0).to(torch.float64) - adjusted.to(torch.float64)
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

    def __init__(
        self,
        alpha: float = 1.0,
        estimate: bool = False,
        simplified: bool = False,
        norm_guard: float = 3.0,
    ):
        self.alpha = alpha
        self.estimate = estimate
        self.simplified = simplified
        self.norm_guard = norm_guard

    @classmethod
    def from_options(
        cls,
        alpha: float = 1.0,
        estimate: bool = False,
        simplified: bool = False,
        norm_guard: float = 3.0,
        **_,
    ):
        return cls(alpha=alpha, estimate=estimate, simplified=simplified, norm_guard=norm_guard)

    def __call__(self, shared: SharedGradients) -> Restoration:
        with one_cpu_thread(shared.bias_grad.device):
            return self._restore(shared)

    def _restore(self, shared: SharedGradients) -> Restoration:
        raw, unknowns, usable = self.solve(shared)
        counts = round_counts(raw, shared.num_images)
        adjusted = adjust_to_total(raw, counts, shared.num_images, eligible=unknowns)
        return Restoration.from_counts(counts, adjusted, undetermined=~usable)

    def solve(self, shared: SharedGradients) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The least-squares counts before rounding (float64), which classes were unknowns
        and which had a usable embedding. For an attack that builds on iLRG's estimate."""
        num_classes = shared.num_classes
        # The small operands in float64 once (the helpers would each convert them again).
        bias_grad, weight, bias = (
            tensor.to(torch.float64) for tensor in (shared.bias_grad, shared.weight, shared.bias)
        )
        # A class with a finite but exactly-zero bias gradient (sum_n p_n[c] == k_c) keeps its
        # unknown count and gets a stand-in probability row; a non-finite one is left out.
        equations = torch.isfinite(bias_grad)
        finite = equations & finite_rows(shared.weight_grad)
        embeddings, usable = embeddings_of_finite(shared.weight_grad, bias_grad, finite)
        if self.estimate:
            probabilities = torch.full(
                (num_classes, num_classes),
                1.0 / num_classes,
                dtype=torch.float64,
                device=embeddings.device,
            )
        else:
            # The gradient's rank is at most K; rows may be taken through a basis of its span to
            # within a few units of the precision it was shared in.
            precision = (
                torch.finfo(shared.weight_grad.dtype).eps
                if shared.weight_grad.is_floating_point()
                else 0.0
            )
            probabilities = class_probabilities(
                embeddings,
                weight,
                bias,
                self.alpha,
                rank=shared.num_images,
                tolerance=8 * precision,
            )
            unstable = unstable_rows(embeddings, usable, self.norm_guard)
            probabilities = fallback_rows(
                probabilities,
                (finite & ~usable) | unstable,
                usable & ~unstable,
                bias,
                self.alpha,
            )
        unknowns = finite
        if self.simplified:
            if shared.known_classes is None:
                raise ValueError("simplified iLRG needs the known present classes")
            known = shared.known_classes.to(device=usable.device, dtype=torch.bool)
            unknowns = unknowns & known
            equations = equations & known
        raw = solve_counts(probabilities, bias_grad, shared.num_images, unknowns, equations)
        return raw, unknowns, usable
