"""The client-side defenses on hand-made gradients, Soteria against a slow reference, and attack.py."""

import argparse
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from attacks.defenses import (
    DEFENSES,
    add_gaussian_noise,
    clip_to_norm,
    global_norm,
    percentile_count,
    representation_scores,
    soteria,
    sparsify,
)
from attacks.gradients import batch_gradients, chunked, embed_and_forward
from experiment.client_options import build_defense
from lightning_modules.networks import VictimNetwork, build_network
from tests.conftest import REPO
from tests.helpers import TinyVictim
from user_errors import UserError


def frozen_copy(grads):
    return {name: grad.clone() for name, grad in grads.items()}


def assert_unchanged(grads, copy):
    assert list(grads) == list(copy)
    for name in grads:
        assert torch.equal(grads[name], copy[name])


def options(**given):
    values = {
        "defense": False,
        "defense_method": None,
        "noise_std": 1e-3,
        "clip_bound": 4.0,
        "sparse_ratio": 10.0,
        "prune_ratio": 10.0,
    }
    values.update(given)
    return argparse.Namespace(**values)


# --- registry and options ---------------------------------------------------------------------


def test_registry_names_and_the_perturb_alias():
    assert list(DEFENSES) == ["dp", "clip", "sparse", "soteria", "perturb"]
    assert DEFENSES["perturb"] is DEFENSES["soteria"]
    assert {name: d.parameter for name, d in DEFENSES.items()} == {
        "dp": "noise_std",
        "clip": "clip_bound",
        "sparse": "sparse_ratio",
        "soteria": "prune_ratio",
        "perturb": "prune_ratio",
    }


def test_build_defense_needs_both_flags():
    assert build_defense(options(), seed=0) is None
    with pytest.raises(
        UserError,
        match=r"^--defense needs --defense_method; valid methods: dp, clip, sparse, soteria, perturb$",
    ):
        build_defense(options(defense=True), seed=0)
    with pytest.raises(UserError, match=r"^--defense_method sparse needs --defense"):
        build_defense(options(defense_method="sparse"), seed=0)


def test_build_defense_describes_itself():
    defense = build_defense(
        options(defense=True, defense_method="perturb", prune_ratio=20.0), seed=7
    )
    assert defense.describe() == {
        "method": "soteria",
        "parameter": "prune_ratio",
        "value": 20.0,
        "seed": 7,
    }
    assert str(defense) == "soteria (prune_ratio = 20)"


# --- dp ---------------------------------------------------------------------------------------


def test_dp_noise_has_the_asked_statistics_and_keeps_the_input():
    grads = {"a.weight": torch.zeros(300, 400), "a.bias": torch.full((5000,), 2.0)}
    copy = frozen_copy(grads)
    noisy = add_gaussian_noise(grads, 0.01, torch.Generator().manual_seed(0))
    assert_unchanged(grads, copy)
    noise = torch.cat([noisy["a.weight"].flatten(), noisy["a.bias"].flatten() - 2.0])
    assert noisy["a.weight"].shape == (300, 400) and noisy["a.weight"].dtype == torch.float32
    assert abs(float(noise.mean())) < 3 * 0.01 / math.sqrt(noise.numel())
    assert float(noise.std()) == pytest.approx(0.01, rel=0.01)
    # Gaussian: about 68.3% of the draws within one std.
    assert float((noise.abs() < 0.01).double().mean()) == pytest.approx(0.6827, abs=0.01)


def test_dp_is_seeded_and_fresh_for_every_try():
    grads = {"w": torch.zeros(10, 10)}
    first = build_defense(options(defense=True, defense_method="dp"), seed=3)
    again = build_defense(options(defense=True, defense_method="dp"), seed=3)
    try_1, try_2 = first(grads, None, None), first(grads, None, None)
    assert torch.equal(try_1["w"], again(grads, None, None)["w"])
    assert not torch.equal(try_1["w"], try_2["w"])
    other = build_defense(options(defense=True, defense_method="dp"), seed=4)
    assert not torch.equal(try_1["w"], other(grads, None, None)["w"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dp_on_cuda_gives_the_cpu_noise():
    grads = {"w": torch.zeros(64, 64)}
    on_cpu = add_gaussian_noise(grads, 0.1, torch.Generator().manual_seed(1))
    on_gpu = add_gaussian_noise({"w": grads["w"].cuda()}, 0.1, torch.Generator().manual_seed(1))
    assert on_gpu["w"].device.type == "cuda"
    assert torch.equal(on_gpu["w"].cpu(), on_cpu["w"])


# --- clip -------------------------------------------------------------------------------------


def test_clip_scales_all_tensors_together_to_the_bound():
    grads = {"w": torch.tensor([[3.0, 0.0], [0.0, 0.0]]), "b": torch.tensor([4.0])}  # global norm 5
    copy = frozen_copy(grads)
    clipped = clip_to_norm(grads, 4.0)
    assert_unchanged(grads, copy)
    assert float(global_norm(clipped)) == pytest.approx(4.0, rel=1e-7)
    assert clipped["w"].flatten().tolist() == pytest.approx([2.4, 0.0, 0.0, 0.0])
    assert clipped["b"].tolist() == pytest.approx([3.2])


def test_clip_leaves_small_or_zero_gradients_alone():
    grads = {"w": torch.tensor([0.3, -0.4])}
    assert torch.equal(clip_to_norm(grads, 4.0)["w"], grads["w"])
    zero = {"w": torch.zeros(3)}
    assert torch.equal(clip_to_norm(zero, 4.0)["w"], zero["w"])


def test_clip_on_real_gradients_gives_the_bound():
    torch.manual_seed(0)
    model = TinyVictim()
    grads = batch_gradients(model, chunked(torch.randn(6, 12) * 50, torch.arange(6), None), 6)
    assert float(global_norm(grads)) > 0.1
    assert float(global_norm(clip_to_norm(grads, 0.1))) == pytest.approx(0.1, rel=1e-6)


# --- sparse -----------------------------------------------------------------------------------


@pytest.mark.parametrize("ratio", [10, 20, 40, 80])
def test_sparse_zeroes_exactly_that_fraction_of_the_smallest(ratio):
    generator = torch.Generator().manual_seed(ratio)
    magnitudes = torch.randperm(1000, generator=generator).float() + 1
    signs = torch.where(torch.rand(1000, generator=generator) < 0.5, -1.0, 1.0)
    grads = {"w": (magnitudes * signs).view(20, 50), "b": torch.arange(1.0, 11.0)}
    copy = frozen_copy(grads)
    sparse = sparsify(grads, ratio)
    assert_unchanged(grads, copy)
    zeroed = sparse["w"] == 0
    assert int(zeroed.sum()) == 10 * ratio  # exactly ratio% of 1000
    assert torch.equal(zeroed.flatten(), magnitudes <= 10 * ratio)
    kept = ~zeroed
    assert torch.equal(sparse["w"][kept], grads["w"][kept])
    assert int((sparse["b"] == 0).sum()) == ratio // 10


@pytest.mark.parametrize("size", [1, 2, 7, 33, 250])
@pytest.mark.parametrize("ratio", [0, 10, 25, 50, 80, 100])
def test_sparse_is_the_original_percentile_rule_on_distinct_values(size, ratio):
    values = torch.randn(size, generator=torch.Generator().manual_seed(size), dtype=torch.float64)
    expected = np.where(
        np.abs(values.numpy()) < np.percentile(np.abs(values.numpy()), ratio), 0, values.numpy()
    )
    assert np.array_equal(sparsify({"v": values}, ratio)["v"].numpy(), expected)
    assert percentile_count(size, ratio) == int((expected == 0).sum())


def test_sparse_count_does_not_depend_on_ties():
    grads = {"w": torch.full((10, 10), -0.5)}
    sparse = sparsify(grads, 40)
    assert int((sparse["w"] == 0).sum()) == 40
    assert sparse["w"].flatten()[:40].eq(0).all()  # ties go by position


# --- soteria ----------------------------------------------------------------------------------


def slow_scores(model, images):
    """The original's loop: one backward pass per feature, then per sample ||d e/d x|| / |e|."""
    inputs = images.clone().requires_grad_(True)
    embeddings, _ = embed_and_forward(model, inputs)
    scores = torch.zeros(embeddings.shape[1], dtype=torch.float64)
    for feature in range(embeddings.shape[1]):
        (grad,) = torch.autograd.grad(embeddings[:, feature].sum(), inputs, retain_graph=True)
        for n in range(images.shape[0]):
            norm, value = float(grad[n].norm()), abs(float(embeddings[n, feature].detach()))
            scores[feature] += norm / value if value > 0 else (math.inf if norm > 0 else 0.0)
    return scores


def narrow_victim():
    """A VictimNetwork whose features narrow to 6 before widening to 20: the Gram path."""
    features = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(144, 6),
        nn.ReLU(),
        nn.Linear(6, 20),
        nn.Tanh(),
    )
    return VictimNetwork(features, nn.Linear(20, 10))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: TinyVictim(), (5, 12)),
        (narrow_victim, (4, 3, 8, 8)),
        (lambda: build_network("lenet5", 10, (3, 32, 32)), (2, 3, 32, 32)),
    ],
    ids=["tiny", "narrowing-sequential", "lenet5"],
)
def test_representation_scores_match_the_slow_reference(make, shape):
    torch.manual_seed(0)
    model = make().double().eval()
    images = torch.randn(*shape, dtype=torch.float64)
    reference = slow_scores(model, images)
    fast = representation_scores(model, [(images, None)])
    assert torch.equal(torch.isinf(fast), torch.isinf(reference))
    finite = torch.isfinite(reference)
    assert torch.allclose(fast[finite], reference[finite], rtol=1e-9, atol=1e-12)
    # In eval mode the batch may come in chunks.
    chunks = [(images[:1], None), (images[1:], None)]
    assert torch.allclose(
        representation_scores(model, chunks)[finite], reference[finite], rtol=1e-9
    )


def test_zero_features_give_zero_or_infinite_scores():
    model = TinyVictim(in_dim=2, dim=3, num_classes=4)
    model.features = nn.Sequential(nn.Linear(2, 3))  # no ReLU: a zero feature can still move
    model = model.double()
    with torch.no_grad():
        model.features[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]]))
        model.features[0].bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    images = torch.tensor([[1.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    # feature 0 is exactly 0 with gradient (1, 0): x/0 = inf; feature 1 is constant 0: 0/0 = 0;
    # feature 2 = 2 x_2 + 1 is 3 and 7 with gradient norm 2.
    scores = representation_scores(model, [(images, None)])
    assert scores.tolist() == pytest.approx([math.inf, 0.0, 2 / 3 + 2 / 7])


def test_soteria_zeroes_the_columns_of_the_lowest_scores_only():
    torch.manual_seed(2)
    model = TinyVictim().double().eval()
    images, labels = torch.randn(6, 12, dtype=torch.float64), torch.tensor([0, 1, 1, 3, 3, 3])
    grads = batch_gradients(model, [(images, labels)], 6)
    copy = frozen_copy(grads)
    defended = soteria(grads, model, [(images, labels)], prune_ratio=25)
    assert_unchanged(grads, copy)
    reference = slow_scores(model, images)
    pruned = torch.argsort(reference, stable=True)[: percentile_count(16, 25)]  # 4 of 16 features
    assert sorted(
        torch.nonzero((defended["classifier.weight"] == 0).all(dim=0)).flatten().tolist()
    ) == sorted(pruned.tolist())
    keep = torch.ones(16, dtype=torch.bool)
    keep[pruned] = False
    assert torch.equal(defended["classifier.weight"][:, keep], grads["classifier.weight"][:, keep])
    for name in grads:
        if name != "classifier.weight":
            assert torch.equal(defended[name], grads[name])


def test_soteria_through_the_registry_uses_the_client_batch():
    torch.manual_seed(3)
    model = build_network("dnn", 10, (1, 28, 28), n_dim=30).eval()
    images, labels = torch.randn(4, 1, 28, 28), torch.tensor([1, 2, 2, 5])
    grads = batch_gradients(model, [(images, labels)], 4)
    defense = build_defense(options(defense=True, defense_method="perturb", prune_ratio=50), seed=0)
    defended = defense(grads, model, lambda: iter([(images, labels)]))
    assert int((defended["classifier.weight"] == 0).all(dim=0).sum()) >= percentile_count(30, 50)


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
    return proc, (json.loads(results.read_text()) if proc.returncode == 0 else None)


@pytest.mark.parametrize(
    "method, flag, value",
    [
        ("dp", "--noise_std", "0.01"),
        ("clip", "--clip_bound", "0.5"),
        ("sparse", "--sparse_ratio", "80"),
        ("perturb", "--prune_ratio", "10"),
    ],
)
def test_attack_py_runs_each_defense_and_says_so(tmp_path, method, flag, value):
    proc, results = attack(
        tmp_path,
        "--num_tries",
        "2",
        "--no-compare",
        "--n_dim",
        "40",
        "--defense",
        "--defense_method",
        method,
        flag,
        value,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    name = "soteria" if method == "perturb" else method
    parameter = flag[2:]
    assert results["defense"] == {
        "method": name,
        "parameter": parameter,
        "value": float(value),
        "seed": 1234,
    }
    assert f"defense: {name} ({parameter} = {float(value):g})" in proc.stdout
    assert results["tries_done"] == 2


def test_attack_py_defended_runs_are_reproducible(tmp_path):
    # Noise this strong scrambles the counts, so equal counts mean equal noise.
    args = (
        "--num_tries",
        "2",
        "--no-compare",
        "--defense",
        "--defense_method",
        "dp",
        "--noise_std",
        "1",
    )
    _, first = attack(tmp_path, *args)
    _, second = attack(tmp_path, *args)
    assert first["tries"] == second["tries"]
    assert first["summary"]["iLRG"]["LnAcc"] < 0.9


def test_attack_py_refuses_a_defense_without_method(tmp_path):
    proc, _ = attack(tmp_path, "--defense")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "attack.py: error: --defense needs --defense_method; valid methods: dp, clip, sparse, soteria, perturb"
    ]


@pytest.mark.slow
def test_strong_defenses_lower_ilrg_on_cifar100_resnet18(tmp_path, shared_data):
    common = (
        "--data_root",
        str(shared_data),
        "--dataset",
        "CIFAR100",
        "--split",
        "val",
        "--model",
        "resnet18",
    )
    common += ("--num_images", "24", "--num_tries", "2", "--no-compare")
    _, undefended = attack(tmp_path, *common)
    assert undefended["summary"]["iLRG"]["LnAcc"] == 1.0
    _, noisy = attack(
        tmp_path, *common, "--defense", "--defense_method", "dp", "--noise_std", "1e-2"
    )
    _, sparse = attack(
        tmp_path, *common, "--defense", "--defense_method", "sparse", "--sparse_ratio", "80"
    )
    assert noisy["summary"]["iLRG"]["LnAcc"] < 0.99
    assert sparse["summary"]["iLRG"]["LnAcc"] < 0.99


def test_preset_table_runs_each_preset_and_prints_one_markdown_table(tmp_path, capsys):
    from experiment import preset_table

    presets = {"plain": "", "noisy": "defense: true\ndefense_method: dp\nnoise_std: 0.01\n"}
    for name, extra in presets.items():
        (tmp_path / f"{name}.yaml").write_text("num_tries: 1\ncompare: false\nn_dim: 20\n" + extra)
    # The table in this process; each preset still runs as its own attack.py process.
    argv = [str(tmp_path / f"{n}.yaml") for n in presets]
    assert preset_table.main([*argv, "--", "--log_dir", str(tmp_path / "logs")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [
        "| preset | defense | method | tries | LeAcc | LnAcc | LnAcc+ | IRec | Exact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    assert lines[2].startswith("| plain | none | iLRG | 1 | ")
    assert lines[3].startswith("| noisy | dp noise_std=0.01 | iLRG | 1 | ")
    assert len(lines) == 4
