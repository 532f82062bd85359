"""The LightningModule that trains a victim network for classification.

Only plain values (names, numbers, lists) go into the hyperparameters, so a
checkpoint alone rebuilds the network, and it loads with
``torch.load(weights_only=True)``: nothing in it needs unpickling code.

Optimizer and schedule follow the original code: SGD with Nesterov momentum 0.9
(or AdamW), and the ``linear`` schedule, a step decay by 0.1 after 3/8, 5/8 and
7/8 of training. ``warmup`` ramps the rate linearly from lr/10 up to lr over the
first tenth of training. The schedule counts epochs or optimizer steps
(``schedule_unit``), whichever the training run counts.
"""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torchmetrics
from torch import nn

from lightning_modules.networks import build_network
from user_errors import UserError

OPTIMIZERS = ("SGD", "AdamW")
SCHEDULERS = ("linear", "none")
SCHEDULE_UNITS = ("epoch", "step")
#: fractions of training after which the ``linear`` schedule divides the rate by 10
DECAY_POINTS = (3 / 8, 5 / 8, 7 / 8)
WARMUP_FRACTION = 0.1
WARMUP_START = 0.1


def lr_factor(position: int, length: int, scheduler: str, warmup: bool) -> float:
    """The multiple of the base rate after ``position`` of ``length`` epochs or steps."""
    factor = 1.0
    if scheduler == "linear":
        milestones = [int(length * point) for point in DECAY_POINTS]
        factor *= 0.1 ** sum(position >= milestone for milestone in milestones)
    if warmup:
        span = max(1, int(length * WARMUP_FRACTION))
        factor *= min(1.0, WARMUP_START + (1.0 - WARMUP_START) * position / span)
    return factor


class VictimClassifier(pl.LightningModule):
    """Cross-entropy training of ``build_network(model, num_classes, input_shape, ...)``.

    ``self.network`` is the :class:`~lightning_modules.networks.VictimNetwork`, so the
    attacked layer is ``self.network.classifier``. ``dataset`` only records what the
    network was trained on (checkpoint names and checks use it). ``schedule_length``
    is the length of training in ``schedule_unit``; None takes it from the Trainer.
    """

    def __init__(
        self,
        model: str = "dnn",
        num_classes: int = 10,
        input_shape: list[int] | tuple[int, int, int] = (1, 28, 28),
        dataset: str | None = None,
        n_hidden: int = 1,
        n_dim: int = 300,
        batchnorm: bool = False,
        dropout: bool = False,
        silu: bool = False,
        leaky_relu: bool = False,
        optimizer: str = "SGD",
        lr: float = 0.1,
        weight_decay: float = 5e-4,
        scheduler: str = "linear",
        warmup: bool = False,
        schedule_unit: str = "epoch",
        schedule_length: int | None = None,
        dp_noise_multiplier: float | None = None,
        dp_max_grad_norm: float = 1.0,
        dp_delta: float = 1e-5,
        dp_batch_size: int | None = None,
    ) -> None:
        super().__init__()
        for name, value, valid in (
            ("optimizer", optimizer, OPTIMIZERS),
            ("scheduler", scheduler, SCHEDULERS),
            ("schedule_unit", schedule_unit, SCHEDULE_UNITS),
        ):
            if value not in valid:
                raise UserError(f"unknown {name} {value!r}; valid: {', '.join(valid)}")
        if schedule_length is not None and schedule_length < 1:
            raise UserError(f"schedule_length must be >= 1, got {schedule_length}")
        # A list, not a tuple: hparams.yaml and weights-only loading keep lists plain.
        input_shape = [int(size) for size in input_shape]
        self.save_hyperparameters()
        self.network = build_network(
            model,
            num_classes,
            tuple(input_shape),
            n_hidden=n_hidden,
            n_dim=n_dim,
            batchnorm=batchnorm,
            dropout=dropout,
            silu=silu,
            leaky_relu=leaky_relu,
        )
        self.loss = nn.CrossEntropyLoss()
        self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.loss(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True)
        self.log("train/acc", self.train_acc, on_step=True, on_epoch=True, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.log(
            "val/loss", self.loss(logits, labels), on_epoch=True, prog_bar=True, sync_dist=True
        )
        self.log("val/acc", self.val_acc, on_epoch=True, prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._validated_at = int(self.trainer.global_step)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Record the latest validation accuracy and the step it was measured at.

        Stage sweeps show it beside the leakage; an iteration stage inside an epoch
        carries the accuracy of the last epoch end (``val_step`` says which), and the
        untrained stage 0 none.
        """
        step = getattr(self, "_validated_at", None)
        accuracy = self.trainer.callback_metrics.get("val/acc") if step is not None else None
        checkpoint["validation"] = (
            {"val_acc": float(accuracy), "val_step": step} if accuracy is not None else None
        )
        if self.hparams.dp_noise_multiplier is not None:
            checkpoint["privacy"] = self.privacy_spent()

    def privacy_spent(self) -> dict:
        """DP-SGD's record so far: every sample is in one step of each epoch begun."""
        from attacks.dp_sgd import Privacy

        hp = self.hparams
        per_epoch = max(1, int(self.trainer.num_training_batches or 1))
        epochs = -(-int(self.trainer.global_step) // per_epoch)  # ceil: an epoch begun counts
        privacy = Privacy(hp.dp_max_grad_norm, hp.dp_noise_multiplier, hp.dp_delta)
        return privacy.describe(max(epochs, 0))

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = self._base_optimizer()
        if hp.dp_noise_multiplier is not None:
            optimizer = self._private(optimizer)
        length = hp.schedule_length or self._trainer_length()

        def factor(position: int) -> float:
            return lr_factor(position, length, hp.scheduler, hp.warmup)

        # A plain function: LambdaLR stores nothing of it in the checkpoint.
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": schedule, "interval": hp.schedule_unit},
        }

    def _private(self, optimizer):
        """DP-SGD through Opacus: per-sample gradients by hooks on the network's layers, each
        clipped to ``dp_max_grad_norm``, summed, noised with std sigma x C and divided by the
        batch size before ``optimizer`` steps (``attacks.dp_sgd`` has the accounting)."""
        from attacks.dp_sgd import check_supported, require_opacus

        require_opacus()
        from opacus import GradSampleModule
        from opacus.optimizers import DPOptimizer

        hp = self.hparams
        check_supported(self.network)
        if getattr(self, "_sampled", None) is None:
            # Kept out of the module tree (a list): the hooks live on the network's own layers,
            # so its parameter names, state_dict and checkpoints stay those of a plain run.
            self._sampled = [GradSampleModule(self.network)]
        return DPOptimizer(
            optimizer,
            noise_multiplier=hp.dp_noise_multiplier,
            max_grad_norm=hp.dp_max_grad_norm,
            expected_batch_size=hp.dp_batch_size,
            generator=torch.Generator().manual_seed(int(torch.initial_seed()) % 2**63),
        )

    def backward(self, loss: torch.Tensor, *args, **kwargs) -> None:
        if getattr(self, "_sampled", None) is None:
            return super().backward(loss, *args, **kwargs)
        from attacks.dp_sgd import input_free_hooks

        with input_free_hooks():
            super().backward(loss, *args, **kwargs)

    def _base_optimizer(self):
        hp = self.hparams
        if hp.optimizer == "SGD":
            optimizer = torch.optim.SGD(
                self.parameters(),
                lr=hp.lr,
                momentum=0.9,
                nesterov=True,
                weight_decay=hp.weight_decay,
            )
            return optimizer
        return torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)

    def _trainer_length(self) -> int:
        if self.hparams.schedule_unit == "step":
            return int(self.trainer.estimated_stepping_batches)
        if self.trainer.max_epochs is None or self.trainer.max_epochs < 1:
            raise UserError("an epoch schedule needs schedule_length or the Trainer's max_epochs")
        return int(self.trainer.max_epochs)
