"""The experiment's side of the reconstruction: labels from iLRG, scores, PNG, options.

The true images and labels reach only the scoring (and ``--gt_labels``, the
upper bound that the paper compares against).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch

from attacks.image_metrics import comparison_grid, denormalise, score_images
from attacks.reconstruction.inverting import (
    COST_FUNCTIONS,
    DEFAULT_LR,
    INITS,
    SOFT_LABELS,
    ReconstructionConfig,
    box_bounds,
    reconstruct,
)
from experiment.config import AttackConfig
from experiment.extension import Extension, TryContext
from experiment.options import non_negative_float, positive_float, positive_int

log = logging.getLogger("attack")


def label_source(config: AttackConfig) -> str:
    """``true`` (--gt_labels), ``iLRG`` (--fix_labels) or ``joint`` (optimised with the images)."""
    if config.gt_labels:
        return "true"
    return "iLRG" if config.fix_labels else "joint"


class Reconstruction(Extension):
    """Reconstructs each attacked batch and scores it against the true images."""

    key = "reconstruction"

    def __init__(
        self,
        model,
        config,
        *,
        source,
        input_shape,
        num_classes,
        mean,
        std,
        seed,
        ilrg,
        save_image=False,
        progress=False,
    ):
        self.model, self.config, self.source = model, config, source
        self.input_shape, self.num_classes = tuple(input_shape), num_classes
        self.mean, self.std, self.seed, self.ilrg = tuple(mean), tuple(std), seed, ilrg
        self.save_image, self.progress = save_image, progress
        self.run_dir: Path | None = None
        self.writer = None
        self.entries: list[dict] = []
        self.logged: set[int] = set()

    @classmethod
    def from_setup(cls, setup) -> Reconstruction:
        from attacks import build_attack

        config, data = setup.config, setup.datamodule
        # fix_labels needs iLRG's answer even when --attacks leaves iLRG out.
        ilrg = setup.attacks.get("iLRG") or build_attack(
            "iLRG",
            alpha=config.alpha,
            estimate=config.estimate,
            simplified=config.simplified,
            norm_guard=config.norm_guard,
        )
        return cls(
            setup.model,
            ReconstructionConfig.from_args(config),
            source=label_source(config),
            input_shape=data.input_shape,
            num_classes=setup.num_classes,
            mean=data.mean,
            std=data.std,
            seed=config.seed,
            ilrg=ilrg,
            save_image=config.save_image,
            progress=not config.quiet,
        )

    def bind(self, run_dir: Path | None, writer=None) -> None:
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.writer = writer

    def labels(self, ctx: TryContext) -> tuple[torch.Tensor | None, str]:
        """The labels to fix (None: optimise them) and where they came from."""
        if self.source == "true":
            return torch.sort(ctx.labels).values, "true"
        if self.source == "iLRG":
            restoration = ctx.restorations.get("iLRG") or self.ilrg(ctx.shared)
            labels = restoration.labels()
            if labels.numel() == ctx.shared.num_images:
                return labels, "iLRG"
            log.warning(
                "iLRG restored %d labels for %d images; optimising the labels instead",
                labels.numel(),
                ctx.shared.num_images,
            )
        return None, "joint"

    def on_try(self, ctx: TryContext) -> dict:
        labels, source = self.labels(ctx)
        device = next(self.model.parameters()).device
        generator = torch.Generator().manual_seed(self.seed + ctx.index)

        def on_loss(iteration, value):
            if self.writer is not None:
                self.writer.add_scalar(f"reconstruction/loss_try{ctx.index}", value, iteration)

        started = time.perf_counter()
        result = reconstruct(
            self.model,
            ctx.grads,
            self.input_shape,
            self.num_classes,
            self.config,
            labels=labels,
            num_images=ctx.shared.num_images,
            bounds=box_bounds(self.mean, self.std, device),
            generator=generator,
            progress=self.progress,
            on_loss=on_loss,
        )
        seconds = time.perf_counter() - started
        true = torch.cat([images for images, _ in ctx.load_chunks()])
        true = denormalise(true, self.mean, self.std)
        rebuilt = denormalise(result.images, self.mean, self.std)
        scores = score_images(rebuilt, true)
        entry = {
            "label_source": source,
            "PSNR": scores.mean_psnr,
            "SSIM": scores.mean_ssim,
            "loss": result.loss,
            "iterations": result.iterations,
            "seconds": seconds,
            "labels": result.labels[scores.order].tolist(),
            "psnr_per_image": scores.psnr.tolist(),
            "ssim_per_image": scores.ssim.tolist() if scores.ssim is not None else None,
        }
        if labels is None:
            entry["soft_labels"] = self.config.soft_labels
        if self.save_image:
            entry["image"] = self._save(ctx.index, true, rebuilt[scores.order])
        self.log_entry(ctx.index, entry)
        log.info(
            "reconstruction try %d (%s labels): PSNR %.2f dB, SSIM %.3f, loss %.4g after %d iterations",
            ctx.index,
            source,
            entry["PSNR"],
            entry["SSIM"],
            result.loss,
            result.iterations,
        )
        self.entries.append(entry)
        return entry

    def _save(self, index: int, true: torch.Tensor, matched: torch.Tensor) -> str | None:
        from torchvision.utils import save_image

        grid = comparison_grid(true, matched)
        if self.writer is not None:
            self.writer.add_image("reconstruction/true_over_reconstructed", grid, index)
        if self.run_dir is None:
            return None
        self.run_dir.mkdir(parents=True, exist_ok=True)  # a stage sweep's folder appears at its end
        path = self.run_dir / f"reconstruction_try{index}.png"
        save_image(grid, path)
        return path.name

    def log_entry(self, index: int, entry: dict) -> None:
        if self.writer is None:
            return
        for name in ("PSNR", "SSIM", "loss"):
            self.writer.add_scalar(f"reconstruction/{name}", entry[name], index)
        self.logged.add(index)

    def restore(self, entries) -> None:
        # The loss curves and image grids of tries another process ran are not in
        # TensorBoard (only the first process writes there); their files and numbers are.
        self.entries = list(entries)

    def summary(self) -> dict:
        def mean(name):
            values = [e[name] for e in self.entries if e[name] is not None]
            return sum(values) / len(values) if values else float("nan")

        labels = {"label_source": self.source}
        if self.source == "joint":
            labels["soft_labels"] = self.config.soft_labels
        return {
            **labels,
            "PSNR": mean("PSNR"),
            "SSIM": mean("SSIM"),
            "loss": mean("loss"),
            "iterations": mean("iterations"),
            "tries": len(self.entries),
        }

    def table(self) -> str | None:
        if not self.entries:
            return None
        s = self.summary()
        source = s["label_source"] + (f" ({s['soft_labels']})" if "soft_labels" in s else "")
        return (
            f"reconstruction ({source} labels, {s['tries']} tries): PSNR {s['PSNR']:.2f} dB, "
            f"SSIM {s['SSIM']:.3f}, matching loss {s['loss']:.4g}, {s['iterations']:.0f} iterations"
        )


def add_reconstruction_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the original ``main.py`` for its Experiment 3, with the same names."""
    group = parser.add_argument_group("image reconstruction (Inverting Gradients)")
    group.add_argument(
        "--rec_img",
        action="store_true",
        help="reconstruct the images of each batch from its gradients",
    )
    group.add_argument(
        "--optim",
        default="ig",
        type=str.lower,
        choices=["ig"],
        help="reconstruction method (Inverting Gradients)",
    )
    group.add_argument(
        "--restarts",
        type=positive_int,
        default=1,
        help="reconstructions per batch; the best by matching loss is kept",
    )
    group.add_argument(
        "--cost_fn",
        default="sim",
        choices=list(COST_FUNCTIONS),
        help="gradient matching cost (sim = 1 - cosine)",
    )
    group.add_argument(
        "--rec_optimizer", default="adam", choices=list(DEFAULT_LR), help="optimizer of the images"
    )
    group.add_argument(
        "--rec_lr",
        type=positive_float,
        default=None,
        help="learning rate (None: adam 0.1, sgd 0.01, lbfgs 1)",
    )
    group.add_argument(
        "--signed", action="store_true", help="step along the sign of the image gradient"
    )
    group.add_argument(
        "--boxed",
        action="store_true",
        help="keep pixels inside the valid range after normalisation",
    )
    group.add_argument(
        "--init",
        default="randn",
        choices=list(INITS),
        help="initial images: normal, uniform in [-1, 1], or zeros",
    )
    group.add_argument(
        "--tv", type=non_negative_float, default=1e-6, help="weight of the total-variation penalty"
    )
    group.add_argument(
        "--l2",
        type=non_negative_float,
        default=1e-6,
        help="weight of the penalty on the L2 norm of the whole batch",
    )
    group.add_argument(
        "--max_iterations", type=positive_int, default=8000, help="iterations per restart"
    )
    group.add_argument(
        "--loss_thresh",
        type=non_negative_float,
        default=1e-4,
        help="stop once the objective (matching loss plus penalties) is below this (0: never)",
    )
    group.add_argument(
        "--fix_labels",
        action="store_true",
        help="fix the labels to iLRG's restored counts instead of optimising them",
    )
    group.add_argument(
        "--soft_labels",
        default="batch",
        choices=list(SOFT_LABELS),
        help="without fixed labels: optimise one soft label for the whole batch (as the original "
        "Inverting Gradients code does), or one per image",
    )
    group.add_argument(
        "--gt_labels", action="store_true", help="fix the labels to the true ones (an upper bound)"
    )
    group.add_argument(
        "--save_image",
        "--save_images",
        dest="save_image",
        action="store_true",
        help="PNG of true over reconstructed images, also in TensorBoard",
    )
