"""The bias-gradient variant of LLG (as in the breaching framework): the same two
stages on grad_b, which is exactly (1/K) sum_n (p_n - y_n) and so needs no
assumption on the sign of the embeddings."""

from __future__ import annotations

from attacks.llg import impact_counts
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack


@register_attack("bias")
class BiasCorrected:
    restores_counts = True

    @classmethod
    def from_options(cls, **_):
        return cls()

    def __call__(self, shared: SharedGradients) -> Restoration:
        counts = impact_counts(shared.bias_grad, shared.num_images)
        return Restoration.from_counts(counts, counts)
