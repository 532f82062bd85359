"""Attacking a trained victim: which checkpoint, and the options it decides.

``--trained_model --epochs N`` (or ``--iter_train --iters N``) picks the checkpoint
``train.py`` saved at that stage in ``--model_path``; ``--checkpoint PATH`` any
checkpoint; ``--checkpoints GLOB`` a sweep over stages (``experiment.stages``). The
network and its options come from the checkpoint; an option set on the command line
(or in a config file) that says otherwise is an error, never silently overridden.
"""

from __future__ import annotations

import glob
import logging
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from experiment.config import AttackConfig
from experiment.train_cli import DEFAULT_EPOCHS, DEFAULT_ITERS, DEFAULT_MODEL_PATH
from user_errors import CheckpointError, UserError

log = logging.getLogger("attack")

#: attack.py options that a checkpoint decides (its hyperparameters use the same names)
CHECKPOINT_OPTIONS = (
    "dataset",
    "model",
    "n_hidden",
    "n_dim",
    "batchnorm",
    "dropout",
    "silu",
    "leaky_relu",
)
#: a ``--checkpoints`` pattern over the stages of one run, e.g. ``dnn_MNIST_GRAY_Iter*.ckpt``
RUN_PATTERN = re.compile(r"(?P<model>[^_*?\[]+)_(?P<dataset>[^*?\[]+)_(?P<unit>Epoch|Iter)\*\.ckpt")


# --- one trained victim ------------------------------------------------------------------


@dataclass
class TrainedVictim:
    path: Path
    unit: str
    stage: int
    network: object
    hparams: dict
    #: the data module's options train.py ran with (its --train_partition, --val_fraction, --seed)
    data_hparams: dict

    def partition(self):
        """train.py's partition of one split, or None where it trained on the train split."""
        from datamodules.views import Partition

        split = self.data_hparams.get("train_partition")
        if split is None:
            return None
        return Partition(
            split, float(self.data_hparams["val_fraction"]), int(self.data_hparams["seed"])
        )

    def describe(self) -> dict:
        """What results.json says about the victim."""
        return {
            "victim": {
                "checkpoint": str(self.path),
                "stage": {"unit": self.unit, "value": self.stage},
                "trained_on": self.hparams.get("dataset"),
                "training": {
                    key: self.hparams.get(key)
                    for key in (
                        "optimizer",
                        "lr",
                        "weight_decay",
                        "scheduler",
                        "warmup",
                        "schedule_unit",
                        "schedule_length",
                    )
                },
            }
        }


def stage_path(config: AttackConfig) -> Path:
    """The checkpoint ``--trained_model`` asks for."""
    from lightning_modules.checkpoints import stage_checkpoint_name

    unit, n = ("iteration", config.iters) if config.iter_train else ("epoch", config.epochs)
    return Path(config.model_path) / stage_checkpoint_name(config.model, config.dataset, unit, n)


def train_command(
    config: AttackConfig, model: str, dataset: str, unit: str, n: int, model_path
) -> str:
    """The ``train.py`` command that saves the checkpoint of (model, dataset, stage) in ``model_path``."""
    defaults = AttackConfig().as_dict()
    words = ["python", "train.py", "--dataset", dataset, "--model", model]
    for option in CHECKPOINT_OPTIONS[2:]:
        value = getattr(config, option)
        if value != defaults[option]:
            words += [f"--{option}"] if value is True else [f"--{option}", str(value)]
    words += ["--iter_train", "--iters", str(n)] if unit == "iteration" else ["--epochs", str(n)]
    if str(model_path) != DEFAULT_MODEL_PATH:
        words += ["--model_path", str(model_path)]
    if config.data_root != defaults["data_root"]:
        words += ["--data_root", str(config.data_root)]
    if config.imagenet_dir is not None:
        words += ["--imagenet_dir", str(config.imagenet_dir)]
    only = only_split_on_disk(config, dataset)
    if only is not None:
        # train.py trains on train and validates on val; with one split at hand it must
        # partition that one, or the command printed here would fail as printed.
        words += ["--train_partition", only]
    return shlex.join(words)


def only_split_on_disk(config: AttackConfig, dataset: str) -> str | None:
    """The one split of ``dataset`` whose files are at hand, or None (both, neither, synthetic)."""
    from datamodules import build_datamodule, dataset_info

    try:
        if dataset_info(dataset)[2]:
            return None
        datamodule = build_datamodule(
            dataset, data_root=config.data_root, imagenet_dir=config.imagenet_dir, download=False
        )
    except UserError:
        return None
    present = datamodule.splits_on_disk()
    return present[0] if len(present) == 1 else None


def missing_checkpoint(config: AttackConfig, path: Path) -> CheckpointError:
    from lightning_modules.checkpoints import STAGE_PATTERN
    from lightning_modules.networks import NETWORKS

    message = f"checkpoint {path} not found"
    match = STAGE_PATTERN.search(path.name)
    if match:
        model, _, dataset = path.name[: match.start()].partition("_")
        if model in NETWORKS and dataset:
            unit = "epoch" if match["unit"] == "Epoch" else "iteration"
            command = train_command(config, model, dataset, unit, int(match["n"]), path.parent)
            message += f"; make it with: {command}"
    return CheckpointError(message)


def missing_stages(config: AttackConfig) -> CheckpointError:
    """No checkpoint matches ``--checkpoints``; where the pattern names a run, the command that saves it."""
    from lightning_modules.networks import NETWORKS

    message = f"no checkpoint matches {config.checkpoints}"
    pattern = Path(config.checkpoints)
    match = RUN_PATTERN.fullmatch(pattern.name)
    if match and match["model"] in NETWORKS and "*" not in pattern.parent.as_posix():
        unit, n = (
            ("epoch", DEFAULT_EPOCHS) if match["unit"] == "Epoch" else ("iteration", DEFAULT_ITERS)
        )
        command = train_command(config, match["model"], match["dataset"], unit, n, pattern.parent)
        message += f"; make the stages with: {command} --mid_save"
    return CheckpointError(message)


def resolve_victim(config: AttackConfig) -> tuple[AttackConfig, TrainedVictim | None]:
    """The options to attack with and the trained victim, if one is asked for.

    Returns a new configuration in which the checkpoint's dataset, model and network
    options replace the defaults; ``config`` itself is left as it is.
    """
    defaults = AttackConfig().as_dict()
    if not config.trained_model and (
        config.iter_train
        or config.epochs != defaults["epochs"]
        or config.iters != defaults["iters"]
    ):
        raise UserError(
            "--epochs, --iters and --iter_train choose the stage of --trained_model; add --trained_model"
        )
    if config.checkpoint:
        path = Path(config.checkpoint)
    elif config.trained_model:
        path = stage_path(config)
    else:
        return config, None
    if not path.is_file():
        raise missing_checkpoint(config, path)
    from lightning_modules.checkpoints import (
        checkpoint_stage,
        classifier_from_checkpoint,
        read_checkpoint,
    )

    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint["hyper_parameters"])
    adopted = adopt_options(config, hparams, path)
    classifier = classifier_from_checkpoint(checkpoint, path)
    unit, n = checkpoint_stage(path, checkpoint)
    data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return adopted, TrainedVictim(path, unit, n, classifier.network, hparams, data_hparams)


def adopt_options(config: AttackConfig, hparams: dict, path) -> AttackConfig:
    """``config`` with the checkpoint's network options; UserError where a set option disagrees.

    Here an option counts as set when it differs from attack.py's default;
    :func:`check_given_options` also catches a default value typed out on the command line.
    """
    from datamodules import dataset_info

    defaults = AttackConfig().as_dict()
    adopted = dict(vars(config))
    for option in CHECKPOINT_OPTIONS:
        if option not in hparams:
            raise CheckpointError(
                f"checkpoint {path} does not record {option!r}; it was not saved by train.py"
            )
        if getattr(config, option) != defaults[option]:
            check_agrees(option, getattr(config, option), hparams, path)
        adopted[option] = hparams[option]
    num_classes, input_shape, _ = dataset_info(adopted["dataset"])
    if hparams.get("num_classes") != num_classes or list(hparams.get("input_shape", [])) != list(
        input_shape
    ):
        raise CheckpointError(
            f"checkpoint {path} has {hparams.get('num_classes')} classes of shape {hparams.get('input_shape')}, "
            f"but {adopted['dataset']} has {num_classes} of shape {list(input_shape)}"
        )
    return AttackConfig(**adopted)


def check_agrees(option: str, given, hparams: dict, path) -> None:
    saved = hparams.get(option)
    if given != saved:
        said = f"--{option}" if given is True else f"--{option} {given}"
        raise UserError(
            f"{said} conflicts with the checkpoint {path} (which has {option} {_plain(saved)})"
        )


def check_given_options(given: set[str], config: AttackConfig) -> None:
    """UserError where an option ``given`` on the command line (or in --config) contradicts the checkpoint asked for.

    Checked before :func:`resolve_victim` adopts the checkpoint's options, because
    there an option typed out with its default value looks the same as one left out.
    """
    from lightning_modules.checkpoints import read_checkpoint

    if config.checkpoints:
        matches = sorted(glob.glob(config.checkpoints, recursive=True))
        path = Path(matches[0]) if matches else None
    elif config.checkpoint:
        path = Path(config.checkpoint)
    elif config.trained_model:
        path = stage_path(config)
    else:
        return
    if path is None or not path.is_file():
        return  # preparing the run says what is missing
    hparams = read_checkpoint(path)["hyper_parameters"]
    for option in CHECKPOINT_OPTIONS:
        if option in given:
            check_agrees(option, getattr(config, option), hparams, path)


def _plain(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
