"""Every preset in configs/ names only real options with valid values."""

from pathlib import Path

import pytest

from experiment.cli import build_parser
from experiment.options import load_config
from experiment.train_cli import build_parser as build_train_parser
from tests.conftest import REPO

PRESETS = sorted((REPO / "configs").rglob("*.yaml"))
# train_*.yaml presets are for train.py, all others for attack.py.
TRAIN_PRESETS = [p for p in PRESETS if p.name.startswith("train_")]
ATTACK_PRESETS = [p for p in PRESETS if p not in TRAIN_PRESETS]


def test_there_are_presets_for_the_papers_experiments():
    folders = {p.relative_to(REPO / "configs").parts[0] for p in PRESETS}
    assert {"experiment1", "experiment2", "train_stage"} <= folders
    assert len([p for p in PRESETS if p.parent.name == "experiment1"]) == 5


@pytest.mark.parametrize(
    "preset", ATTACK_PRESETS, ids=lambda p: str(Path(p).relative_to(REPO / "configs"))
)
def test_attack_preset_loads(preset):
    values = load_config(build_parser(), str(preset))
    assert values, f"{preset} is empty"
    assert "dataset" in values and "model" in values


@pytest.mark.parametrize(
    "preset", TRAIN_PRESETS, ids=lambda p: str(Path(p).relative_to(REPO / "configs"))
)
def test_train_preset_loads(preset):
    values = load_config(build_train_parser(), str(preset))
    assert "dataset" in values and "model" in values
