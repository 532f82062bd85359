import itertools
import json
import math
import os
import subprocess
import sys
from argparse import Namespace

import pytest
import torch
from torch import nn

from attacks import build_attack
from attacks.gradients import batch_gradients, share
from attacks.image_metrics import comparison_grid, match_images, pairwise_mse, score_images
from attacks.observation import Restoration
from attacks.reconstruction import (
    COST_FUNCTIONS,
    GradientMatcher,
    ReconstructionConfig,
    box_bounds,
    initial_images,
    project_to_box,
    reconstruct,
    total_variation,
)
from experiment.cli import build_parser
from experiment.extension import TryContext
from experiment.options import parse_args
from experiment.reconstruction import Reconstruction, label_source
from tests.conftest import REPO

SHAPE = (1, 12, 12)
MEAN, STD = (0.5,), (0.25,)


@pytest.fixture(autouse=True)
def _one_thread():
    # Many tiny double-backward passes: one thread avoids contention stalls on a shared CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def small_victim(seed=0, num_classes=4):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Flatten(), nn.Linear(144, 16), nn.ReLU(), nn.Linear(16, num_classes)
    ).eval()


def batch(seed=0, labels=(0, 1, 1, 3)):
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.rand((len(labels), *SHAPE), generator=generator)
    return (pixels - MEAN[0]) / STD[0], torch.tensor(labels)


# --- cost functions, regularisers, box ------------------------------------------------------


def test_cost_functions_on_known_inputs():
    target, sizes = torch.tensor([3.0, 4.0]), torch.tensor([2])
    sim = COST_FUNCTIONS["sim"]
    assert float(sim(2 * target, target, sizes)) == pytest.approx(0.0, abs=1e-7)
    assert float(sim(-target, target, sizes)) == pytest.approx(2.0)
    assert float(sim(torch.tensor([-4.0, 3.0]), target, sizes)) == pytest.approx(1.0)
    dummy = torch.tensor([1.0, 6.0])  # differences -2, 2
    assert float(COST_FUNCTIONS["l2"](dummy, target, sizes)) == pytest.approx(8.0)
    assert float(COST_FUNCTIONS["l1"](dummy, target, sizes)) == pytest.approx(4.0)
    # max: the largest deviation of each parameter, summed over parameters
    dummy, target = torch.tensor([3.0, 1.0, 0.0, 5.0, 1.0]), torch.zeros(5)
    assert float(COST_FUNCTIONS["max"](dummy, target, torch.tensor([5]))) == pytest.approx(5.0)
    assert float(COST_FUNCTIONS["max"](dummy, target, torch.tensor([2, 3]))) == pytest.approx(8.0)


def test_matcher_compares_all_parameters_and_is_zero_at_the_truth():
    model = small_victim()
    images, labels = batch()
    grads = batch_gradients(model, [(images, labels)], labels.numel())
    for cost_fn in COST_FUNCTIONS:
        matcher = GradientMatcher(model, grads, cost_fn)
        assert matcher.target.numel() == sum(p.numel() for p in model.parameters())
        assert float(matcher(images, labels, create_graph=False)) == pytest.approx(0.0, abs=1e-5)
        assert float(matcher(images.flip(0), labels, create_graph=False)) > 1e-4
    # Confident soft labels give the hard labels' gradient.
    soft = 50.0 * nn.functional.one_hot(labels, 4).float()
    assert float(GradientMatcher(model, grads, "sim")(images, soft, create_graph=False)) < 1e-5


def test_total_variation_of_known_images():
    assert float(total_variation(torch.ones(2, 1, 4, 4))) == 0.0
    stripes = torch.tensor([0.0, 1.0, 0.0, 1.0]).repeat(1, 1, 4, 1)  # columns alternate
    assert float(total_variation(stripes)) == pytest.approx(1.0)


def test_box_keeps_denormalised_pixels_in_unit_range():
    mean, std = (0.5, 0.2, 0.1), (0.25, 0.5, 0.2)
    lower, upper = box_bounds(mean, std)
    assert lower.flatten().tolist() == pytest.approx([-2.0, -0.4, -0.5])
    assert upper.flatten().tolist() == pytest.approx([2.0, 1.6, 4.5])
    images = 10 * torch.randn(4, 3, 5, 5)
    inside = images.clamp(-0.4, 1.6).clone()
    project_to_box(images, (lower, upper))
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6
    assert torch.equal(images[:, 1], inside[:, 1])  # values inside the box are untouched


# --- label sources ---------------------------------------------------------------------------


def test_label_source_follows_the_flags():
    assert label_source(Namespace(fix_labels=False, gt_labels=False)) == "joint"
    assert label_source(Namespace(fix_labels=True, gt_labels=False)) == "iLRG"
    assert label_source(Namespace(fix_labels=True, gt_labels=True)) == "true"
    assert label_source(Namespace(fix_labels=False, gt_labels=True)) == "true"


def make_extension(source, tmp_path=None, iterations=30, **config):
    extension = Reconstruction(
        small_victim(),
        ReconstructionConfig(max_iterations=iterations, boxed=True, **config),
        source=source,
        input_shape=SHAPE,
        num_classes=4,
        mean=MEAN,
        std=STD,
        seed=0,
        ilrg=build_attack("iLRG"),
        save_image=tmp_path is not None,
    )
    if tmp_path is not None:
        extension.bind(tmp_path)
    return extension


def context(model, images, labels, restorations=None):
    grads = batch_gradients(model, [(images, labels)], labels.numel())
    shared = share(model, grads, labels.numel(), layer_name="3")
    counts = torch.bincount(labels, minlength=4)
    return TryContext(
        0,
        torch.arange(labels.numel()),
        labels,
        counts,
        grads,
        shared,
        restorations or {},
        lambda: iter([(images, labels)]),
    )


def test_ilrg_labels_are_exactly_the_adjusted_counts_expanded():
    extension = make_extension("iLRG")
    images, labels = batch()
    restoration = Restoration.from_counts(torch.tensor([2, 0, 1, 0]), torch.tensor([2, 0, 1, 1]))
    fixed, source = extension.labels(
        context(extension.model, images, labels, {"iLRG": restoration})
    )
    assert source == "iLRG"
    assert fixed.tolist() == [0, 0, 2, 3]


def test_ilrg_runs_when_the_attack_list_leaves_it_out():
    extension = make_extension("iLRG")
    images, labels = batch()
    ctx = context(extension.model, images, labels)
    fixed, _ = extension.labels(ctx)
    assert fixed.tolist() == build_attack("iLRG")(ctx.shared).labels().tolist()


def test_true_and_joint_label_sources():
    images, labels = batch(labels=(3, 0, 1, 0))
    model = small_victim()
    assert make_extension("true").labels(context(model, images, labels))[0].tolist() == [0, 0, 1, 3]
    assert make_extension("joint").labels(context(model, images, labels)) == (None, "joint")


# --- matching and scores ---------------------------------------------------------------------


def test_matching_undoes_a_permutation():
    true = torch.rand(6, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    permutation = torch.tensor([4, 2, 0, 5, 1, 3])
    order = match_images(true[permutation] + 0.01, true)
    assert torch.equal(permutation[order], torch.arange(6))
    scores = score_images(true[permutation], true)
    assert torch.isinf(scores.psnr).all() and scores.ssim.tolist() == pytest.approx([1.0] * 6)


def test_matching_minimises_the_total_error():
    generator = torch.Generator().manual_seed(2)
    true, rebuilt = (
        torch.rand(5, 1, 4, 4, generator=generator),
        torch.rand(5, 1, 4, 4, generator=generator),
    )
    cost = pairwise_mse(true, rebuilt)
    best = min(sum(cost[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    order = match_images(rebuilt, true)
    assert float(sum(cost[i, order[i]] for i in range(5))) == pytest.approx(float(best))
    assert score_images(rebuilt, true).ssim is None  # too small for SSIM's 11-pixel window


def test_psnr_of_a_known_error():
    true = torch.full((2, 1, 12, 12), 0.5)
    scores = score_images(true + 0.1, true)  # MSE 0.01 -> 20 dB
    assert scores.mean_psnr == pytest.approx(20.0, abs=1e-4)


def test_grid_puts_true_rows_over_reconstructed_rows():
    true, rebuilt = torch.zeros(20, 1, 12, 12), torch.ones(20, 1, 12, 12)
    grid = comparison_grid(true, rebuilt, per_row=16)
    assert grid.shape[-2:] == (4 * 14 + 2, 16 * 14 + 2)
    row = lambda r: grid[0, 2 + 14 * r : 14 * (r + 1), 2:14]  # noqa: E731 - first tile of row r
    assert [float(row(r).mean()) for r in range(4)] == [0.0, 1.0, 0.0, 1.0]


# --- the optimisation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rec_optimizer": "sgd", "cost_fn": "l2"},
        {"rec_optimizer": "lbfgs", "init": "rand"},
        {"signed": True, "init": "zeros"},
    ],
)
def test_reconstruction_lowers_the_matching_loss(options):
    options = {("optimizer" if k == "rec_optimizer" else k): v for k, v in options.items()}
    model = small_victim()
    images, labels = batch()
    grads = batch_gradients(model, [(images, labels)], 4)
    config = ReconstructionConfig(
        max_iterations=20 if options.get("optimizer") == "lbfgs" else 60, **options
    )
    losses = []
    generator = torch.Generator().manual_seed(0)
    result = reconstruct(
        model,
        grads,
        SHAPE,
        4,
        config,
        labels=labels,
        generator=generator,
        on_loss=lambda _, v: losses.append(v),
    )
    start = initial_images(config.init, (4, *SHAPE), torch.Generator().manual_seed(0))
    assert result.loss < float(
        GradientMatcher(model, grads, config.cost_fn)(start, labels, create_graph=False)
    )
    assert result.iterations == config.max_iterations and len(losses) == config.max_iterations // 10


def test_boxed_joint_reconstruction_stays_in_the_box_and_restarts_keep_the_best():
    model = small_victim()
    images, labels = batch()
    grads = batch_gradients(model, [(images, labels)], 4)
    bounds = box_bounds(MEAN, STD)

    def run(restarts):
        config = ReconstructionConfig(max_iterations=30, boxed=True, restarts=restarts)
        generator = torch.Generator().manual_seed(5)
        return reconstruct(
            model, grads, SHAPE, 4, config, num_images=4, bounds=bounds, generator=generator
        )

    one, three = run(1), run(3)
    assert one.labels.shape == (4,) and one.labels.dtype == torch.long
    assert one.images.min() >= bounds[0].min() - 1e-6 and one.images.max() <= bounds[1].max() + 1e-6
    assert three.loss <= one.loss
    assert run(1).loss == one.loss  # seeded: the same command gives the same reconstruction


def test_one_soft_label_for_the_whole_batch_gives_one_class():
    model = small_victim()
    images, labels = batch()
    grads = batch_gradients(model, [(images, labels)], 4)
    config = ReconstructionConfig(max_iterations=20, soft_labels="batch")
    result = reconstruct(model, grads, SHAPE, 4, config, num_images=4)
    assert result.labels.shape == (4,) and len(set(result.labels.tolist())) == 1
    with pytest.raises(ValueError, match="soft_labels"):
        reconstruct(model, grads, SHAPE, 4, ReconstructionConfig(soft_labels="x"), num_images=4)


def test_early_stop_under_the_loss_threshold():
    model = small_victim()
    images, labels = batch()
    grads = batch_gradients(model, [(images, labels)], 4)
    config = ReconstructionConfig(max_iterations=500, loss_thresh=2.5)  # sim never exceeds 2
    result = reconstruct(model, grads, SHAPE, 4, config, labels=labels)
    assert result.iterations == 10


def test_extension_scores_writes_the_png_and_summarises(tmp_path):
    extension = make_extension("iLRG", tmp_path / "stage", iterations=40)
    images, labels = batch()
    entry = extension.on_try(context(extension.model, images, labels))
    assert (tmp_path / "stage" / entry["image"]).is_file()
    assert entry["label_source"] == "iLRG" and entry["iterations"] == 40
    assert (
        len(entry["psnr_per_image"]) == 4
        and math.isfinite(entry["PSNR"])
        and math.isfinite(entry["SSIM"])
    )
    summary = extension.summary()
    assert set(summary) >= {"PSNR", "SSIM", "label_source", "iterations", "loss"}
    assert "PSNR" in extension.table()


# --- options ---------------------------------------------------------------------------------


def test_both_spellings_of_save_image_and_the_ig_choice():
    parser = build_parser()
    assert parser.parse_args(["--save_images"]).save_image
    assert parser.parse_args(["--save_image", "--optim", "IG"]).optim == "ig"
    with pytest.raises(SystemExit):
        parser.parse_args(["--optim", "dlg"])
    defaults = parser.parse_args([])
    assert (
        defaults.rec_img,
        defaults.cost_fn,
        defaults.rec_optimizer,
        defaults.tv,
        defaults.l2,
    ) == (False, "sim", "adam", 1e-6, 1e-6)
    assert (
        defaults.max_iterations == 8000
        and ReconstructionConfig.from_args(defaults) == ReconstructionConfig()
    )


@pytest.mark.parametrize("preset", ["rec_ig", "rec_ig_fixed_labels"])
def test_experiment3_presets_parse(preset):
    args = parse_args(
        build_parser(), ["--config", str(REPO / "configs" / "experiment3" / f"{preset}.yaml")]
    )
    assert (args.model, args.num_images, args.distribution, args.num_target_cls) == (
        "resnet18",
        16,
        "random2",
        10,
    )
    assert (
        args.rec_img
        and args.signed
        and args.boxed
        and args.tv == 8e-3
        and args.max_iterations == 240000
    )
    assert args.fix_labels == (preset == "rec_ig_fixed_labels")
    assert args.soft_labels == "batch"


# --- attack.py end to end --------------------------------------------------------------------


def run_attack(tmp_path, *args):
    results = tmp_path / "r.json"
    cmd = [
        sys.executable,
        "attack.py",
        "--log_dir",
        str(tmp_path),
        "--results",
        str(results),
        "--quiet",
        *args,
    ]
    # One thread: thousands of tiny double-backward passes stall when threads contend for 2 cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(results.read_text())


def test_attack_py_reconstructs_with_ilrg_labels_and_writes_the_png(tmp_path):
    results = run_attack(
        tmp_path,
        *("--num_tries", "1", "--num_images", "4", "--no-compare", "--exp_name", "rec"),
        *("--rec_img", "--fix_labels", "--boxed", "--max_iterations", "20", "--save_images"),
    )
    summary = results["reconstruction"]
    assert (
        summary["label_source"] == "iLRG" and summary["iterations"] == 20 and summary["tries"] == 1
    )
    assert (
        math.isfinite(summary["PSNR"]) and math.isfinite(summary["SSIM"]) and summary["loss"] >= 0
    )
    entry = results["tries"][0]["reconstruction"]
    counts = results["tries"][0]["methods"]["iLRG"]["counts"]
    assert sorted(entry["labels"]) == [c for c, n in enumerate(counts) for _ in range(n)]
    run_dir = tmp_path / "rec" / "version_0"
    assert (run_dir / entry["image"]).is_file()
    assert json.loads((run_dir / "results.json").read_text())["reconstruction"] == summary


@pytest.mark.slow
def test_ilrg_labels_beat_guessed_labels_on_real_mnist(tmp_path, shared_data):
    # The paper's point on the same batch, weights and initial images: FCN-3, 8 real MNIST
    # test images, 2000 iterations (a quarter of the default; the README's seeds 0-9 use the
    # same). The baseline is the original code's: one soft label optimised for the whole batch.
    common = (
        *("--dataset", "MNIST_GRAY", "--data_root", str(shared_data), "--split", "val"),
        *("--num_images", "8", "--num_tries", "1", "--no-compare", "--rec_img"),
        *("--max_iterations", "2000"),
    )
    guessed = run_attack(tmp_path / "guessed", *common)  # the default: one soft label for the batch
    fixed = run_attack(tmp_path / "fixed", *common, "--fix_labels")
    assert guessed["tries"][0]["true_counts"] == fixed["tries"][0]["true_counts"]
    counts = fixed["tries"][0]["true_counts"]
    true_labels = [c for c, n in enumerate(counts) for _ in range(n)]
    assert sorted(fixed["tries"][0]["reconstruction"]["labels"]) == true_labels  # iLRG is exact
    assert len(set(guessed["tries"][0]["reconstruction"]["labels"])) == 1
    psnr_fixed, psnr_guessed = fixed["reconstruction"]["PSNR"], guessed["reconstruction"]["PSNR"]
    # measured 31.0 vs 15.8 dB (torch 2.14.1, issue 24's batch); over seeds 0-9 the margin
    # was 9.7 to 29.2 dB, so this bound is this batch's, not a law
    assert psnr_fixed > psnr_guessed + 10, (psnr_fixed, psnr_guessed)
    # and SSIM orders them the same way here (measured 0.737 vs 0.599)
    assert fixed["reconstruction"]["SSIM"] > guessed["reconstruction"]["SSIM"] + 0.05
