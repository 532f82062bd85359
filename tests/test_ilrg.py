import math

import pytest
import torch

from attacks import SharedGradients, build_attack
from attacks.ilrg import adjust_to_total, class_embeddings, round_counts
from tests.helpers import TinyVictim, labels_from_counts, shared_for


def ilrg(**options):
    return build_attack("iLRG", **options)


@pytest.mark.parametrize(
    "counts",
    [
        [3, 0, 0, 1, 0, 0, 0, 0, 0, 0],  # few classes
        [24, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # one class only
        [1, 1, 1, 1, 1, 1, 1, 1, 1, 1],  # all classes distinct
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0],  # K = 1
        [5, 2, 0, 0, 9, 0, 1, 0, 0, 7],
    ],
)
def test_zero_weight_layer_is_restored_exactly(counts):
    # With W = 0 every sample has the same softmax softmax(b): iLRG's assumption holds exactly.
    torch.manual_seed(0)
    model = TinyVictim()
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.normal_()
    labels = labels_from_counts(counts)
    inputs = torch.randn(labels.numel(), 12)
    result = ilrg()(shared_for(model, inputs, labels))
    assert result.counts.tolist() == counts
    assert result.adjusted_counts.tolist() == counts
    assert result.present.tolist() == [c > 0 for c in counts]


@pytest.mark.parametrize("label", [0, 4, 9])
def test_single_sample_is_exact_for_any_weights(label):
    torch.manual_seed(label)
    model = TinyVictim()
    labels = torch.tensor([label])
    result = ilrg()(shared_for(model, torch.rand(1, 12), labels))
    expected = [0] * 10
    expected[label] = 1
    assert result.counts.tolist() == expected


def test_one_class_with_identical_embeddings_is_exact():
    torch.manual_seed(3)
    model = TinyVictim()
    inputs = torch.rand(1, 12).repeat(7, 1)
    result = ilrg()(shared_for(model, inputs, torch.full((7,), 5)))
    assert result.counts.tolist() == [0, 0, 0, 0, 0, 7, 0, 0, 0, 0]


def test_chunked_gradients_give_the_same_counts():
    torch.manual_seed(1)
    model = TinyVictim()
    labels = labels_from_counts([2, 0, 3, 1, 0, 0, 4, 0, 0, 2])
    inputs = torch.rand(labels.numel(), 12)
    one_pass = shared_for(model, inputs, labels)
    chunked = shared_for(model, inputs, labels, max_size=5)
    assert torch.allclose(one_pass.weight_grad, chunked.weight_grad, rtol=1e-5, atol=1e-8)
    assert ilrg()(one_pass).counts.tolist() == ilrg()(chunked).counts.tolist()


def _hand_made(bias_grad, weight_grad=None, k=4):
    bias_grad = torch.tensor(bias_grad, dtype=torch.float32)
    num_classes = bias_grad.numel()
    if weight_grad is None:
        weight_grad = bias_grad[:, None] * torch.ones(num_classes, 3)
    return SharedGradients(
        weight_grad=weight_grad,
        bias_grad=bias_grad,
        weight=torch.zeros(num_classes, 3),
        bias=torch.zeros(num_classes),
        num_images=k,
    )


def test_zero_bias_gradient_is_undetermined_not_nan():
    # Uniform softmax (W = 0, b = 0), K = 4 of class 0 out of 4 classes: grad_b = [0.25 - 1, .25, .25, .25].
    # Class 3 is given an exactly-zero bias gradient (as if its samples were predicted perfectly).
    shared = _hand_made([-0.75, 0.25, 0.25, 0.0])
    embeddings, usable = class_embeddings(shared.weight_grad, shared.bias_grad)
    assert usable.tolist() == [True, True, True, False]
    assert torch.isfinite(embeddings).all()
    result = ilrg()(shared)
    assert result.undetermined.tolist() == [False, False, False, True]
    # Its count stays an unknown with a stand-in probability row; the others are untouched.
    assert result.counts[:3].tolist() == [4, 0, 0]
    assert int(result.counts[3]) in (0, 1)
    assert int(result.adjusted_counts.sum()) == 4


def test_non_finite_gradients_give_a_defined_result():
    shared = _hand_made([float("nan"), 0.25, float("inf"), -0.5])
    result = ilrg()(shared)
    assert result.counts.dtype == torch.long
    assert (result.counts >= 0).all() and (result.counts <= 4).all()
    assert result.counts[0] == 0 and result.counts[2] == 0
    all_nan = _hand_made([float("nan")] * 4)
    assert ilrg()(all_nan).counts.tolist() == [0, 0, 0, 0]


def test_estimate_uses_uniform_probabilities():
    # p = 1/C exactly: with W = 0 and b = 0 estimate and the full method agree and are exact.
    torch.manual_seed(0)
    model = TinyVictim(num_classes=6)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    labels = labels_from_counts([0, 3, 0, 2, 1, 0])
    shared = shared_for(model, torch.randn(6, 12), labels)
    assert ilrg(estimate=True)(shared).counts.tolist() == [0, 3, 0, 2, 1, 0]


def test_simplified_solves_only_for_the_known_classes():
    torch.manual_seed(2)
    model = TinyVictim()
    counts = [0, 4, 0, 0, 2, 0, 0, 0, 1, 0]
    labels = labels_from_counts(counts)
    known = torch.tensor(counts) > 0
    shared = shared_for(model, torch.rand(labels.numel(), 12), labels, known=known)
    result = ilrg(simplified=True)(shared)
    assert (result.counts[~known] == 0).all()
    assert (result.adjusted_counts[~known] == 0).all()
    assert int(result.adjusted_counts.sum()) == labels.numel()
    with pytest.raises(ValueError, match="known present classes"):
        ilrg(simplified=True)(shared.replace(known_classes=None))


def test_round_counts_post_processing():
    raw = torch.tensor([-0.4, 0.49, 0.51, 2.5000001, 30.0, 7.2], dtype=torch.float64)
    assert round_counts(raw, 24).tolist() == [0, 0, 1, 3, 0, 7]


@pytest.mark.parametrize(
    ("raw", "k", "expected"),
    [
        ([1.4, 1.4, 1.2], 4, [2, 1, 1]),  # short by one: the entry rounded down most gains
        (
            [1.6, 1.6, 0.6],
            3,
            [1, 2, 0],
        ),  # over by two: 0.6 -> 1 moved up most (in floats), then the first of the tied 1.6s
        ([0.0, 0.0, 0.0], 7, [3, 2, 2]),  # nothing restored: round-robin by residual order
    ],
)
def test_adjusted_counts_sum_to_k(raw, k, expected):
    raw = torch.tensor(raw, dtype=torch.float64)
    counts = round_counts(raw, k)
    adjusted = adjust_to_total(raw, counts, k)
    assert adjusted.tolist() == expected
    assert int(adjusted.sum()) == k


def test_counts_are_integers_within_bounds_on_random_models():
    for seed in range(5):
        torch.manual_seed(seed)
        model = TinyVictim(num_classes=7)
        labels = torch.randint(7, (9,))
        result = ilrg()(shared_for(model, torch.randn(9, 12), labels))
        assert result.counts.dtype == torch.long
        assert int(result.counts.min()) >= 0 and int(result.counts.max()) <= 9
        assert int(result.adjusted_counts.sum()) == 9
        assert not math.isnan(float(result.counts.sum()))


def test_norm_guard_replaces_only_blown_up_rows():
    from attacks.ilrg import fallback_rows, unstable_rows

    embeddings = torch.tensor(
        [[1.0, 0.0], [0.0, 1.2], [0.9, 0.9], [40.0, 0.0]], dtype=torch.float64
    )
    probabilities = torch.tensor(
        [[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.0, 0.0, 0.0, 1.0]],
        dtype=torch.float64,
    )
    usable = torch.ones(4, dtype=torch.bool)
    unstable = unstable_rows(embeddings, usable, norm_guard=3.0)
    assert unstable.tolist() == [False, False, False, True]
    guarded = fallback_rows(probabilities, unstable, ~unstable, torch.zeros(4), alpha=1.0)
    assert torch.allclose(guarded[3], probabilities[:3].mean(dim=0))
    assert torch.equal(guarded[:3], probabilities[:3])
    assert not unstable_rows(embeddings, usable, norm_guard=0.0).any()
    # Nothing trusted: the output at a zero embedding, softmax(b).
    bias = torch.tensor([0.0, 1.0, 2.0, 3.0])
    none_trusted = fallback_rows(probabilities, usable, ~usable, bias, alpha=1.0)
    assert torch.allclose(none_trusted[0], torch.softmax(bias.double(), dim=0))


def test_all_bias_gradients_zero_still_restores_counts():
    # Two classes, one sample each, uniform softmax: grad_b = 0 for both, every e_c undefined,
    # yet the counts follow from k_c = K p_c.
    model = TinyVictim(in_dim=1, dim=1, num_classes=2)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
    result = ilrg()(shared_for(model, torch.randn(2, 1), torch.tensor([0, 1])))
    assert result.undetermined.tolist() == [True, True]
    assert result.counts.tolist() == [1, 1]
