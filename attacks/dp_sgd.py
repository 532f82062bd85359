"""The client under DP-SGD (Abadi et al., CCS 2016), through Opacus: what it shares, and its epsilon.

Every optimizer step of a DP-SGD client clips each sample's gradient (all
parameters together) to norm at most C, sums them, adds N(0, sigma^2 C^2) to
every coordinate and divides by the batch size. Under FedSGD the client shares
one such gradient of its K samples; under FedAvg it takes its E x ceil(K / B)
local steps with them (``attacks.local_update``'s protocol) and shares the
update, which the attacks receive as U / (lr x steps), as every FedAvg update.
The per-sample gradients, the clipping and the noise are Opacus'
(``GradSampleModule``, ``DPOptimizer``); the noise comes from the try's own
generator, so a run is reproducible. Opacus takes per-sample gradients in
training mode only, so the client's float64 copy trains in it (the same outputs
as eval mode for networks without dropout or batch norm; batch norm is refused).

Accounting. Opacus' accountants assume Poisson sampling; this client visits
its K samples in shuffled, disjoint mini-batches, each sample once per epoch,
so no amplification by subsampling is claimed: each sample is in E steps (1
under FedSGD), each a Gaussian mechanism of noise multiplier sigma, and the
accountant composes E of them at sampling rate 1 (``Privacy.epsilon``, in
Opacus' add/remove-one convention: one clipped gradient more or less moves the
sum by C). Changing one sample's label replaces a sample, and for replace-one
neighbours the analysis is exact for this client: the shuffle's positions do
not change, so within an epoch only the replaced sample's own step differs
(parallel composition), and there the sum moves by up to 2C. The label's
guarantee is therefore that of noise multiplier sigma / 2 over E steps
(``Privacy.label_epsilon``), which is what bounds label inference
(``label_accuracy_bound``). Strictly, adding or removing a sample re-deals a
shuffled epoch's batches, so the add/remove epsilon is Opacus' convention
applied to the same step count, not a theorem about this client.
"""

from __future__ import annotations

import contextlib
import math
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from attacks.local_update import LocalTraining, local_copy, update_as_gradients
from user_errors import UserError

#: Opacus' default accountant (privacy loss random variables); "rdp" and "gdp" also work
ACCOUNTANT = "prv"
#: Opacus' clipping divides by (norm + 1e-6): a clipped gradient's norm is C n / (n + 1e-6)
OPACUS_NORM_EPSILON = 1e-6


def require_opacus():
    try:
        import opacus  # noqa: F401
    except ImportError as err:
        raise UserError(
            f"DP-SGD needs opacus ({err}); install it with: pip install -e '.[dp]'"
        ) from None
    import opacus

    return opacus


@contextlib.contextmanager
def input_free_hooks():
    """Opacus' backward hooks fire on the first layer, whose input (the images) needs no
    gradient; torch warns about that on every backward pass. It is expected: silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        yield


@contextlib.contextmanager
def quiet_accounting():
    """At sampling rate 1 the PRV accountant takes log(1 - q) = -inf on purpose (numpy warns),
    and the RDP search may end at its largest order (Opacus warns): neither changes the
    epsilon it returns, which is an upper bound either way."""
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        yield


def check_supported(model: nn.Module) -> None:
    """UserError naming the fix where Opacus cannot take per-sample gradients of ``model``."""
    from opacus.validators import ModuleValidator

    # The victims are attacked in eval mode; Opacus' own check also asks for training mode,
    # which changes nothing for the per-sample gradients of the layers it supports.
    errors = [
        error
        for error in ModuleValidator.validate(model, strict=False)
        if "training mode" not in str(error)
    ]
    if errors:
        # Opacus explains at length; its first sentence names the layer's problem
        first = str(errors[0]).strip().splitlines()[0].split(". ")[0].rstrip(".")
        raise UserError(
            f"DP-SGD cannot train this model: {first} (batch norm mixes the samples of a batch; "
            "train and attack a model without --batchnorm, or replace it with GroupNorm through "
            "opacus.validators.ModuleValidator.fix)"
        )


def epsilon_of(noise_multiplier: float, steps: int, delta: float) -> float:
    """Opacus' epsilon (add/remove-one) after ``steps`` Gaussian mechanisms at sampling rate 1."""
    if steps == 0:
        return 0.0  # nothing released yet (train.py's untrained stage)
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import create_accountant

    accountant = create_accountant(ACCOUNTANT)
    accountant.history = [(noise_multiplier, 1.0, steps)]
    with quiet_accounting():
        return float(accountant.get_epsilon(delta))


def noise_for(target_epsilon: float, steps: int, delta: float) -> float:
    """The noise multiplier sigma that spends ``target_epsilon`` in ``steps`` steps (0 for inf)."""
    if math.isinf(target_epsilon):
        return 0.0
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with quiet_accounting():
        return float(
            get_noise_multiplier(
                target_epsilon=target_epsilon,
                target_delta=delta,
                sample_rate=1.0,
                steps=steps,
                accountant=ACCOUNTANT,
            )
        )


def label_accuracy_bound(label_epsilon: float, delta: float, prior: torch.Tensor) -> float:
    """The best accuracy any attacker can have guessing one sample's label from an
    (epsilon, delta)-DP output under replace-one neighbours, the label drawn from ``prior``
    (class weights) and everything else known to the attacker.

    With a_c the chance of guessing c when the label is c, DP gives, for every c' != c,
    P[guess c | label c'] >= (a_c - delta) e^-eps; the guesses' chances sum to 1 under every
    label, so sum_c pi_c a_c + e^-eps sum_c (1 - pi_c)(a_c - delta) <= 1. The accuracy
    sum_c pi_c a_c is largest with every guess on the likeliest class pi*:

        accuracy <= pi* e^eps / (pi* e^eps + 1 - pi*) + delta (C - 1) pi* / (pi* e^eps + 1 - pi*)

    which for a uniform prior is (e^eps + delta (C - 1)) / (e^eps + C - 1). Capped at 1.
    """
    weights = prior.double() / prior.double().sum()
    largest, num_classes = float(weights.max()), weights.numel()
    if math.isinf(label_epsilon):
        return 1.0
    odds = math.exp(min(label_epsilon, 700.0))  # e^eps overflows a float beyond 709
    denominator = largest * odds + 1 - largest
    return min(1.0, (largest * odds + delta * (num_classes - 1) * largest) / denominator)


@dataclass(frozen=True)
class Privacy:
    """The DP-SGD protocol a client follows: clip norm C, noise multiplier sigma, delta; and,
    when sigma was derived from it, the epsilon asked for."""

    max_grad_norm: float
    noise_multiplier: float
    delta: float
    target_epsilon: float | None = None

    def __post_init__(self):
        if not (self.max_grad_norm > 0):
            raise UserError(
                f"--max_grad_norm must be > 0 (inf: no clipping), got {self.max_grad_norm}"
            )
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise UserError(
                f"--noise_multiplier must be finite and >= 0, got {self.noise_multiplier}"
            )
        if not (0 < self.delta < 1):
            raise UserError(f"--target_delta must be in (0, 1), got {self.delta}")
        if self.noise_multiplier > 0 and math.isinf(self.max_grad_norm):
            raise UserError("noise needs a finite --max_grad_norm: it is scaled by the clip norm")

    @classmethod
    def for_epsilon(
        cls, target_epsilon: float, delta: float, max_grad_norm: float, steps: int
    ) -> Privacy:
        return cls(max_grad_norm, noise_for(target_epsilon, steps, delta), delta, target_epsilon)

    @property
    def opacus_clip(self) -> float:
        """The clip norm handed to Opacus: no clipping is the largest float (its noise std is
        sigma x C, and 0 x inf is NaN; sigma > 0 needs a finite C anyway)."""
        return sys.float_info.max if math.isinf(self.max_grad_norm) else self.max_grad_norm

    @property
    def is_plain(self) -> bool:
        """No noise and no clipping: the client's plain gradient, bit for bit."""
        return self.noise_multiplier == 0 and math.isinf(self.max_grad_norm)

    def epsilon(self, steps: int) -> float:
        """Opacus' epsilon (add/remove-one) spent by a sample that took part in ``steps`` steps."""
        return epsilon_of(self.noise_multiplier, steps, self.delta)

    def label_epsilon(self, steps: int) -> float:
        """The epsilon for one sample's label (replace-one: sensitivity 2C, i.e. sigma / 2)."""
        return epsilon_of(self.noise_multiplier / 2, steps, self.delta)

    def __str__(self) -> str:
        asked = "" if self.target_epsilon is None else f"epsilon = {self.target_epsilon:g}, "
        return (
            f"dpsgd ({asked}noise multiplier = {self.noise_multiplier:.4g}, "
            f"max_grad_norm = {self.max_grad_norm:g}, delta = {self.delta:g})"
        )

    def describe(self, steps: int, prior: torch.Tensor | None = None) -> dict:
        """What results.json says: the protocol, Opacus' epsilon spent by a sample in ``steps``
        steps, the label's epsilon and, given the class prior, the bound on guessing a label.
        JSON has no infinity: an infinite value is the string "inf"."""
        record = {
            "method": "dpsgd",
            "max_grad_norm": self.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "target_epsilon": self.target_epsilon,
            "accountant": ACCOUNTANT,
            "steps_per_sample": steps,
            "epsilon": self.epsilon(steps),
            "label_epsilon": self.label_epsilon(steps),
        }
        if prior is not None:
            record["label_accuracy_bound"] = label_accuracy_bound(
                record["label_epsilon"], self.delta, prior
            )
        return {
            key: "inf" if isinstance(value, float) and math.isinf(value) else value
            for key, value in record.items()
        }


def private_optimizer(
    local: nn.Module, privacy: Privacy, lr: float, batch: int, generator: torch.Generator
):
    """Opacus' per-sample hooks on ``local`` (put in training mode: Opacus records per-sample
    gradients in it only) and its DP-SGD optimizer over plain SGD at ``lr``, averaging over
    ``batch`` samples, its noise from ``generator``. Returns (the hooked module, the optimizer);
    close the module's hooks with ``_close()`` when done."""
    require_opacus()
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    check_supported(local)
    sampled = GradSampleModule(local.train())
    optimizer = DPOptimizer(
        torch.optim.SGD([p for p in local.parameters() if p.requires_grad], lr=lr),
        noise_multiplier=privacy.noise_multiplier,
        max_grad_norm=privacy.opacus_clip,
        expected_batch_size=batch,
        generator=generator,
    )
    return sampled, optimizer


def private_steps(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    privacy: Privacy,
    training: LocalTraining,
    generator: torch.Generator,
) -> tuple[dict[str, torch.Tensor], int]:
    """DP-SGD local training of a float64 copy of ``model`` (``model`` is left as it is).
    Returns the shared "gradients" U / (lr x steps) in the parameters' dtypes, and the steps."""
    local = local_copy(model)
    steps = train_privately(local, images, labels, privacy, training, generator)
    return update_as_gradients(model, dict(local.named_parameters()), training, steps), steps


def train_privately(
    local: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    privacy: Privacy,
    training: LocalTraining,
    generator: torch.Generator,
) -> int:
    """``train_locally`` with DP-SGD, in place on ``local`` (a float64 copy): E epochs of
    shuffled mini-batches of B, each step Opacus' clipped, noised mean gradient (noise drawn
    from ``generator``). Returns the steps taken. ``local`` is left in training mode."""
    if training.optimizer == "momentum":
        raise UserError("the DP-SGD client steps with plain SGD; use --local_optimizer sgd")
    batch = training.batch_for(labels.numel())
    sampled, optimizer = private_optimizer(local, privacy, training.lr, batch, generator)
    steps = 0
    images = images.to(torch.float64)
    try:
        for _ in range(training.epochs):
            order = torch.randperm(labels.numel(), generator=generator).to(labels.device)
            for indices in order.split(batch):
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(sampled(images[indices]), labels[indices])
                with input_free_hooks():
                    loss.backward()
                optimizer.step()
                steps += 1
    finally:
        sampled._close()  # noqa: SLF001 - removes Opacus' hooks from the copy
    return steps


def private_gradient(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    privacy: Privacy,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """A FedSGD client's DP-SGD gradient of its K samples: (sum of clipped per-sample gradients
    + N(0, sigma^2 C^2 I)) / K, in float64 and kept in the parameters' dtypes."""
    local = local_copy(model)
    sampled, optimizer = private_optimizer(local, privacy, 1.0, labels.numel(), generator)
    try:
        loss = nn.functional.cross_entropy(sampled(images.double()), labels)
        with input_free_hooks():
            loss.backward()
        # pre_step clips, sums, adds the noise and scales: p.grad is then what is shared.
        optimizer.pre_step()
    finally:
        sampled._close()  # noqa: SLF001
    sent = dict(model.named_parameters())
    return {
        name: p.grad.detach().to(sent[name].dtype)
        for name, p in local.named_parameters()
        if p.requires_grad
    }
