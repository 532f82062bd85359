"""LLBG (Gat & Sharif, AISec 2024): LLG's two stages on the bias gradient, one impact per class.

A sample of class c moves grad_b[c] by -(1 - p_c)/K: by little where the model
is sure of it. LLG assumes one impact for all classes, which a trained model
breaks (a confident class moves its gradient far less per label than an
uncertain one). LLBG measures each class's confidence conf_c on the server's
auxiliary data and uses the impact -(1 - conf_c)/K: every class with a negative
bias gradient gets a label, then labels go one at a time to the class whose
gradient, with its impacts given back, is lowest.

Without auxiliary data the authors' code (nadbag98/LLBG, ``approx_avg_conf``,
default 0) gives every class one assumed confidence: ``confidence=``. On an
untrained model 0 is close to the truth (1/C) and exact where the measured
means are not (README, "How faithful is each baseline").
"""

from __future__ import annotations

import math

import torch

from attacks.auxiliary import AuxiliaryAttack, AuxiliaryData
from attacks.llg import impact_counts
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack
from user_errors import UserError


@register_attack("LLBG")
class LLBG(AuxiliaryAttack):
    def __init__(self, auxiliary: AuxiliaryData | None, confidence: float | None = None, **kw):
        if confidence is not None and not (math.isfinite(confidence) and 0 <= confidence < 1):
            raise UserError(f"LLBG's assumed confidence must be in [0, 1), got {confidence}")
        #: every class's assumed confidence, or None: measured on the auxiliary data
        self.confidence = confidence
        super().__init__(auxiliary, required=self.needs_auxiliary(llbg_confidence=confidence), **kw)

    @classmethod
    def needs_auxiliary(cls, llbg_confidence: float | None = None, **_) -> bool:
        return llbg_confidence is None

    @classmethod
    def from_options(cls, auxiliary=None, llbg_confidence=None, layer_name=None, seed=0, **_):
        return cls(auxiliary, confidence=llbg_confidence, layer_name=layer_name, seed=seed)

    def __call__(self, shared: SharedGradients) -> Restoration:
        if self.confidence is None:
            confidence = self.statistics_for(shared).confidence
        else:
            confidence = torch.full((shared.num_classes,), self.confidence, dtype=torch.float64)
        # A class the model is certain of on every auxiliary sample would absorb labels for
        # free; its impact is floored at the float32 resolution of a probability.
        doubt = (1 - confidence).clamp_min(torch.finfo(torch.float32).eps)
        impact = (-doubt / shared.num_images).to(shared.bias_grad.device)
        counts = impact_counts(shared.bias_grad, shared.num_images, impact)
        return Restoration.from_counts(counts, counts)
