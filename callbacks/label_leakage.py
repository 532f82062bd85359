"""Label leakage during training: iLRG (and other attacks) on the gradients the optimizer applies.

Every ``attack_every_n_steps`` optimizer steps the callback plays the server of
federated learning: it reads the gradient of the model's last linear layer just
before the optimizer applies it, restores the batch's labels from it, and scores
the restoration against the labels, which it kept aside and which no attack sees.

What the attacked gradient is
    ``on_before_optimizer_step`` runs after the backward pass of the last
    micro-batch, after Lightning unscaled mixed-precision gradients and before it
    clips them. Lightning divides each micro-batch's loss by
    ``accumulate_grad_batches``, so with a mean cross-entropy loss and equal
    micro-batches the accumulated gradient is the mean over all samples of the
    step; DDP averages it over the ranks, so it is the mean over the global
    batch. That is the gradient of one batch of K = all those samples, as iLRG
    assumes. A shorter last batch (of an epoch or of one rank) weighs its
    samples differently and makes the attack approximate there.

Cost
    Steps that are not attacked cost two integer comparisons: no tensor is
    touched, so nothing waits for the device. On an attacked step the labels are
    counted on their device while the batches arrive (no sync), the counts of all
    ranks are summed (one fixed-size all-reduce), and rank zero copies the layer
    and its gradient once, runs the attacks and logs. Small layers are attacked
    on the CPU, where iLRG's few dozen small operations take a fraction of a
    millisecond, instead of as many kernel launches and syncs on a GPU, and on
    one CPU thread (see ``attacks.cpu_threads``). The per-step values reach the
    loggers in groups, at most every ``trainer.log_every_n_steps`` steps and at
    the end of each epoch, with their own steps: each ``log_metrics`` call costs
    about as much as the attack itself on a small layer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn
from torchmetrics import Metric

from attacks import AuxiliaryData, Restoration, SharedGradients, build_attack
from attacks.cpu_threads import one_cpu_thread
from attacks.gradients import last_linear_layer
from attacks.metrics import metric_set
from user_errors import UserError

#: iLRG's work grows as C^2 (d + C) for C classes and d features; layers below this
#: many multiply-adds are attacked on the CPU, larger ones where the layer lives.
CPU_ATTACK_MAX_WORK = 2e7

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)

STEP_PREFIX = "leakage"
EPOCH_PREFIX = "leakage_epoch"


@dataclass(frozen=True)
class LeakageResult:
    """One attacked step: what was attacked, what the attacks restored and how they scored."""

    step: int
    num_images: int
    #: the per-class label counts of the attacked (global) batch, on the CPU
    true_counts: torch.Tensor
    restorations: dict[str, Restoration]
    #: the logged values, keyed like the logger's tags
    values: dict[str, float]


def attack_device(layer: nn.Linear) -> torch.device:
    """Where the attacks on ``layer`` run: the CPU for small layers, else the layer's device."""
    num_classes, num_features = layer.weight.shape
    work = num_classes**2 * (num_features + num_classes)
    return torch.device("cpu") if work <= CPU_ATTACK_MAX_WORK else layer.weight.device


def unsynced_metrics(restores_counts: bool) -> dict[str, Metric]:
    """The metrics of ``attacks.metrics.metric_set``, computed without a cross-process sync.

    Only rank zero attacks and updates them, so a sync at ``compute`` would wait
    forever for ranks that never call it.
    """
    return metric_set(restores_counts, sync_on_compute=False)


def auxiliary_data(auxiliary) -> AuxiliaryData | None:
    """The server's labelled samples from ``AuxiliaryData``, an ``(images, labels)`` pair or a DataLoader."""
    if auxiliary is None or isinstance(auxiliary, AuxiliaryData):
        return auxiliary
    if (
        isinstance(auxiliary, (tuple, list))
        and len(auxiliary) == 2
        and all(isinstance(part, torch.Tensor) for part in auxiliary)
    ):
        return AuxiliaryData(auxiliary[0], auxiliary[1].long())
    return AuxiliaryData.from_batches(auxiliary)


def batch_labels(batch) -> torch.Tensor:
    """``y`` of an ``(x, y)`` batch, checked to be a vector of class indices."""
    if not isinstance(batch, (tuple, list)) or len(batch) < 2:
        raise UserError(
            f"LabelLeakageCallback needs (x, y) batches with the labels second, got {type(batch).__name__}"
        )
    labels = batch[1]
    if (
        not isinstance(labels, torch.Tensor)
        or labels.dim() != 1
        or labels.dtype not in INDEX_DTYPES
    ):
        described = (
            f"a {labels.dim()}-d {labels.dtype} tensor"
            if isinstance(labels, torch.Tensor)
            else type(labels).__name__
        )
        raise UserError(
            f"LabelLeakageCallback needs class-index labels (1-d integer tensor), got {described}"
        )
    return labels


class LabelLeakageCallback(pl.Callback):
    """Runs label-restoration attacks on the last layer's gradients and logs how much leaks.

    Every ``attack_every_n_steps`` optimizer steps (at global steps 0, n, 2n, ...)
    each attack in ``attacks`` (names of ``attacks.ATTACKS``, built with
    ``attack_options``) restores the labels of the step's batch from the
    gradients of ``layer_name`` (default: ``classifier``, else the last
    ``nn.Linear`` of the LightningModule; it needs a bias). ``auxiliary`` is the
    server's labelled data for RLU, LLBG and RLU+: ``AuxiliaryData``, an
    ``(images, labels)`` pair of tensors or a DataLoader of such batches, with
    every class in it. Every logger gets
    ``leakage/<attack>/<metric>`` at that global step: LeAcc, plus LnAcc, LnAcc+,
    IRec and Exact for attacks that restore counts; at the end of each epoch it gets their means
    over the epoch's attacked steps as ``leakage_epoch/<attack>/<metric>``.

    The LightningModule must train with automatic optimization on a mean
    cross-entropy loss and ``(x, y)`` batches. The callback only reads: it leaves
    gradients, weights, modes and random number generators as they were, so
    training runs exactly as without it. ``last_result`` holds the latest
    attacked step (on rank zero).
    """

    def __init__(
        self,
        attack_every_n_steps: int = 1,
        attacks: Iterable[str] = ("iLRG",),
        layer_name: str | None = None,
        attack_options: Mapping[str, object] | None = None,
        auxiliary=None,
    ):
        super().__init__()
        if isinstance(attack_every_n_steps, bool) or not isinstance(attack_every_n_steps, int):
            raise UserError(
                f"attack_every_n_steps must be an integer, got {attack_every_n_steps!r}"
            )
        if attack_every_n_steps < 1:
            raise UserError(f"attack_every_n_steps must be >= 1, got {attack_every_n_steps}")
        names = (attacks,) if isinstance(attacks, str) else tuple(dict.fromkeys(attacks))
        if not names:
            raise UserError("LabelLeakageCallback needs at least one attack")
        self.auxiliary = auxiliary_data(auxiliary)
        # The attacks that run the model find the attacked layer by the same rule as the callback.
        options = {
            **dict(attack_options or {}),
            "auxiliary": self.auxiliary,
            "layer_name": layer_name,
        }
        self.attack_every_n_steps = attack_every_n_steps
        self.attacks = {name: build_attack(name, **options) for name in names}
        # Copies of every parameter's gradient only for the attacks that read more than the
        # attacked layer (decompose reads the hidden layer before it).
        self.needs_parameter_grads = any(
            getattr(attack, "needs_parameter_grads", False) for attack in self.attacks.values()
        )
        self.metrics = {
            name: unsynced_metrics(attack.restores_counts) for name, attack in self.attacks.items()
        }
        self.requested_layer_name = layer_name
        #: the attacked layer's name in the LightningModule, known after ``setup``
        self.layer_name: str | None = None
        self.last_result: LeakageResult | None = None
        self._layer: nn.Linear | None = None
        # Label counts of the micro-batches of the step being attacked, on the labels' device.
        self._counts: torch.Tensor | None = None
        self._counts_step = -1
        # Rank zero's per-step values not yet handed to the loggers: (step, values).
        self._pending: list[tuple[int, dict[str, float]]] = []
        # Rank zero's scored steps not yet added to the epoch metrics: (restored, true) rows.
        self._unrecorded: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}

    # --- setup ---------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise UserError(
                "LabelLeakageCallback needs automatic optimization (one optimizer step per batch)"
            )
        self.layer_name, self._layer = last_linear_layer(pl_module, self.requested_layer_name)
        if not (self._layer.weight.requires_grad and self._layer.bias.requires_grad):
            raise UserError(
                f"the attacked layer {self.layer_name!r} is frozen: it has no gradient to attack"
            )
        if self.auxiliary is not None:
            self.auxiliary.check_covers(self._layer.out_features)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for metrics in self.metrics.values():
            for metric in metrics.values():
                metric.reset()
        self.last_result = None
        self._pending = []
        self._unrecorded = {}

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # An optimizer step never spans epochs; counts left over belong to a skipped step.
        self._counts = None

    # --- every step ----------------------------------------------------------------------

    def _is_attack_step(self, step: int) -> bool:
        return step % self.attack_every_n_steps == 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if not self._is_attack_step(step):
            return
        labels = batch_labels(batch)
        num_classes = self._layer.out_features
        if self._counts is None or self._counts_step != step:
            # One bin per class and one for labels outside them, found when the counts are read.
            self._counts = torch.zeros(num_classes + 1, dtype=torch.long, device=labels.device)
            self._counts_step = step
        # Labels outside [0, C) land in bin C: clamped to [-1, C], then -1 wraps around to C.
        bins = labels.to(self._counts.device, torch.long).clamp(-1, num_classes) % (num_classes + 1)
        # index_add_, not bincount: bincount on CUDA reads the largest label back to the host.
        self._counts.index_add_(0, bins, torch.ones_like(bins))

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer
    ) -> None:
        step = trainer.global_step
        if not self._is_attack_step(step) or self._counts is None or self._counts_step != step:
            return
        # Every rank takes part in the sum; the gradients are the same on all of them after
        # DDP's all-reduce, so rank zero alone attacks, scores and logs.
        counts = trainer.strategy.reduce(self._counts, reduce_op="sum").cpu()
        self._counts = None
        true_counts, outside = counts[:-1], int(counts[-1])
        if outside:  # on every rank, so that none waits for the others
            raise UserError(
                f"{outside} labels are not classes of the attacked layer {self.layer_name!r} "
                f"({true_counts.numel()} outputs); name the model's output layer with layer_name"
            )
        if not trainer.is_global_zero:
            return
        layer = self._layer
        if layer.weight.grad is None or layer.bias.grad is None:
            rank_zero_warn(
                f"LabelLeakageCallback: layer {self.layer_name!r} has no gradient at an attacked step; "
                "it is not used by the loss, or training_step returned None"
            )
            return
        num_images = int(true_counts.sum())
        if num_images == 0:
            return
        with one_cpu_thread(attack_device(layer)):
            shared, finite = self._shared_gradients(layer, num_images, pl_module)
            if not finite:
                # An fp16 overflow (which the gradient scaler skips) or a diverged run: nothing to restore.
                return
            restorations = {name: attack(shared) for name, attack in self.attacks.items()}
            values = self._score(restorations, true_counts)
        self.last_result = LeakageResult(step, num_images, true_counts, restorations, values)
        self._pending.append((step, values))
        # Hand the values over before the next attacked step would be log_every_n_steps or
        # more after the oldest one waiting.
        if step + self.attack_every_n_steps - self._pending[0][0] >= trainer.log_every_n_steps:
            self._flush(trainer)

    def _flush(self, trainer: pl.Trainer) -> None:
        """Give every logger the per-step values waiting, each at its own step; update the metrics."""
        pending, self._pending = self._pending, []
        for logger in trainer.loggers:
            for step, values in pending:
                logger.log_metrics(values, step=step)
        unrecorded, self._unrecorded = self._unrecorded, {}
        for (name, metric_name), rows in unrecorded.items():
            restored, true_counts = (torch.cat(part) for part in zip(*rows))
            # One update for many steps: a (steps, C) batch, each row scored on its own.
            self.metrics[name][metric_name].update(restored, true_counts)

    def _shared_gradients(
        self, layer: nn.Linear, num_images: int, model: nn.Module
    ) -> tuple[SharedGradients, bool]:
        """What the server sees, as copies (the attacks never alias ``.grad`` or the weights),
        and whether the gradients are finite.

        The copies keep the gradient's precision (the attacks compute in float64
        themselves): iLRG's fast products are exact to that precision.
        """
        parts = [
            tensor.detach()
            for tensor in (layer.weight.grad, layer.bias.grad, layer.weight, layer.bias)
        ]
        # One new buffer (cat copies), so the host waits for the device once and copies once.
        flat = torch.cat([part.reshape(-1) for part in parts]).to(attack_device(layer))
        sizes = [part.numel() for part in parts]
        weight_grad, bias_grad, weight, bias = flat.split(sizes)
        shape = layer.weight.shape
        shared = SharedGradients(
            weight_grad=weight_grad.view(shape),
            bias_grad=bias_grad,
            weight=weight.view(shape),
            bias=bias,
            num_images=num_images,
            # The weights the gradient was taken at (the optimizer has not stepped yet): the
            # auxiliary attacks run the model on the server's data with them.
            model=model,
            parameter_grads=self._parameter_grads(model) if self.needs_parameter_grads else None,
        )
        return shared, bool(torch.isfinite(flat[: sizes[0] + sizes[1]]).all())

    @staticmethod
    def _parameter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
        """Every trainable parameter's gradient, copied, by the model's own parameter names."""
        return {
            name: parameter.grad.detach().clone()
            for name, parameter in model.named_parameters()
            if parameter.grad is not None
        }

    def _score(
        self, restorations: dict[str, Restoration], true_counts: torch.Tensor
    ) -> dict[str, float]:
        values = {}
        true_counts = true_counts[None]
        for name, restoration in restorations.items():
            for metric_name, metric in self.metrics[name].items():
                restored = restoration.present if metric_name == "LeAcc" else restoration.counts
                restored = restored.cpu()[None]
                # The step's own score from the metric's definition; the epoch's metric gets the
                # step with the others when the values are flushed.
                value = float(metric.batch_scores(restored, true_counts))
                self._unrecorded.setdefault((name, metric_name), []).append((restored, true_counts))
                values[f"{STEP_PREFIX}/{name}/{metric_name}"] = value
        return values

    # --- every epoch ---------------------------------------------------------------------

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        self._flush(trainer)
        values = {}
        for name, metrics in self.metrics.items():
            for metric_name, metric in metrics.items():
                if metric.update_called:
                    mean = float(metric.compute())
                    if not math.isnan(mean):  # NaN: no attacked step had a defined score
                        values[f"{EPOCH_PREFIX}/{name}/{metric_name}"] = mean
                metric.reset()
        if values:
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        # A run stopped by an error or Ctrl-C keeps the values of the steps it attacked.
        if trainer.is_global_zero:
            self._flush(trainer)
