"""The options of ``attack.py``. Names follow the original iLRG code so its commands carry over."""

from __future__ import annotations

import argparse

from datamodules.names import VIEWS
from experiment.analysis import add_analysis_arguments
from experiment.client_options import add_defense_arguments, add_local_training_arguments
from experiment.config import AttackConfig
from experiment.options import (
    OneLineParser,
    add_config_argument,
    add_data_source_arguments,
    add_network_arguments,
    add_partition_arguments,
    bounded_float,
    load_config,
    non_negative_float,
    positive_float,
    positive_int,
)
from experiment.reconstruction import add_reconstruction_arguments
from experiment.train_cli import DEFAULT_EPOCHS, DEFAULT_ITERS, DEFAULT_MODEL_PATH


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="attack.py",
        description=(
            "Restore the labels of a batch from its shared gradients (iLRG) and compare with prior "
            "attacks. With no arguments: FCN-3 on the offline synthetic MNIST, 24 images, 50 tries, --compare."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        config_type=AttackConfig,
    )
    add_config_argument(parser)

    run = parser.add_argument_group("run")
    run.add_argument("--exp_name", default="Experiment1", help="run folder name under --log_dir")
    run.add_argument(
        "--log_dir", default="logs", help="where run folders logs/<exp_name>/version_<n> go"
    )
    run.add_argument(
        "--seed", type=int, default=1234, help="seeds the model, the batches and random guessing"
    )
    run.add_argument(
        "--num_tries", type=positive_int, default=50, help="number of attacked batches"
    )
    run.add_argument("--results", metavar="PATH", help="also write results.json to PATH")
    run.add_argument(
        "--accelerator",
        default="auto",
        choices=["auto", "cpu", "gpu", "cuda"],
        help="where to compute",
    )
    run.add_argument(
        "--devices",
        type=positive_int,
        default=1,
        help="processes (one per device) the tries are spread over; each try runs on one",
    )
    run.add_argument(
        "--strategy",
        default="auto",
        choices=["auto", "ddp"],
        help="how the processes of --devices > 1 start: Lightning's ddp (auto: the same), each "
        "process runs attack.py again",
    )
    run.add_argument(
        "--num_nodes",
        type=positive_int,
        default=1,
        help="machines, each with --devices processes (start attack.py on each, as for train.py)",
    )
    run.add_argument(
        "--peer_timeout",
        type=positive_float,
        default=300.0,
        help="seconds the processes of --devices/--num_nodes > 1 wait for each other, to join "
        "and at the end's gathering, before the run stops with an error",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")

    data = parser.add_argument_group("data and batch composition")
    add_data_source_arguments(data)
    data.add_argument(
        "--split",
        default="train",
        choices=VIEWS,
        help="which data batches come from: a split, or train.py's training (fit_train) or held-out "
        "(fit_val) data; a checkpoint brings its --train_partition",
    )
    add_partition_arguments(data)
    data.add_argument("--num_images", type=positive_int, default=24, help="batch size K")
    data.add_argument(
        "--max_size",
        type=positive_int,
        default=None,
        help="compute the batch gradient in chunks of at most this many images",
    )
    data.add_argument(
        "--distribution",
        default="random",
        help="random, random2, balanced, extreme, unique, custom_imbalanced or custom_balanced",
    )
    data.add_argument(
        "--num_target_cls", type=positive_int, default=10, help="classes in a 'random2' batch"
    )
    data.add_argument(
        "--num_uniform_cls", type=positive_int, default=8, help="classes in a 'balanced' batch"
    )

    add_network_arguments(parser)
    add_checkpoint_arguments(parser)

    attack = parser.add_argument_group("attack")
    attack.add_argument(
        "--attacks", nargs="+", default=["iLRG"], help="methods to run (see --compare)"
    )
    attack.add_argument(
        "--compare",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run decompose, the prior attacks iDLG, GI, RLG, LLG, bias, random and zeros, and RLU, "
        "LLBG and RLU+ where there is auxiliary data (LLBG also with --llbg_confidence) "
        "(--no-compare: only --attacks)",
    )
    attack.add_argument(
        "--simplified",
        action="store_true",
        help="iLRG given the present classes (LeAcc = 1 by definition)",
    )
    attack.add_argument(
        "--estimate",
        action="store_true",
        help="iLRG with p = 1/C instead of the restored probabilities",
    )
    attack.add_argument(
        "--alpha",
        type=positive_float,
        default=1.0,
        help="iLRG softmax temperature on the restored logits",
    )
    attack.add_argument(
        "--norm_guard",
        type=non_negative_float,
        default=3.0,
        help="iLRG: a class whose restored embedding is this many times the median norm gets the mean "
        "probability row instead (its bias gradient is near zero); 0 = the paper's method as published",
    )
    aux = parser.add_argument_group(
        "auxiliary data (the server's labelled samples, for RLU, LLBG and RLU+)"
    )
    aux.add_argument(
        "--aux_split",
        default="auto",
        choices=("auto", *VIEWS),
        help="where the auxiliary samples come from; never data the attacked batches come from. "
        "auto: the held-out counterpart of --split (val for train, fit_val for fit_train, and back), "
        "and without it on disk --compare leaves them out",
    )
    aux.add_argument(
        "--aux_per_class",
        type=positive_int,
        default=10,
        help="auxiliary samples per class (fewer where the split has fewer)",
    )
    aux.add_argument(
        "--llbg_confidence",
        type=bounded_float(0, 1, high_open=True),
        default=None,
        metavar="CONF",
        help="LLBG without auxiliary data: every class's confidence assumed CONF (the authors' "
        "approx_avg_conf; 0 suits untrained models); default: measured on the auxiliary data",
    )
    add_local_training_arguments(parser)
    add_defense_arguments(parser)
    add_analysis_arguments(parser)
    add_reconstruction_arguments(parser)
    return parser


def given_options(argv: list[str]) -> set[str]:
    """The options set on the command line ``argv`` or in its ``--config`` file."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    # parse_known_args, unlike parse_args, keeps the Namespace: only the names set are wanted
    given = vars(parser.parse_known_args(argv)[0])
    config = given.pop("config", None)
    return set(given) | (set(load_config(build_parser(), config)) if config else set())


def add_checkpoint_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "trained victim (checkpoints of train.py; the network options come from the checkpoint)"
    )
    which = group.add_mutually_exclusive_group()
    which.add_argument(
        "--trained_model",
        action="store_true",
        help="attack the checkpoint train.py saved at stage --epochs (or --iter_train --iters) in --model_path",
    )
    which.add_argument("--checkpoint", metavar="PATH", help="attack this checkpoint")
    which.add_argument(
        "--checkpoints",
        metavar="GLOB",
        help="attack every matching stage with the same batches; writes stages.json and stages.png "
        "in the run folder (and stages.json to --results)",
    )
    group.add_argument(
        "--epochs",
        type=positive_int,
        default=DEFAULT_EPOCHS,
        help="with --trained_model: epochs trained",
    )
    group.add_argument(
        "--iter_train",
        action="store_true",
        help="with --trained_model: the stage counts iterations (--iters)",
    )
    group.add_argument(
        "--iters",
        type=positive_int,
        default=DEFAULT_ITERS,
        help="with --trained_model --iter_train: iterations trained",
    )
    group.add_argument(
        "--model_path", default=DEFAULT_MODEL_PATH, help="folder of train.py's checkpoints"
    )
