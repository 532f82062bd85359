"""What an attacker sees, and what an attack returns.

The server in federated learning holds the model and receives the client's
gradients and the batch size; it never sees the labels. ``SharedGradients``
holds exactly that, and it is the only input an attack gets. Under FedAvg the
server also knows the protocol it set (``LocalTraining``) and the update's
record (``LocalUpdate``); the client's side of it is ``attacks.local_update``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from user_errors import UserError

#: the client's local optimizers; "momentum" is heavy-ball SGD with the usual coefficient
LOCAL_OPTIMIZERS = ("sgd", "momentum")
MOMENTUM = 0.9
#: the default local learning rate: the issue's 0.01 (the RLU paper's value was not at hand)
DEFAULT_LOCAL_LR = 0.01


@dataclass(frozen=True)
class LocalTraining:
    """The local-training protocol the server sets: E epochs of mini-batches of B at lr."""

    epochs: int
    #: None: all K samples in one batch; a B above K also means one batch
    batch_size: int | None
    lr: float
    optimizer: str = "sgd"

    def __post_init__(self):
        if self.epochs < 1:
            raise UserError(f"local training needs >= 1 epoch, got {self.epochs}")
        if self.batch_size is not None and self.batch_size < 1:
            raise UserError(f"the local batch size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"the local learning rate must be a finite number > 0, got {self.lr}")
        if self.optimizer not in LOCAL_OPTIMIZERS:
            raise UserError(
                f"unknown local optimizer {self.optimizer!r}; valid: {', '.join(LOCAL_OPTIMIZERS)}"
            )

    def batch_for(self, num_samples: int) -> int:
        return min(self.batch_size or num_samples, num_samples)

    def steps(self, num_samples: int) -> int:
        """Optimizer steps over ``num_samples`` samples: E x ceil(K / B)."""
        return self.epochs * math.ceil(num_samples / self.batch_for(num_samples))

    def describe(self) -> dict:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lr": self.lr,
            "optimizer": self.optimizer,
        }


@dataclass(frozen=True)
class LocalUpdate:
    """What the server knows of a FedAvg update besides its "gradient": protocol, steps, end weights."""

    training: LocalTraining
    steps: int
    #: the client's weights after the local steps, by parameter name (start - lr x steps x gradient)
    end_state: dict[str, torch.Tensor] = field(repr=False, compare=False)


@dataclass(frozen=True)
class SharedGradients:
    """The gradients a client shares for one batch, plus the server's own knowledge.

    ``weight_grad`` (C x d) and ``bias_grad`` (C,) are the gradients of the mean
    cross-entropy over the batch w.r.t. the last linear layer; ``weight`` and
    ``bias`` are that layer's parameters (the server sent them). ``parameter_grads``
    holds the gradients of every parameter by name, for attacks that use more than
    the last layer. ``known_classes`` is the oracle knowledge of the simplified
    setting (which classes are present), ``None`` otherwise. ``model`` is the
    whole network as the server sent it (the weights the gradient was taken
    at), for attacks that run it on the server's own data; ``None`` where only
    the last layer is at hand.

    Under federated averaging (``local_update`` set) the client took several
    local steps and shared its weight change U: every "gradient" here is
    U / (lr x steps), the mean gradient along its trajectory, ``weight``,
    ``bias`` and ``model`` are the starting weights the server sent, and
    ``local_update`` holds the protocol (E, B, lr, optimizer), the step count
    and the end weights.
    """

    weight_grad: torch.Tensor
    bias_grad: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    num_images: int
    parameter_grads: dict[str, torch.Tensor] | None = field(default=None, repr=False)
    known_classes: torch.Tensor | None = None
    model: torch.nn.Module | None = field(default=None, repr=False, compare=False)
    local_update: LocalUpdate | None = field(default=None, repr=False, compare=False)

    @property
    def num_classes(self) -> int:
        return self.weight_grad.shape[0]

    def replace(self, **changes) -> SharedGradients:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.update(changes)
        return SharedGradients(**values)


@dataclass(frozen=True)
class Restoration:
    """An attack's answer: which classes are in the batch and, if it can tell, how many of each.

    ``counts`` are the raw restored counts (may not sum to K); ``adjusted_counts``
    sum exactly to K, for use as labels (e.g. by image reconstruction).
    """

    present: torch.Tensor
    counts: torch.Tensor | None = None
    adjusted_counts: torch.Tensor | None = None
    #: classes whose gradient carried no usable information (non-finite or exactly zero bias grad)
    undetermined: torch.Tensor | None = None
    #: per-sample attacks: the labels of the samples told apart, one entry per separated sample
    #: (the rest of the batch is counted some other way); ``None`` for count-level attacks
    sample_labels: torch.Tensor | None = None

    @property
    def separated(self) -> int | None:
        """How many of the K samples the attack told apart, or ``None`` if it does not try."""
        return None if self.sample_labels is None else int(self.sample_labels.numel())

    @classmethod
    def from_counts(
        cls, counts: torch.Tensor, adjusted: torch.Tensor | None = None, **kw
    ) -> Restoration:
        return cls(present=counts > 0, counts=counts, adjusted_counts=adjusted, **kw)

    def labels(self) -> torch.Tensor:
        """The multiset of restored labels (sorted), from the counts that sum to K."""
        counts = self.adjusted_counts if self.adjusted_counts is not None else self.counts
        if counts is None:
            raise ValueError("this attack restores only which classes are present, not labels")
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
