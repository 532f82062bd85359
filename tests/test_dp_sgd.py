"""DP-SGD clients through Opacus (attacks.dp_sgd): clipping, noise, accounting, the bound, and
attack.py's --defense_method dpsgd."""

import json
import math
import subprocess
import sys

import pytest
import torch
from torch import nn

from attacks.dp_sgd import (
    OPACUS_NORM_EPSILON,
    Privacy,
    epsilon_of,
    label_accuracy_bound,
    private_gradient,
    private_steps,
)
from attacks.gradients import batch_gradients
from attacks.local_update import LocalTraining, client_update
from attacks.metrics import TargetLabelAccuracy
from tests.conftest import REPO
from tests.helpers import exit_code

DELTA = 1e-5


def per_sample(model, images, labels):
    """Each sample's gradient of its cross-entropy, flattened over all parameters (autograd)."""
    rows = []
    for x, y in zip(images, labels):
        loss = nn.functional.cross_entropy(model(x[None]), y[None])
        rows.append(
            torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])
        )
    return torch.stack(rows)


def test_per_sample_clipping_against_a_hand_computed_case():
    """Two samples, one gradient under the clip norm and one over it: the shared gradient is
    (g_1 + g_2 C / |g_2|) / 2 (Opacus divides by |g| + 1e-6: a relative 1e-6 on the clipped one)."""
    model = nn.Linear(2, 3).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.2]]))
        model.bias.zero_()
    images = torch.tensor([[0.1, 0.0], [6.0, -8.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2])
    rows = per_sample(model, images, labels)
    norms = rows.norm(dim=1)
    clip = 2.0
    assert norms[0] < clip < norms[1]  # the case asked for: one under, one over
    expected = (rows[0] + rows[1] * clip / norms[1]) / 2
    shared = private_gradient(model, images, labels, Privacy(clip, 0.0, DELTA), torch.Generator())
    got = torch.cat([shared["weight"].flatten(), shared["bias"]])
    tolerance = OPACUS_NORM_EPSILON / float(norms[1]) * float(rows[1].abs().max()) * clip
    assert torch.allclose(got, expected, rtol=0, atol=2 * tolerance + 1e-15)
    # and the clipped sample's share has the clip norm
    unclipped = private_gradient(
        model, images[:1], labels[:1], Privacy(clip, 0.0, DELTA), torch.Generator()
    )
    assert torch.allclose(torch.cat([unclipped["weight"].flatten(), unclipped["bias"]]), rows[0])


def toy_model():
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 40), nn.Sigmoid(), nn.Linear(40, 10)).eval()


def toy_batch(size=16):
    generator = torch.Generator().manual_seed(2)
    return torch.rand(size, 1, 8, 8, generator=generator), torch.randint(
        0, 10, (size,), generator=generator
    )


def test_no_noise_and_no_clipping_is_the_plain_gradient():
    model = toy_model()
    images, labels = toy_batch()
    plain = batch_gradients(model, [(images, labels)], 16)
    private = private_gradient(
        model, images, labels, Privacy(math.inf, 0.0, DELTA), torch.Generator()
    )
    for name, grad in plain.items():
        # the per-sample route sums in float64, the plain one in float32: float32's rounding
        scale = float(grad.abs().max())
        assert torch.allclose(
            private[name], grad, rtol=0, atol=16 * torch.finfo(torch.float32).eps * scale
        )
    # FedAvg: Opacus' steps without noise or clipping are the plain client's, bit for bit
    training = LocalTraining(3, 4, 0.05)
    reference, steps = client_update(
        model, images, labels, training, torch.Generator().manual_seed(7)
    )
    dp, dp_steps = private_steps(
        model,
        images,
        labels,
        Privacy(math.inf, 0.0, DELTA),
        training,
        torch.Generator().manual_seed(7),
    )
    assert steps == dp_steps == 12
    assert all(torch.equal(dp[name], reference[name]) for name in reference)


def test_the_noise_has_the_accountants_scale():
    privacy = Privacy.for_epsilon(1.0, DELTA, 0.5, steps=1)
    # the accountant's binary search stops within 0.01 of the target, from below
    assert 0.98 <= epsilon_of(privacy.noise_multiplier, 1, DELTA) <= 1.0
    assert 3.5 < privacy.noise_multiplier < 4.1  # a single Gaussian mechanism at epsilon 1
    # five steps per sample need more noise for the same epsilon
    assert (
        Privacy.for_epsilon(1.0, DELTA, 0.5, steps=5).noise_multiplier
        > 2 * privacy.noise_multiplier
    )
    model = toy_model()
    images, labels = toy_batch()
    clean = private_gradient(model, images, labels, Privacy(0.5, 0.0, DELTA), torch.Generator())
    noisy = private_gradient(model, images, labels, privacy, torch.Generator().manual_seed(3))
    noise = torch.cat([(noisy[n] - clean[n]).flatten() for n in clean])
    expected = privacy.noise_multiplier * 0.5 / 16  # sigma C / K on every coordinate
    # 3010 coordinates: the sample std is within 5% of the true one with overwhelming probability
    assert abs(float(noise.std()) / expected - 1) < 0.05
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(noise.numel())


def test_the_label_bound():
    uniform = torch.ones(10)
    # uniform: (e^eps + delta (C - 1)) / (e^eps + C - 1)
    assert label_accuracy_bound(0.0, DELTA, uniform) == pytest.approx((1 + 9 * DELTA) / 10)
    assert label_accuracy_bound(math.log(9), DELTA, uniform) == pytest.approx((9 + 9 * DELTA) / 18)
    assert label_accuracy_bound(math.inf, DELTA, uniform) == 1.0
    # a prior with one class at 1/2: guessing it alone is right half the time, at epsilon 0
    skewed = torch.tensor([5.0, 1, 1, 1, 1, 1])
    assert label_accuracy_bound(0.0, 0.0, skewed) == pytest.approx(0.5)
    # replace-one costs twice the sensitivity: the label epsilon is that of sigma / 2
    privacy = Privacy(1.0, 2.0, DELTA)
    assert privacy.label_epsilon(1) == pytest.approx(epsilon_of(1.0, 1, DELTA))
    assert privacy.label_epsilon(1) > 2 * privacy.epsilon(1) > 0


def test_target_label_accuracy_hand_cases():
    metric = TargetLabelAccuracy()
    true = torch.tensor([[3, 1, 0, 0]])
    assert float(metric.batch_scores(true, true)) == 1.0
    # [2, 2, 0, 0]: the class-1 target is found (its class has one extra), the class-0 ones not
    assert float(metric.batch_scores(torch.tensor([[2, 2, 0, 0]]), true)) == 0.25
    # nothing restored: a class-0 target guesses between classes 2 and 3 (never 0); a class-1
    # target between 1, 2 and 3: right a third of the time, for one sample of four
    assert float(metric.batch_scores(torch.zeros(1, 4, dtype=torch.long), true)) == pytest.approx(
        1 / 12
    )


@pytest.mark.parametrize(
    "options, message",
    [
        (
            ["--target_epsilon", "1"],
            "--target_epsilon set DP-SGD; add --defense --defense_method dpsgd",
        ),
        (
            ["--defense", "--defense_method", "dpsgd"],
            "--defense_method dpsgd needs exactly one of --target_epsilon and --noise_multiplier",
        ),
        (
            [
                "--defense",
                "--defense_method",
                "dpsgd",
                "--target_epsilon",
                "1",
                "--noise_multiplier",
                "1",
            ],
            "--defense_method dpsgd needs exactly one of --target_epsilon and --noise_multiplier, got both",
        ),
        (
            [
                "--defense",
                "--defense_method",
                "dpsgd",
                "--noise_multiplier",
                "1",
                "--max_grad_norm",
                "inf",
            ],
            "noise needs a finite --max_grad_norm: it is scaled by the clip norm",
        ),
        (
            [
                "--defense",
                "--defense_method",
                "dpsgd",
                "--target_epsilon",
                "1",
                "--model",
                "lenet5",
                "--batchnorm",
            ],
            "DP-SGD cannot train this model",
        ),
        (
            ["--defense", "--defense_method", "dpsgd", "--target_epsilon", "0"],
            "must be a finite number > 0, got 0",
        ),
    ],
)
def test_bad_dpsgd_requests_are_one_line(options, message, tmp_path, capsys):
    import attack

    assert exit_code(attack.main, ["--num_tries", "1", "--log_dir", str(tmp_path), *options]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    if "--batchnorm" in options:
        assert "ModuleValidator.fix" in lines[0] and "GroupNorm" in lines[0]
    assert not list(tmp_path.iterdir())  # refused before the run folder


def run_attack(tmp_path, name, *options):
    results = tmp_path / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, "attack.py", "--num_tries", "4", "--num_images", "16", "--quiet",
         "--log_dir", str(tmp_path / "logs"), "--results", str(results), *options],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text()), proc.stdout


@pytest.mark.slow
def test_epsilon_inf_without_clipping_reproduces_the_plain_run(tmp_path):
    """FedAvg E = 2 (FedSGD takes the same branch: no noise and no clipping is the plain client)."""
    local = ["--local_epochs", "2", "--local_batch_size", "8"]
    plain, _ = run_attack(tmp_path, "plain", *local)
    dp, stdout = run_attack(
        tmp_path, "dp", *local, "--defense", "--defense_method", "dpsgd",
        "--target_epsilon", "inf", "--max_grad_norm", "inf",
    )  # fmt: skip
    assert [t["methods"] for t in dp["tries"]] == [t["methods"] for t in plain["tries"]]
    assert dp["summary"] == plain["summary"]
    assert dp["defense"]["noise_multiplier"] == 0 and dp["defense"]["epsilon"] == "inf"
    assert dp["defense"]["label_accuracy_bound"] == 1.0
    assert "defense: dpsgd (epsilon = inf, noise multiplier = 0" in stdout


@pytest.mark.slow
def test_a_private_run_records_its_epsilon_and_bound(tmp_path):
    record, _ = run_attack(
        tmp_path, "dp", "--defense", "--defense_method", "dpsgd", "--target_epsilon", "1",
        "--local_epochs", "2", "--local_batch_size", "8",
    )  # fmt: skip
    defense = record["defense"]
    assert defense["method"] == "dpsgd" and defense["steps_per_sample"] == 2
    assert 0.98 <= defense["epsilon"] <= 1.0
    assert defense["label_epsilon"] > 2 * defense["epsilon"]
    assert defense["label_accuracy_bound"] == pytest.approx(
        label_accuracy_bound(defense["label_epsilon"], 1e-5, torch.ones(10)), abs=0.01
    )
    # the noise reached the attacks: iLRG no longer restores every count
    assert record["summary"]["iLRG"]["Exact"] < 1.0
