"""The options of what the client does before it shares: local training (FedAvg) and a defense.

The algorithms live in ``attacks.local_update`` and ``attacks.defenses`` and know nothing of the
command line; this module turns ``attack.py``'s options into their objects.
"""

from __future__ import annotations

import argparse

from attacks.defenses import DEFENSES, Defense
from attacks.dp_sgd import Privacy
from attacks.local_update import DEFAULT_LOCAL_LR, LOCAL_OPTIMIZERS, MOMENTUM, LocalTraining
from experiment.config import AttackConfig
from experiment.options import (
    bounded_float,
    clip_norm,
    epsilon_value,
    non_negative_float,
    non_negative_int,
    percentage,
    positive_float,
    positive_int,
)
from user_errors import UserError


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


#: the DP-SGD client's name among the defenses
DPSGD = "dpsgd"


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
    if config.defense_method == DPSGD:
        return None  # not a transform of the gradients: the client itself trains privately
    method = DEFENSES[config.defense_method]
    return Defense(method, getattr(config, method.parameter), seed)


def build_privacy(config: AttackConfig) -> Privacy | None:
    """``--defense_method dpsgd``'s protocol, its noise from ``--target_epsilon`` through the
    accountant (each sample is in E steps, 1 under FedSGD) or ``--noise_multiplier``; None
    without it. The DP-SGD options without dpsgd are an error, never ignored."""
    given = [
        f"--{name}"
        for name in ("target_epsilon", "noise_multiplier")
        if getattr(config, name) is not None
    ]
    if not (config.defense and config.defense_method == DPSGD):
        if given:
            raise UserError(f"{', '.join(given)} set DP-SGD; add --defense --defense_method dpsgd")
        return None
    if len(given) != 1:
        raise UserError(
            "--defense_method dpsgd needs exactly one of --target_epsilon and --noise_multiplier"
            + (", got both" if given else "")
        )
    steps = max(config.local_epochs, 1)
    if config.target_epsilon is not None:
        return Privacy.for_epsilon(
            config.target_epsilon, config.target_delta, config.max_grad_norm, steps
        )
    return Privacy(config.max_grad_norm, config.noise_multiplier, config.target_delta)


def add_defense_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "defense (applied by the client before the gradients are shared)"
    )
    group.add_argument(
        "--defense", action="store_true", help="transform the gradients with --defense_method"
    )
    group.add_argument(
        "--defense_method",
        choices=[*DEFENSES, DPSGD],
        default=None,
        help="dp: Gaussian noise; clip: global-norm clipping; sparse: zero the smallest entries; "
        "soteria (= perturb): prune the weight-gradient columns of the least sensitive features; "
        "dpsgd: the client trains with DP-SGD through Opacus (per-sample clipping and noise)",
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
    group.add_argument(
        "--target_epsilon",
        type=epsilon_value,
        default=None,
        help="dpsgd: the epsilon the client spends (inf: no noise); the noise from the accountant",
    )
    group.add_argument(
        "--noise_multiplier",
        type=non_negative_float,
        default=None,
        help="dpsgd: the noise's std over the clip norm, instead of --target_epsilon",
    )
    group.add_argument(
        "--target_delta",
        type=bounded_float(0, 1, low_open=True, high_open=True),
        default=1e-5,
        help="dpsgd: the delta of (epsilon, delta)",
    )
    group.add_argument(
        "--max_grad_norm",
        type=clip_norm,
        default=1.0,
        help="dpsgd: each sample's gradient is clipped to this L2 norm (inf: no clipping)",
    )
