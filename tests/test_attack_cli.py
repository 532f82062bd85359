"""attack.py end to end, through a subprocess, as a user runs it."""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import COMPARED_METHODS, COUNT_METRICS, exit_code


def run_attack(tmp_path, *args, check=True):
    results = tmp_path / "results.json"
    cmd = [
        sys.executable,
        "attack.py",
        "--log_dir",
        str(tmp_path / "logs"),
        "--results",
        str(results),
        "--quiet",
        *args,
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(results.read_text()), proc
    return None, proc


def test_default_run_is_the_first_experiment_on_synthetic_mnist(tmp_path):
    results, proc = run_attack(tmp_path, "--num_tries", "5")
    assert "SYNTHETIC" in proc.stderr + proc.stdout
    assert results["status"] == "complete"
    assert results["data"] == {
        "dataset": "SYNTH_MNIST",
        "synthetic": True,
        "source": results["data"]["source"],
        "num_classes": 10,
    }
    assert results["config"]["model"] == "dnn" and results["config"]["num_images"] == 24
    assert list(results["summary"]) == COMPARED_METHODS
    assert set(results["summary"]["iLRG"]) == set(COUNT_METRICS)
    assert set(results["summary"]["GI"]) == {"LeAcc"}
    assert len(results["tries"]) == 5
    first = results["tries"][0]
    assert len(first["true_counts"]) == 10 and sum(first["true_counts"]) == 24
    assert set(first["methods"]["iLRG"]) == {"counts"} and set(first["methods"]["GI"]) == {
        "present"
    }
    run_dirs = sorted((tmp_path / "logs" / "Experiment1").iterdir())
    assert [d.name for d in run_dirs] == ["version_0"]
    files = {p.name for p in run_dirs[0].iterdir()}
    assert {"results.json", "run.log"} <= files
    assert any(name.startswith("events.out.tfevents") for name in files)
    assert json.loads((run_dirs[0] / "results.json").read_text()) == results


def test_runs_never_overwrite_each_other(tmp_path):
    import attack

    argv = ["--num_tries", "1", "--exp_name", "again", "--quiet", "--no-compare"]
    argv += ["--log_dir", str(tmp_path / "logs")]
    assert attack.main(argv) == 0 and attack.main(argv) == 0  # in process: the folders matter
    assert sorted(d.name for d in (tmp_path / "logs" / "again").iterdir()) == [
        "version_0",
        "version_1",
    ]


@pytest.mark.slow
def test_fcn3_on_real_mnist_reproduces_experiment_1(tmp_path, shared_data):
    results, _ = run_attack(
        tmp_path,
        *("--dataset", "MNIST_GRAY", "--data_root", str(shared_data), "--split", "val"),
        *("--model", "dnn", "--num_images", "24", "--num_tries", "50", "--compare", "--seed", "0"),
    )
    summary = results["summary"]
    assert results["data"]["synthetic"] is False
    assert summary["iLRG"]["LeAcc"] >= 0.99
    assert summary["iLRG"]["LnAcc"] >= 0.95
    assert summary["GI"]["LeAcc"] >= 0.95
    assert 0.35 <= summary["iDLG"]["LeAcc"] <= 0.7
    assert summary["RLG"]["LeAcc"] >= 0.8


@pytest.mark.slow
@pytest.mark.parametrize("silu", [False, True])
def test_lenet5_on_real_cifar100(tmp_path, shared_data, silu):
    results, _ = run_attack(
        tmp_path,
        *("--dataset", "CIFAR100", "--data_root", str(shared_data), "--split", "val"),
        *("--model", "lenet5", "--num_images", "24", "--num_tries", "20", "--compare"),
        # With SiLU the sign of an embedding's sum, which iDLG relies on, is set by the random
        # init: over seeds 0-3 and 12 iDLG scored 0.24-1.0. Seed 2 is a draw where it fails, as
        # in the paper (0.150); GI and iLRG do not depend on the draw.
        *(["--silu", "--seed", "2"] if silu else []),
    )
    summary = results["summary"]
    assert summary["iLRG"]["LeAcc"] == 1.0 and summary["iLRG"]["LnAcc"] == 1.0
    if silu:
        assert summary["iDLG"]["LeAcc"] < 0.3 and summary["GI"]["LeAcc"] < 0.3


@pytest.mark.slow
def test_lenet5_large_batch_on_real_cifar100(tmp_path, shared_data):
    common = (
        *(
            "--dataset",
            "CIFAR100",
            "--data_root",
            str(shared_data),
            "--split",
            "val",
            "--no-compare",
        ),
        *("--model", "lenet5", "--num_images", "1024", "--num_tries", "5", "--max_size", "256"),
    )
    results, _ = run_attack(tmp_path, *common)
    assert results["summary"]["iLRG"]["LeAcc"] >= 0.99
    assert results["summary"]["iLRG"]["LnAcc"] >= 0.8
    # Without the guard on blown-up class embeddings (the method as published) counts suffer:
    # measured LnAcc 0.918 and Exact 0 against 1.000 and 1.0 with it (0.678 on the batches
    # the seed gave before issue 24).
    unguarded, _ = run_attack(tmp_path, *common, "--norm_guard", "0")
    assert unguarded["summary"]["iLRG"]["LnAcc"] < results["summary"]["iLRG"]["LnAcc"] - 0.05
    assert unguarded["summary"]["iLRG"]["Exact"] < results["summary"]["iLRG"]["Exact"]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["resnet50", "vgg16"])
def test_imagenet_sample(tmp_path, shared_data, model):
    results, _ = run_attack(
        tmp_path,
        *(
            "--dataset",
            "ImageNet",
            "--imagenet_dir",
            str(shared_data / "imagenet-sample"),
            "--split",
            "val",
        ),
        # VGG-16's forward and backward pass on 24 images of 224 x 224 is most of the time: one
        # batch shows it as well as two.
        *(
            "--model",
            model,
            "--num_images",
            "24",
            "--num_tries",
            "2" if model == "resnet50" else "1",
        ),
    )
    assert results["summary"]["iLRG"] == {
        "LeAcc": 1.0,
        "LnAcc": 1.0,
        "LnAcc+": 1.0,
        "IRec": 1.0,
        "Exact": 1.0,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "alexnet"], "unknown model 'alexnet'; valid models: dnn, lenet5,"),
        (["--dataset", "SVHN"], "unknown dataset 'SVHN'; valid datasets:"),
        (["--distribution", "zipf"], "unknown batch distribution 'zipf'; valid: random, random2,"),
        (["--attacks", "DLG"], "unknown attack 'DLG'; valid attacks:"),
        (["--dataset", "SYNTH_CIFAR100"], "model 'dnn' needs 1x28x28 input, dataset gives 3x32x32"),
        (["--num_images", "0"], "argument --num_images: must be >= 1, got 0"),
        (
            ["--distribution", "unique"],
            "distribution 'unique' needs one class per image: 24 images but only 10 classes",
        ),
        (["--dataset", "MNIST_GRAY", "--data_root", "/nonexistent"], "MNIST train split not found"),
        (["--silu"], "option --silu applies to lenet5 only"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    # In process (the entry point's main, as the console script runs it): the subprocess
    # cases of tests/test_usability.py cover the interpreter around it.
    import attack

    argv = ["--log_dir", str(tmp_path / "logs"), "--results", str(tmp_path / "results.json")]
    assert exit_code(attack.main, [*argv, "--quiet", *args]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("attack.py: error: ")
    assert message in lines[0]
    assert not (tmp_path / "logs").exists()
    assert not (tmp_path / "results.json").exists()


def test_config_file_presets_and_flags_win(tmp_path):
    config = tmp_path / "preset.yaml"
    config.write_text("num_tries: 2\nnum_images: 8\nexp_name: from_yaml\n")
    results, _ = run_attack(tmp_path, "--config", str(config), "--num_images", "4")
    assert results["config"]["num_tries"] == 2 and results["config"]["num_images"] == 4
    assert (tmp_path / "logs" / "from_yaml").is_dir()
    config.write_text("num_trie: 2\n")
    _, proc = run_attack(tmp_path, "--config", str(config), check=False)
    assert proc.returncode == 2 and "unknown option 'num_trie'" in proc.stderr


def test_results_record_the_partition_actually_used(tmp_path):
    """--split fit_train: the partition a checkpoint recorded (or none, said in the log)."""
    results = tmp_path / "r.json"
    proc = subprocess.run(
        [sys.executable, "attack.py", "--split", "fit_train", "--num_tries", "1", "--no-compare",
         "--quiet", "--log_dir", str(tmp_path), "--results", str(results)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(results.read_text())["view"] == {
        "split": "fit_train",
        "partition": None,
        "samples": 60000,
    }
    assert (
        "--split fit_train: no partition recorded or given, so the whole train split" in proc.stderr
    )
