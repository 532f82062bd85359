"""One try of the attack experiment: the client's side, then every attack, on one batch.

``attack_try`` is what one ``test_step`` of ``experiment.attack_module`` runs. It is
given the try's index and batch and reads nothing that an earlier try left behind,
so it gives the same outcome on whichever process runs it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from attacks.dp_sgd import private_gradient, private_steps
from attacks.gradients import batch_gradients, share
from attacks.local_update import LocalUpdate, client_update, end_weights
from experiment.batch_fit import batch_fit
from experiment.extension import TryContext
from experiment.report import MethodScores
from experiment.seeding import try_generator

if TYPE_CHECKING:
    from datamodules.composition import ComposedBatchSampler
    from experiment.config import AttackConfig
    from experiment.setup import Setup


def composed_batches(config: AttackConfig, dataset, num_classes: int) -> ComposedBatchSampler:
    """The ``num_tries`` batches: batch i from (seed, i) alone (the same for every stage of
    a sweep, every pass over them and every process), drawn when asked for."""
    from datamodules.composition import ComposedBatchSampler

    return ComposedBatchSampler(
        dataset.targets,
        num_classes,
        config.num_images,
        config.distribution,
        config.num_tries,
        seed=config.seed,
        num_target_cls=config.num_target_cls,
        num_uniform_cls=config.num_uniform_cls,
    )


def load_chunks(setup: Setup, indices: torch.Tensor):
    """The batch, loaded and moved one ``max_size`` chunk at a time to bound memory."""
    step = setup.config.max_size or indices.numel()
    for start in range(0, indices.numel(), step):
        images, labels = setup.dataset.load(indices[start : start + step])
        yield images.to(setup.device, non_blocking=True), labels.to(setup.device, non_blocking=True)


def method_record(restoration) -> dict:
    """One method's answer in results.json: its counts (or present classes), and for a
    per-sample attack how many samples it told apart and their labels."""
    if restoration.counts is None:
        return {"present": torch.nonzero(restoration.present).flatten().tolist()}
    record = {"counts": restoration.counts.tolist()}
    if restoration.sample_labels is not None:
        record["separated"] = restoration.separated
        record["sample_labels"] = sorted(restoration.sample_labels.tolist())
    return record


def client_gradients(
    setup: Setup, indices: torch.Tensor, generator: torch.Generator
) -> tuple[dict[str, torch.Tensor], int]:
    """What the client shares as gradients, and its optimizer steps: one gradient of the batch
    (FedSGD, 1 step), or its FedAvg update divided by lr x steps."""
    config, privacy = setup.config, setup.privacy
    private = privacy is not None and not privacy.is_plain
    if setup.local_training is None and not private:
        return batch_gradients(setup.model, load_chunks(setup, indices), config.num_images), 1
    # Local training revisits every sample each epoch, and DP-SGD takes every sample's own
    # gradient: the whole batch is held at once.
    images, labels = map(torch.cat, zip(*load_chunks(setup, indices)))
    if private and setup.local_training is None:
        return private_gradient(setup.model, images, labels, privacy, generator), 1
    if private:
        return private_steps(setup.model, images, labels, privacy, setup.local_training, generator)
    return client_update(setup.model, images, labels, setup.local_training, generator)


@dataclass
class Scored:
    """What the metrics need of a method's answer, on the CPU: cheap to send between processes."""

    present: torch.Tensor
    counts: torch.Tensor | None


@dataclass
class TryOutcome:
    """One try's results.json record and what scoring it needs, on the CPU."""

    index: int
    record: dict
    true_counts: torch.Tensor
    known: torch.Tensor | None
    scored: dict[str, Scored]
    seconds: dict[str, float]


def attack_try(setup: Setup, index: int, indices: torch.Tensor) -> TryOutcome:
    """Try ``index``: the client's gradients of batch ``indices``, its defense, every attack
    and every extension. Its randomness comes from (seed, index) alone, so a try gives the
    same answer whichever process runs it and whatever ran before."""
    from datamodules.composition import class_counts

    config = setup.config
    true_counts = class_counts(setup.dataset.targets, indices, setup.num_classes).to(setup.device)
    client = try_generator(config.seed, index, "client")
    grads, steps = client_gradients(setup, indices, client)
    if setup.defense is not None:
        # Under FedAvg on the update as gradients: a defense's parameter means the same
        # with and without local steps.
        grads = setup.defense(
            grads,
            setup.model,
            lambda: load_chunks(setup, indices),
            try_generator(config.seed, index, "defense"),
        )
    known = true_counts > 0 if config.simplified else None
    local_update = None
    if setup.local_training is not None:
        local_update = LocalUpdate(
            setup.local_training,
            steps,
            end_weights(setup.model, grads, setup.local_training, steps),
        )
    shared = share(
        setup.model, grads, config.num_images, known_classes=known, local_update=local_update
    )
    record = {"true_counts": true_counts.tolist(), "methods": {}}
    record["batch"] = batch_fit(
        setup.model, load_chunks(setup, indices), shared.weight_grad, shared.bias_grad
    )
    if not all(bool(torch.isfinite(g).all()) for g in (shared.weight_grad, shared.bias_grad)):
        # A diverged model or an extreme defense: the attacks still answer (their
        # documented fallbacks), and the run reports how many tries this hit.
        record["nonfinite_gradients"] = True
    restorations, seconds = {}, {}
    for name, attack in setup.attacks.items():
        started = time.perf_counter()
        if getattr(attack, "randomised", False):
            restoration = attack(shared, generator=try_generator(config.seed, index, "guess"))
        else:
            restoration = attack(shared)
        restorations[name] = restoration
        if setup.device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - started
        record["methods"][name] = method_record(restoration)
    if setup.extensions:
        ctx = TryContext(
            index=index,
            indices=indices,
            labels=setup.dataset.targets[indices].to(setup.device),
            true_counts=true_counts,
            grads=grads,
            shared=shared,
            restorations=restorations,
            load_chunks=lambda: load_chunks(setup, indices),
        )
        for extension in setup.extensions:
            entry = extension.on_try(ctx)
            if entry is not None:
                record[extension.key] = entry
    return TryOutcome(
        index=index,
        record=record,
        true_counts=true_counts.cpu(),
        known=known.cpu() if known is not None else None,
        scored={
            name: Scored(r.present.cpu(), r.counts.cpu() if r.counts is not None else None)
            for name, r in restorations.items()
        },
        seconds=seconds,
    )


def new_scores(setup: Setup) -> dict[str, MethodScores]:
    return {
        name: MethodScores(attack.restores_counts, setup.config.simplified)
        for name, attack in setup.attacks.items()
    }


def log_try(writer, name: str, values: dict[str, float], index: int) -> None:
    for metric, value in values.items():
        writer.add_scalar(f"{name}/{metric}", value, index)
