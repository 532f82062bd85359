"""What ``train.py`` runs: data, victim classifier, Trainer, and checkpoints named by stage.

A stage is a number of completed epochs or optimizer steps. Its checkpoint is
``<model_path>/<model>_<dataset>_Epoch<N>.ckpt`` or ``..._Iter<N>.ckpt``, so
``attack.py --trained_model`` finds it from (model, dataset, stage) alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import warnings
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, LearningRateMonitor, ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from lightning_modules.checkpoints import (
    STAGE_PATTERN,
    atomic_checkpoint_io,
    interrupted_checkpoint_name,
    read_checkpoint,
    stage_checkpoint_name,
)
from lightning_modules.train_config import TrainConfig
from user_errors import CheckpointError, UserError

log = logging.getLogger("train")

NETWORK_OPTIONS = ("n_hidden", "n_dim", "batchnorm", "dropout", "silu", "leaky_relu")
TRAINING_OPTIONS = ("optimizer", "lr", "weight_decay", "scheduler", "warmup")


def stage_unit(config: TrainConfig) -> str:
    return "iteration" if config.iter_train else "epoch"


def final_stage(config: TrainConfig) -> int:
    return config.iters if config.iter_train else config.epochs


def stage_checkpoint_path(config: TrainConfig, n: int | None = None) -> Path:
    """The checkpoint of stage ``n`` (default: the end of training) of the run ``config`` describes."""
    n = final_stage(config) if n is None else n
    return Path(config.model_path) / stage_checkpoint_name(
        config.model, config.dataset, stage_unit(config), n
    )


class StageCheckpoint(ModelCheckpoint):
    """Saves ``<model>_<dataset>_Epoch<N>.ckpt`` after N epochs, or ``..._Iter<N>.ckpt`` after N steps.

    With ``every`` > 0 it saves every ``every`` epochs (or steps) and the untrained
    weights at stage 0; it always saves the end of training. Lightning counts
    epochs from 0, so the number is taken from the loop's count of finished epochs.
    """

    def __init__(self, dirpath, model: str, dataset: str, unit: str, every: int = 0) -> None:
        super().__init__(
            dirpath=dirpath,
            save_top_k=-1,
            every_n_train_steps=every if unit == "iteration" else 0,
            every_n_epochs=every if unit == "epoch" else 0,
            save_on_train_epoch_end=True,
            enable_version_counter=False,
        )
        self.model_name, self.dataset_name, self.unit, self.every = model, dataset, unit, every
        self._trainer: pl.Trainer | None = None
        self.interrupted_path: str | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._trainer = trainer

    def stage(self, trainer: pl.Trainer) -> int:
        if self.unit == "iteration":
            return trainer.global_step
        # Incremented when an epoch's batches are done, before the epoch-end hooks save.
        return trainer.fit_loop.epoch_progress.current.processed

    def format_checkpoint_name(self, metrics, filename=None, ver=None, prefix=None) -> str:
        name = stage_checkpoint_name(
            self.model_name, self.dataset_name, self.unit, self.stage(self._trainer)
        )
        return os.path.join(self.dirpath, name)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        if self.every and trainer.global_step == 0 and not trainer.fast_dev_run:
            trainer.save_checkpoint(self.format_checkpoint_name({}), weights_only=False)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Ctrl-C, SIGTERM or a crash: save ``..._interrupted.ckpt`` so ``--resume`` can go on.

        A name of its own keeps a mid-interval state out of the stage sweeps' globs.
        """
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self.interrupted_path = os.path.join(
            self.dirpath, interrupted_checkpoint_name(self.model_name, self.dataset_name)
        )
        trainer.save_checkpoint(self.interrupted_path, weights_only=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        final = self.format_checkpoint_name({})
        # ``best_model_path`` is the last checkpoint saved (every one is kept), also after a resume.
        if not trainer.fast_dev_run and self.best_model_path != final:
            trainer.save_checkpoint(final, weights_only=False)
            self.best_model_path = final


def build_datamodule_for(config: TrainConfig):
    from datamodules import build_datamodule

    return build_datamodule(
        config.dataset,
        data_root=str(config.data_root),
        split="train",
        imagenet_dir=None if config.imagenet_dir is None else str(config.imagenet_dir),
        batch_size=config.batch_size,
        num_workers=config.num_workers,
        seed=config.seed,
        augment=config.augment,
        train_partition=config.train_partition,
        val_fraction=config.val_fraction,
    )


def classifier_hparams(config: TrainConfig, num_classes: int, input_shape) -> dict:
    """The plain hyperparameters of the :class:`VictimClassifier` this run trains."""
    return {
        "model": config.model,
        "num_classes": int(num_classes),
        "input_shape": [int(size) for size in input_shape],
        "dataset": config.dataset,
        **{name: getattr(config, name) for name in NETWORK_OPTIONS + TRAINING_OPTIONS},
        "schedule_unit": "step" if config.iter_train else "epoch",
        "schedule_length": final_stage(config),
    }


def training_privacy(config: TrainConfig, datamodule) -> dict:
    """The classifier's DP-SGD hyperparameters: none without ``--dp_*``; the noise multiplier
    from ``--dp_target_epsilon`` through the accountant, each sample in one step per epoch."""
    if config.dp_target_epsilon is None and config.dp_noise_multiplier is None:
        return {"dp_noise_multiplier": None}
    if config.dp_target_epsilon is not None and config.dp_noise_multiplier is not None:
        raise UserError("give --dp_target_epsilon or --dp_noise_multiplier, not both")
    from attacks.dp_sgd import Privacy, require_opacus

    require_opacus()
    if config.dp_target_epsilon is not None:
        per_epoch = max(1, len(datamodule.train_dataloader()))
        epochs = -(-config.iters // per_epoch) if config.iter_train else config.epochs
        privacy = Privacy.for_epsilon(
            config.dp_target_epsilon, config.dp_delta, config.dp_max_grad_norm, epochs
        )
    else:
        privacy = Privacy(config.dp_max_grad_norm, config.dp_noise_multiplier, config.dp_delta)
    return {
        "dp_noise_multiplier": privacy.noise_multiplier,
        "dp_max_grad_norm": privacy.max_grad_norm,
        "dp_delta": privacy.delta,
        "dp_batch_size": config.batch_size,
    }


def run_options(hparams: dict) -> dict:
    """The train.py options a classifier's hyperparameters stand for."""
    options = {
        key: hparams.get(key) for key in ("dataset", "model", *NETWORK_OPTIONS, *TRAINING_OPTIONS)
    }
    options["iter_train"] = hparams.get("schedule_unit") == "step"
    options["iters" if options["iter_train"] else "epochs"] = hparams.get("schedule_length")
    return options


def check_resume(path, hparams: dict) -> None:
    """Refuse to resume from a checkpoint that is unsafe, broken or of another run's options."""
    checkpoint = read_checkpoint(path)
    if "loops" not in checkpoint or "optimizer_states" not in checkpoint:
        raise CheckpointError(
            f"checkpoint {path} holds weights only; resuming needs the loop and optimizer state"
        )
    saved, wanted = run_options(checkpoint["hyper_parameters"]), run_options(hparams)
    different = [key for key in wanted if saved.get(key) != wanted[key]]
    if different:
        pairs = ", ".join(
            f"--{key} {saved.get(key)} (this run: {wanted[key]})" for key in different
        )
        raise CheckpointError(f"--resume {path} was saved by a run with other options: {pairs}")


def leakage_callbacks(config: TrainConfig) -> list[Callback]:
    if not config.attack_every_n_steps:
        return []
    try:
        from callbacks import LabelLeakageCallback
    except ImportError:
        raise UserError(
            "--attack_every_n_steps needs callbacks.LabelLeakageCallback, which this checkout does not have"
        ) from None
    return [LabelLeakageCallback(attack_every_n_steps=config.attack_every_n_steps)]


def _not_an_advert(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip:")


def silence_lightning_noise() -> None:
    """Drop Lightning's adverts for its cloud services and a deprecation inside its own code.

    Neither is anything a user of train.py can act on; Lightning's other messages stay.
    """
    # Filters are kept in a list without duplicates, so calling this twice adds nothing.
    logging.getLogger("pytorch_lightning.utilities.rank_zero").addFilter(_not_an_advert)
    # Lightning's pytree helper builds torch's deprecated LeafSpec on every run (torch >= 2.10).
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
    )


def build_trainer(config: TrainConfig, callbacks: list[Callback]) -> pl.Trainer:
    from pytorch_lightning.loggers import TensorBoardLogger
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    silence_lightning_noise()
    logger = TensorBoardLogger(
        save_dir=str(config.log_dir), name=config.exp_name, default_hp_metric=False
    )
    try:
        return pl.Trainer(
            accelerator=config.accelerator,
            devices=config.devices,
            strategy=config.strategy,
            num_nodes=config.num_nodes,
            precision=config.precision,
            max_epochs=-1 if config.iter_train else config.epochs,
            max_steps=config.iters if config.iter_train else -1,
            fast_dev_run=config.dryrun,
            logger=logger,
            callbacks=[*callbacks, LearningRateMonitor(logging_interval="step")],
            log_every_n_steps=10,
            enable_progress_bar=not config.quiet,
            enable_model_summary=not config.quiet,
            plugins=[atomic_checkpoint_io()],
        )
    except (MisconfigurationException, ValueError) as err:
        raise UserError(f"trainer options: {' '.join(str(err).split())}") from None


def train(config: TrainConfig) -> list[Path]:
    """Check everything, then train; returns the stage checkpoints in ``model_path`` of this run.
    (``train.py`` checks first that ``--model_path`` and ``--log_dir`` can be written.)"""
    from datamodules import dataset_info
    from lightning_modules.classifier import VictimClassifier
    from lightning_modules.networks import check_network_fits

    num_classes, input_shape, synthetic = dataset_info(config.dataset)
    check_network_fits(
        config.model, tuple(input_shape), **{n: getattr(config, n) for n in NETWORK_OPTIONS}
    )
    hparams = classifier_hparams(config, num_classes, input_shape)
    if config.resume:
        check_resume(config.resume, hparams)
    datamodule = build_datamodule_for(config)
    # Missing or broken data fails here, in one line, before any Trainer exists.
    datamodule.prepare_data()
    datamodule.setup("fit")
    hparams.update(training_privacy(config, datamodule))
    if hparams["dp_noise_multiplier"] is not None:
        from attacks.dp_sgd import check_supported
        from lightning_modules.networks import build_network

        options = {n: getattr(config, n) for n in NETWORK_OPTIONS}
        check_supported(build_network(config.model, num_classes, tuple(input_shape), **options))
    callbacks = leakage_callbacks(config)
    earlier = [] if config.resume else saved_stages(config)
    if earlier:
        log.warning(
            "%s already holds %d %s checkpoint(s) of %s on %s; this run replaces those of the stages it saves",
            config.model_path,
            len(earlier),
            stage_unit(config),
            config.model,
            config.dataset,
        )
    unit = stage_unit(config)
    every = (
        (config.iter_interval if config.iter_train else config.epoch_interval)
        if config.mid_save
        else 0
    )
    checkpoint = StageCheckpoint(config.model_path, config.model, config.dataset, unit, every)
    trainer = build_trainer(config, [*callbacks, checkpoint])
    if trainer.world_size == 1:
        # The datamodule's state_dict holds the sampler's position, so a mid-epoch resume is
        # exact on one process; under DDP, Lightning's DistributedSampler restarts the epoch
        # and the warning stays true.
        warnings.filterwarnings(
            "ignore", message="You're resuming from a checkpoint that ended before the epoch ended"
        )
    if synthetic:
        log.info("data: %s is SYNTHETIC (generated in memory, no files read)", config.dataset)
    pl.seed_everything(config.seed, workers=True)
    classifier = VictimClassifier(**hparams)
    # weights_only: resuming never runs code that a checkpoint file brings along.
    try:
        # Lightning's progress bar writes to stdout; train.py's stdout is kept for results
        # (none: the checkpoints are logged), so a redirected run does not fill a file with it.
        with contextlib.redirect_stdout(sys.stderr):
            trainer.fit(
                classifier, datamodule=datamodule, ckpt_path=config.resume, weights_only=True
            )
    except SIGTERMException as err:
        # Raised after the callbacks' on_exception ran, which saved the state to resume from.
        raise TrainingInterrupted(checkpoint.interrupted_path, signal.SIGTERM) from err
    except (KeyboardInterrupt, SystemExit) as err:
        # Lightning turns Ctrl-C into SystemExit(1), also after on_exception.
        raise TrainingInterrupted(checkpoint.interrupted_path, signal.SIGINT) from err
    return saved_stages(config) if trainer.is_global_zero else []


class TrainingInterrupted(Exception):
    """Training stopped by a signal; ``checkpoint`` (or None) is the state to resume from.

    ``signum`` is the signal, for the exit code 128 + signum (130 Ctrl-C, 143 SIGTERM).
    """

    def __init__(self, checkpoint: str | None, signum: int = signal.SIGINT):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint
        self.signum = int(signum)


def saved_stages(config: TrainConfig) -> list[Path]:
    """This run's stage checkpoints present in ``model_path``, by stage."""
    run_name = f"{config.model}_{config.dataset}"
    unit = "Iter" if config.iter_train else "Epoch"
    found = []
    for path in Path(config.model_path).glob(f"{run_name}_{unit}*.ckpt"):
        match = STAGE_PATTERN.search(path.name)
        if match and match["unit"] == unit and path.name[: match.start()] == run_name:
            found.append((int(match["n"]), path))
    return [path for _, path in sorted(found)]
