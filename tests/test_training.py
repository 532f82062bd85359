"""The victim LightningModule, train.py's stage checkpoints, safe loading and resuming."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import train
from lightning_modules import VictimClassifier
from lightning_modules.checkpoints import load_victim, read_checkpoint
from lightning_modules.classifier import lr_factor
from tests.conftest import REPO
from user_errors import CheckpointError, UserError

MNIST_ARGS = ["--dataset", "MNIST_GRAY", "--train_partition", "val"]


def train_in_process(tmp_path, *args) -> list[str]:
    """Run train.py's main; returns the checkpoint names in <tmp_path>/ckpt."""
    argv = [
        "--model_path",
        str(tmp_path / "ckpt"),
        "--log_dir",
        str(tmp_path / "logs"),
        "--quiet",
        *args,
    ]
    assert train.main(argv) == 0
    return sorted(path.name for path in (tmp_path / "ckpt").glob("*.ckpt"))


def weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# --- the LightningModule ----------------------------------------------------------------------


def test_classifier_steps_and_plain_hyperparameters():
    torch.manual_seed(0)
    module = VictimClassifier(model="dnn", num_classes=10, input_shape=(1, 28, 28), n_dim=32)
    images, labels = torch.randn(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 5])
    assert module(images).shape == (6, 10)
    assert module.network.classifier.out_features == 10 and module.network.embedding_dim == 32
    loss = module.training_step((images, labels), 0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    module.validation_step((images, labels), 0)
    assert 0.0 <= float(module.val_acc.compute()) <= 1.0
    # Plain values only: YAML-safe, and input_shape kept as a list.
    hparams = dict(module.hparams)
    assert yaml.safe_load(yaml.safe_dump(hparams)) == hparams
    assert hparams["input_shape"] == [1, 28, 28]


def test_optimizers_follow_the_original_code():
    sgd = VictimClassifier(n_dim=8, schedule_length=8).configure_optimizers()["optimizer"]
    group = sgd.param_groups[0]
    assert isinstance(sgd, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (
        0.1,
        0.9,
        True,
        5e-4,
    )
    adamw = VictimClassifier(
        n_dim=8, optimizer="AdamW", lr=1e-3, schedule_length=8
    ).configure_optimizers()
    assert isinstance(adamw["optimizer"], torch.optim.AdamW)
    assert adamw["lr_scheduler"]["interval"] == "epoch"
    assert (
        VictimClassifier(n_dim=8, schedule_unit="step", schedule_length=8).configure_optimizers()[
            "lr_scheduler"
        ]["interval"]
        == "step"
    )
    with pytest.raises(UserError, match="unknown optimizer 'Adam'; valid: SGD, AdamW"):
        VictimClassifier(optimizer="Adam")


def test_linear_schedule_decays_at_three_five_seven_eighths():
    factors = [lr_factor(epoch, 100, "linear", False) for epoch in range(100)]
    assert factors[36] == 1.0 and factors[37] == pytest.approx(0.1)
    assert factors[61] == pytest.approx(0.1) and factors[62] == pytest.approx(0.01)
    assert factors[86] == pytest.approx(0.01) and factors[87] == pytest.approx(0.001)
    assert all(lr_factor(step, 100, "none", False) == 1.0 for step in range(100))
    warm = [lr_factor(step, 100, "none", True) for step in range(12)]
    assert (
        warm[0] == pytest.approx(0.1) and warm[5] == pytest.approx(0.55) and warm[10:] == [1.0, 1.0]
    )


# --- train.py --------------------------------------------------------------------------------


def test_train_py_saves_iteration_stages_on_synthetic_data(tmp_path):
    """Through a subprocess, as a user runs it: stage 0, every 2 steps, and always the end."""
    cmd = [sys.executable, "train.py", "--dataset", "SYNTH_MNIST", "--iter_train", "--iters", "5"]
    cmd += ["--mid_save", "--iter_interval", "2", "--batch_size", "16", "--n_dim", "32"]
    cmd += ["--model_path", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "logs")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == [f"dnn_SYNTH_MNIST_Iter{n}.ckpt" for n in (0, 2, 4, 5)]
    assert "Epoch 0" in proc.stderr  # the progress bar, on stderr
    for name in names:
        checkpoint = read_checkpoint(
            tmp_path / "ckpt" / name
        )  # weights-only, with loops and callbacks
        assert checkpoint["global_step"] == int(name.split("Iter")[1].split(".")[0])
        assert checkpoint["hyper_parameters"]["schedule_unit"] == "step"
    assert "SYNTHETIC" in proc.stderr
    assert proc.stdout == ""  # the progress bar and the logs go to stderr


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory, shared_data):
    """Three epochs of FCN-3 on a seeded partition of the real MNIST test split."""
    root = tmp_path_factory.mktemp("mnist_run")
    names = train_in_process(
        root,
        *MNIST_ARGS,
        *("--data_root", str(shared_data), "--val_fraction", "0.8", "--batch_size", "250"),
        *("--n_dim", "64", "--epochs", "3", "--mid_save", "--epoch_interval", "2"),
    )
    return root, names


def test_epoch_stages_count_completed_epochs(mnist_run):
    root, names = mnist_run
    assert names == [f"dnn_MNIST_GRAY_Epoch{n}.ckpt" for n in (0, 2, 3)]
    steps_per_epoch = 8  # 2000 training images in batches of 250
    for n in (0, 2, 3):
        assert (
            read_checkpoint(root / "ckpt" / f"dnn_MNIST_GRAY_Epoch{n}.ckpt")["global_step"]
            == n * steps_per_epoch
        )
    assert not torch.equal(
        weights(root / "ckpt" / names[0])["network.classifier.weight"],
        weights(root / "ckpt" / names[2])["network.classifier.weight"],
    )


def test_checkpoint_rebuilds_the_network_alone(mnist_run):
    root, _ = mnist_run
    path = root / "ckpt" / "dnn_MNIST_GRAY_Epoch3.ckpt"
    lightning = VictimClassifier.load_from_checkpoint(path, map_location="cpu").eval()
    safe, hparams = load_victim(path)
    assert (
        hparams["model"] == "dnn" and hparams["n_dim"] == 64 and hparams["dataset"] == "MNIST_GRAY"
    )
    saved = weights(path)
    for name, tensor in safe.state_dict().items():
        assert torch.equal(tensor, saved[name]) and torch.equal(
            tensor, lightning.state_dict()[name]
        )
    images = torch.randn(5, 1, 28, 28)
    assert torch.equal(safe(images), lightning(images))
    assert not safe.training


def test_tensorboard_holds_train_and_val_curves(mnist_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _ = mnist_run
    (run,) = (root / "logs" / "train").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss_epoch", "train/acc_epoch", "val/loss", "val/acc"} <= tags
    assert len(events.Scalars("val/acc")) == 3
    assert events.Scalars("val/acc")[-1].value > 0.5  # it learns


def test_resume_ends_with_the_same_checkpoints_and_weights(mnist_run, tmp_path, shared_data):
    root, names = mnist_run
    (tmp_path / "ckpt").mkdir()
    middle = tmp_path / "ckpt" / "dnn_MNIST_GRAY_Epoch2.ckpt"
    shutil.copy(root / "ckpt" / middle.name, middle)
    resumed = train_in_process(
        tmp_path,
        *MNIST_ARGS,
        *("--data_root", str(shared_data), "--val_fraction", "0.8", "--batch_size", "250"),
        *(
            "--n_dim",
            "64",
            "--epochs",
            "3",
            "--mid_save",
            "--epoch_interval",
            "2",
            "--resume",
            str(middle),
        ),
    )
    assert resumed == names[1:]  # nothing before the resumed stage is redone
    final, reference = weights(tmp_path / "ckpt" / names[-1]), weights(root / "ckpt" / names[-1])
    assert all(torch.equal(final[name], reference[name]) for name in reference)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "vgg16"],
            "model 'vgg16' needs 3xSxS (S a multiple of 32) input, dataset gives 1x28x28",
        ),
        (["--dataset", "MNIST_GRAY", "--data_root", "/nonexistent"], "MNIST train split not found"),
        (["--silu"], "option --silu applies to lenet5 only"),
        (["--resume", "/nonexistent.ckpt"], "checkpoint /nonexistent.ckpt not found"),
        (["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
        (["--attack_every_n_steps", "-1"], "argument --attack_every_n_steps: must be >= 0, got -1"),
        (
            ["--model", "lenet5", "--batchnorm", "--dp_noise_multiplier", "1"],
            "DP-SGD cannot train this model: BatchNorm cannot support training with differential "
            "privacy (batch norm mixes the samples of a batch; train and attack a model without "
            "--batchnorm, or replace it with GroupNorm through opacus.validators.ModuleValidator.fix)",
        ),
        (
            ["--dp_noise_multiplier", "1", "--dp_target_epsilon", "3"],
            "give --dp_target_epsilon or --dp_noise_multiplier, not both",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    argv = ["--model_path", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "logs"), *args]
    try:
        code = train.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("train.py: error: ") and message in lines[0], (
        lines
    )
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "logs").exists()


def test_dp_sgd_training_spends_the_epsilon_asked_for(tmp_path):
    """train.py --dp_target_epsilon: Opacus trains the victim; every stage checkpoint records
    the epsilon spent so far (each sample in one step per epoch begun) and loads as any other."""
    cmd = [sys.executable, "train.py", "--dataset", "SYNTH_MNIST", "--iter_train", "--iters", "4"]
    cmd += ["--mid_save", "--iter_interval", "2", "--batch_size", "16", "--n_dim", "32"]
    cmd += ["--dp_target_epsilon", "3", "--dp_max_grad_norm", "0.5"]
    cmd += ["--model_path", str(tmp_path / "ckpt"), "--log_dir", str(tmp_path / "logs"), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = {
        n: read_checkpoint(tmp_path / "ckpt" / f"dnn_SYNTH_MNIST_Iter{n}.ckpt") for n in (0, 2, 4)
    }
    assert records[0]["privacy"]["epsilon"] == 0.0
    for n in (2, 4):
        privacy = records[n]["privacy"]
        assert privacy["steps_per_sample"] == 1 and 2.97 <= privacy["epsilon"] <= 3.0
        assert privacy["max_grad_norm"] == 0.5
        assert records[n]["hyper_parameters"]["dp_noise_multiplier"] == privacy["noise_multiplier"]
    # the weights moved, and the checkpoint keeps the plain network's parameter names
    before, after = records[0]["state_dict"], records[4]["state_dict"]
    assert set(before) == set(after) and "network.classifier.weight" in after
    assert not torch.equal(before["network.classifier.weight"], after["network.classifier.weight"])


def test_resume_refuses_a_checkpoint_of_other_options(mnist_run, tmp_path, capsys, shared_data):
    root, _ = mnist_run
    argv = [
        *MNIST_ARGS,
        "--data_root",
        str(shared_data),
        "--n_dim",
        "64",
        "--epochs",
        "3",
        "--lr",
        "0.05",
    ]
    argv += [
        "--resume",
        str(root / "ckpt" / "dnn_MNIST_GRAY_Epoch2.ckpt"),
        "--model_path",
        str(tmp_path),
    ]
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("was saved by a run with other options: --lr 0.1 (this run: 0.05)"), err


def test_dryrun_runs_one_batch_and_writes_nothing(tmp_path):
    argv = [
        "--dryrun",
        "--batch_size",
        "8",
        "--n_dim",
        "16",
        "--model_path",
        str(tmp_path / "ckpt"),
    ]
    assert train.main([*argv, "--log_dir", str(tmp_path / "logs"), "--quiet"]) == 0
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())


@pytest.mark.slow
def test_cpu_ddp_saves_the_same_stages(tmp_path):
    """Two CPU processes (DDP over gloo): rank 0 writes every stage once."""
    cmd = [
        sys.executable,
        "train.py",
        "--accelerator",
        "cpu",
        "--devices",
        "2",
        "--strategy",
        "ddp",
    ]
    cmd += [
        "--iter_train",
        "--iters",
        "4",
        "--mid_save",
        "--iter_interval",
        "2",
        "--batch_size",
        "16",
    ]
    cmd += [
        "--n_dim",
        "32",
        "--model_path",
        str(tmp_path / "ckpt"),
        "--log_dir",
        str(tmp_path / "logs"),
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == [f"dnn_SYNTH_MNIST_Iter{n}.ckpt" for n in (0, 2, 4)]
    assert read_checkpoint(tmp_path / "ckpt" / names[-1])["global_step"] == 4


# --- safe loading ----------------------------------------------------------------------------


@pytest.fixture
def good_checkpoint(tmp_path):
    torch.manual_seed(0)
    module = VictimClassifier(n_dim=16, dataset="SYNTH_MNIST")
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    path = tmp_path / "good.ckpt"
    torch.save(checkpoint, path)
    return path, checkpoint


class Payload:
    """Stands for code a malicious checkpoint would run when unpickled."""


def test_load_victim_maps_every_bad_file_to_one_line(tmp_path, good_checkpoint):
    path, checkpoint = good_checkpoint
    module, hparams = load_victim(path)
    assert hparams["n_dim"] == 16 and module.network.embedding_dim == 16

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(path.read_bytes()[:200])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint\n")
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({**checkpoint, "extra": Payload()}, unsafe)
    bare = tmp_path / "bare.ckpt"
    torch.save({"state_dict": checkpoint["state_dict"]}, bare)
    other = tmp_path / "other.ckpt"
    torch.save(
        {**checkpoint, "hyper_parameters": {**checkpoint["hyper_parameters"], "n_dim": 24}}, other
    )
    cases = {
        tmp_path / "missing.ckpt": "not found",
        truncated: "is not a torch checkpoint or is truncated",
        text: "is not a torch checkpoint or is truncated",
        unsafe: "refused: loading it would run code it brings along "
        f"(unsupported global {Payload.__module__}.Payload)",
        bare: "has no hyper_parameters to rebuild its network from",
        other: "its weights do not fit a dnn with its own hyper_parameters (size mismatch for network.features.1.weight",
    }
    for bad, message in cases.items():
        with pytest.raises(CheckpointError) as caught:
            load_victim(bad)
        text_of_error = str(caught.value)
        assert (
            "\n" not in text_of_error and str(bad) in text_of_error and message in text_of_error
        ), text_of_error


def test_train_and_attack_share_network_option_defaults():
    from experiment.cli import build_parser as attack_parser
    from experiment.train_cli import build_parser as train_parser

    train_defaults, attack_defaults = (
        vars(train_parser().parse_args([])),
        vars(attack_parser().parse_args([])),
    )
    from experiment.victims import CHECKPOINT_OPTIONS

    for option in CHECKPOINT_OPTIONS:
        assert train_defaults[option] == attack_defaults[option], option
    for option in ("epochs", "iters", "model_path", "iter_train", "seed", "data_root"):
        assert train_defaults[option] == attack_defaults[option], option


def test_presets_are_valid_configs():
    from experiment.cli import build_parser as attack_parser
    from experiment.options import load_config
    from experiment.train_cli import build_parser as train_parser

    presets = sorted((REPO / "configs" / "train_stage").glob("*.yaml"))
    assert [p.name for p in presets] == [
        "attack_cifar100_vgg16.yaml",
        "attack_mnist_fcn3.yaml",
        "train_cifar100_vgg16.yaml",
        "train_mnist_fcn3.yaml",
    ]
    for preset in presets:
        parser = (attack_parser if preset.name.startswith("attack") else train_parser)()
        assert load_config(parser, str(preset))
    mnist = load_config(train_parser(), str(REPO / "configs/train_stage/train_mnist_fcn3.yaml"))
    assert mnist == {
        "dataset": "MNIST_GRAY",
        "model": "dnn",
        "iter_train": True,
        "iters": 1000,
        "mid_save": True,
        "iter_interval": 100,
    }
    assert (
        Path(
            load_config(attack_parser(), str(REPO / "configs/train_stage/attack_mnist_fcn3.yaml"))[
                "checkpoints"
            ]
        ).name
        == "dnn_MNIST_GRAY_Iter*.ckpt"
    )
