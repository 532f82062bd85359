import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import nn
from torch.utils.data import TensorDataset

from callbacks import LabelLeakageCallback
from tests.helpers import COUNT_METRICS
from tests.tiny_training import (
    TinyClassifier,
    cpu_trainer,
    labelled_data,
    loader,
    scalars,
    tensorboard_logger,
)
from user_errors import UserError


def fit(callback, tmp_path, model=None, data=None, batch_size=16, shuffle=False, **trainer_options):
    model = model if model is not None else TinyClassifier()
    data = data if data is not None else labelled_data()
    logger = tensorboard_logger(tmp_path)
    callbacks = [callback] if callback is not None else []
    trainer = cpu_trainer(logger=logger, callbacks=callbacks, **trainer_options)
    trainer.fit(model, loader(data, batch_size, shuffle))
    return model, logger


def test_short_run_logs_every_metric_at_the_attacked_steps(tmp_path):
    callback = LabelLeakageCallback(attack_every_n_steps=2)
    data = labelled_data(num_samples=64)  # 4 batches of 16 per epoch
    _, logger = fit(callback, tmp_path, data=data, max_steps=6)
    logged = scalars(logger.log_dir)
    for metric in COUNT_METRICS:
        # Exact data: iLRG restores every count, so anything below 1 is a plumbing error.
        assert logged[f"leakage/iLRG/{metric}"] == [(0, 1.0), (2, 1.0), (4, 1.0)]
        # One mean per epoch, logged when the epoch ends (after 4 and after 6 steps).
        assert logged[f"leakage_epoch/iLRG/{metric}"] == [(4, 1.0), (6, 1.0)]
    result = callback.last_result
    assert result.step == 4 and result.num_images == 16
    assert torch.equal(result.true_counts, torch.bincount(data.tensors[1][:16], minlength=10))
    assert torch.equal(result.restorations["iLRG"].counts, result.true_counts)
    assert callback.layer_name == "net.3"


def test_training_is_the_same_with_and_without_the_callback(tmp_path):
    def train(callback):
        pl.seed_everything(0, verbose=False)
        model = TinyClassifier(dropout=0.5)
        data = labelled_data(num_samples=48, noise=0.3)
        fit(
            callback,
            tmp_path / str(callback is None),
            model=model,
            data=data,
            shuffle=True,
            max_steps=8,
        )
        return model, torch.get_rng_state()

    # The auxiliary attacks run the model (dropout 0.5) on the server's data at every step.
    auxiliary = labelled_data(num_samples=40, noise=0.3, seed=1)
    callback = LabelLeakageCallback(
        attacks=("iLRG", "decompose", "random", "iDLG", "LLG", "RLU", "RLU+"),
        auxiliary=loader(auxiliary, batch_size=16),
    )
    with_callback, rng_with = train(callback)
    without, rng_without = train(None)
    assert callback.last_result.step == 7
    for (name, value), expected in zip(
        with_callback.state_dict().items(), without.state_dict().values()
    ):
        assert torch.equal(value, expected), name
    assert torch.equal(rng_with, rng_without)


def test_auxiliary_attacks_follow_the_training_and_need_every_class(tmp_path):
    # Every input is one shared vector: each auxiliary sample is what every batch sample is,
    # so RLU's mean logits are the batch's own at every step and its counts are exact. Ten
    # per class: RLU leaves out its last batch of K, and every class keeps samples.
    data = labelled_data(num_samples=64)
    auxiliary = (data.tensors[0][:1].repeat(100, 1), torch.arange(10).repeat(10))
    callback = LabelLeakageCallback(attacks=("RLU", "LLBG", "RLU+"), auxiliary=auxiliary)
    _, logger = fit(callback, tmp_path, data=data, max_steps=3)
    logged = scalars(logger.log_dir)
    assert logged["leakage/RLU/Exact"] == [(0, 1.0), (1, 1.0), (2, 1.0)]
    assert {f"leakage/{a}/{m}" for a in ("LLBG", "RLU+") for m in COUNT_METRICS} <= set(logged)
    missing = LabelLeakageCallback(
        attacks=("RLU",), auxiliary=(torch.randn(9, 12), torch.arange(9))
    )
    with pytest.raises(UserError, match=r"^the auxiliary data has no sample of 1 class\(es\): 9; "):
        fit(missing, tmp_path / "missing", max_steps=1)


def test_accumulated_micro_batches_are_scored_as_one_batch(tmp_path):
    callback = LabelLeakageCallback()
    data = labelled_data(num_samples=48)
    _, logger = fit(
        callback, tmp_path, data=data, batch_size=8, accumulate_grad_batches=2, max_steps=3
    )
    # Step 2 applies the gradient of micro-batches 4 and 5: samples 32..47, K = 16.
    result = callback.last_result
    assert result.step == 2 and result.num_images == 16
    assert torch.equal(result.true_counts, torch.bincount(data.tensors[1][32:48], minlength=10))
    logged = scalars(logger.log_dir)
    for metric in COUNT_METRICS:
        assert logged[f"leakage/iLRG/{metric}"] == [(0, 1.0), (1, 1.0), (2, 1.0)]


def test_attacks_that_find_only_presence_log_only_leacc(tmp_path):
    callback = LabelLeakageCallback(attack_every_n_steps=3, attacks=("iLRG", "GI"))
    _, logger = fit(callback, tmp_path, max_steps=4)
    tags = {tag for tag in scalars(logger.log_dir) if tag.startswith("leakage/")}
    assert tags == {f"leakage/iLRG/{metric}" for metric in COUNT_METRICS} | {"leakage/GI/LeAcc"}
    assert [step for step, _ in scalars(logger.log_dir)["leakage/GI/LeAcc"]] == [0, 3]


def test_every_logger_gets_the_values(tmp_path):
    callback = LabelLeakageCallback(attack_every_n_steps=2)
    csv_logger = CSVLogger(str(tmp_path), name="", version="csv")
    trainer = cpu_trainer(
        logger=[tensorboard_logger(tmp_path), csv_logger], callbacks=[callback], max_steps=3
    )
    trainer.fit(TinyClassifier(), loader(labelled_data()))
    with open(Path(csv_logger.log_dir) / "metrics.csv") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("leakage/iLRG/LnAcc")]
    assert [(int(row["step"]), float(row["leakage/iLRG/LnAcc"])) for row in rows] == [
        (0, 1.0),
        (2, 1.0),
    ]


class TwoHeads(TinyClassifier):
    """The loss uses ``head``; ``probe``, registered last, is an unused linear layer."""

    def __init__(self, probe_outputs=10):
        super().__init__()
        self.head = nn.Linear(10, 10)
        self.probe = nn.Linear(10, probe_outputs)

    def forward(self, x):
        return self.head(torch.relu(self.net(x)))


def test_the_layer_can_be_named(tmp_path):
    callback = LabelLeakageCallback(layer_name="head")
    fit(callback, tmp_path, model=TwoHeads(), max_steps=2)
    assert callback.layer_name == "head"
    assert callback.last_result.step == 1


def test_a_layer_without_gradient_warns_and_is_not_attacked(tmp_path):
    callback = LabelLeakageCallback()  # finds ``probe``, the last nn.Linear
    with pytest.warns(UserWarning, match="'probe' has no gradient"):
        _, logger = fit(callback, tmp_path, model=TwoHeads(), max_steps=2)
    assert callback.layer_name == "probe"
    assert callback.last_result is None
    assert not any(tag.startswith("leakage") for tag in scalars(logger.log_dir))


def test_labels_outside_the_layer_outputs_are_a_user_error(tmp_path):
    with pytest.raises(
        UserError, match=r"labels are not classes of the attacked layer 'probe' \(3 outputs\)"
    ):
        fit(LabelLeakageCallback(), tmp_path, model=TwoHeads(probe_outputs=3), max_steps=1)


@pytest.mark.parametrize(
    ("model", "layer_name", "message"),
    [
        (TinyClassifier(bias=False), None, "has no bias"),
        (TinyClassifier(), "net.1", "no nn.Linear layer named 'net.1'"),
        (TinyClassifier(), "nowhere", "no nn.Linear layer named 'nowhere'"),
    ],
)
def test_a_layer_that_cannot_be_attacked_is_a_user_error(tmp_path, model, layer_name, message):
    with pytest.raises(UserError, match=message):
        fit(LabelLeakageCallback(layer_name=layer_name), tmp_path, model=model, max_steps=1)


def test_a_frozen_layer_is_a_user_error(tmp_path):
    model = TinyClassifier()
    model.net[3].requires_grad_(False)
    with pytest.raises(UserError, match="frozen"):
        fit(LabelLeakageCallback(), tmp_path, model=model, max_steps=1)


class OverflowingGradients(TinyClassifier):
    def on_after_backward(self):
        self.net[3].weight.grad[0, 0] = float("inf")


def test_a_non_finite_gradient_is_not_attacked(tmp_path):
    callback = LabelLeakageCallback()
    _, logger = fit(callback, tmp_path, model=OverflowingGradients(), max_steps=2)
    assert callback.last_result is None
    assert not any(tag.startswith("leakage") for tag in scalars(logger.log_dir))


class UnlabelledBatches(TinyClassifier):
    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self(x).logsumexp(dim=1).mean()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (TensorDataset(torch.randn(32, 12)), r"needs \(x, y\) batches"),
        (TensorDataset(torch.randn(32, 12), torch.rand(32, 10)), "1-d integer tensor"),
    ],
)
def test_batches_without_class_labels_are_a_user_error(tmp_path, data, message):
    with pytest.raises(UserError, match=message):
        fit(LabelLeakageCallback(), tmp_path, model=UnlabelledBatches(), data=data, max_steps=1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"attack_every_n_steps": 0}, "must be >= 1"),
        ({"attack_every_n_steps": 2.0}, "must be an integer"),
        ({"attacks": ("iLRG", "nope")}, "unknown attack 'nope'; valid attacks: .*iLRG"),
        ({"attacks": ()}, "at least one attack"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        LabelLeakageCallback(**options)


def test_steps_that_are_not_attacked_do_not_touch_the_batch():
    callback = LabelLeakageCallback(attack_every_n_steps=2)
    trainer = SimpleNamespace(global_step=1)
    # Not a valid batch: reading it would raise, and on a GPU even a count would be device work.
    callback.on_train_batch_start(trainer, None, {"not": "a batch"}, 0)
    callback.on_before_optimizer_step(trainer, None, None)
    assert callback._counts is None


def test_bf16_mixed_precision_is_attacked(tmp_path):
    callback = LabelLeakageCallback()
    try:
        _, logger = fit(callback, tmp_path, precision="bf16-mixed", max_steps=2)
    except (RuntimeError, ValueError) as error:  # a CPU without bf16 autocast
        pytest.skip(f"bf16-mixed not supported here: {error}")
    logged = scalars(logger.log_dir)
    assert [step for step, _ in logged["leakage/iLRG/LeAcc"]] == [0, 1]
    assert all(0.0 <= value <= 1.0 for _, value in logged["leakage/iLRG/IRec"])
    assert callback.last_result.num_images == 16


@pytest.mark.slow
def test_ddp_attacks_the_global_batch_once(tmp_path):
    script = Path(__file__).with_name("ddp_leakage_script.py")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    record = json.loads((tmp_path / "record.json").read_text())
    steps = record["steps"]
    batch_size, world_size = record["batch_size"], record["world_size"]
    assert world_size == 2
    assert [entry["step"] for entry in steps] == [0, 1, 2, 3]
    for entry in steps:
        # The counts scored against are both ranks' labels, gathered independently by the script...
        assert entry["true_counts"] == entry["global_counts"]
        assert entry["num_images"] == world_size * batch_size
        # ...and the ranks saw different batches, so local counts would not do.
        assert entry["rank_counts"][0] != entry["rank_counts"][1]
        # Exact data: iLRG restores the global counts only from the all-reduced gradient.
        assert entry["restored"] == entry["global_counts"]
    logged = scalars(tmp_path / "tb")
    for metric in COUNT_METRICS:
        assert logged[f"leakage/iLRG/{metric}"] == [(step, 1.0) for step in range(4)]
        assert logged[f"leakage_epoch/iLRG/{metric}"] == [(4, 1.0)]
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    assert all(not math.isnan(value) for values in logged.values() for _, value in values)


def test_decompose_in_the_callback_tells_the_training_batch_apart(tmp_path):
    # K = 8 < C = 10, 64 ReLU units and inputs that differ (each sample its own pattern of
    # active units): the classifier's own gradient separates every sample of the real
    # training step.
    pl.seed_everything(0, verbose=False)
    callback = LabelLeakageCallback(attacks=("decompose",))
    data = labelled_data(num_samples=48, noise=3.0)
    fit(callback, tmp_path, model=TinyClassifier(dim=64), data=data, batch_size=8, max_steps=3)
    result = callback.last_result
    restoration = result.restorations["decompose"]
    assert result.step == 2 and restoration.separated == 8
    assert torch.equal(restoration.counts.cpu(), result.true_counts)
    assert result.values["leakage/decompose/Exact"] == 1.0
