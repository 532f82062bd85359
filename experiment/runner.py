"""One attack experiment: ``num_tries`` batches, each attacked by every chosen method.

``prepare`` checks every option and loads data and model before anything is
written; ``run`` then draws the batches, lets the client compute its gradients,
hands the attacks only what the server sees, and scores them against the true
counts that stay on the client's side.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
from pathlib import Path

import torch

from attacks import (
    ATTACKS,
    AUXILIARY_ATTACKS,
    PER_SAMPLE_ATTACKS,
    PRIOR_ATTACKS,
    AuxiliaryData,
    build_attack,
    check_attack_name,
)
from attacks.defenses import describe_defense
from experiment.batch_fit import batch_fit_summary
from experiment.client_options import build_defense, build_local_training, build_privacy
from experiment.config import AttackConfig
from experiment.logs import RESULT
from experiment.report import METRIC_NAMES, MethodScores, format_table
from experiment.runs import write_json_atomic
from experiment.setup import Setup
from experiment.trial import TryOutcome, composed_batches, log_try, new_scores
from user_errors import UserError

log = logging.getLogger("attack")


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM during a run: finished tries are kept, the run is marked incomplete.

    A KeyboardInterrupt, so whatever stops on Ctrl-C stops on it too; ``signum`` gives the
    exit code 128 + signum (130 for Ctrl-C, 143 for SIGTERM).
    """

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def what_ran(setup: Setup) -> str:
    """One line above the table: the victim, the data, K, the tries and the protocol."""
    config = setup.config
    victim = setup.describe.get("victim")
    stage = (
        f", {victim['stage']['unit']} {victim['stage']['value']} of {victim['checkpoint']}"
        if victim
        else ", untrained"
    )
    training = setup.local_training
    protocol = (
        "FedSGD (one gradient)"
        if training is None
        else f"FedAvg E = {training.epochs}, B = {training.batch_for(config.num_images)}, "
        f"lr = {training.lr:g}, {training.optimizer}"
    )
    return (
        f"{victim_and_data(config)} ({config.split}{stage}), K = {config.num_images}, "
        f"{config.num_tries} tries ({config.distribution}), {protocol}"
    )


def victim_and_data(config: AttackConfig) -> str:
    return f"{config.model} on {config.dataset}"


def needing_auxiliary(config: AttackConfig) -> tuple[str, ...]:
    """The auxiliary attacks that need the data with these options (LLBG given
    ``--llbg_confidence`` does not)."""
    return tuple(
        name
        for name in AUXILIARY_ATTACKS
        if ATTACKS[name].needs_auxiliary(llbg_confidence=config.llbg_confidence)
    )


def method_names(config: AttackConfig, auxiliary: bool = False) -> list[str]:
    """``--attacks``, then with ``--compare`` decompose, the prior attacks and the auxiliary
    ones (without auxiliary data, those that can do without it)."""
    compared = list(PER_SAMPLE_ATTACKS) + list(PRIOR_ATTACKS)
    needed = needing_auxiliary(config)
    compared += [name for name in AUXILIARY_ATTACKS if auxiliary or name not in needed]
    names = list(dict.fromkeys(config.attacks + (compared if config.compare else [])))
    for name in names:
        check_attack_name(name)
    return names


def victim_partition(config: AttackConfig, trained):
    """train.py's partition: the checkpoint's (an option saying otherwise is an error), else the options'."""
    from datamodules.views import Partition

    given = (
        Partition(config.train_partition, config.val_fraction, config.seed)
        if config.train_partition
        else None
    )
    if trained is None or not trained.data_hparams:
        return given
    saved = trained.partition()
    if config.train_partition is not None and (
        saved is None or saved.split != config.train_partition
    ):
        raise UserError(
            f"--train_partition {config.train_partition} conflicts with the checkpoint {trained.path} "
            f"(trained with train_partition {saved.split if saved else 'none'})"
        )
    return saved


def left_out(config: AttackConfig, reason: Exception) -> tuple[None, dict]:
    """No auxiliary data where ``--aux_split auto`` found none fit: the attacks are left out,
    and results.json and the run's log say which and why (``Setup.notes``)."""
    return None, {"left_out": list(needing_auxiliary(config)), "reason": str(reason)}


def auxiliary_data(config: AttackConfig, datamodule, attacked, partition, num_classes):
    """The server's labelled samples and what results.json says of them; (None, None) without.

    ``--aux_split auto`` takes the held-out counterpart of the attacked data where
    its files are there and it holds every class, and otherwise none (so the
    auxiliary attacks stay out of ``--compare``). Data the attacked batches come from is never auxiliary data.
    """
    from datamodules.views import COUNTERPART, auxiliary_sample, data_view
    from user_errors import DataError

    needed = needing_auxiliary(config)
    wanted = any(name in needed for name in config.attacks)
    name = config.aux_split
    if name == "auto":
        name = COUNTERPART.get(config.split)
        if name is None:
            if wanted:
                raise UserError(
                    f"--split {config.split} has no held-out counterpart for the auxiliary data; name one with --aux_split"
                )
            return None, None
        try:
            view = data_view(datamodule, name, partition)
        except DataError as err:
            if wanted:
                raise UserError(
                    f"no auxiliary data for {', '.join(a for a in config.attacks if a in needed)}: {err}"
                ) from None
            return left_out(config, err)
    else:
        view = data_view(datamodule, name, partition)
    if view.overlaps(attacked):
        raise UserError(
            f"--aux_split {name} shares samples with the attacked --split {config.split}: "
            "the auxiliary data would hold the batches' own samples"
        )
    generator = torch.Generator().manual_seed(config.seed)
    indices = auxiliary_sample(view, num_classes, config.aux_per_class, generator)
    images, labels = view.load(indices)
    auxiliary = AuxiliaryData(images, labels)
    try:
        auxiliary.check_covers(num_classes)
    except UserError as err:
        if config.aux_split != "auto" or wanted:
            raise
        return left_out(config, err)
    per_class = torch.bincount(labels, minlength=num_classes)
    return auxiliary, {
        "split": name,
        "per_class": config.aux_per_class,
        "samples": int(labels.numel()),
        "fewest_of_a_class": int(per_class.min()),
    }


def choose_device(accelerator: str) -> torch.device:
    if accelerator in ("gpu", "cuda"):
        if not torch.cuda.is_available():
            raise UserError(
                f"--accelerator {accelerator} asked for, but no CUDA device is available"
            )
        return torch.device("cuda")
    if accelerator == "auto" and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def network_options(config: AttackConfig) -> dict:
    return {
        "n_hidden": config.n_hidden,
        "n_dim": config.n_dim,
        "dropout": config.dropout,
        "batchnorm": config.batchnorm,
        "silu": config.silu,
        "leaky_relu": config.leaky_relu,
    }


def build_victim(config: AttackConfig, num_classes: int, input_shape) -> torch.nn.Module:
    """An untrained victim, seeded so the same command attacks the same weights."""
    from lightning_modules.networks import build_network

    torch.manual_seed(config.seed)
    return build_network(config.model, num_classes, tuple(input_shape), **network_options(config))


def prepare(config: AttackConfig) -> Setup:
    """Check everything and load data and model; raises ``UserError`` and writes nothing."""
    from datamodules import build_datamodule, dataset_info
    from datamodules.base import SPLITS
    from datamodules.composition import check_composition
    from datamodules.views import data_view
    from experiment.victims import resolve_victim
    from lightning_modules.networks import check_network_fits

    # A trained victim brings its own dataset, model and network options.
    config, trained = resolve_victim(config)
    method_names(config)  # unknown names fail before any data is read
    defense = build_defense(config, config.seed)
    local_training = build_local_training(config)
    privacy = build_privacy(config)
    num_classes, input_shape, _ = dataset_info(config.dataset)
    check_network_fits(config.model, tuple(input_shape), **network_options(config))
    device = choose_device(config.accelerator)
    processes = config.devices * config.num_nodes
    if processes > config.num_tries:
        raise UserError(
            f"--devices {config.devices} x --num_nodes {config.num_nodes} = {processes} processes "
            f"for {config.num_tries} tries: each process needs a try; use at most "
            f"{config.num_tries} processes or more --num_tries"
        )
    # Lightning's own checks of --devices/--strategy/--num_nodes, before anything is read.
    from experiment.attack_module import build_trainer

    build_trainer(config)
    datamodule = build_datamodule(
        config.dataset,
        data_root=config.data_root,
        split=config.split if config.split in SPLITS else "all",
        imagenet_dir=config.imagenet_dir,
        seed=config.seed,
    )
    partition = victim_partition(config, trained)
    dataset = data_view(datamodule, config.split, partition)
    auxiliary, aux_description = auxiliary_data(config, datamodule, dataset, partition, num_classes)
    notes = []
    if config.split.startswith("fit_") and partition is None:
        part = config.split.removeprefix("fit_")
        notes.append(
            f"--split {config.split}: no partition recorded or given, so the whole {part} split "
            "(train.py trained on the train split)"
        )
    if aux_description is not None and "left_out" in aux_description:
        notes.append(
            f"no auxiliary data ({aux_description['reason']}): "
            f"{', '.join(aux_description['left_out'])} are left out"
        )
    names = method_names(config, auxiliary is not None)
    class_sizes = torch.bincount(dataset.targets, minlength=num_classes)
    check_composition(
        class_sizes,
        config.num_images,
        config.distribution,
        config.num_target_cls,
        config.num_uniform_cls,
    )
    if dataset.decodes_files:
        # Every file the run will read is decoded now (a corrupt image is one line and exit 2
        # before the run folder exists), not when a try first meets it. The batches come
        # from the seed alone, so run() draws the very same ones again (O(K) each).
        dataset.check_readable(
            torch.tensor(list(composed_batches(config, dataset, num_classes))).unique()
        )
    network = trained.network if trained else build_victim(config, num_classes, input_shape)
    model = network.to(device).eval()
    if privacy is not None and not privacy.is_plain:
        from attacks.dp_sgd import check_supported

        check_supported(model)
    options = {
        "alpha": config.alpha,
        "estimate": config.estimate,
        "simplified": config.simplified,
        "norm_guard": config.norm_guard,
        "llbg_confidence": config.llbg_confidence,
        "seed": config.seed,
        "auxiliary": auxiliary,
    }
    attacks = {name: build_attack(name, **options) for name in names}
    describe = trained.describe() if trained else {}
    # Which samples the batches come from: with fit_train/fit_val, train.py's partition (from
    # the checkpoint or --train_partition), or none (the whole train/val split) -- said either way.
    describe["view"] = {
        "split": config.split,
        "partition": None if partition is None else dataclasses.asdict(partition),
        "samples": len(dataset),
    }
    if aux_description is not None:
        describe["auxiliary"] = aux_description
    setup = Setup(
        config,
        datamodule,
        dataset,
        model,
        device,
        attacks,
        num_classes,
        defense=defense,
        describe=describe,
        local_training=local_training,
        privacy=privacy,
        notes=notes,
    )
    setup.describe["defense"] = describe_defense(defense)
    if privacy is not None:
        # each sample is in E local steps (one gradient under FedSGD); the bound on guessing
        # one sample's label takes the attacked split's class frequencies as the prior
        setup.describe["defense"] = privacy.describe(max(config.local_epochs, 1), class_sizes)
    setup.describe["local_training"] = local_training.describe() if local_training else None
    if config.analysis:
        from experiment.analysis import ErrorAnalysis

        setup.extensions.append(ErrorAnalysis(model, alpha=config.alpha, ratio=config.ratio))
    if config.distribution.startswith("custom_"):
        from datamodules.composition import CUSTOM_CLASSES
        from experiment.analysis import CustomClassCounts

        setup.extensions.append(CustomClassCounts(CUSTOM_CLASSES))
    if config.rec_img:
        from experiment.reconstruction import Reconstruction

        setup.extensions.append(Reconstruction.from_setup(setup))
    return setup


def score(
    setup: Setup, outcomes: list[TryOutcome], writer=None, logged: frozenset[int] = frozenset()
) -> dict[str, MethodScores]:
    """The methods' scores over ``outcomes``, taken in index order: the same sums in the
    same order however many processes ran the tries. The per-try values of the tries
    not in ``logged`` (those another process ran) go to TensorBoard now."""
    scores = new_scores(setup)
    for outcome in outcomes:
        for name, method_scores in scores.items():
            method_scores.seconds.append(outcome.seconds[name])
            values = method_scores.update(outcome.scored[name], outcome.true_counts, outcome.known)
            if writer is not None and outcome.index not in logged:
                log_try(writer, name, values, outcome.index)
    return scores


def run(setup: Setup, run_dir: Path | None, logger=None, table: dict = RESULT) -> dict | None:
    """Attack ``num_tries`` batches on the Lightning Trainer; write results.json (also when
    interrupted) and return it. ``logger``: a TensorBoardLogger for the per-try and summary
    scalars, or None. Under several processes every one runs this and the first writes
    and returns the results; the others return None."""
    from experiment.attack_module import AttackExperiment, StopTries, run_tries
    from experiment.peers import PeerFailed

    config = setup.config
    for note in setup.notes:
        log.info("%s", note)
    writer = logger.experiment if logger is not None else None
    module = AttackExperiment(setup, run_dir, writer)
    status, failure, stopped_by = "complete", None, None
    try:
        run_tries(module, logger)
    except StopTries as err:
        status, stopped_by = "incomplete", Interrupted(err.signum)
    except PeerFailed as err:
        # Another process is gone: what it and this one finished is kept, as after Ctrl-C.
        status, failure = "incomplete", str(err)
    except UserError as err:
        # Bad data found mid-run (say, a corrupt image file): keep what was done, marked as failed.
        status, failure = "failed", str(err)
    if not module.is_primary:
        if stopped_by is not None:
            raise stopped_by
        if failure is not None:
            raise UserError(failure)
        return None
    outcomes = module.collected()
    if stopped_by is not None:
        log.warning(
            "interrupted (%s) after %d of %d tries; results.json is marked incomplete",
            signal.Signals(stopped_by.signum).name,
            len(outcomes),
            config.num_tries,
        )
    scores = score(setup, outcomes, writer, module.logged)
    records = [outcome.record for outcome in outcomes]
    for extension in setup.extensions:
        extension.collect([(o.index, o.record.get(extension.key)) for o in outcomes])
    results = build_results(setup, scores, records, status, module.world_size)
    if module.world_size > 1 and status != "complete":
        # Not every try was run: say which ones these are.
        results["try_indices"] = [outcome.index for outcome in outcomes]
    if failure is not None:
        results["error"] = failure
    if records:
        # The table is the run's result (stdout), printed before any file is written: a full
        # disk must not take the results with it. A run that failed before its first try has none.
        defense = setup.defense or setup.privacy or "none"
        log.info(
            "\n%s\ndefense: %s\n%s", what_ran(setup), defense, format_table(scores), extra=table
        )
        for extension in setup.extensions:
            text = extension.table()
            if text:
                log.info("\n%s", text, extra=table)
    for path in [run_dir / "results.json"] + ([Path(config.results)] if config.results else []):
        try:
            write_json_atomic(path, results)
        except OSError as err:
            raise UserError(
                f"could not write {path}: {err.strerror or err}; the results are in the table above"
            ) from None
    if writer is not None:
        try:
            for method, summary in results["summary"].items():
                for metric, value in summary.items():
                    writer.add_scalar(f"summary/{method}/{metric}", value, 0)
            writer.flush()
        except OSError as err:
            log.warning("TensorBoard's summary scalars could not be written: %s", err)
    affected = results["nonfinite_tries"]
    if affected:
        log.warning(
            "%d of %d tries had non-finite shared gradients (NaN/inf)", affected, len(records)
        )
    if failure is not None and status == "incomplete":
        raise UserError(
            f"{failure}; results.json keeps the {len(records)} finished tries of "
            f"{config.num_tries}, marked incomplete"
        )
    if failure is not None:
        raise UserError(failure)
    if stopped_by is not None:
        raise stopped_by
    return results


def build_results(
    setup: Setup,
    scores: dict[str, MethodScores],
    tries: list[dict],
    status: str,
    processes: int = 1,
) -> dict:
    summary, spread, seconds = {}, {}, {}
    for method, score in scores.items():
        means = score.summary()
        summary[method] = {m: means[m] for m in METRIC_NAMES if m in means}
        spread[method] = {m: v for m, v in score.spread().items()}
        seconds[method] = sum(score.seconds) / max(len(score.seconds), 1)
    return {
        "status": status,
        "tries_done": len(tries),
        "nonfinite_tries": sum(1 for t in tries if t.get("nonfinite_gradients")),
        "config": setup.config.as_dict(),
        "data": {
            "dataset": setup.config.dataset,
            "synthetic": bool(setup.datamodule.is_synthetic),
            "source": getattr(setup.dataset, "source", None),
            "num_classes": setup.num_classes,
        },
        "device": str(setup.device),
        "processes": processes,
        **setup.describe,
        "summary": summary,
        "std": spread,
        "seconds_per_try": seconds,
        # the model's fit of the attacked batches and the share of their samples any
        # attack can see (experiment.batch_fit): the ceiling of per-sample numbers
        "batch": batch_fit_summary(tries, setup.config.num_images),
        "tries": tries,
        **{extension.key: extension.summary() for extension in setup.extensions},
    }
