"""The error analysis of iLRG's approximations, by hand and against a per-class autograd loop."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from attacks.gradients import batch_gradients, embed_and_forward, share
from attacks.observation import Restoration
from experiment.analysis import (
    QUANTITIES,
    CustomClassCounts,
    ErrorAnalysis,
    class_errors,
    cosine_similarity,
    mean_relative_error,
    trimmed_mean,
)
from tests.conftest import REPO
from tests.helpers import TinyVictim, labels_from_counts

ALL_NAMES = [f"{q}_{m}" for q, _, measures in QUANTITIES for m in measures]


def errors_of(model, images, labels, alpha=1.0):
    grads = batch_gradients(model, [(images, labels)], labels.numel())
    shared = share(model, grads, labels.numel())
    with torch.no_grad():
        embeddings, logits = embed_and_forward(model, images)
    args = (
        embeddings,
        logits,
        labels,
        shared.weight_grad,
        shared.bias_grad,
        shared.weight,
        shared.bias,
        alpha,
    )
    return class_errors(*args), shared, embeddings, logits


# --- the measures -----------------------------------------------------------------------------


def test_relative_error_leaves_out_zero_references():
    restored = torch.tensor(
        [[1.0, 2.0, 3.0], [5.0, 0.0, 1.0], [1.0, 1.0, 1.0]], dtype=torch.float64
    )
    reference = torch.tensor(
        [[0.0, 1.0, 2.0], [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64
    )
    values = mean_relative_error(restored, reference)
    assert values[0] == pytest.approx((1 / 1 + 1 / 2) / 2)
    assert math.isnan(values[1])  # nothing to compare with
    assert values[2] == 0


def test_cosine_similarity_of_a_zero_vector_is_undefined():
    values = cosine_similarity(
        torch.tensor([[1.0, 0.0], [0.0, 0.0]]), torch.tensor([[2.0, 2.0], [1.0, 0.0]])
    )
    assert values[0] == pytest.approx(1 / math.sqrt(2))
    assert math.isnan(values[1])


def test_trimmed_mean_drops_extremes_and_non_finite_values():
    assert trimmed_mean(torch.arange(1.0, 11.0), 0.1) == pytest.approx(5.5)
    assert trimmed_mean(torch.tensor([1.0, 2.0, 3.0, 100.0]), 0.25) == pytest.approx(2.5)
    assert trimmed_mean(torch.tensor([1.0, math.nan, 3.0, math.inf])) == pytest.approx(2.0)
    assert math.isnan(trimmed_mean(torch.tensor([math.nan])))


# --- the quantities ---------------------------------------------------------------------------


def per_class_loop(model, images, labels, shared):
    """The original's way: per class, autograd on that class's mean loss, then each comparison."""
    num_images = labels.numel()
    embeddings, logits = embed_and_forward(model, images)
    layer = model.classifier
    out = {}
    for c in torch.unique(labels).tolist():
        mine = labels == c
        loss = nn.functional.cross_entropy(logits[mine], labels[mine])
        weight_grad, bias_grad = torch.autograd.grad(
            loss, [layer.weight, layer.bias], retain_graph=True
        )
        class_w, class_b = weight_grad[c].double(), bias_grad[c].double()
        mean_e = embeddings[mine].mean(dim=0).double()
        mean_z = logits[mine].mean(dim=0).double()
        mean_p = torch.softmax(logits[mine], dim=1).mean(dim=0).double()
        share_c = float(mine.sum()) / num_images
        w_c, b_c = shared.weight_grad[c].double(), shared.bias_grad[c].double()
        restored_e = w_c / b_c
        restored_z = layer.weight.double() @ restored_e + layer.bias.double()
        restored_p = torch.softmax(restored_z, dim=0)
        out[c] = {
            "emb_mse": ((restored_e - mean_e) ** 2).mean(),
            "emb_cos": torch.cosine_similarity(restored_e, mean_e, dim=0),
            "logit_mse": ((restored_z - mean_z) ** 2).mean(),
            "prob_mse": ((restored_p - mean_p) ** 2).mean(),
            "prob_rel": ((restored_p - mean_p).abs() / mean_p).mean(),
            "prob_cos": torch.cosine_similarity(restored_p, mean_p, dim=0),
            "approx1_mse": ((class_b * mean_e - class_w) ** 2).mean(),
            "approx2_mse": ((share_c * class_w - w_c) ** 2).mean(),
            "approx3_mse": (share_c * class_b - b_c) ** 2,
            "approx3_rel": (share_c * class_b - b_c).abs() / b_c.abs(),
            "approx4_mse": ((torch.softmax(mean_z, dim=0) - mean_p) ** 2).mean(),
            "scale_mse": ((w_c / b_c - class_w / class_b) ** 2).mean(),
            "soteria_mse": ((w_c - mean_e) ** 2).mean(),
            "soteria_cos": torch.cosine_similarity(w_c, mean_e, dim=0),
        }
    return out


def test_closed_form_matches_a_per_class_autograd_loop():
    torch.manual_seed(0)
    model = TinyVictim().double()
    labels = labels_from_counts([3, 0, 1, 0, 5, 0, 0, 2, 0, 1])
    images = torch.rand(labels.numel(), 12, dtype=torch.float64)
    errors, shared, _, _ = errors_of(model, images, labels)
    expected = per_class_loop(model, images, labels, shared)
    for c, values in expected.items():
        for name, value in values.items():
            assert float(errors[name][c]) == pytest.approx(
                float(value.detach()), rel=1e-9, abs=1e-15
            ), (c, name)


def test_zero_weights_make_the_probabilities_exact_and_the_rest_computable_by_hand():
    # With W = 0 every sample has the softmax q = softmax(b), so p_c = q and the class-only
    # gradient rows are (q_c - 1) times the class's mean embedding.
    torch.manual_seed(1)
    model = TinyVictim().double()
    with torch.no_grad():
        model.classifier.weight.zero_()
    counts = torch.tensor([4, 0, 2, 0, 0, 0, 0, 0, 0, 2])
    labels = labels_from_counts(counts)
    images = torch.rand(8, 12, dtype=torch.float64)
    errors, _, embeddings, _ = errors_of(model, images, labels)
    q = torch.softmax(model.classifier.bias.detach(), dim=0)
    present = counts > 0
    for name in ("prob_mse", "logit_mse", "approx1_mse", "approx4_mse"):
        assert errors[name][present].abs().max() < 1e-15, name
    assert torch.allclose(errors["prob_cos"][present], torch.ones(3, dtype=torch.float64))
    share = counts / 8
    # batch grad_b[c] = q_c - k_c/K against (k_c/K)(q_c - 1): the other samples' q_c remain.
    assert torch.allclose(errors["approx3_mse"][present], (q * (1 - share))[present] ** 2)
    assert torch.allclose(
        errors["approx3_rel"][present], (q * (1 - share) / (q - share).abs())[present]
    )
    # e_c = (q_c mean(e) - (k_c/K) mean_c(e)) / (q_c - k_c/K)
    mean_all = embeddings.mean(dim=0)
    for c in torch.nonzero(present).flatten().tolist():
        mean_c = embeddings[labels == c].mean(dim=0)
        restored = (q[c] * mean_all - share[c] * mean_c) / (q[c] - share[c])
        assert float(errors["emb_mse"][c]) == pytest.approx(
            float(((restored - mean_c) ** 2).mean()), rel=1e-9
        )


def test_a_single_sample_is_restored_exactly():
    torch.manual_seed(2)
    model = TinyVictim().double()
    errors, _, _, _ = errors_of(model, torch.rand(1, 12, dtype=torch.float64), torch.tensor([6]))
    for name in ("emb", "logit", "prob", "approx2", "approx3", "approx4", "scale"):
        assert float(errors[f"{name}_mse"][6]) < 1e-20, name
    assert float(errors["emb_cos"][6]) == pytest.approx(1.0)
    assert float(errors["prob_cos"][6]) == pytest.approx(1.0)


def test_absent_classes_report_only_the_probability_mse():
    torch.manual_seed(3)
    model = TinyVictim().double()
    labels = torch.tensor([1, 1, 4])
    errors, shared, _, _ = errors_of(model, torch.rand(3, 12, dtype=torch.float64), labels)
    assert set(errors) == set(ALL_NAMES)
    absent = torch.ones(10, dtype=torch.bool)
    absent[[1, 4]] = False
    for name, values in errors.items():
        if name == "absent_prob_mse":
            assert torch.isfinite(values[absent]).all() and torch.isnan(values[~absent]).all()
        else:
            assert torch.isnan(values[absent]).all(), name
    restored_e = shared.weight_grad[0].double() / shared.bias_grad[0].double()
    restored_p = torch.softmax(
        model.classifier.weight.double() @ restored_e + model.classifier.bias.double(), dim=0
    )
    assert float(errors["absent_prob_mse"][0]) == pytest.approx(
        float((restored_p.detach() ** 2).mean())
    )


# --- the extensions ---------------------------------------------------------------------------


class FakeWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def context(model, images, labels, index, restorations=None):
    grads = batch_gradients(model, [(images, labels)], labels.numel())
    true_counts = torch.bincount(labels, minlength=10)
    return SimpleNamespace(
        index=index,
        labels=labels,
        true_counts=true_counts,
        grads=grads,
        shared=share(model, grads, labels.numel()),
        restorations=restorations or {},
        load_chunks=lambda: iter([(images[:2], labels[:2]), (images[2:], labels[2:])]),
    )


def test_error_analysis_extension_averages_tries_and_logs_them():
    torch.manual_seed(4)
    model = TinyVictim()
    analysis = ErrorAnalysis(model, ratio=0.0)
    writer = FakeWriter()
    analysis.bind("unused-run-dir", writer)
    labels = torch.tensor([0, 0, 3, 5, 5])
    entries = [analysis.on_try(context(model, torch.rand(5, 12), labels, i)) for i in range(2)]
    assert set(entries[0]) == set(ALL_NAMES)
    summary = analysis.summary()
    assert summary["tries"] == 2 and summary["ratio"] == 0.0
    for name in ALL_NAMES:
        assert summary["mean"][name] == pytest.approx((entries[0][name] + entries[1][name]) / 2)
    assert ("analysis/prob_cos", entries[1]["prob_cos"], 1) in writer.scalars
    table = analysis.table()
    assert "probability: p_c vs class mean softmax" in table and "absent classes" in table


def test_custom_class_counts_average_the_three_classes():
    counter = CustomClassCounts((0, 3, 7))
    model = TinyVictim()
    for index, restored in enumerate(
        ([1, 0, 0, 5, 0, 0, 0, 2, 0, 0], [2, 0, 0, 4, 0, 0, 0, 1, 0, 1])
    ):
        restorations = {
            "iLRG": Restoration.from_counts(torch.tensor(restored)),
            "GI": Restoration(torch.ones(10) > 0),
        }
        labels = labels_from_counts([1, 0, 0, 5, 0, 0, 0, 2, 0, 0])
        entry = counter.on_try(
            context(model, torch.rand(8, 12), labels, index, restorations=restorations)
        )
        assert set(entry) == {"true", "iLRG"}
    assert counter.summary() == {
        "classes": [0, 3, 7],
        "true": [1.0, 5.0, 2.0],
        "restored": {"iLRG": [1.5, 4.5, 1.5]},
    }
    assert "class 3" in counter.table()


# --- attack.py end to end ---------------------------------------------------------------------


def attack(tmp_path, *args):
    results = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "attack.py",
        "--log_dir",
        str(tmp_path / "logs"),
        "--results",
        str(results),
        "--quiet",
    ]
    proc = subprocess.run([*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc, json.loads(results.read_text())


def test_attack_py_analysis_and_custom_counts(tmp_path):
    proc, results = attack(
        tmp_path,
        *("--dataset", "SYNTH_CIFAR100", "--model", "lenet5", "--num_tries", "2", "--no-compare"),
        *("--distribution", "custom_imbalanced", "--analysis", "--ratio", "0.1"),
    )
    assert results["analysis"]["tries"] == 2 and results["analysis"]["ratio"] == 0.1
    assert set(results["analysis"]["mean"]) == set(ALL_NAMES)
    assert set(results["tries"][0]["analysis"]) == set(ALL_NAMES)
    # The tables are the run's results: stdout.
    assert "error analysis" in proc.stdout and "Soteria: grad_W[c] vs class mean e" in proc.stdout
    assert results["defense"] is None and "defense: none" in proc.stdout
    counts = results["custom_class_counts"]
    assert counts["classes"] == [0, 18, 92] and counts["true"] == [1.0, 22.0, 1.0]
    assert set(counts["restored"]) == {"iLRG"}
    assert "mean restored counts over 2 tries" in proc.stdout


@pytest.mark.slow
def test_untrained_vgg16_restores_the_probabilities_on_cifar100(tmp_path, shared_data):
    _, results = attack(
        tmp_path,
        *(
            "--data_root",
            str(shared_data),
            "--dataset",
            "CIFAR100",
            "--split",
            "val",
            "--model",
            "vgg16",
        ),
        *("--num_images", "64", "--num_tries", "1", "--no-compare", "--analysis"),
    )
    assert results["analysis"]["mean"]["prob_cos"] > 0.999
