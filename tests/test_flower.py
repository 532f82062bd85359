"""The Flower integration: the audit strategy on in-process federations, the simulation's CLI,
and (slow) the same federation on Flower's Ray simulation engine."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg

from attacks import build_attack
from attacks.gradients import share
from attacks.local_update import LocalUpdate, client_update, end_weights
from integrations import flower_sim
from integrations.audit import loaded
from integrations.flower import LeakageAuditStrategy
from integrations.local_grid import FIRST_NODE_ID, LocalGrid
from tests.conftest import REPO
from tests.helpers import exit_code

NUM_CLIENTS, NUM_ROUNDS, K = 3, 2, 16


def plan_for(*extra, log_dir):
    args = flower_sim.build_parser().parse_args(
        [
            "--backend", "local",
            "--num_clients", str(NUM_CLIENTS),
            "--num_rounds", str(NUM_ROUNDS),
            "--num_images", str(K),
            "--attacks", "iLRG", "decompose", "random", "zeros",
            "--log_dir", str(log_dir),
            "--quiet",
            *extra,
        ]
    )  # fmt: skip
    return flower_sim.prepare(args)


class Recording(LeakageAuditStrategy):
    """The audit strategy, also keeping the arrays each round sent (for the reference below)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.sent_rounds = {}

    def configure_train(self, server_round, arrays, config, grid):
        self.sent_rounds[server_round] = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)


def federate(plan, audited: bool, log_dir=None, client_app=None):
    """FedAvg over the plan's clients on the in-process grid; returns (final state, strategy)."""
    outcome = {}
    app = ServerApp()

    @app.main()
    def main(grid, context):
        strategy = FedAvg(
            fraction_evaluate=0.0, min_train_nodes=NUM_CLIENTS, min_available_nodes=NUM_CLIENTS
        )
        if audited:
            strategy = Recording(
                strategy,
                plan.model,
                plan.training,
                plan.args.attacks,
                score_labels=plan.args.report_labels,
                log_dir=log_dir,
                client_key="partition-id",
                seed=plan.args.seed,
            )
        outcome["strategy"] = strategy
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(plan.model.state_dict()),
            num_rounds=NUM_ROUNDS,
            train_config=ConfigRecord({}),
        )
        outcome["state"] = result.arrays.to_torch_state_dict()

    LocalGrid(client_app or flower_sim.client_app(plan), NUM_CLIENTS).serve(app)
    return outcome["state"], outcome["strategy"]


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("audit")
    plan = plan_for("--report_labels", log_dir=log_dir)
    state, strategy = federate(plan, audited=True, log_dir=log_dir)
    return plan, state, strategy, log_dir


def test_the_audit_leaves_fedavg_bit_for_bit_unchanged(audited_run, tmp_path):
    plan, audited_state, _, _ = audited_run
    plain_state, _ = federate(plan_for("--report_labels", log_dir=tmp_path), audited=False)
    assert list(audited_state) == list(plain_state)
    for name in plain_state:
        assert torch.equal(audited_state[name], plain_state[name]), name
    # and the federation did train: the weights moved from the initial model's
    assert not torch.equal(plain_state["classifier.weight"], plan.model.classifier.weight)


def test_audit_counts_equal_attack_py_on_the_same_updates(audited_run):
    """Each client's update rebuilt on the client's side as attack.py builds it (client_update,
    share) gives exactly the counts the audit restored on the server's side."""
    plan, _, strategy, _ = audited_run
    rounds = strategy.log.rounds
    assert [r["round"] for r in rounds] == [1, 2]
    attacks = {name: build_attack(name) for name in ("iLRG", "decompose")}
    compared = 0
    for entry in rounds:
        by_client = {c["client"]: c for c in entry["clients"]}
        assert sorted(by_client) == list(range(NUM_CLIENTS))
        model = loaded(plan.model, strategy.sent_rounds[entry["round"]])
        for client, (images, labels) in enumerate(plan.clients):
            generator = flower_sim.client_generator(plan.args.seed, entry["round"], client)
            grads, steps = client_update(model, images, labels, plan.training, generator)
            update = LocalUpdate(
                plan.training, steps, end_weights(model, grads, plan.training, steps)
            )
            shared = share(model, grads, K, local_update=update)
            for name, attack in attacks.items():
                assert (
                    by_client[client]["methods"][name]["counts"] == attack(shared).counts.tolist()
                )
                compared += 1
            assert by_client[client]["true_counts"] == torch.bincount(labels, minlength=10).tolist()
    assert compared == NUM_ROUNDS * NUM_CLIENTS * 2
    # untrained round 1: every count of every client restored by both
    first = rounds[0]["means"]
    assert first["iLRG"]["Exact"] == 1.0 and first["decompose"]["Exact"] == 1.0
    assert first["zeros"]["IRec"] == 0.0


def test_audit_log_json_tensorboard_and_plot(audited_run):
    plan, _, strategy, log_dir = audited_run
    document = json.loads((log_dir / "audit.json").read_text())
    assert document["attacks"] == ["iLRG", "decompose", "random", "zeros"]
    assert document["local_training"] == {
        "epochs": 1,
        "batch_size": None,
        "lr": 0.01,
        "optimizer": "sgd",
    }
    assert [r["audited"] for r in document["rounds"]] == [NUM_CLIENTS] * NUM_ROUNDS
    client = document["rounds"][0]["clients"][0]
    assert client["status"] == "audited" and client["node"] >= FIRST_NODE_ID
    assert set(client["methods"]["iLRG"]["scores"]) == {"LeAcc", "LnAcc", "LnAcc+", "IRec", "Exact"}
    assert sum(client["methods"]["iLRG"]["counts"]) == K
    assert (log_dir / "leakage.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    assert [s.step for s in events.Scalars("audit/iLRG/IRec")] == [1, 2]
    assert [s.value for s in events.Scalars("audit/zeros/IRec")] == [0.0, 0.0]


def test_labels_are_not_read_without_the_flag(tmp_path):
    """Clients that report their label counts, and the flag off (the default): no scores, no
    true counts anywhere in the log."""
    plan = plan_for("--report_labels", log_dir=tmp_path)
    _, strategy = federate(plan, audited=True)
    strategy_default = LeakageAuditStrategy(FedAvg(), plan.model, plan.training)
    assert strategy_default.score_labels is False
    strategy.score_labels = False
    # the rounds ran with score_labels=True (plan); a fresh round without the flag:
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord(plan.model.state_dict()),
                    "metrics": MetricRecord({"num-examples": K, "label-counts": [K] + [0] * 9}),
                }
            ),
            reply_to=_sent_message(FIRST_NODE_ID),
        )
    ]
    entry = strategy.audit_reply(
        3, replies[0], {FIRST_NODE_ID: ArrayRecord(plan.model.state_dict())}
    )
    assert entry["status"] == "audited"
    assert "true_counts" not in entry and all("scores" not in m for m in entry["methods"].values())


def _sent_message(node: int) -> Message:
    """A train message as the server sends it to ``node`` (ids set as a grid sets them)."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 0, 1, 0
    try:
        message = Message(RecordDict(), node, "train")
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved
    message.metadata.__dict__["_message_id"] = f"m{node}"
    return message


def _reply(node, arrays, **metrics):
    metrics = {"num-examples": K, **metrics}
    return Message(
        RecordDict({"arrays": ArrayRecord(arrays), "metrics": MetricRecord(metrics)}),
        reply_to=_sent_message(node),
    )


def test_malformed_and_failed_replies_are_one_line_each_and_change_nothing(tmp_path):
    plan = plan_for(log_dir=tmp_path)
    state = plan.model.state_dict()
    sent = {FIRST_NODE_ID + i: ArrayRecord(state) for i in range(6)}
    bad_shape = {**state, "classifier.weight": torch.zeros(10, 299)}
    nan = {name: value.clone() for name, value in state.items()}
    nan["classifier.bias"][0] = float("nan")
    replies = [
        _reply(FIRST_NODE_ID, state),
        _reply(FIRST_NODE_ID + 1, bad_shape),
        _reply(FIRST_NODE_ID + 2, nan),
        Message(
            Error(code=0, reason="RuntimeError: out of memory"),
            reply_to=_sent_message(FIRST_NODE_ID + 3),
        ),
        _reply(FIRST_NODE_ID + 4, state, **{"num-examples": 0}),
        _reply(99, state),
    ]
    inner = FedAvg()
    strategy = LeakageAuditStrategy(inner, plan.model, plan.training, ["iLRG"], background=False)
    strategy._sent = sent
    clients = strategy.audit_round(1, replies, sent)["clients"]
    assert [c["status"] for c in clients] == ["audited"] + ["skipped"] * 5
    assert [c.get("reason") for c in clients[1:]] == [
        "the returned 'classifier.weight' has shape (10, 299), the sent one (10, 300)",
        "the returned 'classifier.bias' holds non-finite values",
        "the client failed: RuntimeError: out of memory",
        "'num-examples' is 0, not a sample count >= 1",
        "the reply comes from a node that was not sent weights this round",
    ]
    # The wrapped strategy decides on the same replies: FedAvg leaves out the error reply and
    # averages the rest (the NaN one included), exactly as without the audit.
    good = [replies[0], replies[2], replies[5]]
    mine, _ = strategy.aggregate_train(1, good + [replies[3]])
    theirs, _ = FedAvg().aggregate_train(1, good + [replies[3]])
    for name, value in theirs.to_torch_state_dict().items():
        assert torch.equal(mine.to_torch_state_dict()[name].nan_to_num(7.0), value.nan_to_num(7.0))


def test_a_failing_client_is_logged_and_the_federation_goes_on(tmp_path):
    plan = plan_for("--report_labels", log_dir=tmp_path)
    healthy = flower_sim.client_app(plan)
    from flwr.clientapp import ClientApp

    flaky = ClientApp()

    @flaky.train()
    def train(message, context):
        if (
            context.node_config["partition-id"] == 1
            and message.content["config"]["server-round"] == 2
        ):
            raise RuntimeError("client 1 lost its data")
        return healthy(message, context)

    state, strategy = federate(plan, audited=True, client_app=flaky)
    second = strategy.log.rounds[1]
    assert (second["audited"], second["skipped"]) == (2, 1)
    failed = [c for c in second["clients"] if c["status"] != "audited"]
    assert failed[0]["reason"] == "the client failed: RuntimeError: client 1 lost its data"
    assert all(torch.isfinite(v).all() for v in state.values())


def test_dirichlet_shares_are_disjoint_sized_and_seeded():
    targets = torch.arange(1000) % 10
    shares = flower_sim.dirichlet_clients(targets, 10, 20, 32, 0.1, seed=4)
    again = flower_sim.dirichlet_clients(targets, 10, 20, 32, 0.1, seed=4)
    assert [s.numel() for s in shares] == [32] * 20
    assert all(torch.equal(a, b) for a, b in zip(shares, again))
    everything = torch.cat(shares)
    assert everything.unique().numel() == 640
    few = np.mean([targets[s].unique().numel() for s in shares])
    many = np.mean(
        [
            targets[s].unique().numel()
            for s in flower_sim.dirichlet_clients(targets, 10, 20, 32, 100.0, 4)
        ]
    )
    # alpha 0.1: a client holds about 2-4 classes; alpha 100: nearly all 10
    assert few < 4.5 and many > 9
    # 1000 samples of 100 per class, 31 clients x 32 = 992: classes run short, shares stay full
    tight = flower_sim.dirichlet_clients(targets, 10, 31, 32, 0.1, seed=1)
    assert torch.cat(tight).unique().numel() == 992


def run_sim(*args, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "integrations.flower_sim", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--num_clients", "0"], "argument --num_clients: must be >= 1, got 0"),
        (["--attacks", "iLGR"], "unknown attack 'iLGR'"),
        (["--num_clients", "400"], "400 clients x 32 samples need 12800 samples; the split holds"),
        (
            ["--split", "nosuch"],
            "unknown split 'nosuch'; valid splits: train, val, all, fit_train, fit_val",
        ),
    ],
)
def test_bad_options_are_one_line_and_exit_2(args, message, tmp_path, capsys):
    assert (
        exit_code(flower_sim.main, ["--backend", "local", "--log_dir", str(tmp_path), *args]) == 2
    )
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.glob("flower/version_*"))


def test_the_simulation_on_real_mnist_prints_its_table(tmp_path, shared_data):
    proc = run_sim(
        "--backend", "local", "--dataset", "MNIST_GRAY", "--data_root", str(shared_data),
        "--num_clients", "4", "--num_rounds", "2", "--report_labels", "--quiet",
        "--attacks", "iLRG", "RLU+", "zeros", "--log_dir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("dnn on MNIST_GRAY (untrained), 4 clients x 32 samples")
    for name in ("iLRG", "RLU+"):
        row = next(line for line in lines if line.startswith(name))
        assert row.split()[1:] == ["1.000", "1.000", "1.000"], row
    zeros = next(line for line in lines if line.startswith("zeros"))
    assert zeros.split()[1:] == ["0.000", "0.000", "0.000"]
    run_dir = tmp_path / "flower" / "version_0"
    assert sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("events")) == [
        "audit.json", "global_model.pt", "leakage.png", "run.json",
    ]  # fmt: skip
    record = json.loads((run_dir / "run.json").read_text())
    assert record["dataset"] == "MNIST_GRAY" and len(record["round_seconds"]) == 2
    assert record["auxiliary"] == {"per_class": 10, "samples": 100}
    assert all(1 <= n <= 10 for n in record["client_classes"])
    assert math.isfinite(record["seconds"])


@pytest.mark.slow
def test_ray_gives_the_local_federation_bit_for_bit(tmp_path):
    """Flower's Ray simulation engine runs the same clients in actors; with the replies taken in
    client order, its global model and its audit equal the in-process run's."""
    common = [
        "--num_clients",
        "3",
        "--num_rounds",
        "2",
        "--num_images",
        "16",
        "--report_labels",
        "--quiet",
    ]
    ray = run_sim("--backend", "ray", "--log_dir", str(tmp_path / "ray"), *common, timeout=600)
    assert ray.returncode == 0, ray.stderr[-3000:]
    local = run_sim("--backend", "local", "--log_dir", str(tmp_path / "local"), *common)
    assert local.returncode == 0, local.stderr[-3000:]
    folders = [tmp_path / side / "flower" / "version_0" for side in ("ray", "local")]
    states = [torch.load(f / "global_model.pt") for f in folders]
    assert all(torch.equal(states[0][n], states[1][n]) for n in states[1])
    audits = [json.loads((f / "audit.json").read_text()) for f in folders]
    for a, b in zip(audits[0]["rounds"], audits[1]["rounds"]):
        counts = [
            {c["client"]: c["methods"]["iLRG"]["counts"] for c in side["clients"]}
            for side in (a, b)
        ]
        assert counts[0] == counts[1]
    # the same table, apart from the backend's name and the times
    table = [
        line for line in ray.stdout.splitlines() if line.startswith(("iLRG", "decompose", "zeros"))
    ]
    assert table == [
        line
        for line in local.stdout.splitlines()
        if line.startswith(("iLRG", "decompose", "zeros"))
    ]


def test_dp_sgd_clients_record_their_epsilon(tmp_path):
    proc = run_sim(
        "--backend", "local", "--num_clients", "2", "--num_rounds", "2", "--num_images", "16",
        "--local_epochs", "2", "--local_batch_size", "8", "--target_epsilon", "2",
        "--attacks", "iLRG",
        "--report_labels", "--quiet", "--log_dir", str(tmp_path),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DP-SGD clients: dpsgd (epsilon = 2, noise multiplier = " in proc.stdout
    privacy = json.loads((tmp_path / "flower" / "version_0" / "audit.json").read_text())["privacy"]
    # each sample is in E = 2 steps a round, for 2 rounds
    assert privacy["steps_per_sample"] == 4 and 1.98 <= privacy["epsilon"] <= 2.0
    both = run_sim("--backend", "local", "--target_epsilon", "2", "--noise_multiplier", "1")
    assert both.returncode == 2
    assert both.stderr.strip() == (
        "integrations.flower_sim: error: give --target_epsilon or --noise_multiplier, not both"
    )
