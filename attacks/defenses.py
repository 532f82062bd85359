"""Client-side defenses: lossy transforms of the gradients before the server sees them.

Each defense is a pure function of the gradients (a dict name -> tensor, never
changed in place) plus what it needs, behind the ``DEFENSES`` registry:

``dp``       :func:`add_gaussian_noise`: N(0, ``noise_std``^2) added to every entry of every tensor.
``clip``     :func:`clip_to_norm`: all tensors scaled together to global L2 norm at most ``clip_bound``.
``sparse``   :func:`sparsify`: per tensor, the ``sparse_ratio`` percent of entries of smallest magnitude zeroed.
``soteria``  :func:`soteria` (alias ``perturb``, the original's name): Sun et al., CVPR 2021. The
             columns of the attacked layer's weight gradient are zeroed for the ``prune_ratio``
             percent of embedding features whose representation is least sensitive to the input.

"Percent of the entries" follows the original's rule ``|v| < np.percentile(|v|, ratio)``:
exactly the ``ceil((n - 1) * ratio / 100)`` smallest entries, which is that rule whenever the
values are distinct; ties are broken by position, so the count never depends on them.

:func:`build_defense` turns the options into one callable ``defense(grads, model, load_chunks)``
(``load_chunks()`` yields the client's (images, labels) chunks on the device). Its noise comes
from a CPU generator (its own, seeded with the run seed, or the one passed per call: the attack
experiment's per-try stream), so the same command gives the same noise on any device.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from attacks.gradients import embed_and_forward, last_linear_layer

Grads = dict[str, torch.Tensor]
Chunks = Iterable[tuple[torch.Tensor, torch.Tensor]]

# Rows (samples x features) of one batched vector-Jacobian product: bounds the memory of the
# vmapped backward pass while still batching many features into one call.
_BATCHED_ROWS = 512


# --- the defenses -------------------------------------------------------------------------


def add_gaussian_noise(
    grads: Grads, noise_std: float, generator: torch.Generator | None = None
) -> Grads:
    """Every tensor plus N(0, noise_std^2) noise, drawn on the CPU from ``generator`` in dict order."""
    noisy = {}
    for name, grad in grads.items():
        noise = torch.randn(grad.shape, generator=generator, dtype=grad.dtype)
        noisy[name] = grad + noise_std * noise.to(grad.device)
    return noisy


def global_norm(grads: Grads) -> torch.Tensor:
    """The L2 norm of all tensors taken together, in float64."""
    norms = [torch.linalg.vector_norm(grad, dtype=torch.float64) for grad in grads.values()]
    return torch.linalg.vector_norm(torch.stack(norms))


def clip_to_norm(grads: Grads, clip_bound: float) -> Grads:
    """All tensors scaled by one factor min(1, clip_bound / global norm).

    Unlike ``torch.nn.utils.clip_grad_norm_`` there is no epsilon in the
    denominator, so a clipped gradient has exactly norm ``clip_bound``.
    """
    norm = global_norm(grads)
    scale = torch.clamp(clip_bound / norm, max=1.0) if float(norm) > 0 else norm.new_tensor(1.0)
    return {
        name: grad * scale.to(device=grad.device, dtype=grad.dtype) for name, grad in grads.items()
    }


def percentile_count(num_values: int, ratio: float) -> int:
    """How many of ``num_values`` distinct values lie below their ``ratio``-th percentile (numpy's rule)."""
    # The small epsilon keeps an exact integer product from rounding up one too far.
    return max(0, math.ceil((num_values - 1) * ratio / 100 - 1e-9))


def smallest(values: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask of the ``count`` smallest entries of a 1-D tensor; ties broken by position."""
    mask = torch.zeros_like(values, dtype=torch.bool)
    if count <= 0:
        return mask
    if count >= values.numel():
        return ~mask
    threshold = torch.kthvalue(values, count).values
    mask = values < threshold
    ties = torch.nonzero(values == threshold).flatten()
    mask[ties[: count - int(mask.sum())]] = True
    return mask


def sparsify(grads: Grads, sparse_ratio: float) -> Grads:
    """Per tensor, the ``sparse_ratio`` percent of entries of smallest magnitude set to zero."""
    sparse = {}
    for name, grad in grads.items():
        magnitudes = grad.abs().flatten()
        zero = smallest(magnitudes, percentile_count(magnitudes.numel(), sparse_ratio))
        sparse[name] = grad.masked_fill(zero.view_as(grad), 0)
    return sparse


def soteria(
    grads: Grads,
    model: nn.Module,
    chunks: Chunks,
    prune_ratio: float,
    layer_name: str | None = None,
) -> Grads:
    """Soteria's pruning: zero the weight-gradient columns of the least sensitive features.

    Feature f's score is sum_n ||d e_{n,f} / d x_n||_2 / |e_{n,f}| over the batch
    (:func:`representation_scores`); the ``prune_ratio`` percent of features with
    the smallest scores lose their column of the attacked layer's weight gradient.
    Every other tensor is passed through unchanged.
    """
    name, _ = last_linear_layer(model, layer_name)
    key = f"{name}.weight"
    scores = representation_scores(model, chunks, layer_name)
    pruned = smallest(scores, percentile_count(scores.numel(), prune_ratio))
    defended = dict(grads)
    defended[key] = grads[key].masked_fill(pruned.to(grads[key].device)[None, :], 0)
    return defended


# --- Soteria's representation scores ------------------------------------------------------


def representation_scores(
    model: nn.Module, chunks: Chunks, layer_name: str | None = None
) -> torch.Tensor:
    """Per embedding feature f: sum over the batch of ||d e_{n,f}/d x_n||_2 / |e_{n,f}| (float64, d).

    A sample whose feature is exactly zero adds 0 if its gradient is zero too (a
    dead ReLU: no information either way) and +inf otherwise (never pruned).

    The naive form is one backward pass per feature (d of them; 4096 for VGG).
    Here one *batched* vector-Jacobian product covers a block of features, and
    each backward pass seeds feature f of every sample at once: that gives
    d (sum_m e_{m,f}) / d x_n, the original's quantity, which is d e_{n,f}/d x_n
    when samples do not interact (eval mode). When the feature extractor is an
    ``nn.Sequential`` that narrows below d on the way (VGG: 512 channels before a
    4096-wide MLP), the Jacobian is taken at that narrowest point h instead,
    ||d e_f/d x||^2 = J_f G J_f^T with J = d e/d h and G = (d h/d x)(d h/d x)^T,
    which needs only dim(h) backward passes.
    """
    total: torch.Tensor | None = None
    for images, _labels in chunks:
        inputs = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            split = _narrowest_split(model, inputs, layer_name)
            if split is None:
                embeddings, _ = embed_and_forward(model, inputs, layer_name)
                norms = _jacobian_row_norms(embeddings, inputs)
            else:
                embeddings, norms = _norms_through(model.features, split, inputs)
        sensitivity = _safe_ratio(norms.detach(), embeddings.detach().to(torch.float64).abs()).sum(
            dim=0
        )
        total = sensitivity if total is None else total + sensitivity
    if total is None:
        raise ValueError("no images to compute Soteria's scores from")
    return total


def _safe_ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator with 0/0 = 0 and x/0 = +inf (both non-negative)."""
    ratio = numerator / torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    at_zero = torch.where(
        numerator > 0, torch.full_like(numerator, math.inf), torch.zeros_like(numerator)
    )
    return torch.where(denominator > 0, ratio, at_zero)


def _feature_blocks(num_samples: int, num_features: int) -> Iterable[torch.Tensor]:
    step = max(1, _BATCHED_ROWS // max(num_samples, 1))
    for start in range(0, num_features, step):
        yield torch.arange(start, min(start + step, num_features))


def _one_hot_seeds(outputs: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """(len(features), B, m) seeds: block j seeds feature features[j] of every sample."""
    seeds = outputs.new_zeros((features.numel(), *outputs.shape))
    seeds[torch.arange(features.numel(), device=outputs.device), :, features.to(outputs.device)] = 1
    return seeds


def _jacobian_row_norms(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B, m) float64: ||d outputs[n, f] / d inputs[n]||_2 (see representation_scores for batching)."""
    norms = torch.empty(outputs.shape, dtype=torch.float64, device=outputs.device)
    for features in _feature_blocks(*outputs.shape):
        (rows,) = torch.autograd.grad(
            outputs,
            inputs,
            _one_hot_seeds(outputs, features),
            retain_graph=True,
            is_grads_batched=True,
        )
        norms[:, features.to(outputs.device)] = torch.linalg.vector_norm(
            rows.flatten(2), dim=2, dtype=torch.float64
        ).T
    return norms


def _jacobian_grams(outputs: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """(B, m, m) float64: G_n = J_n J_n^T with J_n = d outputs[n] / d inputs[n]."""
    jacobian = outputs.new_empty((outputs.shape[0], outputs.shape[1], inputs[0].numel()))
    for features in _feature_blocks(*outputs.shape):
        (rows,) = torch.autograd.grad(
            outputs,
            inputs,
            _one_hot_seeds(outputs, features),
            retain_graph=True,
            is_grads_batched=True,
        )
        jacobian[:, features.to(outputs.device)] = rows.flatten(2).transpose(0, 1)
    grams = []
    for rows in jacobian:  # one sample at a time, so one float64 copy of a Jacobian is alive
        rows = rows.to(torch.float64)
        grams.append(rows @ rows.T)
    return torch.stack(grams)


def _narrowest_split(model: nn.Module, inputs: torch.Tensor, layer_name: str | None) -> int | None:
    """Where to split ``model.features`` so that the head's output is narrowest, or None.

    Only for a network whose embedding is ``features(x)`` feeding its
    ``classifier`` (the ``VictimNetwork`` contract), in eval mode (samples must
    not interact), and only if some intermediate output is narrower than d.
    """
    features = getattr(model, "features", None)
    if (
        model.training
        or not isinstance(features, nn.Sequential)
        or not callable(getattr(model, "embed", None))
    ):
        return None
    if last_linear_layer(model, layer_name)[1] is not getattr(model, "classifier", None):
        return None
    widths = []
    with torch.no_grad():
        hidden = inputs[:1]
        for module in features:
            hidden = module(hidden)
            widths.append(hidden[0].numel())
    if len(widths) < 2:
        return None
    # The narrowest output before the last, the latest one on ties (the shortest tail).
    narrowest = min(range(len(widths) - 1), key=lambda i: (widths[i], -i))
    return narrowest + 1 if widths[narrowest] < widths[-1] else None


def _norms_through(
    features: nn.Sequential, split: int, inputs: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embeddings, row norms) of d e/d x for e = tail(head(x)), via the narrow head output h."""
    head, tail = features[:split], features[split:]
    hidden = head(inputs)
    grams = _jacobian_grams(hidden.flatten(1), inputs)
    hidden = hidden.detach()
    embeddings = tail(hidden)

    def tail_of_one(sample: torch.Tensor) -> torch.Tensor:
        return tail(sample.unsqueeze(0)).squeeze(0)

    squared = torch.empty(embeddings.shape, dtype=torch.float64, device=embeddings.device)
    for n in range(hidden.shape[0]):
        # Forward mode: dim(h) tangents through the tail, fewer than its d outputs.
        jacobian = (
            torch.func.jacfwd(tail_of_one)(hidden[n])
            .reshape(embeddings.shape[1], -1)
            .to(torch.float64)
        )
        squared[n] = ((jacobian @ grams[n]) * jacobian).sum(dim=1)
    return embeddings, squared.clamp(min=0).sqrt()


# --- registry ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DefenseInputs:
    """What a defense may use besides the gradients: the client's model, its batch, a seeded generator."""

    model: nn.Module
    load_chunks: Callable[[], Chunks]
    generator: torch.Generator


@dataclass(frozen=True)
class DefenseMethod:
    name: str
    #: the option that sets its strength
    parameter: str
    apply: Callable[[Grads, float, DefenseInputs], Grads]


DEFENSES: dict[str, DefenseMethod] = {}


def register_defense(name: str, parameter: str, apply, aliases: tuple[str, ...] = ()) -> None:
    method = DefenseMethod(name, parameter, apply)
    for key in (name, *aliases):
        if key in DEFENSES:
            raise RuntimeError(f"defense {key!r} registered twice")
        DEFENSES[key] = method


register_defense(
    "dp", "noise_std", lambda grads, value, given: add_gaussian_noise(grads, value, given.generator)
)
register_defense("clip", "clip_bound", lambda grads, value, _given: clip_to_norm(grads, value))
register_defense("sparse", "sparse_ratio", lambda grads, value, _given: sparsify(grads, value))
register_defense(
    "soteria",
    "prune_ratio",
    lambda grads, value, given: soteria(grads, given.model, given.load_chunks(), value),
    aliases=("perturb",),
)


class Defense:
    """One configured defense: ``defense(grads, model, load_chunks) -> grads``."""

    def __init__(self, method: DefenseMethod, value: float, seed: int):
        self.method = method
        self.value = value
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(
        self,
        grads: Grads,
        model: nn.Module,
        load_chunks: Callable[[], Chunks],
        generator: torch.Generator | None = None,
    ) -> Grads:
        """``generator`` (a CPU one) replaces the defense's own stream, which is seeded once
        and consumed call after call: the attack experiment gives each try its own."""
        return self.method.apply(
            grads, self.value, DefenseInputs(model, load_chunks, generator or self.generator)
        )

    def describe(self) -> dict:
        return {
            "method": self.method.name,
            "parameter": self.method.parameter,
            "value": self.value,
            "seed": self.seed,
        }

    def __str__(self) -> str:
        return f"{self.method.name} ({self.method.parameter} = {self.value:g})"


def describe_defense(defense: Defense | None) -> dict | None:
    """What results.json says about the defense."""
    return None if defense is None else defense.describe()
