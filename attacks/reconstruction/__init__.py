"""Image reconstruction from shared gradients with restored labels (the paper's Experiment 3).

Inverting Gradients (Geiping et al., NeurIPS 2020) has to guess the labels of
the batch along with its images; iLRG's restored counts fix them instead,
which is how the iLRG paper improves the attack. ``inverting`` holds the
optimisation, ``extension`` the per-try step of ``attack.py`` and its options;
``attacks.image_metrics`` the scores.
"""

from attacks.reconstruction.extension import (
    Reconstruction,
    add_reconstruction_arguments,
    label_source,
)
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
    "Reconstruction",
    "ReconstructionConfig",
    "ReconstructionResult",
    "add_reconstruction_arguments",
    "box_bounds",
    "initial_images",
    "label_source",
    "project_to_box",
    "reconstruct",
    "total_variation",
]
