"""The fit of the attacked batch and its visible samples (``experiment.batch_fit``)."""

import math

import torch

from experiment.batch_fit import batch_fit, batch_fit_summary
from tests.helpers import TinyVictim, shared_for
from tests.test_stages import attack_in_process


def test_a_sample_fitted_below_the_rounding_is_not_visible():
    torch.manual_seed(0)
    model = TinyVictim(in_dim=12, dim=16, num_classes=10)
    inputs = torch.randn(6, 12)
    labels = torch.tensor([3, 3, 1, 4, 5, 6])
    with torch.no_grad():
        # Every sample predicts class 3 by a margin of 1e4: the two of class 3 have p_y = 1
        # exactly and add nothing to the gradient; the other four are as wrong as can be.
        model.classifier.bias[3] = 1e4
    shared = shared_for(model, inputs, labels)
    fit = batch_fit(model, [(inputs, labels)], shared.weight_grad, shared.bias_grad)
    assert fit["visible"] == 4
    assert math.isclose(fit["accuracy"], 2 / 6, rel_tol=1e-6)
    assert math.isclose(fit["mean_error"], 4 / 6, rel_tol=1e-6)
    assert model.training  # the model's mode is left as it was


def test_the_summary_is_the_mean_and_the_visible_share():
    tries = [
        {"batch": {"accuracy": 0.5, "mean_error": 0.25, "visible": 8}},
        {"batch": {"accuracy": 1.0, "mean_error": 0.75, "visible": 4}},
    ]
    summary = batch_fit_summary(tries, num_images=8)
    assert summary == {"accuracy": 0.75, "mean_error": 0.5, "visible": 0.75}
    assert batch_fit_summary([{"methods": {}}], num_images=8) is None


def test_results_record_each_batch_and_their_summary(tmp_path, capsys):
    code, results, err = attack_in_process(
        tmp_path,
        capsys,
        "--num_images",
        "8",
        "--num_tries",
        "3",
        "--attacks",
        "iLRG",
        "--no-compare",
    )
    assert code == 0, err
    assert [sorted(t["batch"]) for t in results["tries"]] == [
        ["accuracy", "mean_error", "visible"]
    ] * 3
    # An untrained FCN-3: every sample is far from fitted, all 8 visible.
    assert all(t["batch"]["visible"] == 8 for t in results["tries"])
    assert results["batch"]["visible"] == 1.0
    mean_error = sum(t["batch"]["mean_error"] for t in results["tries"]) / 3
    assert math.isclose(results["batch"]["mean_error"], mean_error, rel_tol=1e-6)
