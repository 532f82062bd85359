"""Label-restoration attacks on shared gradients, behind the ``ATTACKS`` registry."""

# Importing a module registers its attack.
from attacks import (  # noqa: F401
    bias_corrected,
    decompose,
    gradinversion,
    idlg,
    ilrg,
    llbg,
    llg,
    random_guess,
    rlg,
    rlu,
    rlu_plus,
    zeros,
)
from attacks.auxiliary import AuxiliaryData
from attacks.observation import Restoration, SharedGradients
from attacks.registry import ATTACKS, build_attack, check_attack_name

#: this project's per-sample attack, which ``--compare`` runs right after iLRG
PER_SAMPLE_ATTACKS = ("decompose",)
#: the published methods ``--compare`` runs besides iLRG, in table order
PRIOR_ATTACKS = ("iDLG", "GI", "RLG", "LLG", "bias", "random", "zeros")
#: the attacks that need the server's auxiliary data (``--aux_split``); ``--compare`` adds them
#: when auxiliary data is given
AUXILIARY_ATTACKS = ("RLU", "LLBG", "RLU+")

__all__ = [
    "ATTACKS",
    "AUXILIARY_ATTACKS",
    "AuxiliaryData",
    "PER_SAMPLE_ATTACKS",
    "PRIOR_ATTACKS",
    "Restoration",
    "SharedGradients",
    "build_attack",
    "check_attack_name",
]
