"""RLU (Chen & Vikalo, ICML 2024) as its authors' released code computes it.

Checked against CityChan/Recovering-Label-from-Update (``client/client_base.py``,
``Client.RLU``; ``client/client_utils.py``). Each step below is that code's:

1. Statistic. The server runs the sent model on its auxiliary samples in
   *train* mode (dropout on), in shuffled batches of the client's mini-batch
   size B, and leaves out the last batch. For every class i, mu_i is the mean
   logit of class i over the samples of the *other* classes (the mean of the
   per-class means, each class weighted alike). The estimate uses softmax(mu),
   one vector for the whole batch; the model's confidence in a sample's own
   class never enters.
2. Equation. Only the bias gradient: k_i is proportional to
   max(0, rho * softmax(mu)_i - grad_b_i), normalised to the number of samples
   and rounded class by class (half to even), so the counts need not sum to K.
   The weight gradient enters only through O_d = mean_c grad_W[c, d] / grad_b[c],
   whose squared norm drives the drift in step 4.
3. Local steps. The released code's ``local_epochs`` m counts SGD steps, each on
   a new mini-batch of B, and rho = mean over t < m of (1 - gamma^(m - t)) /
   (1 - gamma), with gamma the learning-rate schedule's factor (its ``--gamma``,
   default 0.1); rho = 1 for one step. This project's FedAvg client
   (``attacks.local_update``) takes E passes over K samples: m is the step count
   E x ceil(K / B), the released code's sample total B x m is the E x K sample
   visits, and the final counts are normalised to the K samples (identical for
   E = 1 with B dividing K, where B x m = K).
4. Drift (m > 1). The first estimate uses softmax of mu at the client's end
   weights (new_mu; the server has them: start minus the update). Then, at most
   5 times: simulate the logits' drift from mu over m - 1 steps with the
   current counts (each step moves every class's logit by
   -lr x (softmax_i - n_i / B) x |O|^2, n_i the counts per step), compare the
   last simulated logits with new_mu, move one step's worth of counts from the
   class that overshoots most (among those holding at least that many) to the
   one that undershoots most, and stop once no logit is off by 0.1. The final
   counts use the mean softmax along the last simulation. With one step nothing
   drifts and the answer is softmax of mu at the sent weights.

The released loop compares the simulated logits with ``new_mu[m - 1]``, one
class's entry (a scalar), not the vector new_mu; kept here, since that is what
its published numbers come from. Where m > C that entry does not exist (the
released code stops with an IndexError), and the comparison is with the vector.
Two more places where the released code fails and this one does not: a class
whose bias gradient is exactly zero makes O infinite (O is then the mean over
the other classes), and an all-zero estimate divides by zero (every count 0).
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from attacks.auxiliary import AuxiliaryAttack, AuxiliaryData, weights_version
from attacks.observation import Restoration, SharedGradients
from attacks.registry import register_attack
from attacks.rlu_plus import round_to_total

#: the released code's ``--gamma`` default (the learning-rate schedule's factor)
GAMMA = 0.1
#: the drift loop's limits in the released code: iterations, logit gap, classes skipped
MAX_CORRECTIONS = 5
LOGIT_TOLERANCE = 0.1
MAX_SKIPS = 10


def step_weight(steps: int, gamma: float = GAMMA) -> float:
    """rho: the mean over the m steps of (1 - gamma^(m - t)) / (1 - gamma), t = 0 .. m - 1."""
    remaining = torch.arange(steps, 0, -1, dtype=torch.float64)
    if gamma == 1.0:  # the limit of the geometric sum
        return float(remaining.mean())
    return float(((1 - gamma**remaining) / (1 - gamma)).mean())


def proportions(shift: torch.Tensor, bias_grad: torch.Tensor) -> torch.Tensor:
    """v / sum(v) for v = max(0, shift - grad_b): each class's share of the samples (all 0 if v is)."""
    values = (shift - bias_grad).clamp_min(0)
    norm = float(values.sum())
    if not (math.isfinite(norm) and norm > 0):
        return torch.zeros_like(values)
    return values / norm


def proportional_counts(shift: torch.Tensor, bias_grad: torch.Tensor, total: int) -> torch.Tensor:
    """round(total x share) per class, half to even, as float64: the sum may miss ``total``, and
    the drift loop moves these counts (possibly below zero, as the released code does)."""
    return torch.round(proportions(shift, bias_grad) * total)


def other_class_logit_means(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """mu_i: the mean over classes j != i of the mean logit i of class j's samples (0 for none)."""
    sums = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    sums.index_add_(0, labels, logits.to(torch.float64))
    samples = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    class_means = sums / samples.clamp_min(1)[:, None]  # row j: mean logits of class j
    return (class_means.sum(dim=0) - class_means.diagonal()) / (num_classes - 1)


def simulated_logits(
    step_counts: torch.Tensor,
    start: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    spread: float,
) -> torch.Tensor:
    """The released code's drift of mu over m steps (m x C): each step adds
    -lr x (softmax(mu) - n / B) x |O|^2."""
    shifts = [start]
    for _ in range(steps - 1):
        error = torch.softmax(shifts[-1], dim=0) - step_counts / batch_size
        shifts.append(shifts[-1] - lr * error * spread)
    return torch.stack(shifts)


def corrected_probabilities(
    visits: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    spread: float,
) -> torch.Tensor:
    """The released ``estimate_static_RLU_with_posterior``: the mean softmax along the drift
    simulated with counts corrected until the last simulated logits meet ``end``.

    ``visits``: the first estimate's counts over all E x K sample visits (changed here, as
    the released code changes its list); ``start``/``end``: mu at the sent and end weights.
    """
    # The released comparison is with one entry of new_mu; past the C entries there is none.
    reference = end[steps - 1] if steps - 1 < end.numel() else end
    for _ in range(MAX_CORRECTIONS):
        shifts = simulated_logits(torch.round(visits / steps), start, steps, batch_size, lr, spread)
        probabilities = torch.softmax(shifts, dim=1).mean(dim=0)
        gap = shifts[steps - 1] - reference
        over = torch.nonzero(gap >= 0).flatten()
        under = torch.nonzero(~(gap >= 0)).flatten()
        if over.numel() == 0 or under.numel() == 0:
            break
        over_gaps, under_gaps = gap[over].abs(), gap[under].abs()
        largest = max(float(over_gaps.max()), float(under_gaps.max()))
        # From the class that overshoots most, passing over (at most 10 times) those holding
        # fewer than one count per step; the released code then takes the last one it tried.
        pick = int(torch.argmax(over_gaps))
        for _ in range(MAX_SKIPS):
            if visits[over[pick]] >= steps:
                break
            over_gaps[pick] = 0
            pick = int(torch.argmax(over_gaps))
        visits[over[pick]] -= steps
        visits[under[int(torch.argmax(under_gaps))]] += steps
        if largest < LOGIT_TOLERANCE:
            break
    return probabilities


def mean_embedding_direction(shared: SharedGradients) -> torch.Tensor:
    """O_d = mean over classes c of grad_W[c, d] / grad_b[c], over the classes where it is finite."""
    ratios = (
        shared.weight_grad.detach().to(torch.float64).cpu()
        / (shared.bias_grad.detach().to(torch.float64).cpu()[:, None])
    )
    finite = torch.isfinite(ratios).all(dim=1)
    if not bool(finite.any()):
        return torch.zeros(ratios.shape[1], dtype=torch.float64)
    return ratios[finite].mean(dim=0)


def model_at(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` with the parameters in ``state`` (the client's end weights)."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for name, parameter in moved.named_parameters():
            if name in state:
                parameter.copy_(state[name])
    return moved


@register_attack("RLU")
class RLU(AuxiliaryAttack):
    """RLU as released: softmax of the other classes' mean logits against the bias gradient,
    with the released drift correction over several local steps (module docstring)."""

    def __init__(self, auxiliary: AuxiliaryData | None, gamma: float = GAMMA, **kw):
        super().__init__(auxiliary, **kw)
        if not (math.isfinite(gamma) and gamma > 0):
            raise ValueError(f"RLU's gamma must be a finite number > 0, got {gamma}")
        self.gamma = gamma

    def logit_means(self, model: nn.Module, num_classes: int, batch_size: int) -> torch.Tensor:
        """mu at the model's weights, as the released ``estimate_static_RLU`` measures it.

        A copy of the model (train mode may move batch-norm statistics) runs in train mode on
        seeded shuffled batches of B, the last batch left out; dropout draws from a seeded
        stream, so the global one is untouched.
        """
        return self.owned_logit_means(copy.deepcopy(model), num_classes, batch_size)

    def owned_logit_means(self, own: nn.Module, num_classes: int, batch_size: int) -> torch.Tensor:
        """``logit_means`` on a model this attack owns (it is left in train mode)."""
        self.auxiliary.check_covers(num_classes)
        count = self.auxiliary.labels.numel()
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(count, generator=generator)
        kept = order[: (math.ceil(count / batch_size) - 1) * batch_size]
        if kept.numel() == 0:
            # One batch, left out: the released code averages nothing and every mean is 0.
            return torch.zeros(num_classes, dtype=torch.float64)
        own.train()
        device = next(own.parameters()).device
        logits = []
        devices = [device] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            torch.manual_seed(self.seed)
            for batch in kept.split(batch_size):
                images = self.auxiliary.images[batch].to(device)
                logits.append(own(images).detach().to(torch.float64).cpu())
        return other_class_logit_means(
            torch.cat(logits), self.auxiliary.labels[kept].cpu(), num_classes
        )

    def __call__(self, shared: SharedGradients) -> Restoration:
        model = self.required_model(shared.model)
        num_classes, num_images = shared.num_classes, shared.num_images
        update = shared.local_update
        steps = 1 if update is None else update.steps
        batch_size = num_images if update is None else update.training.batch_for(num_images)
        bias_grad = torch.nan_to_num(shared.bias_grad.detach().to(torch.float64).cpu())
        # mu at the sent weights is the same for every try of a run: kept until a weight changes.
        start = self.remembered(
            (weights_version(model), num_classes, batch_size),
            lambda: self.logit_means(model, num_classes, batch_size),
        )
        rho = step_weight(steps, self.gamma)
        probabilities = torch.softmax(start, dim=0)
        if steps > 1:
            end = self.owned_logit_means(model_at(model, update.end_state), num_classes, batch_size)
            visits = num_images * update.training.epochs
            first = proportional_counts(torch.softmax(end, dim=0) * rho, bias_grad, visits)
            spread = float(mean_embedding_direction(shared).square().sum())
            probabilities = corrected_probabilities(
                first, start, end, steps, batch_size, update.training.lr, spread
            )
        shares = proportions(probabilities * rho, bias_grad)
        counts = torch.round(shares * num_images).long()
        # For use as labels: the same shares rounded to sum to K.
        adjusted = round_to_total(shares * num_images, num_images)
        device = shared.bias_grad.device
        return Restoration.from_counts(counts.to(device), adjusted.to(device))
