"""The client's side: the gradient of the mean cross-entropy over one batch.

A batch of thousands of ImageNet images does not fit in memory at once, so the
batch may arrive in chunks: the loss of each chunk is summed and divided by the
full K before its backward pass, which makes the accumulated gradient exactly
that of the whole batch while only one chunk's activations are alive.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from attacks.observation import SharedGradients
from user_errors import UserError


def last_linear_layer(model: nn.Module, name: str | None = None) -> tuple[str, nn.Linear]:
    """The attacked layer: ``name`` if given, else ``model.classifier``, else the last ``nn.Linear``."""
    modules = dict(model.named_modules())
    if name is not None:
        if name not in modules or not isinstance(modules[name], nn.Linear):
            raise UserError(f"no nn.Linear layer named {name!r} in {type(model).__name__}")
        layer_name = name
    elif isinstance(getattr(model, "classifier", None), nn.Linear):
        layer_name = "classifier"
    else:
        linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
        if not linear:
            raise UserError(f"{type(model).__name__} has no nn.Linear layer to attack")
        layer_name = linear[-1]
    layer = modules[layer_name]
    if layer.bias is None:
        raise UserError(f"the last linear layer {layer_name!r} has no bias; iLRG needs it")
    return layer_name, layer


def batch_gradients(
    model: nn.Module, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], num_images: int
) -> dict[str, torch.Tensor]:
    """Gradients of mean cross-entropy over ``num_images`` samples given as (images, labels) chunks."""
    parameters = {name: p for name, p in model.named_parameters() if p.requires_grad}
    totals: list[torch.Tensor] | None = None
    seen = 0
    for images, labels in chunks:
        loss = nn.functional.cross_entropy(model(images), labels, reduction="sum") / num_images
        grads = torch.autograd.grad(loss, list(parameters.values()))
        seen += labels.numel()
        if totals is None:  # the first chunk's gradients are new tensors: they become the sums
            totals = list(grads)
        else:
            for total, grad in zip(totals, grads):
                total += grad
        # Nothing of this chunk outlives it: the peak is one chunk's, not two.
        del images, labels, loss, grads
    if seen != num_images:
        raise ValueError(f"chunks held {seen} samples, expected {num_images}")
    if totals is None:
        totals = [torch.zeros_like(p) for p in parameters.values()]
    return dict(zip(parameters, totals))


def chunked(images: torch.Tensor, labels: torch.Tensor, max_size: int | None):
    """Split a batch into chunks of at most ``max_size`` (None: one chunk)."""
    step = labels.numel() if not max_size else max_size
    for start in range(0, labels.numel(), step):
        yield images[start : start + step], labels[start : start + step]


def share(
    model: nn.Module,
    parameter_grads: dict[str, torch.Tensor],
    num_images: int,
    layer_name: str | None = None,
    known_classes: torch.Tensor | None = None,
    local_update=None,
) -> SharedGradients:
    """What the server holds after the client shares ``parameter_grads`` (under FedAvg, the
    update as gradients, with its ``attacks.local_update.LocalUpdate``)."""
    name, layer = last_linear_layer(model, layer_name)
    prefix = f"{name}." if name else ""  # a bare nn.Linear is its own last layer
    return SharedGradients(
        weight_grad=parameter_grads[f"{prefix}weight"],
        bias_grad=parameter_grads[f"{prefix}bias"],
        weight=layer.weight.detach(),
        bias=layer.bias.detach(),
        num_images=num_images,
        parameter_grads=parameter_grads,
        known_classes=known_classes,
        model=model,
        local_update=local_update,
    )


def embed_and_forward(
    model: nn.Module, images: torch.Tensor, layer_name: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The attacked layer's input (the embedding, B x d) and the model's output, from one forward pass.

    A forward hook on the layer catches its input, so this works for any model,
    with or without an ``embed`` method; gradients flow through both results
    unless the caller disables them.
    """
    _, layer = last_linear_layer(model, layer_name)
    caught: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _module, inputs, _output: caught.append(inputs[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    if len(caught) != 1:
        raise ValueError(
            f"the attacked layer ran {len(caught)} times in one forward pass, expected once"
        )
    return caught[0].flatten(1), logits
