"""Small victims and hand-made batches whose gradients the tests know exactly."""

from __future__ import annotations

import os
import threading
import time

import torch
from torch import nn

from attacks.gradients import batch_gradients, chunked, share

#: what --compare runs besides iLRG on data with a held-out split, in table order
COMPARED_METHODS = [
    "iLRG",
    "decompose",
    "iDLG",
    "GI",
    "RLG",
    "LLG",
    "bias",
    "random",
    "zeros",
    "RLU",
    "LLBG",
    "RLU+",
]
#: the scores of a method that restores counts
COUNT_METRICS = ("LeAcc", "LnAcc", "LnAcc+", "IRec", "Exact")


class TinyVictim(nn.Module):
    """ReLU features then a linear classifier: non-negative embeddings, as the prior attacks assume."""

    def __init__(self, in_dim: int = 12, dim: int = 16, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        self.classifier = nn.Linear(dim, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def labels_from_counts(counts) -> torch.Tensor:
    counts = torch.as_tensor(counts)
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


def shared_for(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, max_size=None, known=None
):
    grads = batch_gradients(model, chunked(inputs, labels, max_size), labels.numel())
    return share(model, grads, labels.numel(), known_classes=known)


def classifier_gradient(embeddings, weight, bias, labels, dtype=torch.float64):
    """The shared gradient of a classifier z = W e + b alone, for float64 ``embeddings`` (rows)
    and ``labels``: (SharedGradients in ``dtype``, the probabilities, the inputs [e_n, 1])."""
    from attacks import SharedGradients

    probabilities = torch.softmax(embeddings @ weight.T + bias, 1)
    errors = probabilities - nn.functional.one_hot(labels, weight.shape[0]).to(torch.float64)
    extended = torch.cat([embeddings, torch.ones(embeddings.shape[0], 1, dtype=torch.float64)], 1)
    gradient = errors.T @ extended / embeddings.shape[0]
    shared = SharedGradients(
        weight_grad=gradient[:, :-1].to(dtype),
        bias_grad=gradient[:, -1].to(dtype),
        weight=weight.to(dtype),
        bias=bias.to(dtype),
        num_images=embeddings.shape[0],
    )
    return shared, probabilities, extended


def fitted_batch(embeddings, weight, bias, confidence, fitted, generator, dtype=torch.float64):
    """``classifier_gradient`` with the logits scaled until the most confident sample reaches
    ``confidence``, the first ``fitted`` samples labelled with the model's prediction and the
    rest at random. Returns (shared, labels, probabilities, the inputs [e_n, 1])."""
    scale = 1.0
    while torch.softmax(scale * (embeddings @ weight.T + bias), 1).max() < confidence:
        scale *= 1.05
    weight, bias = scale * weight, scale * bias
    labels = torch.softmax(embeddings @ weight.T + bias, 1).argmax(1)
    random = torch.randint(weight.shape[0], (embeddings.shape[0],), generator=generator)
    labels[fitted:] = random[fitted:]
    shared, probabilities, extended = classifier_gradient(embeddings, weight, bias, labels, dtype)
    return shared, labels, probabilities, extended


class StreamWatcher:
    """A child process's output pipe, read on a thread: a wait for a marker then has a deadline
    that holds even while the child writes nothing (a blocking ``read`` on the test's thread
    would not return to check it), and the pipe never fills and stalls the child."""

    def __init__(self, stream) -> None:
        self._fd = stream.fileno()
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self._fd, 4096):
            self._chunks.append(chunk)

    def text(self) -> str:
        return b"".join(self._chunks).decode(errors="replace")

    def wait_for(self, marker: str, timeout: float) -> bool:
        """Whether ``marker`` appeared within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while marker not in self.text():
            if time.monotonic() > deadline or not self._thread.is_alive():
                return marker in self.text()
            time.sleep(0.05)
        return True

    def finish(self, timeout: float = 30) -> str:
        """Everything the child wrote, once the pipe closes (the child has ended)."""
        self._thread.join(timeout)
        return self.text()


def exit_code(main, argv: list[str]) -> int:
    """An entry point's ``main(argv)`` in this process: its exit code, argparse's own refusals
    (a SystemExit) included."""
    try:
        return main(argv)
    except SystemExit as stop:
        return stop.code
