"""A Flower federation with a label-leakage audit of every client update: ``python -m integrations.flower_sim``.

N clients each hold K samples of the chosen data, their classes drawn from a
Dirichlet(alpha) mix per client (small alpha: few classes per client, the
non-IID case). Every round the server (Flower's ``FedAvg``) sends the global
model, each client trains E local epochs of mini-batch SGD on its K samples
(``attacks.local_update.train_locally``, the client of ``attack.py
--local_epochs E``: a float64 copy, the model in eval mode, its shuffles
seeded from (seed, round, client)) and returns its weights, and
``integrations.flower.LeakageAuditStrategy`` attacks each update before
FedAvg averages them. With ``--report_labels`` the clients also report their
label counts, read by the audit only to score the attacks.

``--backend ray`` runs the clients on Flower's simulation engine (Ray actors);
``--backend local`` runs them one after another in this process
(``integrations.local_grid``). Either way the server takes the replies in
client order, so a seed gives the same global model to the bit, with or
without the audit (``--no_audit``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import dataclass

#: the attacks audited by default: iLRG, the per-sample attack, and the floors
DEFAULT_ATTACKS = ("iLRG", "decompose", "random", "zeros")
BACKENDS = ("ray", "local")
#: the scores the summary prints, one table each (and LeAcc where an attack restores no counts)
SUMMARY_METRICS = ("IRec", "Exact")
#: the victim options attack.py also has (a checkpoint decides them)
VICTIM_OPTIONS = (
    "dataset",
    "model",
    "n_hidden",
    "n_dim",
    "dropout",
    "batchnorm",
    "silu",
    "leaky_relu",
)


def build_parser() -> argparse.ArgumentParser:
    from experiment.client_options import add_local_training_arguments, clip_norm, epsilon_value
    from experiment.options import (
        OneLineParser,
        add_data_source_arguments,
        add_network_arguments,
        non_negative_float,
        positive_float,
        positive_int,
    )

    parser = OneLineParser(
        prog="integrations.flower_sim",
        description="Federated averaging on Flower with a label-leakage audit of every client update.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fed = parser.add_argument_group("federation")
    fed.add_argument(
        "--num_clients", type=positive_int, default=10, help="clients, all in every round"
    )
    fed.add_argument("--num_rounds", type=positive_int, default=5, help="FedAvg rounds")
    fed.add_argument("--num_images", type=positive_int, default=32, help="samples per client (K)")
    fed.add_argument(
        "--dirichlet",
        type=positive_float,
        default=0.5,
        help="concentration of each client's class mix (small: few classes per client)",
    )
    fed.add_argument(
        "--client_precision",
        choices=["float64", "float32"],
        default="float64",
        help="the weights the clients return: float64 as attack.py's client, or float32 as most "
        "deployments (then the update carries the weights' rounding)",
    )
    fed.add_argument(
        "--backend", choices=BACKENDS, default="ray", help="Ray actors, or one process"
    )
    fed.add_argument(
        "--seed", type=int, default=1234, help="seeds the model, the data and the clients"
    )

    data = parser.add_argument_group("data and model")
    add_data_source_arguments(data)
    data.add_argument("--split", default="val", help="the split the clients' samples come from")
    data.add_argument(
        "--checkpoint",
        default=None,
        help="start from this train.py checkpoint (its network, dataset)",
    )

    audit = parser.add_argument_group("audit")
    audit.add_argument(
        "--attacks",
        nargs="+",
        default=list(DEFAULT_ATTACKS),
        help="attacks run on every update (RLU, LLBG and RLU+ with the server's own samples); "
        "all: every registered attack, in attack.py --compare's order",
    )
    audit.add_argument(
        "--aux_per_class",
        type=positive_int,
        default=10,
        help="the server's auxiliary data for RLU, LLBG and RLU+: this many samples per class of "
        "--split, held by no client",
    )
    audit.add_argument(
        "--report_labels",
        action="store_true",
        help="clients report their label counts so the audit can score the attacks (simulation only)",
    )
    audit.add_argument("--no_audit", action="store_true", help="plain FedAvg, for comparison")
    audit.add_argument(
        "--log_dir", default="logs", help="run folders <log_dir>/<exp_name>/version_<n>"
    )
    audit.add_argument("--exp_name", default="flower")
    audit.add_argument("--quiet", action="store_true", help="no progress bar")
    add_local_training_arguments(parser)
    private = parser.add_argument_group("DP-SGD clients (attacks.dp_sgd, through Opacus)")
    private.add_argument(
        "--target_epsilon",
        type=epsilon_value,
        default=None,
        help="each client trains with DP-SGD spending this epsilon over all rounds",
    )
    private.add_argument(
        "--noise_multiplier",
        type=non_negative_float,
        default=None,
        help="instead of --target_epsilon",
    )
    private.add_argument("--target_delta", type=positive_float, default=1e-5)
    private.add_argument(
        "--max_grad_norm", type=clip_norm, default=1.0, help="per-sample clip norm"
    )
    # attack.py's options, but a federation averages updates: E >= 1 (E = 0 is refused by
    # LocalTraining in one line)
    parser.set_defaults(local_epochs=1)
    epochs = next(action for action in parser._actions if action.dest == "local_epochs")
    epochs.help = "local epochs E over the client's K samples (>= 1)"
    add_network_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from user_errors import UserError

    try:
        if args.backend == "ray":
            _check_ray()
        plan = prepare(args)
    except UserError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    try:
        summary = run(plan)
    except KeyboardInterrupt:
        print(
            "flower_sim: interrupted; the rounds audited so far are in audit.json", file=sys.stderr
        )
        return 130
    print(summary)
    return 0


def _check_ray() -> None:
    from user_errors import UserError

    try:
        import ray  # noqa: F401
    except ImportError:
        raise UserError(
            "--backend ray needs Flower's simulation engine: pip install -e '.[flower]' "
            "(or run with --backend local)"
        ) from None


# --- the plan: data, model, clients -------------------------------------------------------


def dirichlet_clients(
    targets,
    num_classes: int,
    num_clients: int,
    num_images: int,
    alpha: float,
    seed: int,
    exclude=None,
):
    """Each client's ``num_images`` sample indices: its class mix ~ Dirichlet(alpha), its
    counts ~ Multinomial(K, mix), the samples drawn without replacement, no sample held by two
    clients and none of ``exclude`` (the server's own). A class that runs short gives its
    remaining draws to the client's other classes in proportion to the mix. Returns a list of
    index tensors."""
    import numpy as np
    import torch

    from user_errors import UserError

    labels = np.asarray(targets)
    free = np.ones(len(labels), dtype=bool)
    if exclude is not None:
        free[np.asarray(exclude)] = False
    if num_clients * num_images > int(free.sum()):
        raise UserError(
            f"{num_clients} clients x {num_images} samples need {num_clients * num_images} samples; "
            f"the split holds {int(free.sum())}"
            + (" besides the server's auxiliary samples" if exclude is not None else "")
        )
    rng = np.random.default_rng(seed)
    pools = [
        list(rng.permutation(np.flatnonzero((labels == c) & free))) for c in range(num_classes)
    ]
    clients = []
    for _ in range(num_clients):
        mix = rng.dirichlet(np.full(num_classes, alpha))
        counts = rng.multinomial(num_images, mix)
        left = np.array([len(pool) for pool in pools])
        short = np.maximum(counts - left, 0)
        counts -= short
        missing = int(short.sum())
        while missing:
            room = left - counts
            weights = np.where(room > 0, mix + 1e-12, 0.0)
            extra = rng.multinomial(missing, weights / weights.sum())
            extra = np.minimum(extra, room)
            counts += extra
            missing -= int(extra.sum())
        chosen = []
        for c in np.flatnonzero(counts):
            chosen += [pools[c].pop() for _ in range(int(counts[c]))]
        clients.append(torch.tensor(sorted(chosen), dtype=torch.long))
    return clients


@dataclass
class Plan:
    """Everything a run needs, built and checked before anything runs."""

    args: argparse.Namespace
    model: object
    training: object
    #: each client's (images, labels)
    clients: list
    num_classes: int
    auxiliary: object
    describe: dict
    #: the clients' DP-SGD protocol (``attacks.dp_sgd.Privacy``), or None
    privacy: object = None


def prepare(args) -> Plan:
    """Check the options, load the data, build the model and the clients' shares; writes nothing."""
    import torch

    from attacks import (
        ATTACKS,
        AUXILIARY_ATTACKS,
        PER_SAMPLE_ATTACKS,
        PRIOR_ATTACKS,
        check_attack_name,
    )
    from attacks.local_update import LocalTraining
    from datamodules import build_datamodule, dataset_info
    from datamodules.views import data_view
    from experiment.config import AttackConfig
    from experiment.runner import build_victim
    from experiment.runs import check_output_dir
    from experiment.victims import resolve_victim

    if args.attacks == ["all"]:
        # attack.py --compare's table order: iLRG, the per-sample attack, the published
        # ones with the floors, the auxiliary-data ones
        args.attacks = ["iLRG", *PER_SAMPLE_ATTACKS, *PRIOR_ATTACKS, *AUXILIARY_ATTACKS]
    for name in args.attacks:
        check_attack_name(name)
    check_output_dir(f"{args.log_dir}/{args.exp_name}", "--log_dir")
    training = LocalTraining(
        args.local_epochs, args.local_batch_size, args.local_lr, args.local_optimizer
    )
    privacy = private_protocol(args)
    # The victim as attack.py builds it: a checkpoint brings its network, data set and the
    # partition train.py trained on (for --split fit_train / fit_val).
    options = {name: getattr(args, name) for name in VICTIM_OPTIONS}
    config, trained = resolve_victim(
        AttackConfig(checkpoint=args.checkpoint, seed=args.seed, **options)
    )
    num_classes, input_shape, _ = dataset_info(config.dataset)
    model = (trained.network if trained else build_victim(config, num_classes, input_shape)).eval()
    stage = f"{'Epoch' if trained.unit == 'epoch' else 'Iter'}{trained.stage}" if trained else None
    datamodule = build_datamodule(
        config.dataset,
        data_root=args.data_root,
        split="all",
        imagenet_dir=args.imagenet_dir,
        seed=args.seed,
    )
    partition = trained.partition() if trained and trained.data_hparams else None
    view = data_view(datamodule, args.split, partition)
    needs_aux = [n for n in args.attacks if n in AUXILIARY_ATTACKS and ATTACKS[n].needs_auxiliary()]
    auxiliary, aux_indices = None, None
    if needs_aux:
        # The server's own labelled samples, drawn first and then held by no client.
        from attacks import AuxiliaryData
        from datamodules.views import auxiliary_sample

        generator = torch.Generator().manual_seed(args.seed)
        aux_indices = auxiliary_sample(view, num_classes, args.aux_per_class, generator)
        auxiliary = AuxiliaryData(*view.load(aux_indices))
        auxiliary.check_covers(num_classes)
    shares = dirichlet_clients(
        view.targets,
        num_classes,
        args.num_clients,
        args.num_images,
        args.dirichlet,
        args.seed,
        exclude=aux_indices,
    )
    clients = [view.load(indices) for indices in shares]
    describe = {
        "dataset": config.dataset,
        "model": config.model,
        "checkpoint": args.checkpoint,
        "stage": stage,
        "num_clients": args.num_clients,
        "num_rounds": args.num_rounds,
        "num_images": args.num_images,
        "dirichlet": args.dirichlet,
        "split": args.split,
        "auxiliary": None
        if auxiliary is None
        else {"per_class": args.aux_per_class, "samples": len(aux_indices)},
        "seed": args.seed,
        "backend": args.backend,
        "client_precision": args.client_precision,
        "client_classes": [int(torch.unique(labels).numel()) for _, labels in clients],
    }
    if privacy is not None:
        prior = torch.bincount(view.targets, minlength=num_classes)
        describe["privacy"] = privacy.describe(args.num_rounds * args.local_epochs, prior)
    return Plan(
        privacy=privacy,
        args=args,
        model=model,
        training=training,
        clients=clients,
        num_classes=num_classes,
        auxiliary=auxiliary,
        describe=describe,
    )


# --- the Flower apps ----------------------------------------------------------------------


def private_protocol(args):
    """The clients' DP-SGD protocol, or None. Each sample is in E steps a round, every round."""
    from attacks.dp_sgd import Privacy
    from user_errors import UserError

    if args.target_epsilon is not None and args.noise_multiplier is not None:
        raise UserError("give --target_epsilon or --noise_multiplier, not both")
    if args.target_epsilon is not None:
        steps = args.num_rounds * args.local_epochs
        return Privacy.for_epsilon(
            args.target_epsilon, args.target_delta, args.max_grad_norm, steps
        )
    if args.noise_multiplier is not None:
        return Privacy(args.max_grad_norm, args.noise_multiplier, args.target_delta)
    return None


#: the last key of the clients' shuffle streams (the audit's streams have none)
CLIENT_STREAM = 7


def client_generator(seed: int, server_round: int, client: int):
    """Client ``client``'s shuffles in round ``server_round``: from (seed, round, client) alone."""
    from datamodules.composition import keyed_generator

    return keyed_generator(seed, server_round, client, CLIENT_STREAM)


def client_app(plan: Plan):
    """The ``ClientApp``: client ``partition-id`` trains on its share and returns its weights."""
    import torch
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    from attacks.dp_sgd import train_privately
    from attacks.local_update import local_copy, train_locally
    from integrations.audit import loaded

    template, training, clients, privacy = plan.model, plan.training, plan.clients, plan.privacy
    seed, precision = plan.args.seed, plan.args.client_precision
    report_labels, num_classes = plan.args.report_labels, plan.num_classes
    app = ClientApp()

    @app.train()
    def train(message: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        images, labels = clients[client]
        model = loaded(template, message.content["arrays"].to_torch_state_dict())
        server_round = int(message.content["config"]["server-round"])
        local = local_copy(model)
        generator = client_generator(seed, server_round, client)
        if privacy is None or privacy.is_plain:
            train_locally(local, images.double(), labels, training, generator)
        else:
            train_privately(local, images, labels, privacy, training, generator)
        state = local.state_dict()
        if precision == "float32":
            state = {name: value.float() for name, value in state.items()}
        metrics = {"num-examples": int(labels.numel()), "partition-id": client}
        if report_labels:
            metrics["label-counts"] = torch.bincount(labels, minlength=num_classes).tolist()
        content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
        return Message(content, reply_to=message)

    return app


class ClientOrder:
    """A grid whose replies come back sorted by the client's ``partition-id``: FedAvg's sum then
    runs in the same order every run (Ray hands replies back in the order they finish)."""

    def __init__(self, grid):
        self.grid = grid

    def __getattr__(self, name):
        return getattr(self.grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        return sorted(replies, key=_client_of)


def _client_of(message) -> int:
    from integrations.flower import reply_metric

    client = None if message.has_error() else reply_metric(message, "partition-id")
    return -1 if client is None else int(client)


def server_app(plan: Plan, outcome: dict):
    """The ``ServerApp``: FedAvg over every client for ``num_rounds``, audited unless
    ``--no_audit``; fills ``outcome`` with the final weights, the audit and the seconds."""
    from flwr.app import ArrayRecord, ConfigRecord, Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    from integrations.flower import LeakageAuditStrategy

    args = plan.args
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,
            min_train_nodes=args.num_clients,
            min_available_nodes=args.num_clients,
        )
        if not args.no_audit:
            strategy = LeakageAuditStrategy(
                strategy,
                plan.model,
                plan.training,
                args.attacks,
                auxiliary=plan.auxiliary,
                score_labels=args.report_labels,
                log_dir=outcome["run_dir"],
                describe=plan.describe,
                client_key="partition-id",
                seed=args.seed,
            )
            outcome["audit"] = strategy
        progress = RoundProgress(args.num_rounds, args.quiet)
        started = time.perf_counter()
        try:
            result = strategy.start(
                grid=ClientOrder(grid),
                initial_arrays=ArrayRecord(plan.model.state_dict()),
                num_rounds=args.num_rounds,
                train_config=ConfigRecord({"local-epochs": args.local_epochs}),
                evaluate_fn=progress,
            )
        finally:
            progress.close()
        outcome["seconds"] = time.perf_counter() - started
        outcome["round_seconds"] = progress.seconds
        outcome["arrays"] = result.arrays.to_torch_state_dict()

    return app


class RoundProgress:
    """A progress bar over the rounds, moved by the strategy's server-side evaluation hook
    (called once before the first round and after each); keeps each round's wall time."""

    def __init__(self, num_rounds: int, quiet: bool):
        from tqdm import tqdm

        self.bar = tqdm(
            total=num_rounds, desc="rounds", unit="round", disable=quiet, file=sys.stderr
        )
        self.seconds: list[float] = []
        self._last = time.perf_counter()

    def __call__(self, server_round: int, arrays):
        now = time.perf_counter()
        if server_round > 0:
            self.seconds.append(now - self._last)
            self.bar.update(1)
        self._last = now
        return None

    def close(self) -> None:
        self.bar.close()


def quiet_flower() -> None:
    """Flower's INFO lines (one per round and client) off; its warnings and errors stay."""
    from flwr.supercore.logger import FLOWER_LOGGER  # its import sets the level: set it after

    FLOWER_LOGGER.setLevel(logging.WARNING)
    FLOWER_LOGGER.addFilter(_expected_warnings)


def _expected_warnings(record: logging.LogRecord) -> bool:
    """Drops the two warnings this simulation always gets: that ``run_simulation`` is deprecated
    (see ``_run_ray``) and that federated evaluation is off (it is: only training is audited)."""
    message = record.getMessage()
    return not (
        "`run_simulation` function is deprecated" in message
        or "fraction_evaluate is set to 0.0" in message
    )


def run(plan: Plan) -> str:
    """Run the federation; returns the summary table."""
    import torch

    from experiment.runs import new_run_dir, write_json_atomic

    args = plan.args
    run_dir = new_run_dir(args.log_dir, args.exp_name)
    outcome: dict = {"run_dir": run_dir}
    quiet_flower()
    clients, servers = client_app(plan), server_app(plan, outcome)
    if args.backend == "local":
        from integrations.local_grid import LocalGrid

        LocalGrid(clients, args.num_clients).serve(servers)
    else:
        _run_ray(servers, clients, args.num_clients)
    if "arrays" not in outcome:
        raise RuntimeError("the federation ended without a result; Flower's log above says why")
    torch.save(outcome["arrays"], run_dir / "global_model.pt")
    run_record = {
        **plan.describe,
        "attacks": [] if args.no_audit else list(args.attacks),
        "local_training": plan.training.describe(),
        "seconds": round(outcome["seconds"], 3),
        "round_seconds": [round(s, 3) for s in outcome["round_seconds"]],
    }
    audit = outcome.get("audit")
    if audit is not None:
        run_record["audit_seconds"] = [r["audit_seconds"] for r in audit.log.rounds]
    write_json_atomic(run_dir / "run.json", run_record)
    return summary_text(plan, outcome, run_dir)


def _run_ray(server, clients, num_clients: int) -> None:
    import warnings

    from flwr.simulation import run_simulation

    with warnings.catch_warnings():
        # run_simulation is the Python entry point of Flower's simulation engine; Flower points
        # new projects at `flwr run`, which needs a Flower app project around the code.
        warnings.simplefilter("ignore")
        run_simulation(
            server_app=server,
            client_app=clients,
            num_supernodes=num_clients,
            backend_config={
                "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                # The actors' own log lines (start-up, "terminating") stay out of the output;
                # a client's error still comes back to the server as an error reply.
                "init_args": {"log_to_driver": False},
            },
        )


def summary_text(plan: Plan, outcome: dict, run_dir) -> str:
    from integrations.audit_log import format_rounds

    args = plan.args
    what = (
        f"{plan.describe['model']} on {plan.describe['dataset']}"
        + (f" ({plan.describe['stage']})" if plan.describe["stage"] else " (untrained)")
        + f", {args.num_clients} clients x {args.num_images} samples (Dirichlet {args.dirichlet}),"
        f" FedAvg E={args.local_epochs} B={plan.training.batch_for(args.num_images)}"
        f" lr={args.local_lr}, {args.num_rounds} round{'s' if args.num_rounds != 1 else ''} on {args.backend}"
    )
    if plan.privacy is not None:
        spent = plan.describe["privacy"]["epsilon"]
        what += f"; DP-SGD clients: {plan.privacy}, epsilon {spent:.3g} over all rounds"
    lines = [what, f"federation: {outcome['seconds']:.1f} s"]
    audit = outcome.get("audit")
    if audit is not None:
        rounds = audit.log.rounds
        spent = sum(r["audit_seconds"] for r in rounds)
        skipped = sum(r["skipped"] for r in rounds)
        lines[-1] += f", of which the audit {spent:.1f} s; {skipped} replies not audited"
        if args.report_labels:
            presence_only = any(
                "IRec" not in means for r in rounds for means in r["means"].values()
            )
            for metric in SUMMARY_METRICS + (("LeAcc",) if presence_only else ()):
                table = format_rounds(rounds, metric)
                if table:
                    lines += ["", table]
        else:
            lines.append("(no scores: add --report_labels to score the attacks)")
    lines += ["", f"run folder: {run_dir}"]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
