"""Label-restoration attacks on shared gradients, behind the ``ATTACKS`` registry."""

# Importing a module registers its attack.
from attacks import bias_corrected, gradinversion, idlg, ilrg, llg, random_guess, rlg  # noqa: F401
from attacks.observation import Restoration, SharedGradients
from attacks.registry import ATTACKS, build_attack, check_attack_name

#: the methods ``--compare`` runs besides iLRG, in table order
PRIOR_ATTACKS = ("iDLG", "GI", "RLG", "LLG", "bias", "random")

__all__ = [
    "ATTACKS",
    "PRIOR_ATTACKS",
    "Restoration",
    "SharedGradients",
    "build_attack",
    "check_attack_name",
]
