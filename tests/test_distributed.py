"""attack.py's tries spread over two CPU processes (Lightning's ddp) give the one-process run.

Every try draws its randomness from (seed, try index): the ``random`` guesses, the dp
defense's noise and the FedAvg client's shuffles below all depend on it, so a try run
by the second process must equal the same try run alone.
"""

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

#: what may differ between the runs: how they ran, not what they found
HOW_IT_RAN = {"config", "seconds_per_try", "processes"}


def attack_process(tmp_path, name, *args):
    results = tmp_path / f"{name}.json"
    cmd = [sys.executable, "attack.py", *args, "--log_dir", str(tmp_path / "logs")]
    cmd += ["--exp_name", name, "--results", str(results), "--quiet"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text()), proc


@pytest.mark.slow
def test_two_ddp_processes_give_the_one_process_run_on_real_mnist(tmp_path, shared_data):
    # Real MNIST; every method (random included), dp noise and two local epochs of FedAvg:
    # the three per-try random streams.
    options = ["--dataset", "MNIST_GRAY", "--data_root", str(shared_data), "--split", "fit_train"]
    options += ["--train_partition", "val", "--num_images", "16", "--num_tries", "5"]
    options += ["--local_epochs", "2", "--local_batch_size", "8"]
    options += ["--defense", "--defense_method", "dp", "--noise_std", "1e-3"]
    # and an extension, whose summary must cover the other process's tries too
    options += ["--analysis"]
    one, _ = attack_process(tmp_path, "one", *options)
    two, proc = attack_process(
        tmp_path, "two", *options, "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp"
    )
    assert one["processes"] == 1 and two["processes"] == 2
    assert one["status"] == two["status"] == "complete"
    assert two["tries_done"] == 5 and len(two["tries"]) == 5
    # Exactly equal, to the last bit: the per-try counts in index order, every summary and
    # spread, the auxiliary data, defense and protocol records.
    assert {k: v for k, v in two.items() if k not in HOW_IT_RAN} == {
        k: v for k, v in one.items() if k not in HOW_IT_RAN
    }
    assert "random" in two["summary"] and two["defense"]["method"] == "dp"
    assert two["analysis"]["tries"] == 5 and len(two["tries"][1]["analysis"]) > 0
    assert two["config"]["devices"] == 2 and two["config"]["strategy"] == "ddp"
    # One run folder, written by the first process only; the second said nothing.
    (folder,) = (tmp_path / "logs" / "two").iterdir()
    assert json.loads((folder / "results.json").read_text()) == two
    assert proc.stdout.count("defense: dp") == 1


@pytest.mark.slow
def test_the_seeded_random_streams_are_per_try(tmp_path):
    # Three tries run alone give the first three of five: nothing a try draws depends on
    # the tries after it (or on how many there are).
    options = ["--attacks", "random", "--no-compare", "--local_epochs", "2"]
    options += ["--local_batch_size", "8", "--defense", "--defense_method", "dp"]
    five, _ = attack_process(tmp_path, "five", *options, "--num_tries", "5")
    three, _ = attack_process(tmp_path, "three", *options, "--num_tries", "3")
    assert three["tries"] == five["tries"][:3]
    guesses = [t["methods"]["random"]["counts"] for t in five["tries"]]
    assert len({tuple(g) for g in guesses}) == 5  # a fresh guess per try
