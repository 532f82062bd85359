"""decompose's dense route (``attacks.consistency``): per-sample labels where the classifier's
inputs have no zeros, on gradients whose samples the tests know exactly."""

import inspect
import math

import pytest
import torch
from torch import nn

from attacks import SharedGradients, build_attack
from attacks.consistency import (
    Consistency,
    best_labels,
    levenberg_marquardt,
    new_samples,
    relative_miss,
    row_starts,
)
from attacks.decompose import batch_inputs, subspace
from tests.helpers import classifier_gradient, fitted_batch, shared_for


def dense_batch(
    num_images=24, dim=64, num_classes=100, confidence=0.999, seed=0, dtype=torch.float64
):
    """The classifier's gradient for K dense embeddings (softplus of Gaussians: no zeros).

    The logits are scaled until the most confident sample reaches ``confidence``.
    Samples 1-3 are sample 0 moved a little (four samples the model puts in one
    class); every sample but the last sixth carries the model's prediction (fitted
    samples, as a trained model's), the last sixth a random label.
    """
    generator = torch.Generator().manual_seed(seed)
    normal = torch.randn(num_images, dim, generator=generator, dtype=torch.float64)
    normal[1:4] = normal[0] + 0.3 * normal[1:4]
    embeddings = nn.functional.softplus(normal)
    weight = torch.randn(num_classes, dim, generator=generator, dtype=torch.float64)
    weight /= math.sqrt(dim)
    bias = 0.1 * torch.randn(num_classes, generator=generator, dtype=torch.float64)
    return fitted_batch(embeddings, weight, bias, confidence, 5 * num_images // 6, generator, dtype)


def stacked(shared):
    return torch.cat([shared.weight_grad, shared.bias_grad[:, None]], 1).to(torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_dense_embeddings_give_every_label_in_float64(seed):
    shared, labels, probabilities, _ = dense_batch(seed=seed)
    # The premise: confident samples up to 0.999, and no vertex of the row space is a sample.
    assert probabilities.max() >= 0.999
    gradient = stacked(shared)
    assert batch_inputs(gradient, 24, 2.0**-52, torch.Generator().manual_seed(0))[0].shape[0] == 0
    restoration = build_attack("decompose")(shared)
    assert restoration.separated == 24
    assert sorted(restoration.sample_labels.tolist()) == sorted(labels.tolist())
    assert torch.equal(restoration.counts, torch.bincount(labels, minlength=100))


def test_dense_embeddings_in_float32_give_no_wrong_label():
    # A float32 client: the smallest terms (p_y up to 0.999) are not resolved at float32's
    # rounding, and a sample is kept only where its point passes both tests to the precision
    # its own term allows. Measured over these 4 batches: 67 of 96 separated, none wrong.
    separated = wrong = 0
    for seed in range(4):
        shared, labels, _, _ = dense_batch(seed=seed, dtype=torch.float32)
        restoration = build_attack("decompose")(shared)
        separated += restoration.separated
        found = torch.bincount(restoration.sample_labels, minlength=100)
        wrong += int((found - torch.bincount(labels, minlength=100)).clamp_min(0).sum())
    assert wrong == 0
    assert separated >= 60


def test_the_jacobian_is_the_derivative():
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(10, generator=generator, dtype=torch.float64)
    slope = torch.randn(10, 3, generator=generator, dtype=torch.float64)
    columns = torch.linalg.qr(torch.randn(10, 4, generator=generator, dtype=torch.float64))[0]
    labels = torch.tensor([2, 7])
    y = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    _, jacobian = relative_miss(y, base, slope, columns, labels, jacobian=True)
    for start in range(2):
        expected = torch.autograd.functional.jacobian(
            lambda v, s=start: relative_miss(v[None], base, slope, columns, labels[s : s + 1])[0],
            y[start],
        )
        torch.testing.assert_close(jacobian[start], expected)


def test_a_search_from_near_a_sample_ends_on_it():
    shared, labels, _, inputs = dense_batch(num_images=8, seed=1)
    gradient = stacked(shared)
    space = subspace(gradient, 8, 2.0**-52)
    logits = torch.cat([shared.weight, shared.bias[:, None]], 1) @ space.basis
    last = space.basis[-1]
    offset = last / last.square().sum()
    free = torch.linalg.svd(last[None])[2][1:].T
    columns = torch.linalg.qr(gradient @ space.basis)[0]
    # Sample 5's own coordinates in the row space, moved off it by 0.05 per free coordinate.
    truth = (space.basis.T @ inputs[5]) @ free
    generator = torch.Generator().manual_seed(2)
    start = truth + 0.05 * torch.randn(7, generator=generator, dtype=torch.float64)
    before = relative_miss(start[None], logits @ offset, logits @ free, columns, labels[5:6])
    y, miss = levenberg_marquardt(
        start[None].clone(), logits @ offset, logits @ free, columns, 1e-12
    )
    assert float(before.norm()) > 1e-3 and float(miss) <= 1e-10
    found = (offset + y[0] @ free.T) @ space.basis.T
    torch.testing.assert_close(found, inputs[5], rtol=1e-7, atol=1e-7)


def test_row_starts_are_the_rows_beyond_the_noise_largest_bias_first():
    gradient = torch.tensor(
        [[2.0, 4.0, -2.0], [1.0, 1.0, 0.5], [3.0, 0.0, -1.0], [5.0, 5.0, 1e-6]], dtype=torch.float64
    )
    starts = row_starts(gradient, noise=1e-3, room=1)
    expected = torch.tensor([[-1.0, -2.0, 1.0], [-3.0, 0.0, 1.0], [2.0, 2.0, 1.0]])
    torch.testing.assert_close(starts, expected.to(torch.float64))


def test_the_best_label_is_the_one_the_column_space_holds():
    # Column space spanned by p - onehot(3) for p below: label 3 fits exactly, no other does.
    p = torch.softmax(torch.tensor([[0.3, -1.0, 0.5, 2.0, 0.1]], dtype=torch.float64), 1)
    g = p[0] - torch.eye(5, dtype=torch.float64)[3]
    other = torch.tensor([0.2, -0.5, 0.1, 0.1, 0.1], dtype=torch.float64)
    columns = torch.linalg.qr(torch.stack([g, other], 1))[0]
    assert best_labels(p, columns).tolist() == [3]
    assert (
        float(
            relative_miss(
                torch.zeros(1, 0, dtype=torch.float64),
                torch.log(p[0]),
                torch.zeros(5, 0, dtype=torch.float64),
                columns,
            ).norm()
        )
        < 1e-12
    )


def test_wedderburn_ratios_are_the_identity_on_the_samples():
    # x_m^T G^+ g_n / K = [m = n] for the true inputs and output gradients, and a point of the
    # row space that is no sample fails it.
    shared, labels, probabilities, inputs = dense_batch(num_images=8, seed=3)
    gradient = stacked(shared)
    space = subspace(gradient, 8, 2.0**-52)
    whole = Consistency.of(
        gradient, shared.weight, shared.bias, space.basis, space.singular, space.noise
    )
    errors = probabilities - torch.eye(100, dtype=torch.float64)[labels]
    ratios = whole.ratios(inputs, errors, 8)
    # Within what the test allows a sample (the square root of its resolution at float64's
    # rounding); G^+ is ill-conditioned where samples 1-3 are near copies of sample 0: the
    # cross ratios are off by up to 3.5e-7 (measured), far inside the 0.5 the test allows.
    allowed = whole.resolution(errors).sqrt()
    assert float(allowed.max()) < 1e-4
    assert bool(((ratios.diagonal() - 1).abs() <= allowed).all())
    off = ratios - torch.diag(ratios.diagonal())
    assert float(off.abs().max()) <= 1e-6
    mixed = 0.5 * (inputs[0] + inputs[1])
    p = torch.softmax(mixed[:-1] @ shared.weight.T + shared.bias, 0)
    mixed_error = p - torch.eye(100, dtype=torch.float64)[labels[0]]
    assert abs(float(whole.ratios(mixed[None], mixed_error[None], 8)[0, 0]) - 1) > 0.1


def test_the_route_sees_only_what_the_server_sees():
    parameters = list(inspect.signature(new_samples).parameters)
    assert parameters == ["whole", "rest", "found", "weight", "bias", "num_images"]
    of = list(inspect.signature(Consistency.of).parameters)
    assert of == ["gradient", "weight", "bias", "basis", "singular", "noise"]
    assert not any("label" in name for name in SharedGradients.__dataclass_fields__)


class Pooled(nn.Module):
    """A ResNet's shape in small: ReLU convolutions, a global average pool, a linear classifier."""

    def __init__(self, num_classes: int = 20):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


def test_a_trained_global_pool_model_gives_per_sample_labels_where_ilrg_fails():
    # 200 random images memorised in a few seconds (train accuracy 1): the samples are fitted,
    # iLRG's class embeddings fail, and the pooled embeddings have no vertex to find.
    # Measured: decompose IRec 1.0 (79 of 80 separated, none wrong), iLRG 0.49.
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(200, 3, 8, 8, generator=generator)
    labels = torch.randint(20, (200,), generator=generator)
    model = Pooled()
    optimizer = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(300):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        assert float((model(images).argmax(1) == labels).float().mean()) == 1.0
    recall = {"iLRG": 0.0, "decompose": 0.0}
    separated = wrong = 0
    for _ in range(10):
        batch = torch.randperm(200, generator=generator)[:8]
        shared = shared_for(model, images[batch], labels[batch])
        true = torch.bincount(labels[batch], minlength=20)
        for name in recall:
            restoration = build_attack(name)(shared)
            counts = restoration.adjusted_counts
            recall[name] += float(torch.minimum(counts, true).sum()) / 8 / 10
        separated += restoration.separated
        found = torch.bincount(restoration.sample_labels, minlength=20)
        wrong += int((found - true).clamp_min(0).sum())
    assert wrong == 0 and separated >= 70
    assert recall["decompose"] >= recall["iLRG"] + 0.3


@pytest.mark.slow
def test_a_vgg_head_separates_64_samples():
    # The VGG-16 head at K = 64 of 100 classes: 4096-wide ReLU embeddings (half zeros), a
    # float32 client. 2K > C, so no consistency search; the vertices of the row space are
    # the samples. Measured: 64 of 64 separated, the counts exact.
    generator = torch.Generator().manual_seed(7)
    embeddings = torch.relu(torch.randn(64, 4096, generator=generator, dtype=torch.float64))
    weight = torch.randn(100, 4096, generator=generator, dtype=torch.float64) / 64
    bias = 0.1 * torch.randn(100, generator=generator, dtype=torch.float64)
    labels = torch.randint(100, (64,), generator=generator)
    shared, _, _ = classifier_gradient(embeddings, weight, bias, labels, torch.float32)
    restoration = build_attack("decompose")(shared)
    assert restoration.separated == 64
    assert sorted(restoration.sample_labels.tolist()) == sorted(labels.tolist())
    assert torch.equal(restoration.counts, torch.bincount(labels, minlength=100))
