"""Attacking trained victims: one saved checkpoint, or every training stage of a run.

``--trained_model --epochs N`` (or ``--iter_train --iters N``) picks the checkpoint
``train.py`` saved at that stage in ``--model_path``; ``--checkpoint PATH`` any
checkpoint; ``--checkpoints GLOB`` a sweep over stages. The network and its
options come from the checkpoint; an option set on the command line (or in a
config file) that says otherwise is an error, never silently overridden.

A sweep attacks every stage with the same batches (the runner draws them from
the seed alone), then writes one table, ``stages.json``, ``stages.png`` and the
TensorBoard scalars ``stage/<method>/<metric>`` with the stage as the step.
"""

from __future__ import annotations

import argparse
import glob
import logging
import math
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from experiment.errors import CheckpointError, UserError
from experiment.logs import RESULT
from experiment.options import positive_int
from experiment.runs import write_json_atomic
from lightning_modules.train_cli import DEFAULT_EPOCHS, DEFAULT_ITERS, DEFAULT_MODEL_PATH

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
UNIT_LABELS = {"epoch": "Epoch", "iteration": "Iter"}
#: one per method in stages.png, so lines that coincide stay distinguishable
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
#: a ``--checkpoints`` pattern over the stages of one run, e.g. ``dnn_MNIST_GRAY_Iter*.ckpt``
RUN_PATTERN = re.compile(r"(?P<model>[^_*?\[]+)_(?P<dataset>[^*?\[]+)_(?P<unit>Epoch|Iter)\*\.ckpt")


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


def stage_path(args: argparse.Namespace) -> Path:
    """The checkpoint ``--trained_model`` asks for."""
    from lightning_modules.checkpoints import stage_checkpoint_name

    unit, n = ("iteration", args.iters) if args.iter_train else ("epoch", args.epochs)
    return Path(args.model_path) / stage_checkpoint_name(args.model, args.dataset, unit, n)


def train_command(
    args: argparse.Namespace, model: str, dataset: str, unit: str, n: int, model_path
) -> str:
    """The ``train.py`` command that saves the checkpoint of (model, dataset, stage) in ``model_path``."""
    defaults = _parser_defaults()
    words = ["python", "train.py", "--dataset", dataset, "--model", model]
    for option in CHECKPOINT_OPTIONS[2:]:
        value = getattr(args, option)
        if value != defaults[option]:
            words += [f"--{option}"] if value is True else [f"--{option}", str(value)]
    words += ["--iter_train", "--iters", str(n)] if unit == "iteration" else ["--epochs", str(n)]
    if str(model_path) != DEFAULT_MODEL_PATH:
        words += ["--model_path", str(model_path)]
    if args.data_root != defaults["data_root"]:
        words += ["--data_root", str(args.data_root)]
    if args.imagenet_dir is not None:
        words += ["--imagenet_dir", str(args.imagenet_dir)]
    only = only_split_on_disk(args, dataset)
    if only is not None:
        # train.py trains on train and validates on val; with one split at hand it must
        # partition that one, or the command printed here would fail as printed.
        words += ["--train_partition", only]
    return shlex.join(words)


def only_split_on_disk(args: argparse.Namespace, dataset: str) -> str | None:
    """The one split of ``dataset`` whose files are at hand, or None (both, neither, synthetic)."""
    from datamodules import build_datamodule, dataset_info

    try:
        if dataset_info(dataset)[2]:
            return None
        datamodule = build_datamodule(
            dataset, data_root=args.data_root, imagenet_dir=args.imagenet_dir, download=False
        )
    except UserError:
        return None
    present = datamodule.splits_on_disk()
    return present[0] if len(present) == 1 else None


def missing_checkpoint(args: argparse.Namespace, path: Path) -> CheckpointError:
    from lightning_modules.checkpoints import STAGE_PATTERN
    from lightning_modules.networks import NETWORKS

    message = f"checkpoint {path} not found"
    match = STAGE_PATTERN.search(path.name)
    if match:
        model, _, dataset = path.name[: match.start()].partition("_")
        if model in NETWORKS and dataset:
            unit = "epoch" if match["unit"] == "Epoch" else "iteration"
            command = train_command(args, model, dataset, unit, int(match["n"]), path.parent)
            message += f"; make it with: {command}"
    return CheckpointError(message)


def missing_stages(args: argparse.Namespace) -> CheckpointError:
    """No checkpoint matches ``--checkpoints``; where the pattern names a run, the command that saves it."""
    from lightning_modules.networks import NETWORKS

    message = f"no checkpoint matches {args.checkpoints}"
    pattern = Path(args.checkpoints)
    match = RUN_PATTERN.fullmatch(pattern.name)
    if match and match["model"] in NETWORKS and "*" not in pattern.parent.as_posix():
        unit, n = (
            ("epoch", DEFAULT_EPOCHS) if match["unit"] == "Epoch" else ("iteration", DEFAULT_ITERS)
        )
        command = train_command(args, match["model"], match["dataset"], unit, n, pattern.parent)
        message += f"; make the stages with: {command} --mid_save"
    return CheckpointError(message)


def resolve_victim(args: argparse.Namespace) -> tuple[argparse.Namespace, TrainedVictim | None]:
    """The options to attack with and the trained victim, if one is asked for.

    Returns a new namespace in which the checkpoint's dataset, model and network
    options replace the defaults; ``args`` itself is left as it is.
    """
    defaults = _parser_defaults()
    if not args.trained_model and (
        args.iter_train or args.epochs != defaults["epochs"] or args.iters != defaults["iters"]
    ):
        raise UserError(
            "--epochs, --iters and --iter_train choose the stage of --trained_model; add --trained_model"
        )
    if args.checkpoint:
        path = Path(args.checkpoint)
    elif args.trained_model:
        path = stage_path(args)
    else:
        return args, None
    if not path.is_file():
        raise missing_checkpoint(args, path)
    from lightning_modules.checkpoints import (
        checkpoint_stage,
        classifier_from_checkpoint,
        read_checkpoint,
    )

    checkpoint = read_checkpoint(path)
    hparams = dict(checkpoint["hyper_parameters"])
    adopted = adopt_options(args, hparams, path)
    classifier = classifier_from_checkpoint(checkpoint, path)
    unit, n = checkpoint_stage(path, checkpoint)
    data_hparams = dict(checkpoint.get("datamodule_hyper_parameters") or {})
    return adopted, TrainedVictim(path, unit, n, classifier.network, hparams, data_hparams)


def adopt_options(args: argparse.Namespace, hparams: dict, path) -> argparse.Namespace:
    """``args`` with the checkpoint's network options; UserError where a set option disagrees.

    Here an option counts as set when it differs from attack.py's default;
    :func:`check_given_options` also catches a default value typed out on the command line.
    """
    from datamodules import dataset_info

    defaults = _parser_defaults()
    adopted = dict(vars(args))
    for option in CHECKPOINT_OPTIONS:
        if option not in hparams:
            raise CheckpointError(
                f"checkpoint {path} does not record {option!r}; it was not saved by train.py"
            )
        if getattr(args, option) != defaults[option]:
            check_agrees(option, getattr(args, option), hparams, path)
        adopted[option] = hparams[option]
    num_classes, input_shape, _ = dataset_info(adopted["dataset"])
    if hparams.get("num_classes") != num_classes or list(hparams.get("input_shape", [])) != list(
        input_shape
    ):
        raise CheckpointError(
            f"checkpoint {path} has {hparams.get('num_classes')} classes of shape {hparams.get('input_shape')}, "
            f"but {adopted['dataset']} has {num_classes} of shape {list(input_shape)}"
        )
    return argparse.Namespace(**adopted)


def check_agrees(option: str, given, hparams: dict, path) -> None:
    saved = hparams.get(option)
    if given != saved:
        said = f"--{option}" if given is True else f"--{option} {given}"
        raise UserError(
            f"{said} conflicts with the checkpoint {path} (which has {option} {_plain(saved)})"
        )


def given_options(argv: list[str]) -> set[str]:
    """The options set on the command line ``argv`` or in its ``--config`` file."""
    from attacks.cli import build_parser
    from experiment.options import load_config

    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_known_args(argv)[0])
    config = given.pop("config", None)
    return set(given) | (set(load_config(build_parser(), config)) if config else set())


def check_given_options(argv: list[str], args: argparse.Namespace) -> None:
    """UserError where an option on the command line (or in --config) contradicts the checkpoint asked for.

    Checked before :func:`resolve_victim` adopts the checkpoint's options, because
    there an option typed out with its default value looks the same as one left out.
    """
    from lightning_modules.checkpoints import read_checkpoint

    if args.checkpoints:
        matches = sorted(glob.glob(args.checkpoints, recursive=True))
        path = Path(matches[0]) if matches else None
    elif args.checkpoint:
        path = Path(args.checkpoint)
    elif args.trained_model:
        path = stage_path(args)
    else:
        return
    if path is None or not path.is_file():
        return  # preparing the run says what is missing
    hparams = read_checkpoint(path)["hyper_parameters"]
    given = given_options(argv)
    for option in CHECKPOINT_OPTIONS:
        if option in given:
            check_agrees(option, getattr(args, option), hparams, path)


def _plain(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _parser_defaults() -> dict:
    """attack.py's defaults, unaffected by --config (which sets the defaults of its own parser)."""
    from attacks.cli import build_parser

    return vars(build_parser().parse_args([]))


# --- a sweep over training stages ---------------------------------------------------------


@dataclass
class Stage:
    path: Path
    unit: str
    value: int
    #: {"val_acc", "val_step"} that train.py recorded in the checkpoint, or None
    validation: dict | None = None

    @property
    def label(self) -> str:
        return f"{UNIT_LABELS[self.unit]}{self.value}"


@dataclass
class Sweep:
    """The stages to attack and the first stage's setup (which checked data and options)."""

    args: argparse.Namespace
    stages: list[Stage]
    first: object

    @property
    def datamodule(self):
        return self.first.datamodule


def find_stages(pattern: str) -> list[Stage]:
    """The checkpoints matching ``pattern``, checked and sorted by stage; CheckpointError otherwise."""
    from lightning_modules.checkpoints import (
        NETWORK_KEYS,
        checkpoint_stage,
        classifier_from_checkpoint,
        read_checkpoint,
    )

    paths = sorted(glob.glob(pattern, recursive=True))
    if not paths:
        raise CheckpointError(f"no checkpoint matches {pattern}")
    stages, reference = [], None
    for name in paths:
        checkpoint = read_checkpoint(name)
        # Building the classifier checks that the weights fit the architecture.
        classifier_from_checkpoint(checkpoint, name)
        hparams = checkpoint["hyper_parameters"]
        architecture = {key: hparams.get(key) for key in ("dataset", *NETWORK_KEYS)}
        if reference is None:
            reference = (name, architecture)
        elif architecture != reference[1]:
            differ = next(key for key in architecture if architecture[key] != reference[1][key])
            raise CheckpointError(
                f"checkpoints {reference[0]} and {name} are not stages of one network "
                f"({differ} {reference[1][differ]} vs {architecture[differ]})"
            )
        validation = checkpoint.get("validation")
        stages.append(
            Stage(
                Path(name),
                *checkpoint_stage(name, checkpoint),
                validation=dict(validation) if isinstance(validation, dict) else None,
            )
        )
    units = sorted({stage.unit for stage in stages})
    if len(units) > 1:
        raise CheckpointError(
            f"{pattern} matches both epoch and iteration stages; sweep one kind at a time"
        )
    stages.sort(key=lambda stage: stage.value)
    for before, after in zip(stages, stages[1:]):
        if before.value == after.value:
            raise CheckpointError(f"{before.path} and {after.path} are both stage {before.label}")
    return stages


def stage_args(args: argparse.Namespace, stage: Stage) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), "checkpoint": str(stage.path), "results": None})


def prepare_sweep(args: argparse.Namespace) -> Sweep:
    """Check every stage, the data and the options; raises UserError and writes nothing."""
    from attacks import runner

    if not glob.glob(args.checkpoints, recursive=True):
        raise missing_stages(args)
    stages = find_stages(args.checkpoints)
    first = runner.prepare(stage_args(args, stages[0]))
    return Sweep(args, stages, first)


def run_sweep(sweep: Sweep, run_dir: Path, writer=None) -> dict:
    """Attack every stage with the same batches; write the stage folders, stages.json and stages.png."""
    from attacks import runner

    done: list[dict] = []
    try:
        for stage in sweep.stages:
            setup = (
                sweep.first
                if stage is sweep.stages[0]
                else runner.prepare(stage_args(sweep.args, stage))
            )
            log.info("stage %s: %s", stage.label, stage.path)
            results = runner.run(setup, run_dir / stage.label, writer=None)
            done.append(stage_record(stage, results, run_dir))
            if writer is not None:
                for method, metrics in results["summary"].items():
                    for metric, value in metrics.items():
                        if value is not None and math.isfinite(value):
                            writer.add_scalar(f"stage/{method}/{metric}", value, stage.value)
                writer.flush()
    except KeyboardInterrupt:
        write_stages(sweep, done, "incomplete", run_dir)
        raise
    return write_stages(sweep, done, "complete", run_dir)


def stage_record(stage: Stage, results: dict, run_dir: Path) -> dict:
    return {
        "stage": stage.value,
        "label": stage.label,
        "checkpoint": str(stage.path),
        "results": str(Path(stage.label) / "results.json"),
        **(stage.validation or {"val_acc": None, "val_step": None}),
        "summary": results["summary"],
        "std": results["std"],
    }


def write_stages(sweep: Sweep, done: list[dict], status: str, run_dir: Path) -> dict:
    args = sweep.args
    setup = sweep.first
    summary = {
        "status": status,
        "unit": sweep.stages[0].unit,
        "stages": [record["stage"] for record in done],
        "pending": [stage.value for stage in sweep.stages[len(done) :]],
        "methods": list(setup.attacks),
        "data": {
            "dataset": setup.args.dataset,
            "synthetic": bool(setup.datamodule.is_synthetic),
            "num_classes": setup.num_classes,
        },
        "model": setup.args.model,
        "local_training": setup.describe.get("local_training"),
        "config": vars(args),
        "results": done,
    }
    write_json_atomic(run_dir / "stages.json", summary)
    if args.results:
        write_json_atomic(args.results, summary)
    if done:
        log.info("\n%s", format_stage_table(summary), extra=RESULT)
        plot_stages(summary, run_dir / "stages.png")
    return summary


def format_stage_table(summary: dict) -> str:
    from attacks.report import METRIC_NAMES

    header = f"{'stage':<10}{'method':<8}" + "".join(f"{m:>17}" for m in METRIC_NAMES)
    lines = [header, "-" * len(header)]
    for record in summary["results"]:
        for method, means in record["summary"].items():
            cells = []
            for metric in METRIC_NAMES:
                mean, spread = means.get(metric), record["std"].get(method, {}).get(metric)
                if mean is None or not math.isfinite(mean):
                    cells.append(f"{'-':>17}")
                else:
                    cells.append(f"{mean:>9.3f} ± {spread if spread is not None else math.nan:.3f}")
            lines.append(f"{record['label']:<10}{method:<8}" + "".join(f"{c:>17}" for c in cells))
    return "\n".join(lines)


def plot_stages(summary: dict, path: Path) -> Path:
    """One panel per metric, one line per method, against the stage."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from attacks.report import METRIC_NAMES

    records = summary["results"]
    metrics = [
        m
        for m in METRIC_NAMES
        if any(m in means for r in records for means in r["summary"].values())
    ]
    accuracy = [(r["stage"], r["val_acc"]) for r in records if r.get("val_acc") is not None]
    panels = len(metrics) + bool(accuracy)
    figure, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.6), squeeze=False)
    methods = summary["methods"]
    stages = [r["stage"] for r in records]
    # Methods often score alike (iDLG, LLG and bias share their presence rule): distinct
    # markers and a small sideways shift keep every line visible instead of hidden beneath another.
    shift = (max(stages) - min(stages)) * 0.015 if len(stages) > 1 else 0.0
    for axis, metric in zip(axes[0], metrics):
        # One colour and marker per method across panels, also where a method lacks a metric.
        for index, method in enumerate(methods):
            points = [
                (r["stage"], r["summary"][method][metric])
                for r in records
                if r["summary"].get(method, {}).get(metric) is not None
            ]
            if points:
                xs, ys = zip(*points)
                offset = (index - (len(methods) - 1) / 2) * shift
                axis.plot(
                    [x + offset for x in xs],
                    ys,
                    marker=MARKERS[index % len(MARKERS)],
                    markersize=7 - 3 * index / max(len(methods) - 1, 1),
                    fillstyle="none",
                    linewidth=1.2,
                    color=f"C{index % 10}",
                    label=method,
                )
        axis.set_title(metric)
        axis.set_xlabel("iteration" if summary["unit"] == "iteration" else "epoch")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    if accuracy:
        axis = axes[0][-1]
        xs, ys = zip(*accuracy)
        axis.plot(xs, ys, marker="o", color="black", label="val acc")
        axis.set_title("validation accuracy (from the checkpoint)")
        axis.set_xlabel("iteration" if summary["unit"] == "iteration" else "epoch")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    figure.legend(*axes[0][0].get_legend_handles_labels(), loc="center right", fontsize="small")
    figure.suptitle(
        f"{summary['model']} on {summary['data']['dataset']}: label restoration over training"
    )
    figure.tight_layout(rect=(0, 0, 0.9, 1))
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
