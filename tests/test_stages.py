"""attack.py on saved checkpoints: one stage, a sweep over stages, and the errors in between."""

import json
import subprocess
import sys

import pytest
import torch

import attack
import train
from tests.conftest import REPO
from tests.helpers import COMPARED_METHODS, COUNT_METRICS

STAGES = (0, 2, 4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny training run on synthetic MNIST with checkpoints after 0, 2 and 4 iterations,
    attacked by the label-leakage callback every 2 steps."""
    root = tmp_path_factory.mktemp("stage_run")
    argv = [
        "--iter_train",
        "--iters",
        "4",
        "--mid_save",
        "--iter_interval",
        "2",
        "--batch_size",
        "16",
        "--attack_every_n_steps",
        "2",
    ]
    argv += [
        "--n_dim",
        "32",
        "--model_path",
        str(root / "ckpt"),
        "--log_dir",
        str(root / "logs"),
        "--quiet",
    ]
    assert train.main(argv) == 0
    assert sorted(p.name for p in (root / "ckpt").iterdir()) == sorted(
        f"dnn_SYNTH_MNIST_Iter{n}.ckpt" for n in STAGES
    )
    return root


def attack_in_process(tmp_path, capsys, *args):
    """attack.py's main; returns (exit code, results or None, stderr)."""
    results = tmp_path / "results.json"
    argv = ["--log_dir", str(tmp_path / "logs"), "--results", str(results), "--quiet", *args]
    try:
        code = attack.main(argv)
    except SystemExit as exit:  # argparse's own errors
        code = exit.code
    err = capsys.readouterr().err
    return code, (json.loads(results.read_text()) if results.exists() else None), err


def one_line_error(code, err, message):
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("attack.py: error: "), err
    assert message in lines[0], lines[0]
    return lines[0]


def test_sweep_writes_table_json_png_and_tensorboard(run_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    pattern = str(run_dir / "ckpt" / "dnn_SYNTH_MNIST_Iter*.ckpt")
    cmd = [
        sys.executable,
        "attack.py",
        "--checkpoints",
        pattern,
        "--num_images",
        "8",
        "--num_tries",
        "3",
    ]
    cmd += [
        "--log_dir",
        str(tmp_path / "logs"),
        "--exp_name",
        "sweep",
        "--results",
        str(tmp_path / "r.json"),
        "--quiet",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (folder,) = (tmp_path / "logs" / "sweep").iterdir()
    summary = json.loads((folder / "stages.json").read_text())
    assert json.loads((tmp_path / "r.json").read_text()) == summary
    assert set(summary) == {
        "status",
        "unit",
        "stages",
        "pending",
        "methods",
        "data",
        "model",
        "local_training",
        "config",
        "results",
    }
    assert summary["local_training"] is None  # FedSGD: one gradient per batch
    assert summary["status"] == "complete" and summary["unit"] == "iteration"
    assert summary["stages"] == list(STAGES) and summary["pending"] == []
    assert summary["methods"] == COMPARED_METHODS
    assert [r["label"] for r in summary["results"]] == [f"Iter{n}" for n in STAGES]
    assert set(summary["results"][0]["summary"]["iLRG"]) == set(COUNT_METRICS)

    # stdout: one line saying what ran and one table, stage x method, its columns aligned;
    # each stage's own table goes to run.log only.
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == f"dnn on SYNTH_MNIST, {len(STAGES)} stages of {pattern}"
    assert lines[1].startswith("stage     method")
    rows = [line.split()[:2] for line in lines[3:]]
    methods = summary["methods"]
    assert rows[: len(methods)] == [["Iter0", m] for m in methods]
    assert rows[-1] == ["Iter4", "RLU+"] and len(rows) == len(methods) * len(STAGES)
    assert len({len(line) for line in lines[3:]}) == 1  # every row as wide: no column shifted
    assert "defense: none" not in proc.stdout + proc.stderr
    assert (folder / "run.log").read_text().count("defense: none") == len(STAGES)

    # The same batches at every stage, each stage attacking its own checkpoint.
    per_stage = [json.loads((folder / f"Iter{n}" / "results.json").read_text()) for n in STAGES]
    counts = [[t["true_counts"] for t in results["tries"]] for results in per_stage]
    assert counts[0] == counts[1] == counts[2]
    assert [r["victim"]["checkpoint"] for r in per_stage] == [
        str(run_dir / "ckpt" / f"dnn_SYNTH_MNIST_Iter{n}.ckpt") for n in STAGES
    ]
    assert per_stage[0]["config"]["n_dim"] == 32  # from the checkpoint, not attack.py's default

    assert (folder / "stages.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image

    width, height = Image.open(folder / "stages.png").size
    assert width <= 1600 and height <= 900  # panels in a grid, not one long row
    events = EventAccumulator(str(folder))
    events.Reload()
    scalars = events.Scalars("stage/iLRG/LnAcc")
    assert [s.step for s in scalars] == list(STAGES)
    expected = [r["summary"]["iLRG"]["LnAcc"] for r in summary["results"]]
    assert [s.value for s in scalars] == pytest.approx(expected)


def test_train_py_attaches_the_leakage_callback(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (version,) = (run_dir / "logs" / "train").iterdir()
    events = EventAccumulator(str(version))
    events.Reload()
    assert [s.step for s in events.Scalars("leakage/iLRG/LeAcc")] == [0, 2]


def test_trained_model_attacks_the_stage_checkpoint(run_dir, tmp_path, capsys):
    code, results, err = attack_in_process(
        tmp_path,
        capsys,
        *("--trained_model", "--iter_train", "--iters", "2", "--model_path", str(run_dir / "ckpt")),
        *("--num_images", "8", "--num_tries", "2", "--no-compare"),
    )
    assert code == 0, err
    victim = results["victim"]
    assert victim["checkpoint"] == str(run_dir / "ckpt" / "dnn_SYNTH_MNIST_Iter2.ckpt")
    assert (
        victim["stage"] == {"unit": "iteration", "value": 2}
        and victim["trained_on"] == "SYNTH_MNIST"
    )
    assert results["config"]["n_dim"] == 32


def test_missing_checkpoint_names_the_train_command(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = attack_in_process(
        tmp_path,
        capsys,
        "--trained_model",
        "--iter_train",
        "--iters",
        "100",
        "--dataset",
        "MNIST_GRAY",
        "--n_hidden",
        "2",
    )
    one_line_error(
        code,
        err,
        "checkpoint checkpoints/dnn_MNIST_GRAY_Iter100.ckpt not found; make it with: "
        "python train.py --dataset MNIST_GRAY --model dnn --n_hidden 2 --iter_train --iters 100",
    )
    code, _, err = attack_in_process(
        tmp_path, capsys, "--trained_model", "--epochs", "10", "--model_path", "runs"
    )
    one_line_error(
        code,
        err,
        "checkpoint runs/dnn_SYNTH_MNIST_Epoch10.ckpt not found; make it with: "
        "python train.py --dataset SYNTH_MNIST --model dnn --epochs 10 --model_path runs",
    )
    code, _, err = attack_in_process(
        tmp_path, capsys, "--checkpoints", "runs/dnn_MNIST_GRAY_Iter*.ckpt", "--data_root", "/data"
    )
    one_line_error(
        code,
        err,
        "no checkpoint matches runs/dnn_MNIST_GRAY_Iter*.ckpt; make the stages with: python train.py "
        "--dataset MNIST_GRAY --model dnn --iter_train --iters 1000 --model_path runs --data_root /data --mid_save",
    )
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--n_hidden", "2"],
            "--n_hidden 2 conflicts with the checkpoint {path} (which has n_hidden 1)",
        ),
        (
            ["--n_dim", "300"],
            "--n_dim 300 conflicts with the checkpoint {path} (which has n_dim 32)",
        ),
        (
            ["--model", "lenet5"],
            "--model lenet5 conflicts with the checkpoint {path} (which has model dnn)",
        ),
        (
            ["--dataset", "MNIST_GRAY"],
            "--dataset MNIST_GRAY conflicts with the checkpoint {path} (which has dataset SYNTH_MNIST)",
        ),
        (["--silu"], "--silu conflicts with the checkpoint {path} (which has silu false)"),
    ],
)
def test_an_option_that_contradicts_the_checkpoint_is_an_error(
    run_dir, tmp_path, capsys, args, message
):
    path = run_dir / "ckpt" / "dnn_SYNTH_MNIST_Iter2.ckpt"
    code, _, err = attack_in_process(tmp_path, capsys, "--checkpoint", str(path), *args)
    one_line_error(code, err, message.format(path=path))
    assert not (tmp_path / "logs").exists()


def test_contradiction_in_a_config_file_is_an_error(run_dir, tmp_path, capsys):
    path = run_dir / "ckpt" / "dnn_SYNTH_MNIST_Iter2.ckpt"
    config = tmp_path / "preset.yaml"
    config.write_text("model: dnn\nn_dim: 300\n")
    code, _, err = attack_in_process(
        tmp_path, capsys, "--config", str(config), "--checkpoint", str(path)
    )
    one_line_error(
        code, err, f"--n_dim 300 conflicts with the checkpoint {path} (which has n_dim 32)"
    )


def test_bad_checkpoints_are_one_line_errors(run_dir, tmp_path, capsys):
    good = torch.load(run_dir / "ckpt" / "dnn_SYNTH_MNIST_Iter2.ckpt", weights_only=True)
    other = tmp_path / "other.ckpt"
    torch.save({**good, "hyper_parameters": {**good["hyper_parameters"], "n_dim": 64}}, other)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes((run_dir / "ckpt" / "dnn_SYNTH_MNIST_Iter2.ckpt").read_bytes()[:1000])
    cases = [
        (
            ["--checkpoint", str(other)],
            f"checkpoint {other}: its weights do not fit a dnn with its own hyper_parameters",
        ),
        (
            ["--checkpoint", str(broken)],
            f"checkpoint {broken} is not a torch checkpoint or is truncated",
        ),
        (
            ["--checkpoints", str(tmp_path / "none_*.ckpt")],
            f"no checkpoint matches {tmp_path / 'none_*.ckpt'}",
        ),
        (["--checkpoints", str(tmp_path / "*.ckpt")], "is not a torch checkpoint or is truncated"),
        (
            ["--epochs", "5"],
            "--epochs, --iters and --iter_train choose the stage of --trained_model; add --trained_model",
        ),
        (
            ["--checkpoint", "a.ckpt", "--trained_model"],
            "argument --trained_model: not allowed with argument --checkpoint",
        ),
    ]
    for args, message in cases:
        code, _, err = attack_in_process(tmp_path, capsys, *args)
        line = one_line_error(code, err, message)
        if "truncated" in message:
            # torch's own reason, in whole sentences: it ends where a sentence ends
            assert line.endswith(".)") or line.endswith("...)"), line
    assert not (tmp_path / "logs").exists()


def test_a_sweep_needs_stages_of_one_network(run_dir, tmp_path, capsys):
    good = torch.load(run_dir / "ckpt" / "dnn_SYNTH_MNIST_Iter2.ckpt", weights_only=True)
    (tmp_path / "mixed").mkdir()
    torch.save(good, tmp_path / "mixed" / "dnn_SYNTH_MNIST_Iter2.ckpt")
    torch.save(good, tmp_path / "mixed" / "dnn_SYNTH_MNIST_Epoch1.ckpt")
    code, _, err = attack_in_process(
        tmp_path, capsys, "--checkpoints", str(tmp_path / "mixed" / "*.ckpt")
    )
    one_line_error(code, err, "matches both epoch and iteration stages; sweep one kind at a time")


@pytest.mark.slow
def test_sweep_over_two_ddp_processes_gives_the_one_process_sweep(run_dir, tmp_path):
    pattern = str(run_dir / "ckpt" / "dnn_SYNTH_MNIST_Iter*.ckpt")
    sweeps = {}
    for name, extra in (("one", []), ("two", ["--accelerator", "cpu", "--devices", "2"])):
        cmd = [sys.executable, "attack.py", "--checkpoints", pattern, "--num_images", "8"]
        cmd += ["--num_tries", "3", "--log_dir", str(tmp_path / "logs"), "--exp_name", name]
        cmd += ["--results", str(tmp_path / f"{name}.json"), "--quiet", *extra]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        (folder,) = (tmp_path / "logs" / name).iterdir()
        sweeps[name] = (json.loads((tmp_path / f"{name}.json").read_text()), folder)
    (one, one_dir), (two, two_dir) = sweeps["one"], sweeps["two"]
    assert two["stages"] == list(STAGES) and two["status"] == "complete"
    assert [r["summary"] for r in two["results"]] == [r["summary"] for r in one["results"]]
    assert [r["std"] for r in two["results"]] == [r["std"] for r in one["results"]]
    for stage in STAGES:
        label = f"Iter{stage}"
        first = json.loads((one_dir / label / "results.json").read_text())
        second = json.loads((two_dir / label / "results.json").read_text())
        assert second["processes"] == 2 and second["tries"] == first["tries"]
