"""The fast paths against plain, obviously-correct implementations kept here.

iLRG: a per-class loop and a minimum-norm least-squares solve (pinv). RLG: one
linear program per class. Chunked gradients: one pass. No test here measures a
time (benchmarks/ does). Heavy references run on one CPU thread: on a shared
2-core machine two threads can be many times slower.
"""

import numpy as np
import pytest
import torch

from attacks import SharedGradients, build_attack
from attacks.cpu_threads import one_cpu_thread
from attacks.gradients import batch_gradients, chunked
from attacks.ilrg import embedding_products, solve_counts, solve_square
from attacks.rlg import _left_vectors_by_svd, label_space, present_classes, rounding_of
from callbacks import LabelLeakageCallback
from lightning_modules.networks import build_network
from tests.helpers import TinyVictim, shared_for
from tests.tiny_training import (
    TinyClassifier,
    cpu_trainer,
    labelled_data,
    loader,
    scalars,
    tensorboard_logger,
)

# --- iLRG -----------------------------------------------------------------------------------------


def plain_ilrg_counts(shared: SharedGradients, alpha: float = 1.0, norm_guard: float = 3.0):
    """iLRG class by class in numpy: embeddings, softmax rows, the guard, the minimum-norm solve."""
    grad_w = shared.weight_grad.double().numpy()
    grad_b = shared.bias_grad.double().numpy()
    weight, bias = shared.weight.double().numpy(), shared.bias.double().numpy()
    k = shared.num_images
    num_classes = grad_b.size
    finite = np.array(
        [np.isfinite(grad_b[c]) and np.isfinite(grad_w[c]).all() for c in range(num_classes)]
    )
    usable = np.array([finite[c] and grad_b[c] != 0 for c in range(num_classes)])
    rows, norms = np.zeros((num_classes, num_classes)), np.zeros(num_classes)
    for c in range(num_classes):
        embedding = grad_w[c] / grad_b[c] if usable[c] else np.zeros(grad_w.shape[1])
        norms[c] = np.linalg.norm(embedding)
        logits = alpha * (weight @ embedding + bias)
        rows[c] = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    unstable = np.zeros(num_classes, dtype=bool)
    if norm_guard > 0 and usable.sum() >= 2:
        usable_norms = np.sort(norms[usable])
        median = usable_norms[(usable_norms.size - 1) // 2]  # torch.median: the lower middle
        unstable = usable & (norms > norm_guard * median)
    replace, trusted = (finite & ~usable) | unstable, usable & ~unstable
    if replace.any():
        if trusted.any():
            stand_in = rows[trusted].mean(axis=0)
        else:
            stand_in = np.exp(alpha * bias - (alpha * bias).max())
            stand_in /= stand_in.sum()
        rows[replace] = stand_in
    equations, unknowns = np.isfinite(grad_b), finite
    system = np.vstack(
        [(rows.T - np.eye(num_classes))[equations][:, unknowns], np.ones(unknowns.sum())]
    )
    target = np.concatenate([k * grad_b[equations], [k]])
    raw = np.zeros(num_classes)
    raw[unknowns] = np.linalg.lstsq(system, target, rcond=None)[0]  # pinv(system) @ target
    counts = np.round(np.clip(raw, 0, None)).astype(int)
    counts[counts > k] = 0
    return counts


def random_batch_shared(num_classes, dim, num_images, seed, in_dim=20, weight_scale=1.0):
    torch.manual_seed(seed)
    model = TinyVictim(in_dim=in_dim, dim=dim, num_classes=num_classes)
    with torch.no_grad():
        model.classifier.weight.mul_(weight_scale)
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num_images,), generator=generator)
    return shared_for(model, torch.rand(num_images, in_dim, generator=generator), labels)


@pytest.mark.parametrize(
    ("num_classes", "dim", "num_images", "seed"),
    [
        (10, 16, 5, 0),
        (10, 16, 40, 1),  # K > C: the norm guard and near-zero bias gradients
        (50, 24, 12, 2),
        (200, 48, 24, 3),
        (1000, 96, 8, 4),  # C = 1000: the logits through the row-space basis
        (1000, 64, 4, 5),
    ],
)
def test_ilrg_matches_the_plain_per_class_implementation(num_classes, dim, num_images, seed):
    shared = random_batch_shared(num_classes, dim, num_images, seed)
    for norm_guard in (3.0, 0.0) if num_classes < 1000 else (3.0,):
        fast = build_attack("iLRG", norm_guard=norm_guard)(shared).counts.numpy()
        assert (fast == plain_ilrg_counts(shared, norm_guard=norm_guard)).all()


def test_ilrg_matches_the_plain_implementation_with_zero_and_non_finite_rows():
    shared = random_batch_shared(30, 16, 10, 6)
    weight_grad, bias_grad = shared.weight_grad.clone(), shared.bias_grad.clone()
    bias_grad[3] = 0.0  # a usable row with no embedding: stand-in row, still an unknown
    weight_grad[7, 2] = float("nan")  # a non-finite row: neither unknown nor trusted
    bias_grad[11] = float("inf")  # a non-finite equation
    shared = shared.replace(weight_grad=weight_grad, bias_grad=bias_grad)
    assert (build_attack("iLRG")(shared).counts.numpy() == plain_ilrg_counts(shared)).all()


def test_low_rank_products_are_exact_to_the_tolerance_and_fall_back_on_full_rank():
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(1000, 8, dtype=torch.float64, generator=generator)
    embeddings = factors @ torch.randn(8, 512, dtype=torch.float64, generator=generator)
    weight = torch.randn(1000, 512, dtype=torch.float64, generator=generator)
    plain = embeddings @ weight.T
    bound = embeddings.norm(dim=1)[:, None] * weight.norm(dim=1)[None, :]
    tolerance = 1e-9
    fast = embedding_products(embeddings, weight, rank=8, tolerance=tolerance)
    assert ((fast - plain).abs() <= tolerance * bound).all()
    # A few rows off the span (a defense's noise, say) are multiplied out in full.
    embeddings[[3, 500]] += torch.randn(2, 512, dtype=torch.float64, generator=generator)
    fast = embedding_products(embeddings, weight, rank=8, tolerance=tolerance)
    plain = embeddings @ weight.T
    assert torch.equal(fast[[3, 500]], plain[[3, 500]])
    assert ((fast - plain).abs() <= tolerance * bound).all()
    # Full rank: the plain product itself.
    noisy = embeddings + 1e-3 * torch.randn(
        embeddings.shape, dtype=torch.float64, generator=generator
    )
    assert torch.equal(
        embedding_products(noisy, weight, rank=8, tolerance=tolerance), noisy @ weight.T
    )


def test_the_square_solve_is_the_least_squares_solution_even_for_an_inconsistent_target():
    generator = torch.Generator().manual_seed(1)
    probabilities = torch.softmax(
        3 * torch.randn(40, 40, dtype=torch.float64, generator=generator), dim=1
    )
    # A target whose entries do not sum to zero, as after a defense added noise.
    bias_grad = torch.randn(40, dtype=torch.float64, generator=generator) / 10
    system = np.vstack([probabilities.T.numpy() - np.eye(40), np.ones(40)])
    target = np.concatenate([7 * bias_grad.numpy(), [7]])
    least_squares = np.linalg.lstsq(system, target, rcond=None)[0]
    square = solve_square(probabilities, bias_grad, 7)
    assert np.allclose(square.numpy(), least_squares, rtol=0, atol=1e-9)
    every = torch.ones(40, dtype=torch.bool)
    assert torch.equal(solve_counts(probabilities, bias_grad, 7, every, every), square)


def test_a_singular_square_system_takes_the_general_path():
    # One-hot rows (a saturated softmax): P^T - I = 0 and the system is all 1 1^T.
    probabilities = torch.eye(5, dtype=torch.float64)
    bias_grad = torch.zeros(5, dtype=torch.float64)
    assert solve_square(probabilities, bias_grad, 5) is None
    every = torch.ones(5, dtype=torch.bool)
    # The minimum-norm solution of k_1 + ... + k_5 = 5.
    assert torch.allclose(
        solve_counts(probabilities, bias_grad, 5, every, every), torch.ones(5, dtype=torch.float64)
    )


# --- RLG ------------------------------------------------------------------------------------------


def rlg_cases():
    for num_classes, dim, num_images, weight_scale, seed in [
        (30, 20, 6, 1.0, 100),
        (100, 40, 24, 1.0, 101),
        (250, 60, 16, 1.0, 102),
        (120, 50, 24, 8.0, 103),
        (40, 60, 64, 1.0, 104),  # K > C
        # A saturated softmax: most rows are zero or about 1e-8, where the LP's tolerances
        # decide, and where an equivalent LP (without the zero rows, say) answered otherwise.
        (250, 40, 30, 300.0, 200),
        (250, 40, 30, 50.0, 106),
    ]:
        yield random_batch_shared(num_classes, dim, num_images, seed, weight_scale=weight_scale)


def test_rlg_matches_one_lp_per_class_on_random_batches():
    for shared in rlg_cases():
        rows = label_space(shared.weight_grad, shared.num_images)
        order = np.argsort(shared.bias_grad.double().numpy(), kind="stable")
        assert (present_classes(rows, order) == present_classes(rows, order, prune=False)).all()


@pytest.mark.parametrize("seed", [0, 1])
def test_rlg_matches_one_lp_per_class_on_random_rows(seed):
    generator = np.random.default_rng(seed)
    rows = generator.standard_normal((220, 6))
    rows[:40] *= 1e-3  # short rows
    rows[50] = rows[51]  # a repeated row: each lies in the other's cone
    rows[60] = 0.0
    order = generator.permutation(220)
    assert (present_classes(rows, order) == present_classes(rows, order, prune=False)).all()


def test_randomized_label_space_spans_the_leading_singular_vectors():
    shared = random_batch_shared(600, 400, 16, 7, in_dim=64)
    fast = label_space(shared.weight_grad, 16)
    with one_cpu_thread("cpu"):
        full = _left_vectors_by_svd(
            shared.weight_grad.double(), 16, rounding_of(shared.weight_grad)
        ).numpy()
    assert fast.shape == full.shape == (600, 16)
    assert np.abs(fast @ fast.T - full @ full.T).max() < 1e-9


def test_label_space_of_a_gradient_of_lower_rank_than_k():
    generator = torch.Generator().manual_seed(2)
    gradient = torch.randn(500, 5, dtype=torch.float64, generator=generator) @ torch.randn(
        5, 300, dtype=torch.float64, generator=generator
    )
    rows = label_space(gradient, 24)
    assert rows.shape == (500, 5)
    with one_cpu_thread("cpu"):
        full = _left_vectors_by_svd(gradient, 24, rounding_of(gradient)).numpy()
    assert np.abs(rows @ rows.T - full @ full.T).max() < 1e-9


# --- chunked gradients ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "input_shape", "num_images", "max_size"),
    [("lenet5", (3, 32, 32), 96, 32), ("resnet18", (3, 32, 32), 8, 3)],
)
def test_chunked_gradients_equal_one_pass(name, input_shape, num_images, max_size):
    torch.manual_seed(0)
    # eval(): batch norm uses running statistics, as in attack.py, so chunks see one function.
    model = build_network(name, 100, input_shape).eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(num_images, *input_shape, generator=generator)
    labels = torch.randint(100, (num_images,), generator=generator)
    with one_cpu_thread("cpu"):
        one_pass = batch_gradients(model, chunked(images, labels, None), num_images)
        in_chunks = batch_gradients(model, chunked(images, labels, max_size), num_images)
    for parameter, gradient in one_pass.items():
        error = (in_chunks[parameter] - gradient).norm() / gradient.norm().clamp_min(1e-30)
        assert error < 1e-5, parameter


# --- the callback's grouped logging and the thread scope --------------------------------------------


def test_grouped_logging_gives_every_step_its_own_value(tmp_path):
    callback = LabelLeakageCallback()
    logger = tensorboard_logger(tmp_path)
    trainer = cpu_trainer(logger=logger, callbacks=[callback], max_steps=11, log_every_n_steps=4)
    trainer.fit(TinyClassifier(), loader(labelled_data(num_samples=96)))  # 6 batches per epoch
    logged = scalars(logger.log_dir)
    assert logged["leakage/iLRG/LnAcc"] == [(step, 1.0) for step in range(11)]
    assert logged["leakage_epoch/iLRG/LnAcc"] == [(6, 1.0), (11, 1.0)]
    assert callback._pending == []


class FailsAtStep5(TinyClassifier):
    def training_step(self, batch, batch_idx):
        if self.trainer.global_step == 5:
            raise RuntimeError("stop")
        return super().training_step(batch, batch_idx)


def test_values_waiting_for_the_logger_survive_an_error(tmp_path):
    logger = tensorboard_logger(tmp_path)
    trainer = cpu_trainer(
        logger=logger, callbacks=[LabelLeakageCallback()], max_steps=20, log_every_n_steps=50
    )
    with pytest.raises(RuntimeError, match="stop"):
        trainer.fit(FailsAtStep5(), loader(labelled_data(num_samples=160)))
    logger.experiment.flush()
    assert [step for step, _ in scalars(logger.log_dir)["leakage/iLRG/LeAcc"]] == [0, 1, 2, 3, 4]


def test_one_cpu_thread_restores_the_thread_count():
    before = torch.get_num_threads()
    with pytest.raises(ValueError), one_cpu_thread("cpu"):
        assert torch.get_num_threads() == 1
        raise ValueError
    assert torch.get_num_threads() == before
