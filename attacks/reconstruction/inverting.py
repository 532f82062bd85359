"""Inverting Gradients (Geiping et al., NeurIPS 2020): images whose gradients match the shared ones.

A dummy batch is optimised until the gradient of its mean cross-entropy on the
victim, over every parameter, matches the shared gradient under ``cost_fn``.
The labels are either fixed (iLRG's restored ones, or the true ones as an upper
bound) or optimised jointly as soft labels: one row of logits per image
(``per_image``), or one row for the whole batch (``batch``), which is what the
original Inverting Gradients code optimises and what the iLRG paper compared with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn


def _cosine_cost(dummy: torch.Tensor, target: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return 1 - (dummy * target).sum() / (dummy.norm() * target.norm()).clamp_min(1e-30)


def _max_cost(dummy: torch.Tensor, target: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    # The largest deviation of each parameter tensor, summed over the parameters.
    return torch.segment_reduce((dummy - target).abs(), "max", lengths=sizes).sum()


#: cost(dummy gradients, shared gradients, parameter sizes): the gradients of all parameters
#: flattened into one vector each, ``sizes`` the length of each parameter's segment
COST_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "sim": _cosine_cost,
    "l2": lambda dummy, target, sizes: (dummy - target).pow(2).sum(),
    "l1": lambda dummy, target, sizes: (dummy - target).abs().sum(),
    "max": _max_cost,
}
DEFAULT_LR = {"adam": 0.1, "sgd": 0.01, "lbfgs": 1.0}
INITS = ("randn", "rand", "zeros")
#: joint soft labels: a row of logits per image, or one row shared by the batch
SOFT_LABELS = ("per_image", "batch")
#: the learning rate drops tenfold at these fractions of max_iterations
DECAY_AT = (3 / 8, 5 / 8, 7 / 8)
#: how often (iterations) the loss is read back for the progress bar and the early stop
REPORT_EVERY = 10


@dataclass(frozen=True)
class ReconstructionConfig:
    cost_fn: str = "sim"
    optimizer: str = "adam"
    lr: float | None = None  # None: DEFAULT_LR of the optimizer
    signed: bool = False
    boxed: bool = False
    init: str = "randn"
    tv: float = 1e-6
    l2: float = 1e-6
    max_iterations: int = 8000
    restarts: int = 1
    loss_thresh: float = 1e-4
    soft_labels: str = "batch"

    @classmethod
    def from_args(cls, args) -> ReconstructionConfig:
        """From ``attack.py``'s options: any object with their names as attributes (the harness's
        ``AttackConfig``); the option names differ from the fields (``rec_lr`` -> ``lr``)."""
        return cls(
            args.cost_fn,
            args.rec_optimizer,
            args.rec_lr,
            args.signed,
            args.boxed,
            args.init,
            args.tv,
            args.l2,
            args.max_iterations,
            args.restarts,
            args.loss_thresh,
            args.soft_labels,
        )


@dataclass(frozen=True)
class ReconstructionResult:
    images: torch.Tensor  # (K, C, H, W), normalised like the data set
    labels: torch.Tensor  # (K,) the fixed labels, or the argmax of the optimised soft labels
    loss: float  # gradient-matching cost of the kept restart
    iterations: int  # iterations the kept restart ran


def flatten(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def total_variation(images: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference between horizontally and vertically neighbouring pixels."""
    across = (images[..., :, 1:] - images[..., :, :-1]).abs().mean()
    down = (images[..., 1:, :] - images[..., :-1, :]).abs().mean()
    return across + down


def box_bounds(mean, std, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (1, C, 1, 1) bounds of normalised images whose pixels lie in [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    return -mean_t / std_t, (1 - mean_t) / std_t


def project_to_box(images: torch.Tensor, bounds: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Clamp ``images`` in place into the box, channel by channel."""
    lower, upper = bounds
    return images.clamp_(min=lower.to(images.device), max=upper.to(images.device))


def initial_images(init: str, shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """A starting batch on the CPU, drawn from ``generator`` so both label sources start alike.

    ``randn``: standard normal; ``rand``: uniform in [-1, 1]; ``zeros``.
    """
    if init == "randn":
        return torch.randn(shape, generator=generator)
    if init == "rand":
        return 2 * torch.rand(shape, generator=generator) - 1
    if init == "zeros":
        return torch.zeros(shape)
    raise ValueError(f"unknown init {init!r}; valid: {', '.join(INITS)}")


def soft_cross_entropy(logits: torch.Tensor, label_logits: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy against the soft labels softmax(label_logits), (K, C) or (1, C)."""
    return -(label_logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1).mean()


class GradientMatcher:
    """The cost between the gradients a dummy batch produces and the shared ones."""

    def __init__(self, model: nn.Module, target_grads: dict[str, torch.Tensor], cost_fn: str):
        if cost_fn not in COST_FUNCTIONS:
            raise ValueError(f"unknown cost_fn {cost_fn!r}; valid: {', '.join(COST_FUNCTIONS)}")
        named = dict(model.named_parameters())
        self.model = model
        self.parameters = [named[name] for name in target_grads]
        self.target = flatten(target_grads.values()).detach()
        sizes = [grad.numel() for grad in target_grads.values()]
        self.sizes = torch.tensor(sizes, device=self.target.device)
        self.cost = COST_FUNCTIONS[cost_fn]

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, create_graph: bool = True
    ) -> torch.Tensor:
        """``labels``: (K,) class indices, or (K, C) or (1, C) logits of soft labels."""
        logits = self.model(images)
        if labels.is_floating_point():
            loss = soft_cross_entropy(logits, labels)
        else:
            loss = nn.functional.cross_entropy(logits, labels)
        grads = torch.autograd.grad(loss, self.parameters, create_graph=create_graph)
        return self.cost(flatten(grads), self.target, self.sizes)


def _optimizer(
    config: ReconstructionConfig, variables: list[torch.Tensor]
) -> torch.optim.Optimizer:
    lr = config.lr if config.lr is not None else DEFAULT_LR[config.optimizer]
    if config.optimizer == "adam":
        return torch.optim.Adam(variables, lr=lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(variables, lr=lr, momentum=0.9, nesterov=True)
    if config.optimizer == "lbfgs":
        return torch.optim.LBFGS(variables, lr=lr, line_search_fn="strong_wolfe")
    raise ValueError(f"unknown optimizer {config.optimizer!r}; valid: {', '.join(DEFAULT_LR)}")


def _optimise(matcher, images, labels, config, bounds, progress, on_loss) -> tuple[float, int]:
    """One restart, in place on ``images`` (and ``labels`` if soft); returns (final cost, iterations)."""
    variables = [images] + ([labels] if labels.is_floating_point() else [])
    optimizer = _optimizer(config, variables)
    milestones = [int(config.max_iterations * fraction) for fraction in DECAY_AT]
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=0.1)
    latest = {}

    def closure():
        matching = matcher(images, labels)
        total = matching
        if config.tv:
            total = total + config.tv * total_variation(images)
        if config.l2:
            total = total + config.l2 * images.norm()
        grads = torch.autograd.grad(total, variables)
        for variable, grad in zip(variables, grads):
            variable.grad = grad.sign() if config.signed and variable is images else grad
        latest["matching"], latest["total"] = matching.detach(), total.detach()
        return total

    iteration = 0
    with tqdm_bar(config.max_iterations, progress) as bar:
        while iteration < config.max_iterations:
            optimizer.step(closure)
            scheduler.step()
            if bounds is not None:
                with torch.no_grad():
                    project_to_box(images, bounds)
            iteration += 1
            bar.update(1)
            if iteration % REPORT_EVERY == 0 or iteration == config.max_iterations:
                value = float(latest["matching"])
                bar.set_postfix(loss=f"{value:.4g}", refresh=False)
                if on_loss is not None:
                    on_loss(iteration, value)
                if not math.isfinite(value) or float(latest["total"]) < config.loss_thresh:
                    break
    images.grad = None
    final = float(matcher(images.detach(), labels.detach(), create_graph=False))
    return (final if math.isfinite(final) else math.inf), iteration


def _shifted(on_loss: Callable[[int, float], None], offset: int, iteration: int, value: float):
    on_loss(offset + iteration, value)


def tqdm_bar(total: int, enabled: bool, desc: str = "reconstruction"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="it", disable=not enabled, leave=False)


def reconstruct(
    model: nn.Module,
    target_grads: dict[str, torch.Tensor],
    input_shape,
    num_classes: int,
    config: ReconstructionConfig,
    *,
    labels: torch.Tensor | None = None,
    num_images: int | None = None,
    bounds: tuple[torch.Tensor, torch.Tensor] | None = None,
    generator: torch.Generator | None = None,
    progress: bool = False,
    on_loss: Callable[[int, float], None] | None = None,
) -> ReconstructionResult:
    """Invert ``target_grads`` (name -> gradient of the mean loss) into a batch of images.

    ``labels`` fixes the labels; without them soft labels are optimised jointly
    (``config.soft_labels``) and ``num_images`` gives K. ``bounds`` (see :func:`box_bounds`) is
    required when ``config.boxed``. The kept restart is the one whose final
    gradient-matching cost is lowest.
    """
    if config.boxed and bounds is None:
        raise ValueError("boxed reconstruction needs the bounds of the normalised pixels")
    if labels is None and num_images is None:
        raise ValueError("give the labels or the number of images")
    if config.soft_labels not in SOFT_LABELS:
        raise ValueError(
            f"unknown soft_labels {config.soft_labels!r}; valid: {', '.join(SOFT_LABELS)}"
        )
    device = next(model.parameters()).device
    count = labels.numel() if labels is not None else num_images
    matcher = GradientMatcher(model, target_grads, config.cost_fn)
    best = None
    with torch.enable_grad():
        for restart in range(config.restarts):
            images = initial_images(config.init, (count, *input_shape), generator).to(device)
            images.requires_grad_(True)
            if labels is not None:
                trial_labels = labels.to(device)
            else:
                rows = count if config.soft_labels == "per_image" else 1
                trial_labels = torch.randn((rows, num_classes), generator=generator).to(device)
                trial_labels.requires_grad_(True)
            loss, iterations = _optimise(
                matcher,
                images,
                trial_labels,
                config,
                bounds if config.boxed else None,
                progress,
                # one TensorBoard curve across restarts
                None
                if on_loss is None
                else partial(_shifted, on_loss, restart * config.max_iterations),
            )
            if best is None or loss < best.loss:
                hard = (
                    trial_labels if labels is not None else trial_labels.argmax(dim=1).expand(count)
                )
                best = ReconstructionResult(images.detach(), hard.detach(), loss, iterations)
    return best
