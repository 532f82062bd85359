"""One gradient computation in a fresh process: the memory it adds at its peak, its time and accuracy.

``python -m benchmarks.memory_probe --images K [--max-size M]`` prints one JSON
line. Torch's CPU allocations are invisible to tracemalloc, so the probe reads
the kernel's count: it resets the process's resident-memory high-water mark
(``/proc/self/clear_refs``, Linux) once the model and data are ready, and
reports how far the mark rose above the resident memory of that moment.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

MODEL, NUM_CLASSES, INPUT_SHAPE, DATASET = "resnet18", 100, (3, 32, 32), "SYNTH_CIFAR100"


def memory_mib(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process, in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, required=True, help="batch size K")
    parser.add_argument("--max-size", type=int, default=None, help="chunk size (None: one pass)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--compare-one-pass",
        action="store_true",
        help="also compute the one-pass gradient and compare",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from attacks.gradients import batch_gradients
    from datamodules import build_datamodule
    from lightning_modules.networks import build_network

    torch.manual_seed(0)
    # eval(): batch norm uses its running statistics, so chunks see the same function (as in attack.py).
    model = build_network(MODEL, NUM_CLASSES, INPUT_SHAPE).eval()
    dataset = build_datamodule(DATASET, seed=0).dataset("train")
    indices = torch.arange(args.images)
    step = args.max_size or max(args.images, 1)

    def chunks():
        # Loaded one chunk at a time, as experiment.trial.load_chunks does.
        for start in range(0, args.images, step):
            yield dataset.load(indices[start : start + step])

    record: dict = {"images": args.images, "max_size": args.max_size}
    resident = memory_mib("VmRSS")
    reset_peak()
    started = time.perf_counter()
    chunked = batch_gradients(model, chunks(), args.images)
    record["seconds"] = time.perf_counter() - started
    record["peak_mib"] = memory_mib("VmHWM") - resident
    if args.compare_one_pass:
        one_pass = batch_gradients(model, [dataset.load(indices)], args.images)
        record["relative_error"] = max(
            float((chunked[name] - grad).norm() / grad.norm())
            for name, grad in one_pass.items()
            if grad.norm() > 0
        )
    print(json.dumps(record))


if __name__ == "__main__":
    main()
