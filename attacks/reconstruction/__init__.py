"""Image reconstruction from shared gradients with restored labels (the paper's Experiment 3).

Inverting Gradients (Geiping et al., NeurIPS 2020) has to guess the labels of
the batch along with its images; iLRG's restored counts fix them instead,
which is how the iLRG paper improves the attack. ``inverting`` holds the
optimisation and ``attacks.image_metrics`` the scores; the per-try step of ``attack.py`` and its
options are the harness's (``experiment.reconstruction``).
"""

from attacks.reconstruction.inverting import (
    COST_FUNCTIONS,
    GradientMatcher,
    ReconstructionConfig,
    ReconstructionResult,
    box_bounds,
    initial_images,
    project_to_box,
    reconstruct,
    total_variation,
)

__all__ = [
    "COST_FUNCTIONS",
    "GradientMatcher",
    "ReconstructionConfig",
    "ReconstructionResult",
    "box_bounds",
    "initial_images",
    "project_to_box",
    "reconstruct",
    "total_variation",
]
