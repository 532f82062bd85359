"""attack.py with the server's auxiliary data: a real trained checkpoint, and the inputs it refuses."""

import gzip

import numpy as np
import pytest

import train
from tests.test_bad_data_cli import assert_one_line_error, attack, idx_bytes
from tests.test_stages import attack_in_process


@pytest.fixture(scope="module")
def trained_fcn(tmp_path_factory, shared_data):
    """FCN-3 trained 200 iterations on train.py's partition of the real MNIST test set."""
    root = tmp_path_factory.mktemp("fcn_mnist")
    argv = ["--dataset", "MNIST_GRAY", "--model", "dnn", "--data_root", str(shared_data)]
    argv += ["--train_partition", "val", "--iter_train", "--iters", "200", "--quiet"]
    argv += ["--model_path", str(root / "ckpt"), "--log_dir", str(root / "logs")]
    assert train.main(argv) == 0
    return root / "ckpt" / "dnn_MNIST_GRAY_Iter200.ckpt"


@pytest.mark.slow
def test_auxiliary_attacks_and_decompose_on_a_trained_checkpoint(
    trained_fcn, shared_data, tmp_path, capsys
):
    code, results, err = attack_in_process(
        tmp_path,
        capsys,
        *("--checkpoint", str(trained_fcn), "--data_root", str(shared_data)),
        *("--split", "fit_train", "--num_images", "8", "--num_tries", "20"),
        *("--attacks", "iLRG", "decompose", "RLU", "LLBG", "RLU+", "zeros", "--no-compare"),
    )
    assert code == 0, err
    # The batches come from the 9000 images the model trained on; the auxiliary samples,
    # 10 per class, from the 1000 it held out.
    assert results["auxiliary"] == {
        "split": "fit_val",
        "per_class": 10,
        "samples": 100,
        "fewest_of_a_class": 10,
    }
    assert list(results["summary"]) == ["iLRG", "decompose", "RLU", "LLBG", "RLU+", "zeros"]
    summary = results["summary"]
    for method in summary:
        assert set(summary[method]) == {"LeAcc", "LnAcc", "LnAcc+", "IRec", "Exact"}
    assert summary["zeros"]["IRec"] == 0.0 and summary["zeros"]["Exact"] == 0.0
    # The floor of LnAcc is the share of absent classes.
    absent = np.mean([np.mean(np.array(t["true_counts"]) == 0) for t in results["tries"]])
    assert summary["zeros"]["LnAcc"] == pytest.approx(absent)
    assert summary["RLU+"]["IRec"] >= summary["iLRG"]["IRec"] + 0.2
    assert summary["RLU+"]["LeAcc"] >= 0.9
    # decompose, without auxiliary data, tells the samples apart (measured: IRec 1.0 and
    # Exact 1.0 against iLRG's 0.5 and 0).
    assert summary["decompose"]["IRec"] >= summary["iLRG"]["IRec"] + 0.3
    assert summary["decompose"]["Exact"] >= 0.8
    separated = [t["methods"]["decompose"]["separated"] for t in results["tries"]]
    assert sum(separated) >= 0.9 * 8 * 20


def write_idx_split(raw, stem_images, stem_labels, labels):
    images = np.zeros((len(labels), 28, 28), dtype=np.uint8)
    for n, label in enumerate(labels):  # class-dependent pixels, so a model separates them
        images[n, label * 2 : label * 2 + 3, :] = 200
    (raw / f"{stem_images}.gz").write_bytes(gzip.compress(idx_bytes(images, 2051)))
    (raw / f"{stem_labels}.gz").write_bytes(
        gzip.compress(idx_bytes(np.array(labels, dtype=np.uint8), 2049))
    )


def test_an_auxiliary_split_without_some_class_is_refused(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    write_idx_split(raw, "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte", list(range(10)) * 4)
    # The train split, where the auxiliary samples come from, has no 7 and no 9.
    write_idx_split(
        raw, "train-images-idx3-ubyte", "train-labels-idx1-ubyte", [0, 1, 2, 3, 4, 5, 6, 8] * 3
    )
    proc = attack(
        tmp_path,
        *("--dataset", "MNIST_GRAY", "--data_root", str(tmp_path), "--split", "val"),
        *("--aux_split", "train", "--num_images", "4", "--attacks", "RLU", "--no-compare"),
    )
    assert_one_line_error(proc, "the auxiliary data has no sample of 2 class(es): 7, 9")
    assert not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--aux_per_class", "0"], "argument --aux_per_class: must be >= 1, got 0"),
        (
            ["--split", "train", "--aux_split", "train"],
            "--aux_split train shares samples with the attacked --split train",
        ),
        (
            ["--split", "fit_train", "--train_partition", "train", "--aux_split", "train"],
            "--aux_split train shares samples with the attacked --split fit_train",
        ),
        (
            ["--split", "all", "--attacks", "LLBG"],
            "--split all has no held-out counterpart for the auxiliary data",
        ),
    ],
)
def test_auxiliary_options_that_would_leak_or_make_no_sense(tmp_path, capsys, args, message):
    from tests.test_stages import one_line_error

    code, results, err = attack_in_process(tmp_path, capsys, "--num_tries", "1", *args)
    one_line_error(code, err, message)
    assert results is None and not (tmp_path / "logs").exists()


def test_held_out_part_of_the_partition_is_the_default_auxiliary_data(tmp_path, capsys):
    code, results, err = attack_in_process(
        tmp_path,
        capsys,
        *("--split", "fit_train", "--train_partition", "train", "--num_tries", "2"),
        *("--attacks", "RLU", "--no-compare", "--aux_per_class", "3"),
    )
    assert code == 0, err
    assert results["auxiliary"] == {
        "split": "fit_val",
        "per_class": 3,
        "samples": 30,
        "fewest_of_a_class": 3,
    }


def test_llbg_with_an_assumed_confidence_runs_where_there_is_no_auxiliary_data(tmp_path, capsys):
    # --split all has no held-out counterpart: RLU and RLU+ stay out, LLBG runs on its assumption.
    code, results, err = attack_in_process(
        tmp_path,
        capsys,
        *("--split", "all", "--num_images", "8", "--num_tries", "3", "--llbg_confidence", "0"),
    )
    assert code == 0, err
    assert "LLBG" in results["summary"] and "auxiliary" not in results
    assert not {"RLU", "RLU+"} & set(results["summary"])
    assert results["config"]["llbg_confidence"] == 0.0
    # Untrained FCN-3 at K = 8: every count restored (measured 3 of 3).
    assert results["summary"]["LLBG"]["Exact"] == 1.0


@pytest.mark.parametrize("value", ["1", "-0.1", "nan"])
def test_llbg_confidence_outside_zero_to_one_is_refused(tmp_path, capsys, value):
    from tests.test_stages import one_line_error

    code, results, err = attack_in_process(tmp_path, capsys, "--llbg_confidence", value)
    one_line_error(
        code, err, f"argument --llbg_confidence: must be a finite number >= 0 and < 1, got {value}"
    )
    assert results is None
