"""One attack experiment's set-up: what ``experiment.runner.prepare`` builds and every try reads.

Its own module so that the runner (which builds it) and the try (which reads it) both import it,
and neither the other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attacks.dp_sgd import Privacy
from attacks.observation import LocalTraining
from experiment.config import AttackConfig
from experiment.extension import Extension


@dataclass
class Setup:
    config: AttackConfig
    datamodule: object
    dataset: object
    model: torch.nn.Module
    device: torch.device
    attacks: dict[str, object]
    num_classes: int
    #: client-side transform of the gradients before they are shared (a defense), or None
    defense: Callable | None = None
    extensions: list[Extension] = field(default_factory=list)
    #: what the run says before its tries (prepare runs before the run's log exists)
    notes: list[str] = field(default_factory=list)
    #: what results.json should say about the victim and the defense
    describe: dict = field(default_factory=dict)
    #: FedAvg's local training on the client (``--local_epochs``); None: FedSGD, one gradient
    local_training: LocalTraining | None = None
    #: the client trains with DP-SGD (``--defense_method dpsgd``); None: it does not
    privacy: Privacy | None = None
