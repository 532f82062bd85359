"""How far iLRG's approximations are from the truth, batch by batch (``attack.py --analysis``).

iLRG reads class c's embedding off the shared gradients as e_c = grad_W[c] / grad_b[c]
and stands its softmax p_c in for every sample of the class. Per class present in
the batch, all from one forward pass of the client's batch (its labels used only to
score), this compares (restored or approximate quantity vs its reference):

``emb``      restored e_c vs the class's mean embedding
``logit``    W e_c + b vs the class's mean logits
``prob``     p_c = softmax(alpha (W e_c + b)) vs the class's mean softmax
``approx1``  the class-only weight-gradient row vs (its bias gradient) x (mean embedding)
``approx2``  the batch weight-gradient row vs (k_c/K) x the class-only one
``approx3``  the batch bias gradient vs (k_c/K) x the class-only one
``approx4``  softmax of the mean logits vs the mean softmax
``scale``    grad_W[c]/grad_b[c] of the batch vs that of the class alone
``soteria``  the raw weight-gradient row vs the mean embedding (what Soteria assumes leaks)
``absent_prob``  for absent classes only: p_c vs the zero vector (the original's choice)

each as ``_mse`` (mean squared error over the vector's entries), ``_rel`` (mean of
|a - r| / |r| over the entries whose reference r is not 0: 0/0 and x/0 are left out)
and, for the first three and Soteria, ``_cos`` (cosine similarity). The reference of
(1)-(3) is the exact left side, of (4) the mean softmax, of ``scale`` the class alone.

"Class-only" gradients are those of the class's samples alone, their loss averaged
over k_c, as if the batch held only class c; they come in closed form from the
embeddings and softmax (grad_b = mean (p_n - y_n), grad_W = mean (p_n - y_n) e_n^T),
not from extra backward passes. The batch gradients are the shared ones, after any
defense: the analysis sees what the attack saw.

Per try, each quantity is averaged over the classes after trimming the ``ratio``
fraction of extreme values from each end (the original's filter); the summary is
the plain mean (and std) of the per-try values.
"""

from __future__ import annotations

import argparse
import math

import torch

from attacks.gradients import embed_and_forward
from attacks.ilrg import class_embeddings
from experiment.extension import Extension, TryContext
from experiment.options import bounded_float

#: (quantity, what it compares, which measures) in table order
QUANTITIES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("emb", "embedding: e_c vs class mean", ("mse", "rel", "cos")),
    ("logit", "logits: W e_c + b vs class mean", ("mse", "rel", "cos")),
    ("prob", "probability: p_c vs class mean softmax", ("mse", "rel", "cos")),
    ("approx1", "(1) grad_W^c[c] vs grad_b^c[c] * mean e", ("mse", "rel")),
    ("approx2", "(2) grad_W[c] vs k_c/K * grad_W^c[c]", ("mse", "rel")),
    ("approx3", "(3) grad_b[c] vs k_c/K * grad_b^c[c]", ("mse", "rel")),
    ("approx4", "(4) softmax(mean z) vs mean softmax", ("mse", "rel")),
    ("scale", "grad_W[c]/grad_b[c]: batch vs class alone", ("mse", "rel")),
    ("soteria", "Soteria: grad_W[c] vs class mean e", ("mse", "cos")),
    ("absent_prob", "absent classes: p_c vs 0", ("mse",)),
)
MEASURES = ("mse", "rel", "cos")


# --- the per-class quantities -------------------------------------------------------------


def mean_squared_error(restored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return ((restored - reference) ** 2).mean(dim=-1)


def mean_relative_error(restored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Row-wise mean of |a - r| / |r| over the entries with r != 0 (NaN if there are none)."""
    defined = reference != 0
    safe = torch.where(defined, reference, torch.ones_like(reference))
    relative = torch.where(
        defined, (restored - reference).abs() / safe.abs(), torch.zeros_like(reference)
    )
    count = defined.sum(dim=-1)
    return torch.where(
        count > 0,
        relative.sum(dim=-1) / count.clamp(min=1),
        torch.full_like(relative[..., 0], math.nan),
    )


def cosine_similarity(restored: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity; NaN where either vector is zero (it has no direction)."""
    norms = torch.linalg.vector_norm(restored, dim=-1) * torch.linalg.vector_norm(reference, dim=-1)
    dots = (restored * reference).sum(dim=-1)
    return torch.where(
        norms > 0,
        dots / torch.where(norms > 0, norms, torch.ones_like(norms)),
        torch.full_like(norms, math.nan),
    )


def class_errors(
    embeddings: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    weight_grad: torch.Tensor,
    bias_grad: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    alpha: float = 1.0,
) -> dict[str, torch.Tensor]:
    """Every ``<quantity>_<measure>`` as a (C,) float64 tensor, NaN where it does not apply.

    ``embeddings`` (K, d) and ``logits`` (K, C) are the batch's, from one forward
    pass; ``weight_grad``/``bias_grad`` the shared gradients of the attacked layer,
    ``weight``/``bias`` its parameters.
    """
    embeddings, logits = embeddings.to(torch.float64), logits.to(torch.float64)
    weight, bias = weight.to(torch.float64), bias.to(torch.float64)
    weight_grad, bias_grad = weight_grad.to(torch.float64), bias_grad.to(torch.float64)
    num_images, num_classes = logits.shape
    probabilities = torch.softmax(logits, dim=1)
    one_hot = torch.nn.functional.one_hot(labels.to(logits.device).long(), num_classes).to(
        torch.float64
    )
    counts = one_hot.sum(dim=0)
    present = counts > 0
    per_class = counts.clamp(min=1)[:, None]

    mean_embedding = one_hot.T @ embeddings / per_class
    mean_logits = one_hot.T @ logits / per_class
    mean_softmax = one_hot.T @ probabilities / per_class

    restored_embedding, usable = class_embeddings(weight_grad, bias_grad)
    restored_embedding = torch.where(usable[:, None], restored_embedding, math.nan)
    restored_logits = restored_embedding @ weight.T + bias
    restored_softmax = torch.softmax(alpha * restored_logits, dim=1)

    # Row n holds p_n[c] - 1 in its own class's column and 0 elsewhere: the class-only terms.
    own = (probabilities - one_hot) * one_hot
    class_bias_grad = own.sum(dim=0) / per_class[:, 0]
    class_weight_grad = own.T @ embeddings / per_class
    share = (counts / num_images)[:, None]
    scalar = lambda v: v[:, None]  # noqa: E731 - a scalar per class, as a vector of one entry

    pairs = {
        "emb": (restored_embedding, mean_embedding),
        "logit": (restored_logits, mean_logits),
        "prob": (restored_softmax, mean_softmax),
        "approx1": (class_bias_grad[:, None] * mean_embedding, class_weight_grad),
        "approx2": (share * class_weight_grad, weight_grad),
        "approx3": (share * scalar(class_bias_grad), scalar(bias_grad)),
        "approx4": (torch.softmax(mean_logits, dim=1), mean_softmax),
        "scale": (weight_grad / scalar(bias_grad), class_weight_grad / scalar(class_bias_grad)),
        "soteria": (weight_grad, mean_embedding),
    }
    functions = {"mse": mean_squared_error, "rel": mean_relative_error, "cos": cosine_similarity}
    nan = torch.full((num_classes,), math.nan, dtype=torch.float64, device=logits.device)
    errors = {}
    for quantity, _, measures in QUANTITIES:
        if quantity == "absent_prob":
            errors["absent_prob_mse"] = torch.where(
                present, nan, mean_squared_error(restored_softmax, 0.0)
            )
            continue
        restored, reference = pairs[quantity]
        for measure in measures:
            errors[f"{quantity}_{measure}"] = torch.where(
                present, functions[measure](restored, reference), nan
            )
    return errors


def trimmed_mean(values: torch.Tensor, ratio: float = 0.0) -> float:
    """Mean of the finite values after dropping floor(ratio * n) from each end; NaN if none are left."""
    values = torch.sort(values[torch.isfinite(values)].flatten()).values
    cut = int(ratio * values.numel())
    kept = values[cut : values.numel() - cut]
    return float(kept.mean()) if kept.numel() else math.nan


# --- the extensions -----------------------------------------------------------------------


class ErrorAnalysis(Extension):
    """Per try, the class-averaged errors of iLRG's approximations (see the module docstring)."""

    key = "analysis"

    def __init__(self, model: torch.nn.Module, alpha: float = 1.0, ratio: float = 0.0):
        self.model = model
        self.alpha = alpha
        self.ratio = ratio
        self.per_try: list[dict[str, float]] = []
        self.writer = None
        self.logged: set[int] = set()

    def bind(self, run_dir, writer=None) -> None:
        self.writer = writer

    def on_try(self, ctx: TryContext) -> dict[str, float]:
        embeddings, logits, labels = [], [], []
        with torch.no_grad():
            for images, chunk_labels in ctx.load_chunks():
                chunk_embeddings, chunk_logits = embed_and_forward(self.model, images)
                embeddings.append(chunk_embeddings)
                logits.append(chunk_logits)
                labels.append(chunk_labels)
        shared = ctx.shared
        errors = class_errors(
            torch.cat(embeddings),
            torch.cat(logits),
            torch.cat(labels),
            shared.weight_grad,
            shared.bias_grad,
            shared.weight,
            shared.bias,
            self.alpha,
        )
        values = {name: trimmed_mean(per_class, self.ratio) for name, per_class in errors.items()}
        self.per_try.append(values)
        self.log_entry(ctx.index, values)
        return values

    def log_entry(self, index: int, entry: dict[str, float]) -> None:
        if self.writer is None:
            return
        for name, value in entry.items():
            if math.isfinite(value):
                self.writer.add_scalar(f"analysis/{name}", value, index)
        self.logged.add(index)

    def restore(self, entries) -> None:
        self.per_try = list(entries)

    def _column(self, name: str) -> torch.Tensor:
        return torch.tensor([values[name] for values in self.per_try], dtype=torch.float64)

    def summary(self) -> dict:
        names = list(self.per_try[0]) if self.per_try else []
        means, spreads = {}, {}
        for name in names:
            column = self._column(name)
            finite = column[torch.isfinite(column)]
            means[name] = float(finite.mean()) if finite.numel() else math.nan
            spreads[name] = float(finite.std(unbiased=False)) if finite.numel() else math.nan
        return {"ratio": self.ratio, "tries": len(self.per_try), "mean": means, "std": spreads}

    def table(self) -> str | None:
        if not self.per_try:
            return None
        means = self.summary()["mean"]
        title = f"error analysis: mean over {len(self.per_try)} tries of class averages (trim ratio {self.ratio:g})"
        header = f"{'quantity':<44}" + "".join(f"{m:>12}" for m in ("MSE", "rel. err", "cos sim"))
        lines = [title, header, "-" * len(header)]
        for quantity, label, measures in QUANTITIES:
            cells = []
            for measure in MEASURES:
                value = (
                    means.get(f"{quantity}_{measure}", math.nan)
                    if measure in measures
                    else math.nan
                )
                if math.isnan(value):
                    cells.append("-")
                else:
                    cells.append(f"{value:.3e}" if measure == "mse" else f"{value:.3f}")
            lines.append(f"{label:<44}" + "".join(f"{cell:>12}" for cell in cells))
        return "\n".join(lines)


class CustomClassCounts(Extension):
    """The restored counts of the hand-picked classes of the ``custom_*`` batches, per method."""

    key = "custom_class_counts"

    def __init__(self, classes: tuple[int, ...]):
        self.classes = list(classes)
        self.true: list[list[int]] = []
        self.restored: dict[str, list[list[int]]] = {}

    def on_try(self, ctx: TryContext) -> dict:
        index = torch.tensor(self.classes, device=ctx.true_counts.device)
        entry = {"true": ctx.true_counts[index].tolist()}
        self.true.append(entry["true"])
        for method, restoration in ctx.restorations.items():
            if restoration.counts is not None:
                entry[method] = restoration.counts.to(index.device)[index].tolist()
                self.restored.setdefault(method, []).append(entry[method])
        return entry

    def restore(self, entries) -> None:
        self.true, self.restored = [], {}
        for entry in entries:
            self.true.append(entry["true"])
            for method, counts in entry.items():
                if method != "true":
                    self.restored.setdefault(method, []).append(counts)

    @staticmethod
    def _mean(rows: list[list[int]]) -> list[float]:
        return torch.tensor(rows, dtype=torch.float64).mean(dim=0).tolist()

    def summary(self) -> dict:
        if not self.true:
            return {"classes": self.classes}
        return {
            "classes": self.classes,
            "true": self._mean(self.true),
            "restored": {method: self._mean(rows) for method, rows in self.restored.items()},
        }

    def table(self) -> str | None:
        if not self.true:
            return None
        summary = self.summary()
        header = f"{'counts':<10}" + "".join(f"{'class ' + str(c):>12}" for c in self.classes)
        lines = [f"mean restored counts over {len(self.true)} tries", header, "-" * len(header)]
        for method, means in [("true", summary["true"]), *summary["restored"].items()]:
            lines.append(f"{method:<10}" + "".join(f"{value:>12.2f}" for value in means))
        return "\n".join(lines)


# --- options ------------------------------------------------------------------------------


trim_ratio = bounded_float(0, 0.5, high_open=True)


def add_analysis_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("error analysis")
    group.add_argument(
        "--analysis",
        action="store_true",
        help="compare iLRG's restored embeddings, logits, probabilities and approximations with the truth",
    )
    group.add_argument(
        "--ratio",
        type=trim_ratio,
        default=0.0,
        help="analysis: fraction of extreme class values trimmed from each end before averaging",
    )
