import numpy as np
import pytest
import torch

from attacks import (
    ATTACKS,
    AUXILIARY_ATTACKS,
    PER_SAMPLE_ATTACKS,
    PRIOR_ATTACKS,
    AuxiliaryData,
    SharedGradients,
    build_attack,
)
from attacks.llg import impact_counts
from attacks.rlg import label_space, present_classes
from tests.helpers import TinyVictim, labels_from_counts, shared_for
from user_errors import UserError


def hand_made(weight_grad, bias_grad=None, k=3):
    weight_grad = torch.tensor(weight_grad, dtype=torch.float32)
    num_classes = weight_grad.shape[0]
    if bias_grad is None:
        bias_grad = weight_grad.sum(dim=1)
    return SharedGradients(
        weight_grad=weight_grad,
        bias_grad=torch.as_tensor(bias_grad, dtype=torch.float32),
        weight=torch.zeros_like(weight_grad),
        bias=torch.zeros(num_classes),
        num_images=k,
    )


def test_registry_lists_every_method_and_rejects_unknown_names():
    assert set(PRIOR_ATTACKS) | set(AUXILIARY_ATTACKS) | set(PER_SAMPLE_ATTACKS) | {"iLRG"} == set(
        ATTACKS
    )
    with pytest.raises(UserError, match=r"^unknown attack 'DLG'; valid attacks: .*iLRG"):
        build_attack("DLG")


def test_idlg_uses_the_sign_of_the_row_sum():
    shared = hand_made([[0.2, -0.5], [0.1, 0.3], [-0.1, 0.05], [0.0, 0.0]])
    assert build_attack("iDLG")(shared).present.tolist() == [True, False, True, False]


def test_gradinversion_uses_the_row_minimum():
    shared = hand_made([[0.2, -0.5], [0.1, 0.3], [-0.1, 0.05], [0.0, 0.0]])
    present = build_attack("GI")(shared).present
    assert present.tolist() == [True, False, True, False]
    shared = hand_made([[0.6, -0.1], [0.1, 0.3]])
    assert build_attack("GI")(shared).present.tolist() == [
        True,
        False,
    ]  # row sum > 0, still present
    assert build_attack("iDLG")(shared).present.tolist() == [False, False]


def test_llg_two_stages_by_hand():
    # Negative classes 0 and 2 get one label each; impact m = (-3 - 1) * (1 + 1/4) / 5 = -1,
    # leaving [-2, 0.5, 0, 2]. Three more labels by argmin, adding 1 after each pick:
    # class 0 (-2), class 0 (-1), then the tie at 0 goes to the lower index, class 0 again.
    counts = impact_counts(torch.tensor([-3.0, 0.5, -1.0, 2.0]), 5)
    assert counts.tolist() == [4, 0, 1, 0]
    assert int(counts.sum()) == 5


def test_llg_more_negative_classes_than_labels_keeps_the_most_negative():
    counts = impact_counts(torch.tensor([-1.0, -3.0, -2.0, 1.0]), 2)
    assert counts.tolist() == [0, 1, 1, 0]


@pytest.mark.parametrize("name", ["LLG", "bias"])
def test_count_attacks_give_k_labels(name):
    torch.manual_seed(0)
    model = TinyVictim()
    labels = labels_from_counts([0, 2, 0, 0, 1, 0, 0, 3, 0, 0])
    result = build_attack(name)(shared_for(model, torch.rand(6, 12), labels))
    assert int(result.counts.sum()) == 6
    assert (result.counts >= 0).all()


def test_bias_attack_restores_a_single_label():
    torch.manual_seed(0)
    model = TinyVictim()
    result = build_attack("bias")(shared_for(model, torch.rand(1, 12), torch.tensor([7])))
    assert result.counts.tolist() == [0, 0, 0, 0, 0, 0, 0, 1, 0, 0]


def test_random_guess_is_seeded_and_uses_its_own_generator():
    shared = hand_made([[0.1]] * 10, k=24)
    torch.manual_seed(5)
    before = torch.rand(1)
    first = build_attack("random", seed=3)(shared).counts
    torch.manual_seed(5)
    assert torch.equal(torch.rand(1), before)  # global RNG untouched
    assert torch.equal(first, build_attack("random", seed=3)(shared).counts)
    assert int(first.sum()) == 24


@pytest.mark.parametrize("label", [0, 3, 9])
def test_rlg_single_sample(label):
    torch.manual_seed(label)
    model = TinyVictim()
    result = build_attack("RLG")(shared_for(model, torch.rand(1, 12), torch.tensor([label])))
    assert torch.nonzero(result.present).flatten().tolist() == [label]


def test_rlg_finds_the_present_classes_when_k_is_small():
    torch.manual_seed(0)
    model = TinyVictim(in_dim=32, dim=64, num_classes=40)
    counts = torch.zeros(40, dtype=torch.long)
    counts[[1, 7, 22, 39]] = torch.tensor([1, 2, 1, 1])
    labels = labels_from_counts(counts)
    result = build_attack("RLG")(shared_for(model, torch.rand(labels.numel(), 32), labels))
    assert result.present.tolist() == (counts > 0).tolist()


def test_rlg_pruning_agrees_with_one_lp_per_class():
    rng = torch.Generator().manual_seed(0)
    for trial in range(6):
        torch.manual_seed(trial)
        num_classes = 30
        model = TinyVictim(in_dim=20, dim=40, num_classes=num_classes)
        k = int(torch.randint(2, 12, (1,), generator=rng))
        labels = torch.randint(num_classes, (k,), generator=rng)
        shared = shared_for(model, torch.rand(k, 20), labels)
        rows = label_space(shared.weight_grad, k)
        order = np.arange(num_classes)
        assert (
            present_classes(rows, order, prune=True) == present_classes(rows, order, prune=False)
        ).all()


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_every_attack_survives_non_finite_gradients(name):
    weight_grad = torch.tensor([[float("nan"), 0.1], [0.2, float("inf")], [-0.3, 0.1], [0.1, 0.1]])
    shared = hand_made(weight_grad.tolist(), bias_grad=[float("nan"), 0.1, -0.2, 0.1], k=2)
    options = {}
    if name in AUXILIARY_ATTACKS:
        # The server's model diverged too: its outputs on the auxiliary data are not finite.
        model = TinyVictim(in_dim=3, dim=2, num_classes=4)
        with torch.no_grad():
            model.classifier.weight[0, 0] = float("nan")
            model.classifier.weight[1, 1] = float("inf")
        shared = shared.replace(model=model)
        options["auxiliary"] = AuxiliaryData(torch.rand(8, 3), torch.arange(8) % 4)
    result = build_attack(name, **options)(shared)
    assert result.present.dtype == torch.bool and result.present.shape == (4,)
    if result.counts is not None:
        assert result.counts.dtype == torch.long
        assert (result.counts >= 0).all() and (result.counts <= 2).all()
