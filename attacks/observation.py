"""What an attacker sees, and what an attack returns.

The server in federated learning holds the model and receives the client's
gradients and the batch size; it never sees the labels. ``SharedGradients``
holds exactly that, and it is the only input an attack gets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from attacks.local_update import LocalUpdate


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
