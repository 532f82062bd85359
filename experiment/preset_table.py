"""Run attack.py on several presets and print one Markdown table of their scores.

    python3 -m experiment.preset_table configs/defense/resnet18_*.yaml -- --data_root ../shared/data --split val

Everything after ``--`` is passed to every run (flags win over the presets). Each
preset runs as its own ``attack.py`` process, exactly as a user would run it; the
table has one row per preset and method, with the defense each run used.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from experiment.report import METRIC_NAMES

REPO = Path(__file__).resolve().parents[1]
COLUMNS = METRIC_NAMES


def run_preset(config: str, extra: list[str], results: Path) -> dict:
    command = [
        sys.executable,
        "attack.py",
        "--config",
        config,
        *extra,
        "--results",
        str(results),
        "--quiet",
    ]
    proc = subprocess.run(
        command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    if proc.returncode != 0:
        last = (
            proc.stderr.strip().splitlines()[-1]
            if proc.stderr.strip()
            else f"exit code {proc.returncode}"
        )
        raise SystemExit(f"preset_table: {config} failed: {last}")
    return json.loads(results.read_text())


def defense_cell(results: dict) -> str:
    defense = results.get("defense")
    return (
        "none"
        if not defense
        else f"{defense['method']} {defense['parameter']}={defense['value']:g}"
    )


def table_rows(config: str, results: dict) -> list[str]:
    rows = []
    for method, scores in results["summary"].items():
        spread = results["std"][method]
        cells = [
            f"{scores[m]:.3f} ± {spread[m]:.3f}" if scores.get(m) is not None else "-"
            for m in COLUMNS
        ]
        name = Path(config).stem
        rows.append(
            f"| {name} | {defense_cell(results)} | {method} | {results['tries_done']} | "
            + " | ".join(cells)
            + " |"
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    configs, extra = (
        (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    )
    parser = argparse.ArgumentParser(
        prog="python3 -m experiment.preset_table", description=__doc__.split("\n")[0]
    )
    parser.add_argument("configs", nargs="+", metavar="PRESET.yaml")
    configs = parser.parse_args(configs).configs
    print("| preset | defense | method | tries | " + " | ".join(COLUMNS) + " |")
    print("|" + " --- |" * (4 + len(COLUMNS)))
    with tempfile.TemporaryDirectory() as folder:
        for index, config in enumerate(configs):
            results = run_preset(config, extra, Path(folder) / f"{index}.json")
            print("\n".join(table_rows(config, results)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
