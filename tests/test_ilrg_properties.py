"""Property-based checks of iLRG over random small models and label multisets."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attacks import build_attack
from tests.helpers import TinyVictim, labels_from_counts, shared_for


@st.composite
def batches(draw):
    num_classes = draw(st.integers(2, 12))
    counts = draw(st.lists(st.integers(0, 6), min_size=num_classes, max_size=num_classes))
    if sum(counts) == 0:
        counts[draw(st.integers(0, num_classes - 1))] = 1
    in_dim = draw(st.integers(1, 8))
    dim = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    return num_classes, counts, in_dim, dim, seed


@settings(max_examples=60, deadline=None)
@given(batches(), st.sampled_from([0.0, 3.0]))
def test_counts_are_bounded_integers_and_adjusted_sum_to_k(batch, norm_guard):
    num_classes, counts, in_dim, dim, seed = batch
    torch.manual_seed(seed)
    model = TinyVictim(in_dim, dim, num_classes)
    labels = labels_from_counts(counts)
    k = labels.numel()
    result = build_attack("iLRG", norm_guard=norm_guard)(
        shared_for(model, torch.randn(k, in_dim), labels)
    )
    assert result.counts.dtype == torch.long
    assert int(result.counts.min()) >= 0 and int(result.counts.max()) <= k
    assert int(result.adjusted_counts.sum()) == k
    assert int(result.adjusted_counts.min()) >= 0


@settings(max_examples=60, deadline=None)
@given(batches(), st.floats(-3, 3))
def test_zero_weight_layer_restores_every_multiset_exactly(batch, bias_scale):
    # W = 0: every sample has the same softmax, whatever its embedding, so the equations are exact.
    num_classes, counts, in_dim, dim, seed = batch
    torch.manual_seed(seed)
    model = TinyVictim(in_dim, dim, num_classes)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.normal_().mul_(bias_scale)
    labels = labels_from_counts(counts)
    result = build_attack("iLRG")(
        shared_for(model, torch.randn(labels.numel(), in_dim) * 3, labels)
    )
    assert result.counts.tolist() == counts
