"""The server's auxiliary data: a few labelled samples per class, and what the model does on them.

The auxiliary-data attacks (RLU, LLBG, RLU+) assume the server holds a small
labelled set from the task's distribution, never the client's batch. On it the
server measures, for every true class j, the model's mean softmax output
E[p | y = j] (row j of ``probabilities``: its diagonal is the confidence, the
rest the "erroneous confidence") and each sample's deviation from it. The mean
is the expectation of exactly the per-sample term that the bias gradient sums
over the batch:

    K grad_b = sum_n (p_n - y_n) ~ sum_j k_j (P_j - e_j)

so the counts k solve a linear system whose matrix comes from the auxiliary
data. (RLU, as released, measures its own statistic: ``attacks.rlu``.)

The statistics depend on the weights; an attack keeps the last ones with the
version counters of the model's tensors and recomputes only after a weight
changed (an optimizer step during training, another checkpoint in a sweep).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import torch
from torch import nn

from attacks.gradients import embed_and_forward
from attacks.observation import SharedGradients
from user_errors import UserError

if TYPE_CHECKING:
    from attacks.local_update import LocalTraining

#: samples per forward pass over the auxiliary set: bounds memory, not results
AUX_BATCH = 256
T = TypeVar("T")


@dataclass(frozen=True)
class AuxiliaryData:
    """Labelled samples the server holds: ``images`` (N x ...) and class-index ``labels`` (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self):
        if self.labels.dim() != 1 or self.images.shape[0] != self.labels.shape[0]:
            raise UserError(
                f"auxiliary data needs one label per image, got {tuple(self.images.shape)} images "
                f"and {tuple(self.labels.shape)} labels"
            )

    @classmethod
    def from_batches(cls, batches: Iterable) -> AuxiliaryData:
        """From a DataLoader (or any iterable) of ``(images, labels)`` batches."""
        images, labels = [], []
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise UserError(
                    f"auxiliary batches must be (images, labels), got {type(batch).__name__}"
                )
            images.append(torch.as_tensor(batch[0]))
            labels.append(torch.as_tensor(batch[1]).long())
        if not images:
            raise UserError("the auxiliary data loader gave no batches")
        return cls(torch.cat(images), torch.cat(labels))

    def check_covers(self, num_classes: int) -> None:
        """UserError naming the classes without a sample: their statistics would be guesses."""
        counts = torch.bincount(self.labels.clamp(0, num_classes), minlength=num_classes + 1)
        outside = int(counts[num_classes]) + int((self.labels < 0).sum())
        if outside:
            raise UserError(
                f"{outside} auxiliary labels are not classes of a {num_classes}-class model"
            )
        missing = torch.nonzero(counts[:num_classes] == 0).flatten().tolist()
        if missing:
            shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
            raise UserError(
                f"the auxiliary data has no sample of {len(missing)} class(es): {shown}; "
                "the auxiliary attacks need every class (more --aux_per_class or another --aux_split)"
            )


@dataclass(frozen=True)
class ClassStatistics:
    """Per-true-class means over the auxiliary data, in float64 (C x C each, row = true class)."""

    #: row j: E[p | y = j]; the diagonal is the model's confidence on class j
    probabilities: torch.Tensor
    #: samples per class that the means are over
    samples: torch.Tensor
    #: whether every auxiliary embedding is >= 0 (a ReLU before the layer), as row tests assume
    non_negative_embeddings: bool
    #: per auxiliary sample: p - onehot(y) minus its class's mean (N x C), and its label (N,)
    deviations: torch.Tensor
    labels: torch.Tensor

    @property
    def confidence(self) -> torch.Tensor:
        return self.probabilities.diagonal()


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """The model in eval mode (no dropout, batch-norm running statistics untouched), then as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def class_statistics(
    model: nn.Module, auxiliary: AuxiliaryData, num_classes: int, layer_name: str | None = None
) -> ClassStatistics:
    """Run the model on the auxiliary data and average the gradient's per-sample terms per class."""
    auxiliary.check_covers(num_classes)
    device = next(model.parameters()).device
    errors = []
    non_negative = True
    with evaluation_mode(model), torch.no_grad():
        for start in range(0, auxiliary.labels.numel(), AUX_BATCH):
            images = auxiliary.images[start : start + AUX_BATCH].to(device)
            labels = auxiliary.labels[start : start + AUX_BATCH]
            embeddings, logits = embed_and_forward(model, images, layer_name)
            errors.append(sample_errors(logits, labels, num_classes))
            non_negative = non_negative and bool((embeddings >= 0).all())
    return per_class(torch.cat(errors), auxiliary.labels, non_negative)


def sample_errors(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Per sample, its term of K grad_b: p - onehot(y) (float64, on the CPU)."""
    probabilities = torch.softmax(logits.detach().to(torch.float64), dim=1).cpu()
    return probabilities - nn.functional.one_hot(labels.cpu(), num_classes)


def per_class(errors: torch.Tensor, labels: torch.Tensor, non_negative: bool) -> ClassStatistics:
    """The per-class means of the per-sample terms (N x C), and each sample's deviation."""
    num_classes = errors.shape[1]
    samples = torch.bincount(labels, minlength=num_classes)
    eye = torch.eye(num_classes, dtype=torch.float64)
    probability_sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    probability_sums.index_add_(0, labels, errors + eye[labels])
    probabilities = probability_sums / samples[:, None]
    deviations = errors - (probabilities - eye)[labels]
    return ClassStatistics(probabilities, samples, non_negative, deviations, labels.clone())


def trajectory_statistics(
    model: nn.Module,
    auxiliary: AuxiliaryData,
    num_classes: int,
    training: LocalTraining,
    num_images: int,
    seed: int = 0,
    layer_name: str | None = None,
) -> ClassStatistics:
    """The per-sample terms averaged along a simulated local training (LLBG and RLU+ under FedAvg).

    Under FedAvg the shared bias "gradient" holds each sample's p - onehot(y)
    averaged over the E times its mini-batch was used, at weights the server never
    sees; the client's own samples grow more confident as it fits them. The
    server plays the client on its auxiliary data: a seeded order cuts the
    samples into simulated clients of K (the last one filled up from the first
    samples), each trains a copy of the sent model with the same E, B, lr and
    optimizer, and every forward pass records the terms of the samples in that
    mini-batch, at the weights that step's gradient is taken at. Their mean per
    sample, then per class, replaces the statistics at the sent weights.
    """
    from attacks.local_update import local_copy, train_locally

    auxiliary.check_covers(num_classes)
    count = auxiliary.labels.numel()
    generator = torch.Generator().manual_seed(seed)
    clients = math.ceil(count / num_images)
    order = torch.randperm(count, generator=generator).repeat(
        math.ceil(clients * num_images / count)
    )
    error_sums = torch.zeros(count, num_classes, dtype=torch.float64)
    visits = torch.zeros(count, dtype=torch.float64)
    non_negative = True
    device = next(model.parameters()).device
    for client in order[: clients * num_images].split(num_images):
        labels = auxiliary.labels[client]

        def observe(indices, embeddings, logits, client=client, labels=labels):
            nonlocal non_negative
            indices = indices.cpu()
            errors = sample_errors(logits, labels[indices], num_classes)
            non_negative = non_negative and bool((embeddings >= 0).all())
            error_sums.index_add_(0, client[indices], errors)
            visits.index_add_(0, client[indices], torch.ones(indices.numel(), dtype=torch.float64))

        images = auxiliary.images[client].to(device, torch.float64)
        train_locally(
            local_copy(model), images, labels.to(device), training, generator, observe, layer_name
        )
    return per_class(error_sums / visits[:, None], auxiliary.labels, non_negative)


def weights_version(model: nn.Module) -> tuple:
    """Changes whenever a parameter or buffer of ``model`` is written in place (or replaced)."""
    return (id(model),) + tuple(
        (id(t), t._version) for t in (*model.parameters(), *model.buffers())
    )


class AuxiliaryAttack:
    """Base of the attacks that use the server's auxiliary data and the model (``shared.model``)."""

    restores_counts = True

    @classmethod
    def needs_auxiliary(cls, **options) -> bool:
        """Whether the attack built with these options reads the auxiliary data (an attack that
        can do without, LLBG with an assumed confidence, says when)."""
        return True

    def __init__(
        self,
        auxiliary: AuxiliaryData | None,
        layer_name: str | None = None,
        seed: int = 0,
        required: bool = True,
    ):
        if auxiliary is None and required:
            raise UserError(
                f"attack {self.name!r} needs auxiliary data (attack.py: --aux_split, --aux_per_class; "
                "callback: auxiliary=)"
            )
        self.auxiliary = auxiliary
        self.layer_name = layer_name
        #: seeds the simulated local training of a FedAvg update (``trajectory_statistics``)
        self.seed = seed
        self._cached: tuple[tuple, object] | None = None

    @classmethod
    def from_options(
        cls,
        auxiliary: AuxiliaryData | None = None,
        layer_name: str | None = None,
        seed: int = 0,
        **_,
    ):
        return cls(auxiliary, layer_name=layer_name, seed=seed)

    def statistics(
        self,
        model: nn.Module | None,
        num_classes: int,
        training: LocalTraining | None = None,
        num_images: int = 0,
    ) -> ClassStatistics:
        """At the sent weights, or (``training`` given) along a simulated local training of K samples.

        The server's model stays the same over a run's tries, so the simulation runs once per model.
        """
        key = (weights_version(self.required_model(model)), training, num_images)

        def measure() -> ClassStatistics:
            if training is None:
                return class_statistics(model, self.auxiliary, num_classes, self.layer_name)
            return trajectory_statistics(
                model, self.auxiliary, num_classes, training, num_images, self.seed, self.layer_name
            )

        return self.remembered(key, measure)

    def required_model(self, model: nn.Module | None) -> nn.Module:
        """The shared model, which these attacks run on the auxiliary data; a UserError without."""
        if model is None:
            raise UserError(
                f"attack {self.name!r} runs the model on the auxiliary data: share(...) the model too"
            )
        return model

    def remembered(self, key: tuple, compute: Callable[[], T]) -> T:
        """``compute()``, kept while ``key`` (the weights' versions and what else it depends on)
        stays the same: the server's model is the same over a run's tries."""
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, compute())
        return self._cached[1]

    def statistics_for(self, shared: SharedGradients) -> ClassStatistics:
        """The statistics that fit what was shared: one gradient, or a FedAvg update."""
        update = shared.local_update
        if update is None:
            return self.statistics(shared.model, shared.num_classes)
        return self.statistics(shared.model, shared.num_classes, update.training, shared.num_images)
