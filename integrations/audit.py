"""Label-leakage audit of one's own model: what a client shares, and every attack on it.

Any ``nn.Module`` whose attacked layer (``layer_name``, else ``classifier``, else
the last ``nn.Linear``) has a bias will do; no network class of this project is
needed. Two ways to get what the server holds, ``SharedGradients``:

- ``shared_from_batch``: the client's side under FedSGD, the gradient of the
  mean cross-entropy of one batch, as the client would send it;
- ``shared_from_update``: the server's side under FedAvg, from the model it
  sent, the weights the client returned and the protocol it set (E, B, lr,
  optimizer; ``attacks.local_update.LocalTraining``): the update divided by
  lr x steps, exactly what ``attack.py --local_epochs E`` attacks.

``LeakageAudit`` then runs registered attacks on it and, where the true labels
are known (a simulation, one's own test), scores them. The labels reach only
the scores: the attacks get ``SharedGradients`` and nothing else.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from attacks import AuxiliaryData, Restoration, SharedGradients, build_attack
from attacks.gradients import batch_gradients, share
from attacks.local_update import LocalTraining, LocalUpdate, end_weights, update_as_gradients
from attacks.metrics import metric_set
from user_errors import UserError


def shared_from_batch(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, layer_name: str | None = None
) -> SharedGradients:
    """What a FedSGD client shares for the batch ``(images, labels)``: the gradient of the mean
    cross-entropy of every trainable parameter at ``model``'s weights, in its current mode.

    The labels make the gradient (the client has them); they are not in the result.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1 or labels.numel() != len(images) or labels.numel() == 0:
        raise UserError(
            f"need one class-index label per image, got {tuple(labels.shape)} labels "
            f"for {len(images)} images"
        )
    grads = batch_gradients(model, [(images, labels.long())], labels.numel())
    return share(model, grads, labels.numel(), layer_name)


def shared_from_update(
    sent_model: nn.Module,
    returned: Mapping[str, torch.Tensor],
    training: LocalTraining,
    num_images: int,
    layer_name: str | None = None,
) -> SharedGradients:
    """What the server holds of a FedAvg update: ``sent_model`` is the model as sent (its
    weights are the start), ``returned`` the client's weights after local training by
    parameter name (a ``state_dict``; buffers in it are ignored), ``training`` the protocol
    the server set and ``num_images`` the client's sample count K.

    Every trainable parameter's "gradient" is (start - end) / (lr x steps), computed in
    float64 and kept in the parameter's dtype, as ``attacks.local_update.client_update``
    computes it on the client.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
        raise UserError(f"the client's sample count must be an integer >= 1, got {num_images!r}")
    sent = {name: p for name, p in sent_model.named_parameters() if p.requires_grad}
    missing = [name for name in sent if name not in returned]
    if missing:
        raise UserError(
            f"the returned weights lack {len(missing)} of the model's parameters "
            f"(first: {missing[0]!r})"
        )
    ends = {}
    for name, start in sent.items():
        end = torch.as_tensor(returned[name])
        if tuple(end.shape) != tuple(start.shape):
            raise UserError(
                f"the returned {name!r} has shape {tuple(end.shape)}, the sent one "
                f"{tuple(start.shape)}"
            )
        if not bool(torch.isfinite(end).all()):
            raise UserError(f"the returned {name!r} holds non-finite values")
        ends[name] = end
    steps = training.steps(num_images)
    grads = update_as_gradients(sent_model, ends, training, steps)
    update = LocalUpdate(training, steps, end_weights(sent_model, grads, training, steps))
    return share(sent_model, grads, num_images, layer_name, local_update=update)


def loaded(template: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A copy of ``template`` with the weights of ``state``, in ``template``'s dtype and mode."""
    model = copy.deepcopy(template)
    try:
        model.load_state_dict({name: torch.as_tensor(value) for name, value in state.items()})
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise UserError(
            f"the weights do not fit {type(template).__name__}: {first[-1].strip() if first else err}"
        ) from None
    return model


@dataclass(frozen=True)
class AuditResult:
    """Every attack's answer on one shared gradient, its seconds, and its scores where the
    true counts were given (``None`` otherwise)."""

    num_images: int
    restorations: dict[str, Restoration]
    seconds: dict[str, float]
    true_counts: torch.Tensor | None = None
    scores: dict[str, dict[str, float]] | None = None

    def counts(self, name: str) -> list[int] | None:
        """The restored count per class of attack ``name`` (None for a presence-only attack)."""
        counts = self.restorations[name].counts
        return None if counts is None else [int(c) for c in counts.tolist()]

    def record(self) -> dict:
        """A JSON-ready record: per method what attack.py's results.json holds of it (counts or
        present classes; a per-sample attack's separated samples and their labels), its seconds
        and scores; the true counts where known."""
        from experiment.trial import method_record

        methods = {}
        for name, restoration in self.restorations.items():
            entry = {**method_record(restoration), "seconds": round(self.seconds[name], 6)}
            if self.scores is not None:
                entry["scores"] = self.scores[name]
            methods[name] = entry
        record: dict = {"num_images": self.num_images, "methods": methods}
        if self.true_counts is not None:
            record["true_counts"] = [int(c) for c in self.true_counts.tolist()]
        return record


class LeakageAudit:
    """Runs the attacks ``attacks`` (names of ``attacks.ATTACKS``) on ``SharedGradients``.

    ``auxiliary`` is the server's labelled data for RLU, LLBG and RLU+
    (``AuxiliaryData`` or an ``(images, labels)`` pair); ``attack_options`` go to
    every attack (``alpha``, ``estimate``, ...; each takes those it knows). Scores
    are the tool's metrics (LeAcc, and LnAcc, LnAcc+, IRec and Exact for attacks
    that restore counts), each for this one batch.
    """

    def __init__(
        self,
        attacks: Iterable[str] = ("iLRG",),
        *,
        auxiliary=None,
        layer_name: str | None = None,
        seed: int = 0,
        **attack_options,
    ):
        names = (attacks,) if isinstance(attacks, str) else tuple(dict.fromkeys(attacks))
        if not names:
            raise UserError("an audit needs at least one attack")
        if isinstance(auxiliary, (tuple, list)):
            auxiliary = AuxiliaryData(torch.as_tensor(auxiliary[0]), torch.as_tensor(auxiliary[1]))
        options = {**attack_options, "auxiliary": auxiliary, "layer_name": layer_name, "seed": seed}
        self.attacks = {name: build_attack(name, **options) for name in names}
        self.metrics = {
            name: metric_set(attack.restores_counts) for name, attack in self.attacks.items()
        }
        self.seed = seed

    def __call__(
        self,
        shared: SharedGradients,
        true_labels: torch.Tensor | None = None,
        *,
        true_counts: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> AuditResult:
        """Every attack on ``shared``; scored if ``true_labels`` (K class indices) or
        ``true_counts`` (one count per class) are given. ``generator`` feeds the randomised
        attacks (``random``); by default one seeded with the audit's seed."""
        truth = self._true_counts(shared, true_labels, true_counts)
        restorations, seconds = {}, {}
        for name, attack in self.attacks.items():
            started = time.perf_counter()
            if getattr(attack, "randomised", False):
                generator = generator or torch.Generator().manual_seed(self.seed)
                restorations[name] = attack(shared, generator=generator)
            else:
                restorations[name] = attack(shared)
            seconds[name] = time.perf_counter() - started
        scores = None if truth is None else self._scores(restorations, truth)
        return AuditResult(shared.num_images, restorations, seconds, truth, scores)

    @staticmethod
    def _true_counts(shared, true_labels, true_counts) -> torch.Tensor | None:
        if true_labels is not None and true_counts is not None:
            raise UserError("give the true labels or the true counts, not both")
        num_classes = shared.num_classes
        if true_labels is not None:
            labels = torch.as_tensor(true_labels).long().cpu()
            if labels.dim() != 1 or bool(((labels < 0) | (labels >= num_classes)).any()):
                raise UserError(
                    f"true labels must be a vector of class indices in [0, {num_classes})"
                )
            true_counts = torch.bincount(labels, minlength=num_classes)
        if true_counts is None:
            return None
        counts = torch.as_tensor(true_counts).long().cpu()
        if counts.shape != (num_classes,) or bool((counts < 0).any()):
            raise UserError(
                f"true counts must be {num_classes} non-negative integers, got shape "
                f"{tuple(counts.shape)}"
            )
        if int(counts.sum()) != shared.num_images:
            raise UserError(
                f"the true counts sum to {int(counts.sum())}, the batch holds {shared.num_images}"
            )
        return counts

    def _scores(self, restorations, truth: torch.Tensor) -> dict[str, dict[str, float]]:
        scores = {}
        for name, restoration in restorations.items():
            scores[name] = {}
            for metric_name, metric in self.metrics[name].items():
                restored = restoration.present if metric_name == "LeAcc" else restoration.counts
                value = float(metric.batch_scores(restored.cpu()[None], truth[None]))
                # NaN: no score defined for this batch (LnAcc+ with nothing present)
                scores[name][metric_name] = None if math.isnan(value) else value
        return scores
