"""The client's side under federated averaging: several local SGD steps, then the weight change.

FedSGD (``attacks.gradients``) shares one gradient of one batch. FedAvg, what
federated learning mostly runs, lets the client take E epochs of mini-batch SGD
over its K samples and send only U = W_start - W_end. The server knows E, the
mini-batch size B, the learning rate and K (it set them), never the labels.

The attacks keep their one input: the shared "gradient" of every parameter is
U / (lr x steps), the mean gradient along the local trajectory (exactly so for
plain SGD), with the starting weights as the model. For the last layer's bias,
with B dividing K, K times it is the trajectory mean of sum_n (p_n - y_n): the
equation ``K grad_b = S - k`` the count attacks solve still holds, with S the
batch's softmax sum averaged over the steps instead of taken at the start.

Two choices, both so that E = 1 with B = K gives back the FedSGD gradient:

- the client trains a float64 copy of the model. In float32, U / (lr x steps)
  carries the rounding of the weights (eps |W| / lr, about 1e-4 of a gradient
  entry at lr = 0.01), which would bury what the gradient-precision tests of
  RLG and RLU+ look for; a real float32 client adds that noise on top of what
  is measured here.
- the model runs in the mode the server sent it in, as ``batch_gradients``
  does (attack.py's victims are in eval mode: dropout off, batch norm on its
  running statistics), so the only difference from FedSGD is the steps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from attacks.gradients import embed_and_forward

# The protocol and the update's record are what the server knows, next to the gradients:
# they live in attacks.observation (imported here for the code that finds them here).
from attacks.observation import (  # noqa: F401
    DEFAULT_LOCAL_LR,
    LOCAL_OPTIMIZERS,
    MOMENTUM,
    LocalTraining,
    LocalUpdate,
)

#: called after each local step's forward pass: (batch indices, embeddings, logits), detached
Observer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def train_locally(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    training: LocalTraining,
    generator: torch.Generator,
    observe: Observer | None = None,
    layer_name: str | None = None,
) -> int:
    """E epochs of mini-batch SGD on ``model`` in place (mean cross-entropy per mini-batch).

    Each epoch visits the samples in a fresh order drawn from ``generator``.
    Returns the number of optimizer steps taken, E x ceil(K / B).
    """
    momentum = MOMENTUM if training.optimizer == "momentum" else 0.0
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=training.lr, momentum=momentum)
    batch = training.batch_for(labels.numel())
    steps = 0
    for _ in range(training.epochs):
        order = torch.randperm(labels.numel(), generator=generator).to(labels.device)
        for indices in order.split(batch):
            embeddings, logits = embed_and_forward(model, images[indices], layer_name)
            loss = nn.functional.cross_entropy(logits, labels[indices])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
            if observe is not None:
                observe(indices, embeddings.detach(), logits.detach())
    return steps


def local_copy(model: nn.Module) -> nn.Module:
    """The model a client (or the server playing one) trains: a float64 copy, in the sent mode."""
    return copy.deepcopy(model).double()


def client_update(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    training: LocalTraining,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], int]:
    """The shared "gradients" U / (lr x steps) of every trainable parameter, and the step count.

    ``model`` (what the server sent) is left as it is; a float64 copy trains.
    """
    local = local_copy(model)
    steps = train_locally(local, images.double(), labels, training, generator)
    return update_as_gradients(model, dict(local.named_parameters()), training, steps), steps


def update_as_gradients(
    model: nn.Module, ends: Mapping[str, torch.Tensor], training: LocalTraining, steps: int
) -> dict[str, torch.Tensor]:
    """(W_sent - W_end) / (lr x steps) of every trainable parameter of ``model`` (the weights
    sent), ``ends`` the weights after the steps by parameter name: computed in float64, kept in
    the sent parameter's dtype. What the server attacks of a FedAvg update."""
    scale = training.lr * steps
    return {
        name: ((p.detach().double() - ends[name].detach().to(p.device, torch.float64)) / scale).to(
            p.dtype
        )
        for name, p in model.named_parameters()
        if p.requires_grad
    }


def end_weights(
    model: nn.Module, grads: dict[str, torch.Tensor], training: LocalTraining, steps: int
) -> dict[str, torch.Tensor]:
    """W_end = W_start - lr x steps x shared gradient: the end weights the shared update implies
    (after a defense, the defended update's)."""
    sent = dict(model.named_parameters())
    return {name: sent[name].detach() - training.lr * steps * grad for name, grad in grads.items()}
