"""The options of ``train.py``. Names follow the original iLRG code so its commands carry over."""

from __future__ import annotations

import argparse

from experiment.options import (
    OneLineParser,
    add_config_argument,
    add_data_source_arguments,
    add_network_arguments,
    add_partition_arguments,
    bounded_float,
    clip_norm,
    epsilon_value,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from lightning_modules.train_config import TrainConfig

DEFAULT_EPOCHS = 100
DEFAULT_ITERS = 1000
DEFAULT_MODEL_PATH = "checkpoints"
PRECISIONS = (
    "32-true",
    "64-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "32",
    "64",
    "16",
    "bf16",
)


def devices_option(text: str) -> int | str:
    """``auto``, a number of devices, or a comma-separated list of device ids (as Lightning takes)."""
    if text == "auto":
        return text
    if text.isdigit():
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
        return value
    ids = text.split(",")
    if all(part.strip().isdigit() for part in ids if part.strip()) and any(p.strip() for p in ids):
        return text
    raise argparse.ArgumentTypeError(f"expected auto, a count or ids like 0,1; got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        config_type=TrainConfig,
        prog="train.py",
        description=(
            "Train a victim network and save checkpoints at chosen stages (epochs or iterations) "
            "for attack.py --trained_model / --checkpoints."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_argument(parser)

    run = parser.add_argument_group("run")
    run.add_argument("--exp_name", default="train", help="TensorBoard run name under --log_dir")
    run.add_argument(
        "--log_dir", default="logs", help="TensorBoard logs go to <log_dir>/<exp_name>/version_<n>"
    )
    run.add_argument(
        "--seed",
        type=int,
        default=1234,
        help="seeds the initial weights, the data partition and the shuffling",
    )
    run.add_argument(
        "--dryrun",
        action="store_true",
        help="run one batch of training and validation; write no checkpoint or log",
    )
    run.add_argument(
        "--resume",
        metavar="PATH",
        help="continue the run that saved this checkpoint (same options)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "--attack_every_n_steps",
        type=non_negative_int,
        default=0,
        help="run the label-leakage attacks every N optimizer steps during training (0: never)",
    )

    trainer = parser.add_argument_group("hardware (passed to the Lightning Trainer)")
    trainer.add_argument("--accelerator", default="auto", help="auto, cpu, gpu, cuda, mps, ...")
    trainer.add_argument(
        "--devices", type=devices_option, default="auto", help="auto, a count, or ids like 0,1"
    )
    trainer.add_argument("--strategy", default="auto", help="auto, ddp, ddp_spawn, fsdp, ...")
    trainer.add_argument("--num_nodes", type=positive_int, default=1, help="number of machines")
    trainer.add_argument(
        "--precision", default="32-true", choices=PRECISIONS, help="numeric precision"
    )

    data = parser.add_argument_group("data")
    add_data_source_arguments(data)
    add_partition_arguments(data)
    data.add_argument(
        "--augment", action="store_true", help="augment the training images (CIFAR-100, ImageNet)"
    )
    data.add_argument(
        "--num_workers", type=non_negative_int, default=0, help="dataloader worker processes"
    )

    add_network_arguments(parser)

    optim = parser.add_argument_group("optimization")
    optim.add_argument(
        "--epochs",
        type=positive_int,
        default=DEFAULT_EPOCHS,
        help="epochs to train (without --iter_train)",
    )
    optim.add_argument(
        "--iter_train",
        action="store_true",
        help="count training in optimizer steps (--iters) instead of epochs",
    )
    optim.add_argument(
        "--iters",
        type=positive_int,
        default=DEFAULT_ITERS,
        help="optimizer steps to train (with --iter_train)",
    )
    optim.add_argument("--batch_size", type=positive_int, default=128, help="training batch size")
    optim.add_argument("--lr", type=positive_float, default=0.1, help="learning rate")
    optim.add_argument(
        "--optimizer", default="SGD", choices=["SGD", "AdamW"], help="SGD: Nesterov momentum 0.9"
    )
    optim.add_argument(
        "--scheduler",
        default="linear",
        choices=["linear", "none"],
        help="linear: lr x0.1 after 3/8, 5/8 and 7/8 of training",
    )
    optim.add_argument("--weight_decay", type=non_negative_float, default=5e-4, help="weight decay")
    optim.add_argument(
        "--warmup",
        action="store_true",
        help="ramp the lr from lr/10 to lr over the first tenth of training",
    )

    private = parser.add_argument_group("DP-SGD (through Opacus; pip install -e '.[dp]')")
    private.add_argument(
        "--dp_target_epsilon",
        type=epsilon_value,
        default=None,
        help="train with DP-SGD spending this epsilon (each sample is in one step per epoch)",
    )
    private.add_argument(
        "--dp_noise_multiplier",
        type=non_negative_float,
        default=None,
        help="train with DP-SGD at this noise multiplier instead",
    )
    private.add_argument(
        "--dp_max_grad_norm", type=clip_norm, default=1.0, help="per-sample clip norm"
    )
    private.add_argument(
        "--dp_delta",
        type=bounded_float(0, 1, low_open=True, high_open=True),
        default=1e-5,
        help="the delta of (epsilon, delta)",
    )

    save = parser.add_argument_group("checkpoints")
    save.add_argument(
        "--model_path",
        default=DEFAULT_MODEL_PATH,
        help="folder of the checkpoints <model>_<dataset>_Epoch<N>.ckpt / _Iter<N>.ckpt",
    )
    save.add_argument(
        "--mid_save",
        action="store_true",
        help="also save the untrained weights and every --epoch_interval / --iter_interval",
    )
    save.add_argument(
        "--epoch_interval",
        type=positive_int,
        default=10,
        help="epochs between checkpoints (with --mid_save)",
    )
    save.add_argument(
        "--iter_interval",
        type=positive_int,
        default=100,
        help="optimizer steps between checkpoints (with --mid_save and --iter_train)",
    )
    return parser
