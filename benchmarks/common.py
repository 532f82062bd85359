"""Timing, statistics and the result record shared by the benchmark cases."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch


def seconds(function: Callable[[], object], device: torch.device | None = None) -> float:
    """Wall time of one call; waits for the GPU before and after when ``device`` is CUDA."""
    cuda = device is not None and device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    function()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def quartiles(values: list[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); with fewer than 4 values the ends are min and max."""
    ordered = sorted(values)
    median = statistics.median(ordered)
    if len(ordered) < 4:
        return ordered[0], median, ordered[-1]
    first, _, third = statistics.quantiles(ordered, n=4, method="inclusive")
    return first, median, third


@dataclass
class Result:
    """One row of the table and one entry of results.json.

    ``value`` is what the target is stated in (a ratio, or seconds where the
    target is an absolute time); ``median`` and ``spread`` describe the timed
    quantity in ``unit``. ``passed`` is None for cases that only report.
    """

    name: str
    description: str
    unit: str
    median: float | None = None
    spread: tuple[float, float] | None = None
    repeats: int = 0
    value: float | None = None
    value_text: str = ""
    target: str = ""
    passed: bool | None = None
    skipped: str | None = None
    details: dict = field(default_factory=dict)

    @classmethod
    def timed(cls, name: str, description: str, samples: list[float], unit: str = "s", **kw):
        first, median, third = quartiles(samples)
        details = {"samples": samples, **kw.pop("details", {})}
        return cls(
            name, description, unit, median, (first, third), len(samples), details=details, **kw
        )

    def as_json(self) -> dict:
        record = asdict(self)
        record["spread"] = list(self.spread) if self.spread is not None else None
        record["spread_kind"] = "IQR" if self.repeats >= 4 else "min-max"
        return record


def format_seconds(value: float) -> str:
    if value < 1e-3:
        return f"{value * 1e6:.0f} us"
    if value < 1:
        return f"{value * 1e3:.2f} ms" if value < 0.1 else f"{value * 1e3:.0f} ms"
    return f"{value:.2f} s"


def format_quantity(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return format_seconds(value)
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value:.3g} {unit}".strip()


def table(results: list[Result]) -> str:
    header = ("case", "median", "spread", "n", "measured", "target", "result")
    rows = []
    for r in results:
        if r.skipped:
            rows.append((r.name, "-", "-", "-", "-", r.target, f"skipped: {r.skipped}"))
            continue
        spread = (
            f"{format_quantity(r.spread[0], r.unit)} .. {format_quantity(r.spread[1], r.unit)}"
            if r.spread is not None
            else "-"
        )
        verdict = {True: "pass", False: "FAIL", None: "report"}[r.passed]
        rows.append(
            (
                r.name,
                format_quantity(r.median, r.unit),
                spread,
                str(r.repeats or "-"),
                r.value_text,
                r.target,
                verdict,
            )
        )
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(header, widths))]
    lines.append("  ".join("-" * width for width in widths))
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in rows]
    return "\n".join(lines)
