"""Honest metrics (Exact, LnAcc+, the zeros floor), RLU+, LLBG, LLG's stage 2 and RLG's rank."""

import math

import pytest
import torch
from torch import nn

from attacks import AuxiliaryData, build_attack
from attacks.auxiliary import class_statistics
from attacks.gradients import batch_gradients, share
from attacks.llg import impact_counts
from attacks.metrics import metric_set
from attacks.rlg import label_space
from attacks.rlu_plus import round_to_total
from tests.helpers import labels_from_counts
from user_errors import UserError


def scores(restored, true) -> dict[str, float]:
    metrics = metric_set(restores_counts=True)
    for name, metric in metrics.items():
        given = torch.tensor(restored) > 0 if name == "LeAcc" else torch.tensor(restored)
        metric.update(given, torch.tensor(true))
    return {name: float(metric.compute()) for name, metric in metrics.items()}


def test_exact_and_present_class_accuracy_on_hand_made_counts():
    true = [[2, 0, 1, 0], [2, 0, 1, 0]]
    values = scores([[2, 0, 1, 0], [1, 1, 1, 0]], true)
    assert values["Exact"] == 0.5  # the second batch is one label off
    assert values["LnAcc+"] == 0.75  # present classes 0 and 2: 2 of 2, then 1 of 2
    assert values["LnAcc"] == 0.75  # (4 + 2) of 8 classes
    assert values["IRec"] == pytest.approx((3 / 3 + 2 / 3) / 2)


def test_zeros_scores_the_share_of_absent_classes_and_nothing_else():
    model = nn.Linear(3, 4)
    labels = labels_from_counts([2, 0, 1, 0])
    grads = batch_gradients(model, [(torch.randn(3, 3), labels)], 3)
    restoration = build_attack("zeros")(share(model, grads, 3))
    assert restoration.counts.tolist() == [0, 0, 0, 0]
    values = scores([restoration.counts.tolist()], [[2, 0, 1, 0]])
    assert values == {"LeAcc": 0.5, "LnAcc": 0.5, "LnAcc+": 0.0, "IRec": 0.0, "Exact": 0.0}


def confident_linear_model(logit_gaps) -> nn.Linear:
    """A C-class linear model on one-hot inputs whose error mass all goes to the last class.

    Input e_j (j < C - 1) gets logit gap a_j on class j, 0 on the last class and
    -40 elsewhere: confidence sigmoid(a_j), erroneous confidence only on class C - 1.
    """
    num_classes = len(logit_gaps) + 1
    model = nn.Linear(num_classes, num_classes)
    with torch.no_grad():
        model.weight.fill_(-40.0)
        model.weight[-1].zero_()
        for j, gap in enumerate(logit_gaps):
            model.weight[j, j] = gap
        model.bias.zero_()
    return model


def shared_batch(model, counts):
    labels = labels_from_counts(counts)
    inputs = torch.eye(len(counts))[labels]
    grads = batch_gradients(model, [(inputs, labels)], labels.numel())
    return share(model, grads, labels.numel())


def auxiliary_one_per_class(num_classes) -> AuxiliaryData:
    return AuxiliaryData(torch.eye(num_classes), torch.arange(num_classes))


# confidences 0.9, 0.99, 0.9999 (logit gaps log(p / (1 - p)))
GAPS = [math.log(9), math.log(99), math.log(9999)]


def test_class_statistics_are_the_models_confidences():
    model = confident_linear_model(GAPS)
    stats = class_statistics(model, auxiliary_one_per_class(4), 4)
    assert stats.confidence[:3].tolist() == pytest.approx([0.9, 0.99, 0.9999], rel=1e-5)
    assert stats.samples.tolist() == [1, 1, 1, 1]
    # The error mass of classes 0-2 lands on class 3 only.
    assert stats.probabilities[0, 3] == pytest.approx(0.1, rel=1e-5)


# LLBG ignores the erroneous confidence that other samples put on a present class; here it
# all lands on the last class, so the batches leave that class out.
@pytest.mark.parametrize("counts", [[3, 2, 1, 0], [0, 4, 2, 0], [1, 1, 5, 0]])
def test_rlu_given_presence_is_exact_where_every_sample_of_a_class_adds_the_same(counts):
    # One auxiliary sample per class: no spread, so the whitened equations decide, not the prior.
    model = confident_linear_model(GAPS)
    restoration = build_attack("RLU+", auxiliary=auxiliary_one_per_class(4))(
        shared_batch(model, counts)
    )
    assert restoration.counts.tolist() == counts


def test_rlu_given_presence_falls_back_on_the_prior_where_samples_differ_wildly():
    # Auxiliary samples of each class range from barely fitted to certain: a count cannot be
    # read off the gradient, and the K - n labels beyond one per class spread evenly.
    model = confident_linear_model(GAPS)
    scales = torch.tensor([0.05, 1.0, 3.0])
    images = torch.cat([torch.eye(4)[:3] * s for s in scales] + [torch.eye(4)[3:]])
    labels = torch.cat([torch.arange(3)] * 3 + [torch.tensor([3])])
    counts = [6, 1, 1, 0]
    restoration = build_attack("RLU+", auxiliary=AuxiliaryData(images, labels))(
        shared_batch(model, counts)
    )
    # 8 labels over 3 present classes: 8/3 each, rounded to 3, 3, 2 in some order.
    assert sorted(restoration.counts[:3].tolist()) == [2, 3, 3]
    assert int(restoration.counts[3]) == 0


@pytest.mark.parametrize("counts", [[3, 2, 1, 0], [0, 4, 2, 0], [1, 1, 5, 0]])
def test_llbg_restores_exact_counts_with_per_class_impacts(counts):
    model = confident_linear_model(GAPS)
    shared = shared_batch(model, counts)
    restoration = build_attack("LLBG", auxiliary=auxiliary_one_per_class(4))(shared)
    assert restoration.counts.tolist() == counts
    # LLG's one impact for all classes cannot: a 0.9999-confident label moves its
    # gradient a thousand times less than a 0.9-confident one.
    assert build_attack("LLG")(shared).counts.tolist() != counts


def test_llbg_with_an_assumed_confidence_needs_no_auxiliary_data():
    """The authors' approx_avg_conf: every class's confidence one value, 0 by default there."""
    model = nn.Linear(4, 4)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()  # every class 1/4 on every input: impact -(1 - 1/4) / K
    counts = [3, 0, 2, 1]
    shared = shared_batch(model, counts)
    assert build_attack("LLBG", llbg_confidence=0.25)(shared).counts.tolist() == counts
    # Assumed 0: each label's impact is -1/K instead of -(3/4)/K. grad_b = 1/4 - k/K =
    # (-1/4, 1/4, -1/12, 1/12): stage 1 gives classes 0 and 2 a label (class 3's one sample
    # leaves its gradient positive); stage 2 the other four, to 0, then 0, 2, 3 (tied at 1/12).
    assert build_attack("LLBG", llbg_confidence=0.0)(shared).counts.tolist() == counts
    with pytest.raises(
        UserError, match=r"^LLBG's assumed confidence must be in \[0, 1\), got 1.0$"
    ):
        build_attack("LLBG", llbg_confidence=1.0)


def test_statistics_follow_the_weights_and_leave_the_model_as_it_was():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 4))
    model.train()
    attack = build_attack("LLBG", auxiliary=auxiliary_one_per_class(4))
    first = attack.statistics(model, 4)
    assert attack.statistics(model, 4) is first  # same weights: kept
    with torch.no_grad():
        model[2].bias += 1.0
    assert attack.statistics(model, 4) is not first  # a weight changed: measured again
    assert all(module.training for module in model.modules())


def test_auxiliary_attacks_refuse_missing_data_and_missing_classes():
    with pytest.raises(UserError, match=r"^attack 'RLU' needs auxiliary data"):
        build_attack("RLU")
    attack = build_attack("LLBG", auxiliary=AuxiliaryData(torch.eye(4)[:3], torch.arange(3)))
    with pytest.raises(UserError, match=r"^the auxiliary data has no sample of 1 class\(es\): 3; "):
        attack(shared_batch(confident_linear_model(GAPS), [1, 1, 1, 0]))


def test_round_to_total_keeps_the_sum_and_stays_within_one():
    values = torch.tensor([2.6, 0.3, 1.2, 0.0, 3.9], dtype=torch.float64)
    counts = round_to_total(values, 8)
    assert counts.tolist() == [3, 0, 1, 0, 4]
    over = round_to_total(torch.tensor([2.0, 2.0, 2.0], dtype=torch.float64), 5)
    assert int(over.sum()) == 5 and (over - 2).abs().max() <= 1


def test_llg_stage_two_raises_the_class_it_chose():
    # Classes 0 and 1 get one label each; impact m = -5.9 * (1 + 1/4) / 4 = -1.84375 leaves
    # [-1.156, -1.056, 1, 2]. Two more labels: class 0, which then rises to 0.69, then
    # class 1. Raising the loop's leftover index instead would give class 0 both: [3, 1, 0, 0].
    counts = impact_counts(torch.tensor([-3.0, -2.9, 1.0, 2.0]), 4)
    assert counts.tolist() == [2, 2, 0, 0]


def test_llg_with_one_impact_per_class():
    # Class 0 moves by 0.1 per label, class 1 by 1: class 0's -0.3 is three labels.
    counts = impact_counts(torch.tensor([-0.3, -1.0, 0.5]), 4, torch.tensor([-0.1, -1.0, -1.0]))
    assert counts.tolist() == [3, 1, 0]


def test_rlg_rank_is_decided_in_the_gradients_own_precision():
    generator = torch.Generator().manual_seed(0)
    num_classes, dim, rank = 10, 50, 3
    left = torch.linalg.qr(
        torch.randn(num_classes, rank, generator=generator, dtype=torch.float64)
    ).Q
    right = torch.linalg.qr(torch.randn(dim, rank, generator=generator, dtype=torch.float64)).Q
    exact = left @ torch.diag(torch.tensor([1.0, 1e-2, 1e-3], dtype=torch.float64)) @ right.T
    rounded = exact.to(torch.float32)  # rank 3 plus float32 rounding: about 1e-8 per entry
    singular = torch.linalg.svdvals(rounded.to(torch.float64))
    assert singular[rank] > 1e-12  # in float64 the rounding is rank: 8 columns at K = 8
    assert label_space(rounded, 8).shape == (num_classes, rank)
    assert label_space(exact, 8).shape == (num_classes, rank)
