"""Scoring a reconstructed batch against the true one: optimal matching, PSNR, SSIM, a PNG grid.

A batch reconstructed from its gradient comes back in an arbitrary order (the
gradient is a mean over the batch), so each reconstruction is paired with one
true image by an optimal assignment on the per-pair mean squared error before
any score is computed. All scores are taken on de-normalised images in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: SSIM's default Gaussian window is 11 pixels wide; smaller images get no SSIM.
SSIM_MIN_SIZE = 11


def denormalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalised images (B, C, H, W) back to pixel values, clamped to [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * std_t + mean_t).clamp(0.0, 1.0)


def pairwise_mse(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """(A, B) matrix of the mean squared error between every image of ``first`` and of ``second``."""
    a = first.flatten(1).to(torch.float64)
    b = second.flatten(1).to(torch.float64)
    return torch.cdist(a, b).pow(2) / a.shape[1]


def match_images(reconstructed: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """``order`` such that ``reconstructed[order[i]]`` is paired with ``true[i]``, minimising the total MSE."""
    from scipy.optimize import linear_sum_assignment

    cost = pairwise_mse(true, reconstructed).cpu().numpy()
    rows, columns = linear_sum_assignment(cost)
    order = torch.empty(len(rows), dtype=torch.long)
    order[torch.as_tensor(rows)] = torch.as_tensor(columns, dtype=torch.long)
    return order.to(reconstructed.device)


def psnr_per_image(reconstructed: torch.Tensor, true: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each pair of [0, 1] images (inf for an exact copy)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    return peak_signal_noise_ratio(
        reconstructed, true, data_range=1.0, reduction="none", dim=(1, 2, 3)
    )


def ssim_per_image(reconstructed: torch.Tensor, true: torch.Tensor) -> torch.Tensor | None:
    """SSIM of each pair of [0, 1] images, or None when they are too small for the 11-pixel window."""
    if min(true.shape[-2:]) < SSIM_MIN_SIZE:
        return None
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        reconstructed, true, data_range=1.0, reduction="none"
    )


@dataclass(frozen=True)
class ImageScores:
    """Scores of one reconstructed batch, in the order of the true images."""

    order: torch.Tensor  # reconstructed[order[i]] is paired with true[i]
    psnr: torch.Tensor  # (K,) dB
    ssim: torch.Tensor | None  # (K,) or None for images below 11 pixels

    @property
    def mean_psnr(self) -> float:
        return float(self.psnr.mean())

    @property
    def mean_ssim(self) -> float:
        return float(self.ssim.mean()) if self.ssim is not None else float("nan")


def score_images(reconstructed: torch.Tensor, true: torch.Tensor) -> ImageScores:
    """Match ``reconstructed`` to ``true`` (both de-normalised, (K, C, H, W)) and score every pair."""
    if reconstructed.shape != true.shape:
        raise ValueError(
            f"shapes differ: reconstructed {tuple(reconstructed.shape)}, true {tuple(true.shape)}"
        )
    order = match_images(reconstructed, true)
    matched = reconstructed[order].to(true.dtype)
    return ImageScores(order, psnr_per_image(matched, true), ssim_per_image(matched, true))


def comparison_grid(true: torch.Tensor, matched: torch.Tensor, per_row: int = 16) -> torch.Tensor:
    """One image: rows of true images, each over the row of their reconstructions.

    Batches wider than ``per_row`` wrap into several true/reconstructed row pairs;
    the last pair is padded with blank images so columns stay aligned.
    """
    from torchvision.utils import make_grid

    count = true.shape[0]
    per_row = min(per_row, count)
    pad = (-count) % per_row
    blank = true.new_zeros((pad, *true.shape[1:]))
    true_rows = torch.cat([true, blank]).split(per_row)
    matched_rows = torch.cat([matched.to(true.dtype), blank]).split(per_row)
    tiles = torch.cat([torch.cat(pair) for pair in zip(true_rows, matched_rows)])
    return make_grid(tiles.cpu(), nrow=per_row, padding=2, pad_value=1.0)
