"""The typed configurations: the parsers hand them out, their defaults are the parsers', and no
module below the entry points handles an argparse Namespace."""

import ast
import dataclasses

import pytest

from experiment.cli import build_parser
from experiment.config import AttackConfig
from experiment.options import parse_args
from lightning_modules.train_cli import build_parser as build_train_parser
from lightning_modules.train_config import TrainConfig
from tests.conftest import REPO
from tests.test_architecture import PACKAGES

#: the parsers' own modules: the only place the command line is a Namespace
PARSER_MODULES = {"experiment/options.py", "experiment/cli.py"}


@pytest.mark.parametrize(
    ("parser", "config_type"), [(build_parser, AttackConfig), (build_train_parser, TrainConfig)]
)
def test_the_parser_gives_the_typed_config_with_the_same_defaults(parser, config_type):
    parsed = parser().parse_args([])
    assert type(parsed) is config_type
    # A default changed on one side only would make the two disagree.
    assert parsed == config_type()
    fields = [field.name for field in dataclasses.fields(config_type)]
    dests = [action.dest for action in parser()._actions if action.dest != "help"]
    assert fields == dests  # one field per option, in the parser's order


def test_the_config_is_frozen_and_config_files_still_apply(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("num_images: 16\ndistribution: random2\n")
    config = parse_args(build_parser(), ["--config", str(preset), "--num_tries", "3"])
    assert (config.num_images, config.distribution, config.num_tries) == (16, "random2", 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 0
    assert dataclasses.replace(config, seed=0).seed == 0 and config.seed == 1234


def test_no_module_below_the_entry_points_handles_a_namespace():
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = path.relative_to(REPO).as_posix()
            if name in PARSER_MODULES:
                continue
            tree = ast.parse(path.read_text())
            used = {
                node.attr if isinstance(node, ast.Attribute) else node.id
                for node in ast.walk(tree)
                if isinstance(node, ast.Attribute | ast.Name)
            }
            assert "Namespace" not in used, name
