"""A sweep over training stages: ``--checkpoints GLOB`` attacks every stage with the same batches.

The runner draws the batches from the seed alone, so every stage sees the same ones; the sweep
then writes one table, ``stages.json``, ``stages.png`` and the TensorBoard scalars
``stage/<method>/<metric>`` with the stage as the step.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from experiment import runner
from experiment.config import AttackConfig
from experiment.logs import FILE_ONLY, RESULT
from experiment.runs import is_primary_process, write_json_atomic
from experiment.victims import missing_stages
from user_errors import CheckpointError

log = logging.getLogger("attack")

UNIT_LABELS = {"epoch": "Epoch", "iteration": "Iter"}
#: one per method in stages.png, so lines that coincide stay distinguishable
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


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

    config: AttackConfig
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


def stage_config(config: AttackConfig, stage: Stage) -> AttackConfig:
    return dataclasses.replace(config, checkpoint=str(stage.path), results=None)


def prepare_sweep(config: AttackConfig) -> Sweep:
    """Check every stage, the data and the options; raises UserError and writes nothing."""
    if not glob.glob(config.checkpoints, recursive=True):
        raise missing_stages(config)
    stages = find_stages(config.checkpoints)
    first = runner.prepare(stage_config(config, stages[0]))
    return Sweep(config, stages, first)


def run_sweep(sweep: Sweep, run_dir: Path | None, logger=None) -> dict | None:
    """Attack every stage with the same batches; write the stage folders, stages.json and stages.png.

    Under several processes each stage's tries are spread over them (``runner.run``); the
    first process writes, the others return None."""
    done: list[dict] = []
    writer = logger.experiment if logger is not None else None
    try:
        for stage in sweep.stages:
            setup = (
                sweep.first
                if stage is sweep.stages[0]
                else runner.prepare(stage_config(sweep.config, stage))
            )
            log.info("stage %s: %s", stage.label, stage.path)
            # Each stage's own table goes to run.log only; stdout gets the combined one.
            stage_dir = run_dir / stage.label if run_dir is not None else None
            results = runner.run(setup, stage_dir, table=FILE_ONLY)
            if results is None:
                continue  # not the first process
            done.append(stage_record(stage, results, run_dir))
            if writer is not None:
                for method, metrics in results["summary"].items():
                    for metric, value in metrics.items():
                        if value is not None and math.isfinite(value):
                            writer.add_scalar(f"stage/{method}/{metric}", value, stage.value)
                writer.flush()
    except KeyboardInterrupt:
        if run_dir is not None and is_primary_process():
            write_stages(sweep, done, "incomplete", run_dir)
        raise
    if run_dir is None or not is_primary_process():
        return None
    return write_stages(sweep, done, "complete", run_dir)


def stage_record(stage: Stage, results: dict, run_dir: Path) -> dict:
    return {
        "stage": stage.value,
        "label": stage.label,
        "checkpoint": str(stage.path),
        "results": str(Path(stage.label) / "results.json"),
        **(stage.validation or {"val_acc": None, "val_step": None}),
        "batch": results.get("batch"),
        "summary": results["summary"],
        "std": results["std"],
    }


def write_stages(sweep: Sweep, done: list[dict], status: str, run_dir: Path) -> dict:
    config = sweep.config
    setup = sweep.first
    summary = {
        "status": status,
        "unit": sweep.stages[0].unit,
        "stages": [record["stage"] for record in done],
        "pending": [stage.value for stage in sweep.stages[len(done) :]],
        "methods": list(setup.attacks),
        "data": {
            "dataset": setup.config.dataset,
            "synthetic": bool(setup.datamodule.is_synthetic),
            "num_classes": setup.num_classes,
        },
        "model": setup.config.model,
        "local_training": setup.describe.get("local_training"),
        "config": config.as_dict(),
        "results": done,
    }
    write_json_atomic(run_dir / "stages.json", summary)
    if config.results:
        write_json_atomic(config.results, summary)
    if done:
        log.info(
            "\n%s, %d stages of %s\n%s",
            runner.victim_and_data(sweep.first.config),
            len(summary["results"]),
            sweep.config.checkpoints,
            format_stage_table(summary),
            extra=RESULT,
        )
        plot_stages(summary, run_dir / "stages.png")
    return summary


def format_stage_table(summary: dict) -> str:
    from experiment.report import METRIC_NAMES

    names = [m for record in summary["results"] for m in record["summary"]]
    width = max([len("method"), *map(len, names)]) + 2
    header = f"{'stage':<10}{'method':<{width}}" + "".join(f"{m:>17}" for m in METRIC_NAMES)
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
            lines.append(
                f"{record['label']:<10}{method:<{width}}" + "".join(f"{c:>17}" for c in cells)
            )
    return "\n".join(lines)


def plot_stages(summary: dict, path: Path) -> Path:
    """One panel per metric, one line per method, against the stage."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    from experiment.report import METRIC_NAMES

    records = summary["results"]
    metrics = [
        m
        for m in METRIC_NAMES
        if any(m in means for r in records for means in r["summary"].values())
    ]
    accuracy = [(r["stage"], r["val_acc"]) for r in records if r.get("val_acc") is not None]
    fits = [(r["stage"], r["batch"]) for r in records if r.get("batch")]
    panels = len(metrics) + bool(accuracy or fits)
    # A grid of at most three panels a row: readable on a laptop screen.
    columns = min(3, panels)
    rows = -(-panels // columns)
    figure, grid = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.6 * rows), squeeze=False)
    axes = [list(grid.flat)]
    for spare in axes[0][panels:]:
        spare.set_visible(False)
    methods = summary["methods"]
    stages = sorted({r["stage"] for r in records})
    # Methods often score alike (iDLG, LLG and bias share their presence rule): distinct
    # markers and a small sideways shift keep every line visible instead of hidden beneath
    # another. All shifts stay within 6% of the closest stages' gap: no point leaves its stage.
    gap = min(b - a for a, b in zip(stages, stages[1:])) if len(stages) > 1 else 0.0
    shift = 0.12 * gap / max(len(methods) - 1, 1)
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
        if metric in ("IRec", "Exact") and fits:
            # No attack sees a sample below the gradient's rounding: the per-sample ceiling.
            xs, ys = zip(*((stage, fit["visible"]) for stage, fit in fits))
            axis.plot(xs, ys, linestyle="--", color="black", label="visible samples")
        axis.set_title(metric)
        axis.set_xlabel("iteration" if summary["unit"] == "iteration" else "epoch")
        axis.set_ylim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    if accuracy or fits:
        axis = axes[0][panels - 1]
        if accuracy:
            xs, ys = zip(*accuracy)
            axis.plot(xs, ys, marker="o", color="black", label="val acc")
        for key, marker, style, label in (
            ("accuracy", "s", "-", "accuracy on the attacked batches"),
            ("mean_error", "^", ":", "mean 1 - p_y of the attacked batches"),
        ):
            if fits:
                xs, ys = zip(*((stage, fit[key]) for stage, fit in fits))
                axis.plot(xs, ys, marker=marker, linestyle=style, color="grey", label=label)
        axis.legend(fontsize="x-small")
        axis.set_title("accuracy and fit")
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
