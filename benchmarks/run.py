"""Run the performance benchmarks: ``python -m benchmarks.run`` (or ``python benchmarks/run.py``).

Prints one table and writes ``benchmarks/results.json``: per case the median
over repeats, the spread (interquartile range with 4 or more repeats, else
min..max), the value the target is stated in, the target and pass/fail.
``--only`` picks cases (``trained``, which trains victims, runs only when
named), ``--quick`` is a smoke run with few repeats (its
numbers are not measurements). GPU cases are skipped, and say so, without CUDA.
Torch runs on ``--threads`` intra-op threads (default 1): on a 2-core machine
shared with other jobs, two threads made the same training run take from 0.2 s
to 7 s, while one thread gave steady times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.cases import CASES, ON_REQUEST, Settings
from benchmarks.common import table
from benchmarks.trained import victim_runs

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results.json"


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="run only these cases")
    parser.add_argument(
        "--quick", action="store_true", help="few repeats: checks the suite runs, measures nothing"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1: on a shared machine two threads make timings swing tenfold)",
    )
    parser.add_argument(
        "--output", type=Path, default=DEFAULT_OUTPUT, help="where results.json goes"
    )
    parser.add_argument(
        "--data_root",
        type=Path,
        default=Settings.data_root,
        help="the real data sets (trained: MNIST and CIFAR-100)",
    )
    parser.add_argument(
        "--work_dir",
        type=Path,
        default=Settings.work_dir,
        help="trained: checkpoints and sweeps (reused when there)",
    )
    parser.add_argument(
        "--victims",
        nargs="+",
        default=(),
        choices=[run[0] for run in victim_runs()],
        help="trained: only these victims (and training seeds); default all",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(
        quick=args.quick,
        threads=args.threads,
        data_root=args.data_root,
        work_dir=args.work_dir,
        victims=tuple(args.victims),
    )
    started = time.perf_counter()
    results = []
    for name in args.only or [name for name in CASES if name not in ON_REQUEST]:
        case_started = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        results += CASES[name](settings)
        print(f"[{name}] {time.perf_counter() - case_started:.0f} s", file=sys.stderr, flush=True)
    print(table(results))
    record = {
        "command": " ".join(
            ["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]
        ),
        "quick": args.quick,
        "threads": args.threads,
        "machine": machine(),
        "seconds": time.perf_counter() - started,
        "cases": [result.as_json() for result in results],
    }
    args.output.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\n{len(results)} results in {record['seconds']:.0f} s -> {args.output}")
    return 0 if all(result.passed is not False for result in results) else 1


if __name__ == "__main__":
    sys.exit(main())
