"""The options of what the client does before it shares: local training (FedAvg) and a defense.

The algorithms live in ``attacks.local_update`` and ``attacks.defenses`` and know nothing of the
command line; this module turns ``attack.py``'s options into their objects.
"""

from __future__ import annotations

import argparse

from attacks.defenses import DEFENSES, Defense
from attacks.local_update import DEFAULT_LOCAL_LR, LOCAL_OPTIMIZERS, MOMENTUM, LocalTraining
from experiment.config import AttackConfig
from experiment.errors import UserError
from experiment.options import (
    non_negative_float,
    non_negative_int,
    percentage,
    positive_float,
    positive_int,
)


def build_local_training(config: AttackConfig) -> LocalTraining | None:
    """The ``--local_*`` options as a protocol; None for FedSGD (``--local_epochs 0``)."""
    if config.local_epochs == 0:
        stray = [
            f"--{name}"
            for name, default in (
                ("local_batch_size", None),
                ("local_lr", DEFAULT_LOCAL_LR),
                ("local_optimizer", "sgd"),
            )
            if getattr(config, name) != default
        ]
        if stray:
            raise UserError(f"{', '.join(stray)} set local training; add --local_epochs E >= 1")
        return None
    return LocalTraining(
        config.local_epochs, config.local_batch_size, config.local_lr, config.local_optimizer
    )


def add_local_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "federated averaging (the client trains locally and shares its weight change)"
    )
    group.add_argument(
        "--local_epochs",
        type=non_negative_int,
        default=0,
        help="local epochs E over the K images; 0 = FedSGD, one gradient of the batch",
    )
    group.add_argument(
        "--local_batch_size",
        type=positive_int,
        default=None,
        help="local mini-batch size B (default and any B >= K: the whole batch)",
    )
    group.add_argument(
        "--local_lr", type=positive_float, default=DEFAULT_LOCAL_LR, help="local learning rate"
    )
    group.add_argument(
        "--local_optimizer",
        choices=LOCAL_OPTIMIZERS,
        default="sgd",
        help=f"local optimizer: plain SGD or SGD with momentum {MOMENTUM}",
    )


def build_defense(config: AttackConfig, seed: int) -> Defense | None:
    """The defense the options ask for, or None; raises ``UserError`` on an incomplete request."""
    if not config.defense:
        if config.defense_method is not None:
            raise UserError(
                f"--defense_method {config.defense_method} needs --defense to take effect"
            )
        return None
    if config.defense_method is None:
        raise UserError(f"--defense needs --defense_method; valid methods: {', '.join(DEFENSES)}")
    method = DEFENSES[config.defense_method]
    return Defense(method, getattr(config, method.parameter), seed)


def add_defense_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "defense (applied by the client before the gradients are shared)"
    )
    group.add_argument(
        "--defense", action="store_true", help="transform the gradients with --defense_method"
    )
    group.add_argument(
        "--defense_method",
        choices=list(DEFENSES),
        default=None,
        help="dp: Gaussian noise; clip: global-norm clipping; sparse: zero the smallest entries; "
        "soteria (= perturb): prune the weight-gradient columns of the least sensitive features",
    )
    group.add_argument(
        "--noise_std",
        type=non_negative_float,
        default=1e-3,
        help="dp: std of the noise added to every entry",
    )
    group.add_argument(
        "--clip_bound",
        type=positive_float,
        default=4.0,
        help="clip: global L2 norm of all gradients together",
    )
    group.add_argument(
        "--sparse_ratio",
        type=percentage,
        default=10.0,
        help="sparse: percent of each tensor's entries zeroed",
    )
    group.add_argument(
        "--prune_ratio",
        type=percentage,
        default=10.0,
        help="soteria: percent of embedding features pruned",
    )
