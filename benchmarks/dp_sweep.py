"""Label leakage against DP-SGD's epsilon: ``python -m benchmarks.dp_sweep``.

For FCN-3 / MNIST and LeNet-5 / CIFAR-100, untrained and trained (the
trained-victims benchmark's checkpoints in ``--work_dir``), under FedSGD and
FedAvg (E = 5, B = 8), K = 32, every method: ``attack.py`` without a defense,
then with ``--defense_method dpsgd`` at epsilon = inf (clipping only), 8, 3 and
1 (delta 1e-5, clip norm 1). The victims' batches and options are those of the
``configs/fedavg`` presets. For each run it reads the tries of results.json and
scores every count attack with IRec and with the one-label game DP bounds
(``attacks.metrics.TargetLabelAccuracy``), beside the bound on that game
(``attacks.dp_sgd.label_accuracy_bound``). Writes ``sweep.json``, ``sweep.md``
(the tables) and ``sweep.png`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from attacks.metrics import InstanceRecall, TargetLabelAccuracy

REPO = Path(__file__).resolve().parents[1]
#: (name, preset, trained-victims folder or None)
VICTIMS = (
    ("FCN-3 / MNIST, untrained", "fcn3_mnist_e5", None),
    ("FCN-3 / MNIST, after 1000 iterations", "fcn3_mnist_trained_e5", "fcn3_mnist"),
    ("LeNet-5 / CIFAR-100, untrained", "lenet5_cifar100_e5", None),
    ("LeNet-5 / CIFAR-100, after 40 epochs", "lenet5_cifar100_trained_e5", "lenet5_cifar100"),
)
MODES = (("FedSGD", 0), ("FedAvg E = 5", 5))
#: the settings, in table order: no defense, then DP-SGD at each epsilon (inf: clipping only)
SETTINGS = ("none", "inf", "8", "3", "1")
TRIES = 10


def run_one(preset: str, folder: str | None, epochs: int, setting: str, args, out: Path) -> dict:
    config = yaml.safe_load((REPO / "configs" / "fedavg" / f"{preset}.yaml").read_text())
    config.update(num_tries=TRIES, exp_name=f"{preset}_{epochs}_{setting}")
    if epochs == 0:
        for key in ("local_epochs", "local_batch_size"):
            config.pop(key, None)
    if setting != "none":
        config.update(defense=True, defense_method="dpsgd", target_epsilon=float(setting))
    path = out / f"{config['exp_name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    results = out / f"{config['exp_name']}.json"
    command = [
        sys.executable, "attack.py", "--config", str(path), "--quiet",
        "--data_root", str(args.data_root), "--log_dir", str(out / "logs"), "--results", str(results),
    ]  # fmt: skip
    if folder is not None:
        command += ["--model_path", str(args.work_dir / folder)]
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True, timeout=3600)
    record = json.loads(results.read_text())
    return score(record, time.perf_counter() - started)


def score(record: dict, seconds: float) -> dict:
    """Each count attack's mean IRec and one-label accuracy over the tries, and the defense."""
    true = torch.tensor([t["true_counts"] for t in record["tries"]])
    methods = {}
    for name in record["tries"][0]["methods"]:
        if "counts" not in record["tries"][0]["methods"][name]:
            continue  # presence only: no labels to guess with
        restored = torch.tensor([t["methods"][name]["counts"] for t in record["tries"]])
        recall, target = InstanceRecall(), TargetLabelAccuracy()
        recall.update(restored, true)
        target.update(restored, true)
        methods[name] = {"IRec": float(recall.compute()), "TargetAcc": float(target.compute())}
    return {"defense": record["defense"], "methods": methods, "seconds": round(seconds, 1)}


def best(cell: dict) -> tuple[str, float]:
    """The count attack with the highest one-label accuracy (the floors excluded)."""
    attacks = {n: m for n, m in cell["methods"].items() if n not in ("random", "zeros")}
    name = max(attacks, key=lambda n: attacks[n]["TargetAcc"])
    return name, attacks[name]["TargetAcc"]


def table(name: str, mode: str, cells: dict) -> str:
    header = "| method | " + " | ".join(_setting_name(s) for s in SETTINGS) + " |"
    lines = [f"**{name}, {mode}** (IRec / one-label accuracy)", "", header]
    lines.append("|---" * (len(SETTINGS) + 1) + "|")
    for method in cells["none"]["methods"]:
        row = [
            f"{cells[s]['methods'][method]['IRec']:.3f} / {cells[s]['methods'][method]['TargetAcc']:.3f}"
            for s in SETTINGS
        ]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    sigma = ["-"] + [f"{cells[s]['defense']['noise_multiplier']:.3g}" for s in SETTINGS[1:]]
    label = ["-"] + [_number(cells[s]["defense"]["label_epsilon"]) for s in SETTINGS[1:]]
    bound = ["1"] + [f"{cells[s]['defense']['label_accuracy_bound']:.3f}" for s in SETTINGS[1:]]
    lines.append("| noise multiplier | " + " | ".join(sigma) + " |")
    lines.append("| label epsilon (replace-one) | " + " | ".join(label) + " |")
    lines.append("| **bound** on one-label accuracy | " + " | ".join(bound) + " |")
    verdicts = []
    for s in SETTINGS:
        _, value = best(cells[s])
        limit = 1.0 if s == "none" else cells[s]["defense"]["label_accuracy_bound"]
        verdicts.append("within" if value <= limit else "**ABOVE**")
    lines.append("| best attack vs bound | " + " | ".join(verdicts) + " |")
    return "\n".join(lines)


def _number(value) -> str:
    return value if isinstance(value, str) else f"{value:.3g}"


def _setting_name(setting: str) -> str:
    return {"none": "no defense", "inf": "eps = inf (clip 1)"}.get(setting, f"eps = {setting}")


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(results)
    columns = len(MODES)
    rows = math.ceil(len(panels) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 3.2 * rows), squeeze=False)
    positions = range(len(SETTINGS) - 1)
    for axis, key in zip(axes.flat, panels):
        cells = results[key]
        settings = SETTINGS[1:][::-1]  # eps = 1, 3, 8, inf
        best_values = [best(cells[s])[1] for s in settings]
        bounds = [cells[s]["defense"]["label_accuracy_bound"] for s in settings]
        randoms = [cells[s]["methods"]["random"]["TargetAcc"] for s in settings]
        axis.plot(positions, best_values, marker="o", label="best attack")
        axis.plot(positions, bounds, linestyle="--", color="black", label="DP bound")
        axis.plot(positions, randoms, marker="x", color="grey", label="random")
        axis.axhline(cells["none"]["methods"]["random"]["TargetAcc"], color="grey", linewidth=0.5)
        axis.set_xticks(list(positions), [f"eps={s}" for s in settings])
        axis.set_ylim(-0.02, 1.02)
        axis.set_title(key, fontsize="small")
        axis.set_ylabel("one-label accuracy")
    axes.flat[0].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dp_sweep", description=__doc__)
    parser.add_argument("--data_root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--work_dir", type=Path, default=REPO / "benchmarks" / "work")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "work" / "dp_sweep")
    parser.add_argument("--victims", nargs="+", default=[v[1] for v in VICTIMS])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    sweep = args.out / "sweep.json"
    if sweep.exists():
        results = json.loads(sweep.read_text())
    for name, preset, folder in VICTIMS:
        if preset not in args.victims:
            continue
        for mode, epochs in MODES:
            key = f"{name}, {mode}"
            cells = results.setdefault(key, {})
            for setting in SETTINGS:
                if setting in cells:
                    continue
                cells[setting] = run_one(preset, folder, epochs, setting, args, args.out)
                print(
                    f"{key}, {setting}: {cells[setting]['seconds']} s", file=sys.stderr, flush=True
                )
                sweep.write_text(json.dumps(results, indent=1))
    tables = [table(*key.rsplit(", ", 1), cells) for key, cells in results.items()]
    (args.out / "sweep.md").write_text("\n\n".join(tables) + "\n")
    plot(results, args.out / "sweep.png")
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
