"""The Flower audit's cost: the same federation with and without ``LeakageAuditStrategy``.

Each run is ``python -m integrations.flower_sim`` on Flower's Ray simulation
engine: 10 clients of 32 shipped MNIST samples, FCN-3, FedAvg E = 1, 5 rounds.
A round's wall time is the median of rounds 2-5 (round 1 also starts the Ray
actors); the audit runs beside the next round (``background``), so what it
costs is the difference of the medians, plus the last round's audit, which the
run waits for at its end (in the federation's total). The plain and the
audited run must end with the same global model (``torch.equal``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import Result

REPO = Path(__file__).resolve().parents[1]
#: the attack sets timed: iLRG alone, and the simulation's default set
ATTACK_SETS = {"ilrg": ["iLRG"], "default": ["iLRG", "decompose", "random", "zeros"]}


def federation(folder: Path, name: str, data_root: Path, attacks: list[str] | None) -> dict:
    command = [
        sys.executable, "-m", "integrations.flower_sim", "--quiet",
        "--dataset", "MNIST_GRAY", "--data_root", str(data_root),
        "--num_clients", "10", "--num_rounds", "5", "--num_images", "32",
        "--log_dir", str(folder), "--exp_name", name,
    ]  # fmt: skip
    command += ["--no_audit"] if attacks is None else ["--report_labels", "--attacks", *attacks]
    subprocess.run(command, cwd=REPO, capture_output=True, check=True, timeout=900)
    run_dir = folder / name / "version_0"
    record = json.loads((run_dir / "run.json").read_text())
    record["state"] = torch.load(run_dir / "global_model.pt")
    if attacks is not None:
        record["audit"] = json.loads((run_dir / "audit.json").read_text())
    return record


def flower_audit(settings) -> list[Result]:
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
    except ImportError:
        return [
            Result(
                "flower_audit",
                "audit overhead on Flower's Ray simulation",
                "",
                skipped="flwr[simulation] not installed (pip install -e '.[flower]')",
                target="<= 10% of a round",
            )
        ]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        plain = federation(Path(folder), "plain", settings.data_root, None)
        plain_round = statistics.median(plain["round_seconds"][1:])
        for label, attacks in ATTACK_SETS.items():
            audited = federation(Path(folder), label, settings.data_root, attacks)
            rounds = audited["round_seconds"][1:]
            overhead = statistics.median(rounds) / plain_round - 1
            same = all(torch.equal(audited["state"][n], plain["state"][n]) for n in plain["state"])
            first = audited["audit"]["rounds"][0]["means"]
            exact = {
                name: first[name]["Exact"] for name in attacks if name in ("iLRG", "decompose")
            }
            results.append(
                Result.timed(
                    f"flower_audit_{label}",
                    f"Flower FedAvg, 10 clients x 32 MNIST, FCN-3, E = 1: a round with the audit "
                    f"({', '.join(attacks)}) against without",
                    rounds,
                    value=overhead,
                    value_text=f"{overhead:+.0%} of a {plain_round:.2f} s round; federation "
                    f"{audited['seconds']:.1f} s vs {plain['seconds']:.1f} s; audit "
                    f"{statistics.median(audited['audit_seconds']):.2f} s/round; same model: {same}; "
                    f"round-1 Exact {exact}",
                    target="<= 10% of a round",
                    passed=overhead <= 0.10 and same,
                    details={
                        "plain_round_seconds": plain["round_seconds"],
                        "audit_seconds": audited["audit_seconds"],
                        "federation_seconds": [audited["seconds"], plain["seconds"]],
                        "same_global_model": same,
                        "round1_exact": exact,
                    },
                )
            )
    return results
