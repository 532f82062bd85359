"""RLU as its authors' released code computes it: each step on hand-computed cases, the FedAvg
mapping, and real MNIST updates against a loop-by-loop reference of the released procedure."""

import numpy as np
import pytest
import torch
from torch import nn

import attacks.rlu as rlu
from attacks import AuxiliaryData, build_attack
from attacks.gradients import batch_gradients, share
from attacks.local_update import LocalTraining, LocalUpdate, client_update, end_weights
from experiment import runner
from experiment.cli import build_parser
from experiment.options import parse_args
from experiment.seeding import try_generator
from experiment.trial import client_gradients, composed_batches
from tests.helpers import labels_from_counts

FLOAT64 = torch.finfo(torch.float64).eps


def identity_model(num_classes: int = 3) -> nn.Linear:
    """Logits = inputs: the auxiliary samples' logits are what the test writes down."""
    model = nn.Linear(num_classes, num_classes)
    with torch.no_grad():
        model.weight.copy_(torch.eye(num_classes))
        model.bias.zero_()
    return model


# Class 0's samples have logits (9, 1, 0), class 1's (1, 9, 0), class 2's (0, 0, 7):
# mu_0 = (1 + 0) / 2, mu_1 = (1 + 0) / 2, mu_2 = (0 + 0) / 2.
CLASS_LOGITS = torch.tensor([[9.0, 1.0, 0.0], [1.0, 9.0, 0.0], [0.0, 0.0, 7.0]])
MU = [0.5, 0.5, 0.0]


def auxiliary(copies: int) -> AuxiliaryData:
    labels = torch.arange(3).repeat(copies)
    return AuxiliaryData(CLASS_LOGITS[labels], labels)


def test_mu_is_the_mean_logit_over_the_other_classes_samples():
    labels = torch.tensor([0, 0, 1, 2])
    logits = torch.tensor([[8.0, 1.0, 0.0], [10.0, 1.0, 0.0], [1.0, 9.0, 0.0], [0.0, 0.0, 7.0]])
    # Class means, not sample means: class 0's two samples count as one class.
    assert rlu.other_class_logit_means(logits, labels, 3).tolist() == MU


def test_mu_leaves_out_the_last_batch_and_runs_in_train_mode():
    model = identity_model()
    attack = build_attack("RLU", auxiliary=auxiliary(5))
    # 15 samples in batches of 6: 12 kept, every class keeps at least 2 of its 5 identical samples.
    assert attack.logit_means(model, 3, 6).tolist() == MU
    # One batch holds them all, and it is the last one: the released code averages nothing.
    assert attack.logit_means(model, 3, 15).tolist() == [0.0, 0.0, 0.0]
    # Train mode: dropout is on while mu is measured, from a seeded stream, and the model's
    # mode and the global random stream are left as they were.
    dropped = nn.Sequential(nn.Dropout(0.5), identity_model())
    dropped.eval()
    state = torch.get_rng_state()
    first = attack.logit_means(dropped, 3, 6)
    assert first.tolist() != MU
    assert torch.equal(attack.logit_means(dropped, 3, 6), first)
    assert torch.equal(torch.get_rng_state(), state)
    assert not any(module.training for module in dropped.modules())


def test_step_weight_rho():
    assert rlu.step_weight(1) == 1.0
    # (1 - 0.1^3) / 0.9, (1 - 0.1^2) / 0.9, (1 - 0.1) / 0.9 = 1.11, 1.1, 1.0
    assert rlu.step_weight(3, 0.1) == pytest.approx((1.11 + 1.1 + 1.0) / 3, rel=8 * FLOAT64)
    assert rlu.step_weight(4, 1.0) == 2.5  # the geometric sum's limit: m - t


def test_counts_are_clipped_normalised_and_rounded_class_by_class():
    shift = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    bias_grad = torch.tensor([-0.3, 0.1, 0.6], dtype=torch.float64)
    # v = (0.5, 0.2, 0): 8 x (5/7, 2/7, 0) = (5.71, 2.29, 0)
    assert rlu.proportional_counts(shift, bias_grad, 8).tolist() == [6.0, 2.0, 0.0]
    # Half to even, class by class: (0.5, 0.5, 1.0) rounds to (0, 0, 1), one short of 2.
    half = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    assert rlu.proportional_counts(half, torch.zeros(3, dtype=torch.float64), 2).tolist() == [
        0.0,
        0.0,
        1.0,
    ]
    # Nothing above the gradient: no count anywhere (the released code divides by zero).
    assert rlu.proportional_counts(shift, shift + 1, 8).tolist() == [0.0, 0.0, 0.0]


def test_one_step_rlu_on_a_hand_computed_batch():
    """K = 6 with counts (3, 2, 1) on inputs the model scores 1/3 each.

    grad_b = (1/3 - 1/2, 0, 1/3 - 1/6); softmax(mu) = (e^.5, e^.5, 1) / (2 e^.5 + 1)
    = (0.3837, 0.3837, 0.2327); v = (0.5504, 0.3837, 0.0660), sum 1; 6 v = (3.30, 2.30, 0.40).
    """
    model = identity_model()
    labels = labels_from_counts([3, 2, 1])
    grads = batch_gradients(model, [(torch.zeros(6, 3), labels)], 6)
    restoration = build_attack("RLU", auxiliary=auxiliary(5))(share(model, grads, 6))
    assert restoration.counts.tolist() == [3, 2, 0]  # the class-2 sample is missed
    assert restoration.adjusted_counts.tolist() == [3, 2, 1]  # largest remainder: 0.40


def test_one_drift_correction_with_the_released_scalar_comparison():
    """m = 2 steps, B = 4, lr = 0.5, |O|^2 = 2, mu = 0, new_mu = (0.5, -0.2, 0.1), counts (4, 4, 0).

    Pass 1: per-step counts (2, 2, 0); the second simulated logits are
    0 - 0.5 x 2 x (1/3 - (1/2, 1/2, 0)) = (1/6, 1/6, -1/3), compared with new_mu[1] = -0.2:
    gaps (0.37, 0.37, -0.13), so class 0 (first of the largest) gives 2 to class 2.
    Pass 2: per-step counts (1, 2, 1); logits (-1/12, 1/6, -1/12); every gap >= 0: stop.
    """
    visits = torch.tensor([4.0, 4.0, 0.0], dtype=torch.float64)
    end = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    start = torch.zeros(3, dtype=torch.float64)
    probabilities = rlu.corrected_probabilities(visits, start, end, 2, 4, 0.5, 2.0)
    assert visits.tolist() == [2.0, 4.0, 2.0]
    last = torch.tensor([-1 / 12, 1 / 6, -1 / 12], dtype=torch.float64)
    expected = (torch.full((3,), 1 / 3, dtype=torch.float64) + torch.softmax(last, 0)) / 2
    assert torch.allclose(probabilities, expected, rtol=0, atol=8 * FLOAT64)


def test_past_the_c_entries_of_new_mu_the_loop_compares_with_the_vector(monkeypatch):
    """m = 4 > C = 3: new_mu[3] does not exist (the released code stops there).

    Per-step counts (2, 2, 0), B = 4, lr = 0.5, |O|^2 = 2: the logits drift from 0 to
    (0.167, 0.167, -0.333), (0.283, 0.283, -0.566), (0.371, 0.371, -0.742). Against the vector
    new_mu = (0.5, -0.2, 0.1) the gaps are (-0.129, 0.571, -0.842): class 1 gives 4 counts to
    class 2. (Against the scalar new_mu[2] = 0.1 class 0 would give them.)
    """
    monkeypatch.setattr(rlu, "MAX_CORRECTIONS", 1)
    visits = torch.tensor([8.0, 8.0, 0.0], dtype=torch.float64)
    start = torch.zeros(3, dtype=torch.float64)
    end = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
    drift = rlu.simulated_logits(visits / 4, start, 4, 4, 0.5, 2.0)
    # The hand values above, to their four decimals.
    assert drift[3].tolist() == pytest.approx([0.3711, 0.3711, -0.7422], abs=5e-5)
    rlu.corrected_probabilities(visits, start, end, 4, 4, 0.5, 2.0)
    assert visits.tolist() == [8.0, 4.0, 4.0]


def test_fedavg_maps_passes_to_steps_and_visits(monkeypatch):
    """E passes over K samples in mini-batches of B: m = E x ceil(K / B) steps, E x K visits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3))
    labels = labels_from_counts([4, 3, 1])
    images = torch.randn(8, 3)
    training = LocalTraining(epochs=2, batch_size=3, lr=0.1)
    grads, steps = client_update(model, images, labels, training, torch.Generator().manual_seed(0))
    update = LocalUpdate(training, steps, end_weights(model, grads, training, steps))
    seen = {}

    def record(visits, start, end, steps, batch_size, lr, spread):
        seen.update(visits=float(visits.sum()), steps=steps, batch_size=batch_size, lr=lr)
        return torch.softmax(start, dim=0)

    monkeypatch.setattr(rlu, "corrected_probabilities", record)
    aux = AuxiliaryData(torch.randn(30, 3), torch.arange(3).repeat(10))
    restoration = build_attack("RLU", auxiliary=aux)(share(model, grads, 8, local_update=update))
    assert steps == 6 and seen["steps"] == 6 and seen["batch_size"] == 3 and seen["lr"] == 0.1
    # The first estimate is rounded class by class over the 16 visits: within C / 2 of them.
    assert abs(seen["visits"] - 16) <= 1.5
    assert restoration.counts.shape == (3,)
    # One step (E = 1, B = K): no drift to correct, the FedSGD answer.
    monkeypatch.undo()
    one = LocalTraining(epochs=1, batch_size=None, lr=0.1)
    grads, steps = client_update(model, images, labels, one, torch.Generator().manual_seed(0))
    fedavg = share(model, grads, 8, local_update=LocalUpdate(one, steps, {}))
    fedsgd = share(model, batch_gradients(model, [(images, labels)], 8), 8)
    attack = build_attack("RLU", auxiliary=aux)
    assert torch.equal(attack(fedavg).counts, attack(fedsgd).counts)


def released_rlu(mu, new_mu, bias_grad, weight_grad, steps, batch_size, lr, gamma=0.1):
    """The released procedure, loop by loop as written there, in plain numpy (the test's reference)."""
    num_classes = len(mu)
    total = batch_size * steps
    rho = np.mean([(1 - gamma ** (steps - t)) / (1 - gamma) for t in range(steps)])

    def softmax(x):
        e = np.exp(x - np.max(x))
        return e / e.sum()

    def estimate(shift):
        v = [max(0.0, shift[i] - bias_grad[i]) for i in range(num_classes)]
        s = sum(v)
        return [round(v[i] / s * total) for i in range(num_classes)]

    counts = estimate(softmax(new_mu) * rho)
    direction = [np.mean(weight_grad[:, d] / bias_grad) for d in range(weight_grad.shape[1])]
    spread = sum(o * o for o in direction)
    largest, passes = 100.0, 0
    while largest >= 0.1 and passes < 5:
        passes += 1
        per_step = [round(c / steps) for c in counts]
        shifts, softmaxes = [np.array(mu)], [softmax(mu)]
        for _ in range(steps - 1):
            step = np.array(
                [
                    -lr * (softmax(shifts[-1])[i] - per_step[i] / batch_size) * spread
                    for i in range(num_classes)
                ]
            )
            shifts.append(shifts[-1] + step)
            softmaxes.append(softmax(shifts[-1]))
        gap = shifts[steps - 1] - new_mu[steps - 1]
        over = [i for i in range(num_classes) if gap[i] >= 0]
        under = [i for i in range(num_classes) if gap[i] < 0]
        if not over or not under:
            break
        over_gaps = [abs(gap[i]) for i in over]
        largest = max(max(over_gaps), max(abs(gap[i]) for i in under))
        pick = int(np.argmax(over_gaps))
        tries = 0
        while counts[over[pick]] < steps and tries < 10:
            over_gaps[pick] = 0
            pick = int(np.argmax(over_gaps))
            tries += 1
        counts[over[pick]] -= steps
        counts[under[int(np.argmax([abs(gap[i]) for i in under]))]] += steps
    return estimate(np.mean(softmaxes, axis=0) * rho)


@pytest.mark.slow
def test_rlu_on_real_mnist_updates_is_the_released_procedure(shared_data):
    """FCN-3 on the shipped MNIST, K = 32, one pass in mini-batches of 8 (m = 4: the drift loop runs)."""
    argv = ["--dataset", "MNIST_GRAY", "--data_root", str(shared_data), "--split", "fit_train"]
    argv += ["--train_partition", "val", "--num_images", "32", "--num_tries", "6"]
    argv += ["--local_epochs", "1", "--local_batch_size", "8", "--attacks", "RLU", "--no-compare"]
    config = parse_args(build_parser(), argv)
    setup = runner.prepare(config)
    attack = setup.attacks["RLU"]
    for index, indices in enumerate(composed_batches(config, setup.dataset, setup.num_classes)):
        grads, steps = client_gradients(
            setup, torch.tensor(indices), try_generator(config.seed, index, "client")
        )
        training = setup.local_training
        update = LocalUpdate(training, steps, end_weights(setup.model, grads, training, steps))
        shared = share(setup.model, grads, 32, local_update=update)
        mu = attack.logit_means(setup.model, 10, 8).numpy()
        new_mu = attack.logit_means(rlu.model_at(setup.model, update.end_state), 10, 8).numpy()
        bias_grad = shared.bias_grad.double().numpy()
        weight_grad = shared.weight_grad.double().numpy()
        expected = released_rlu(mu, new_mu, bias_grad, weight_grad, 4, 8, training.lr)
        assert attack(shared).counts.tolist() == expected, index
    assert steps == 4
