"""LLBG (Gat & Sharif, AISec 2024): LLG's two stages on the bias gradient, one impact per class.

A sample of class c moves grad_b[c] by -(1 - p_c)/K: by little where the model
is sure of it. LLG assumes one impact for all classes, which a trained model
breaks (a confident class moves its gradient far less per label than an
uncertain one). LLBG measures each class's confidence conf_c on the server's
auxiliary data and uses the impact -(1 - conf_c)/K: every class with a negative
bias gradient gets a label, then labels go one at a time to the class whose
gradient, with its impacts given back, is lowest.
"""

from __future__ import annotations

import torch

from attacks.auxiliary import AuxiliaryAttack
from attacks.llg import impact_counts
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack


@register_attack("LLBG")
class LLBG(AuxiliaryAttack):
    def __call__(self, shared: SharedGradients) -> Restoration:
        stats = self.statistics_for(shared)
        # A class the model is certain of on every auxiliary sample would absorb labels for
        # free; its impact is floored at the float32 resolution of a probability.
        doubt = (1 - stats.confidence).clamp_min(torch.finfo(torch.float32).eps)
        impact = (-doubt / shared.num_images).to(shared.bias_grad.device)
        counts = impact_counts(shared.bias_grad, shared.num_images, impact)
        return Restoration.from_counts(counts, counts)
