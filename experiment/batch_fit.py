"""How well the victim fits the attacked batch, and how many of its samples any attack can see.

The harness knows the batch's labels (the attacks never do): per try it records
the model's accuracy on the batch, the mean error 1 - p_y, and how many samples
are *visible*: a sample's term (1/K) g_n [e_n, 1]^T in the classifier's gradient,
g_n = p_n - onehot(y_n), is above the gradient's own rounding (half an ulp of
its rms entry, over all entries). A sample fitted closer than that adds nothing
any layer's gradient holds to the precision it was sent in, so the visible share
is the ceiling beside every per-sample number. Measured at the weights the
client starts from (under FedAvg the update also holds later steps).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics.aggregation import MeanMetric
from torchmetrics.functional.classification import multiclass_accuracy

from attacks.gradients import last_linear_layer


@torch.no_grad()
def batch_fit(model: nn.Module, chunks, weight_grad: torch.Tensor, bias_grad: torch.Tensor) -> dict:
    """{"accuracy", "mean_error", "visible"} of one batch, given as (images, labels) chunks."""
    _, classifier = last_linear_layer(model)
    inputs: list[torch.Tensor] = []
    hook = classifier.register_forward_hook(lambda _m, args, _out: inputs.append(args[0]))
    was_training = model.training
    model.eval()
    logits, labels = [], []
    try:
        for images, chunk_labels in chunks:
            logits.append(model(images).float())
            labels.append(chunk_labels)
    finally:
        hook.remove()
        model.train(was_training)
    logits, labels = torch.cat(logits), torch.cat(labels)
    embeddings = torch.cat(inputs).flatten(1).double()
    num_images, num_classes = logits.shape
    p = torch.softmax(logits.double(), dim=1)
    errors = p - nn.functional.one_hot(labels, num_classes).double()
    # ||g_n [e_n, 1]^T|| / K = |g_n| |[e_n, 1]| / K
    terms = (
        torch.linalg.vector_norm(errors, dim=1)
        * (embeddings.square().sum(1) + 1).sqrt()
        / num_images
    )
    gradient = torch.cat([weight_grad.detach().double(), bias_grad.detach().double()[:, None]], 1)
    eps = torch.finfo(weight_grad.dtype).eps
    rounding = 0.5 * eps * float(gradient.square().mean().sqrt()) * math.sqrt(gradient.numel())
    return {
        "accuracy": float(multiclass_accuracy(logits, labels, num_classes, average="micro")),
        "mean_error": float(1 - p.gather(1, labels[:, None]).mean()),
        "visible": int((terms > rounding).sum()),
    }


def batch_fit_summary(tries: list[dict], num_images: int) -> dict | None:
    """The tries' means, the visible count as a share of K (the per-sample ceiling)."""
    records = [t["batch"] for t in tries if "batch" in t]
    if not records:
        return None
    # The tries are already gathered from every process: nothing to synchronise (a sync on
    # the first process alone would wait for the others at a barrier they never reach).
    means = {
        key: MeanMetric(sync_on_compute=False) for key in ("accuracy", "mean_error", "visible")
    }
    for record in records:
        for key, metric in means.items():
            metric.update(record[key] / (num_images if key == "visible" else 1))
    return {key: float(metric.compute()) for key, metric in means.items()}
