"""iDLG (Zhao et al., 2020), extended to batches.

With non-negative embeddings (ReLU), a class's weight-gradient row is a sum of
(p_n[c] - y_n[c]) e_n: only samples labelled c contribute negative terms, so a
negative row sum signals the class.
"""

from __future__ import annotations

import torch

from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack


@register_attack("iDLG")
class IDLG:
    restores_counts = False

    @classmethod
    def from_options(cls, **_):
        return cls()

    def __call__(self, shared: SharedGradients) -> Restoration:
        row_sums = torch.nan_to_num(shared.weight_grad.to(torch.float64).sum(dim=1), nan=0.0)
        return Restoration(present=row_sums < 0)
