"""RLG (Dang et al., 2021): revealing labels through the SVD of the weight gradient.

grad_W = (1/K) sum_n (p_n - y_n) e_n^T, so its column space is spanned by the
vectors p_n - y_n, each negative only at its sample's label. With grad_W = U S V^T
and U_r the first r = min(K, rank) left singular vectors, class c is present iff
some vector U_r x of that space is negative at c and non-negative elsewhere:
U_r[c] . x < 0 <= U_r[j] . x for all j != c. By Farkas' lemma that fails exactly
when U_r[c] lies in the cone spanned by the other rows.

Deciding it takes one linear program per class. Two cheap steps cut the count:
classes are tried most-likely-present first, and any class whose row lies in the
cone of rows already proven present (a small non-negative least-squares fit) is
absent without an LP, since that cone lies inside the cone of all other rows.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linprog, nnls

from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack

#: relative residual under which a row counts as inside a cone
CONE_TOLERANCE = 1e-9


def label_space(weight_grad: torch.Tensor, num_images: int) -> np.ndarray:
    """U_r: the first min(K, rank) left singular vectors of grad_W, as a C x r array."""
    matrix = torch.nan_to_num(weight_grad.to(torch.float64), nan=0.0, posinf=0.0, neginf=0.0)
    left, singular, _ = torch.linalg.svd(matrix, full_matrices=False)
    if singular.numel() == 0 or float(singular[0]) == 0.0:
        return np.zeros((matrix.shape[0], 0))
    tolerance = float(singular[0]) * max(matrix.shape) * torch.finfo(torch.float64).eps
    rank = int((singular > tolerance).sum())
    return left[:, : min(num_images, rank)].cpu().numpy()


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


def in_cone(row: np.ndarray, generators: np.ndarray) -> bool:
    """Is ``row`` a non-negative combination of the rows of ``generators``?"""
    if generators.shape[0] == 0:
        return False
    _, residual = nnls(generators.T, row)
    return residual <= CONE_TOLERANCE * max(1.0, float(np.linalg.norm(row)))


def present_classes(rows: np.ndarray, order: np.ndarray, prune: bool = True) -> np.ndarray:
    """Decide every class; ``order`` lists classes most-likely-present first."""
    present = np.zeros(rows.shape[0], dtype=bool)
    if rows.shape[1] == 0:
        return present
    for c in order:
        if prune and in_cone(rows[c], rows[present]):
            continue
        present[c] = separable(rows, c)
    return present


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
