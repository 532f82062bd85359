"""RLG (Dang et al., 2021): revealing labels through the SVD of the weight gradient.

grad_W = (1/K) sum_n (p_n - y_n) e_n^T, so its column space is spanned by the
vectors p_n - y_n, each negative only at its sample's label. With grad_W = U S V^T
and U_r the first r = min(K, rank) left singular vectors, class c is present iff
some vector U_r x of that space is negative at c and non-negative elsewhere:
U_r[c] . x < 0 <= U_r[j] . x for all j != c. By Farkas' lemma that fails exactly
when U_r[c] lies in the cone spanned by the other rows.

The plain way decides each class with one linear program over all C rows
(``present_classes(..., prune=False)``). The fast way (the default) reaches the
same answers with certificates found on a few rows (Clarkson's idea): the
distance from U_r[c] to the cone of a small working set of other rows, by
non-negative least squares. A fit with zero residual and moderate weights
proves c absent. Otherwise the residual gives a direction x that separates
U_r[c] from the working set, and one product U_r x checks it against every row:
no row on the wrong side proves c present, and the rows most on the wrong side
join the working set, which all classes share. Rows of about 1e-9 and less
(common with a saturated softmax) are where the exact answer and the LP's,
with its tolerances, can part; a class whose certificate leans on them is left
to the LP. At C = 1000 that is a few dozen small LPs instead of a thousand
large ones.

At ImageNet scale the SVD of the 1000 x 2048 gradient cost more than all of
that; only its first r = K singular vectors are needed, and a randomized range
finder gives them to float64 accuracy at a fraction of the cost.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import numpy as np
import torch
from scipy.optimize import linprog, nnls

from attacks.cpu_threads import one_cpu_thread
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack

#: entries of U_r at most this large are zero: the LP solver (HiGHS) ignores such matrix
#: entries (its small_matrix_value), and both ways of deciding must see the same rows
ENTRY_FLOOR = 1e-9
#: relative residual under which a row counts as inside a cone
CONE_TOLERANCE = 1e-9
#: a unit row is on the wrong side of a separating x if unit[j] . x < -this |x|: rounding
#: error only, so a separator holds for every row however short (the LP scales rows up)
SEPARATION_TOLERANCE = 1e-12
#: a cone fit of U_r[c] with total weight up to this proves the LP infeasible (it would need 1e7)
WEIGHT_LIMIT = 1e4
#: a separating x up to this long in the LP's scale proves the LP feasible
SEPARATOR_LIMIT = 1e6
#: rows added to the working set per failed separation
ROWS_PER_STEP = 4
#: extra columns of the randomized range finder beyond r
SKETCH_OVERSAMPLING = 10


def label_space(weight_grad: torch.Tensor, num_images: int) -> np.ndarray:
    """U_r: the first min(K, rank) left singular vectors of grad_W, as a C x r array.

    The rank is the numerical rank in the gradient's own precision: computed in
    float64, a float32 gradient of a trained model has singular values down to
    its rounding (about 1e-7 of the largest) that are noise, and the directions
    they add let almost every class pass the cone test.
    """
    eps = rounding_of(weight_grad)
    matrix = weight_grad.to(torch.float64, copy=True)
    with one_cpu_thread(matrix.device):
        torch.nan_to_num_(matrix, nan=0.0, posinf=0.0, neginf=0.0)
        left = _leading_left_vectors(matrix, num_images, eps)
        if left is None:
            left = _left_vectors_by_svd(matrix, num_images, eps)
    return left.cpu().numpy()


def rounding_of(tensor: torch.Tensor) -> float:
    """The relative rounding of the tensor's dtype (float32's 1.2e-7; float64 for other kinds)."""
    return torch.finfo(tensor.dtype if tensor.is_floating_point() else torch.float64).eps


def rank_tolerance(largest: float, shape, eps: float) -> float:
    """Singular values at most this are rounding: numpy's matrix_rank rule, in the data's precision."""
    return largest * max(shape) * eps


def _left_vectors_by_svd(matrix: torch.Tensor, num_images: int, eps: float) -> torch.Tensor:
    left, singular, _ = torch.linalg.svd(matrix, full_matrices=False)
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return matrix.new_zeros((matrix.shape[0], 0))
    rank = int((singular > rank_tolerance(float(singular[0]), matrix.shape, eps)).sum())
    return left[:, : min(num_images, rank)]


def _leading_left_vectors(matrix: torch.Tensor, num_images: int, eps: float) -> torch.Tensor | None:
    """The first K left singular vectors by ``sketched_svd``, or None where the full SVD is due.

    Approximate singular values never exceed the true ones, so sigma_K above the
    rank tolerance proves rank >= K; otherwise (a batch of repeated images, say)
    the rank needs the full SVD.
    """
    sketched = sketched_svd(matrix, num_images)
    if sketched is None:
        return None
    left, singular, _ = sketched
    rows, cols = matrix.shape
    if not float(singular[num_images - 1]) > rank_tolerance(float(singular[0]), (rows, cols), eps):
        return None
    return left[:, :num_images]


def sketched_svd(
    matrix: torch.Tensor, rank_bound: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The SVD of ``matrix`` restricted to its leading K + 10 directions, by a randomized range
    finder; None where the matrix is too small for a sketch to pay (then take the full SVD).

    A random sketch of K + 10 columns, one power iteration and an SVD of the
    (K + 10) x d projection: the span of the first K vectors is exact up to
    (sigma_{K+11} / sigma_K)^3 (the float32 rounding of a gradient of rank K puts
    sigma_{K+1} about 1e-4 below sigma_K). Returns (U, S, V^T) of K + 10 terms.
    """
    rows, cols = matrix.shape
    width = rank_bound + SKETCH_OVERSAMPLING
    if 4 * width > min(rows, cols):
        return None
    generator = torch.Generator(device=matrix.device).manual_seed(0)
    sketch = torch.randn(width, cols, generator=generator, dtype=matrix.dtype, device=matrix.device)
    # Products kept as (width x n) @ (n x m), MKL's fast layout for thin factors (A^T B with
    # a thin B is up to ten times slower): each line is one product with the matrix.
    basis = torch.linalg.qr((sketch @ matrix.T).T).Q  # range of the matrix ...
    basis = torch.linalg.qr((basis.T @ matrix).T).Q  # ... one power iteration ...
    basis = torch.linalg.qr((basis.T @ matrix.T).T).Q
    left, singular, right_t = torch.linalg.svd(basis.T @ matrix, full_matrices=False)
    return basis @ left, singular, right_t


def separable(rows: np.ndarray, c: int) -> bool:
    """Is there x with rows[c] . x < 0 and rows[j] . x >= 0 for all j != c?  (one LP)"""
    others = np.delete(rows, c, axis=0)
    # Scale fixes rows[c] . x <= -1; the other rows give -rows[j] . x <= 0.
    constraints = np.vstack([rows[c : c + 1], -others])
    bounds = np.zeros(constraints.shape[0])
    bounds[0] = -1.0
    result = linprog(
        np.zeros(rows.shape[1]), A_ub=constraints, b_ub=bounds, bounds=(None, None), method="highs"
    )
    return result.status == 0


def present_classes(rows: np.ndarray, order: np.ndarray, prune: bool = True) -> np.ndarray:
    """Decide every class; ``order`` lists classes most-likely-present first.

    ``prune=False`` is the plain method, one LP over all rows per class; the
    default reaches the same answers by certificates on a shared working set,
    and asks the LP only where a certificate is too weak to predict it.
    """
    present = np.zeros(rows.shape[0], dtype=bool)
    if rows.shape[1] == 0:
        return present
    cleaned = np.where(np.abs(rows) <= ENTRY_FLOOR, 0.0, rows)
    if not prune:
        for c in order:
            present[c] = separable(cleaned, c)
        return present
    norms = np.linalg.norm(cleaned, axis=1)
    # A zero row lies in every cone (absent) and adds nothing to one: only the others take part.
    kept = np.flatnonzero(norms > 0)
    rows, norms = cleaned[kept], norms[kept]
    position = np.full(present.size, -1)
    position[kept] = np.arange(kept.size)
    # Cone membership ignores row lengths; unit rows make one tolerance fit all.
    unit = rows / norms[:, None]
    working: list[int] = []
    for c in order:
        if position[c] >= 0:
            # Where it decides, the LP sees exactly the reference's problem: on rows this
            # short HiGHS can answer an equivalent LP (say, without the zero rows) otherwise.
            ask_lp = partial(separable, cleaned, int(c))
            present[c] = _separable_by_certificates(unit, norms, int(position[c]), working, ask_lp)
    return present


def _separable_by_certificates(
    unit: np.ndarray, norms: np.ndarray, c: int, working: list[int], ask_lp: Callable[[], bool]
) -> bool:
    """``separable`` for row ``c`` proved on subsets of rows; grows ``working`` with the rows it needed.

    ``unit`` holds the rows scaled to length one, ``norms`` their lengths;
    ``ask_lp`` gives the LP's answer where no certificate is strong enough.

    The LP decides with a feasibility tolerance: it finds x with
    U_r[c] . x <= -1 and U_r[j] . x >= -1e-7. By Farkas' lemma that fails exactly
    when U_r[c] = sum_j w_j U_r[j] with w >= 0 and sum_j w_j below 1e7. So a fit
    with total weight under ``WEIGHT_LIMIT`` proves the LP infeasible, and an x
    with no row on the wrong side and |x| under ``SEPARATOR_LIMIT`` (in the LP's
    scale) proves it feasible. Rows of about 1e-9 and less, which the LP all but
    ignores, can make the exact answer and the LP's differ; there the LP decides.
    """
    generators = [j for j in working if j != c]
    while True:
        if generators:
            try:
                weights, distance = nnls(unit[generators].T, unit[c])
            except RuntimeError:  # no convergence (degenerate geometry)
                return ask_lp()
            residual = unit[c] - unit[generators].T @ weights
        else:
            distance, residual = 1.0, unit[c]
        if distance <= CONE_TOLERANCE:
            total_weight = float((weights * norms[c] / norms[generators]).sum())
            return False if total_weight <= WEIGHT_LIMIT else ask_lp()
        # x = -residual has unit[c] . x = -distance^2 and unit[j] . x >= 0 for the generators
        # (the optimality conditions of the fit). Scaled to U_r[c] . x = -1 as in the LP, row j
        # is at sides[j] |U_r[j]| / (distance^2 |U_r[c]|).
        sides = unit @ -residual
        sides[c] = np.inf
        sides[generators] = np.inf
        wrong = np.flatnonzero(sides < -SEPARATION_TOLERANCE * distance)
        if wrong.size == 0:
            separator_norm = 1.0 / (distance * norms[c])
            return True if separator_norm <= SEPARATOR_LIMIT else ask_lp()
        worst = wrong[np.argsort(sides[wrong], kind="stable")[:ROWS_PER_STEP]].tolist()
        generators.extend(worst)
        working.extend(j for j in worst if j not in working)


@register_attack("RLG")
class RLG:
    restores_counts = False

    def __init__(self, prune: bool = True):
        self.prune = prune

    @classmethod
    def from_options(cls, **_):
        return cls()

    def __call__(self, shared: SharedGradients) -> Restoration:
        rows = label_space(shared.weight_grad, shared.num_images)
        # Negative bias gradient is the strongest cheap hint of presence.
        hint = torch.nan_to_num(shared.bias_grad.to(torch.float64), nan=0.0).cpu().numpy()
        present = present_classes(rows, np.argsort(hint, kind="stable"), prune=self.prune)
        return Restoration(present=torch.from_numpy(present).to(shared.bias_grad.device))
