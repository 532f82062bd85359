"""Turning per-try scores into the summary table, TensorBoard scalars and results.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attacks.metrics import metric_set

#: the paper's LeAcc, LnAcc and IRec; LnAcc+ (over the present classes) and Exact (whole
#: count vector right) are not lifted by the absent classes that "zeros" gets right
METRIC_NAMES = ("LeAcc", "LnAcc", "LnAcc+", "IRec", "Exact")


@dataclass
class MethodScores:
    """Per-try scores of one method; the torchmetrics objects hold the running means."""

    restores_counts: bool
    simplified: bool = False
    metrics: dict = field(init=False)
    per_try: dict[str, list[float]] = field(init=False)
    seconds: list[float] = field(default_factory=list)

    def __post_init__(self):
        # The experiment gathers every try to one process and scores them there, in index
        # order: no process may wait for another to sync a metric.
        self.metrics = metric_set(self.restores_counts, self.simplified, sync_on_compute=False)
        self.per_try = {name: [] for name in self.metrics}

    def update(
        self, restoration, true_counts: torch.Tensor, known_classes=None
    ) -> dict[str, float]:
        """Score one try; returns this try's values."""
        values = {}
        for name, metric in self.metrics.items():
            if name == "LeAcc":
                # In the simplified setting the present classes are given: LeAcc is 1 by definition.
                restored = known_classes if known_classes is not None else restoration.present
            else:
                restored = restoration.counts
            value = float(metric(restored.to(true_counts.device), true_counts))
            self.per_try[name].append(value)
            values[name] = value
        return values

    def summary(self) -> dict[str, float]:
        # Before the first try there is no mean (and torchmetrics would warn); NaN says undefined.
        return {
            name: float(metric.compute()) if self.per_try[name] else math.nan
            for name, metric in self.metrics.items()
        }

    def spread(self) -> dict[str, float]:
        out = {}
        for name, values in self.per_try.items():
            finite = [v for v in values if not math.isnan(v)]
            out[name] = (
                float(torch.tensor(finite, dtype=torch.float64).std(unbiased=False))
                if finite
                else math.nan
            )
        return out


def format_table(scores: dict[str, MethodScores]) -> str:
    # The method column as wide as its longest name ("decompose"), so the numbers line up.
    width = max(len("method"), *(len(name) for name in scores)) + 2
    header = (
        f"{'method':<{width}}" + "".join(f"{m:>17}" for m in METRIC_NAMES) + f"{'time/try':>12}"
    )
    lines = [header, "-" * len(header)]
    for method, score in scores.items():
        means, spreads = score.summary(), score.spread()
        cells = []
        for name in METRIC_NAMES:
            if name in means and not math.isnan(means[name]):
                cells.append(f"{means[name]:>9.3f} ± {spreads[name]:.3f}")
            else:
                cells.append(f"{'-':>17}")
        seconds = sum(score.seconds) / max(len(score.seconds), 1)
        time_text = f"{seconds * 1e3:.2f} ms" if seconds < 1 else f"{seconds:.2f} s"
        lines.append(f"{method:<{width}}" + "".join(f"{c:>17}" for c in cells) + f"{time_text:>12}")
    return "\n".join(lines)
