"""The typed configurations: the parsers hand them out, their defaults are the parsers', and no
module below the entry points handles an argparse Namespace."""

import ast
import dataclasses

import pytest

from experiment.cli import build_parser
from experiment.config import AttackConfig
from experiment.options import parse_args
from experiment.train_cli import build_parser as build_train_parser
from lightning_modules.train_config import TrainConfig
from tests.conftest import REPO
from tests.test_architecture import PACKAGES

#: the parsers' own modules: the only place the command line is a Namespace
# the parsers, and the simulation's entry point (its Plan carries the options it parsed)
PARSER_MODULES = {"experiment/options.py", "experiment/cli.py", "integrations/flower_sim.py"}


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


@pytest.mark.parametrize(
    "line, message",
    [
        (
            "local_epochs: 2.5",
            "bad value 2.5 for local_epochs (invalid literal for int() with base 10: '2.5')",
        ),
        (
            "num_images: 8.9",
            "bad value 8.9 for num_images (invalid literal for int() with base 10: '8.9')",
        ),
        (
            "num_tries: true",
            "bad value True for num_tries (invalid literal for int() with base 10: 'True')",
        ),
    ],
)
def test_a_config_file_value_is_refused_as_the_same_flag_is(tmp_path, capsys, line, message):
    """A YAML number is never truncated into an integer option, nor a boolean taken for one."""
    path = tmp_path / "bad.yaml"
    path.write_text(line + "\n")
    with pytest.raises(SystemExit) as stop:
        parse_args(build_parser(), ["--config", str(path)])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == f"attack.py: error: {path}: {message}"


def test_config_file_scalars_arrive_as_the_command_line_gives_them(tmp_path):
    path = tmp_path / "ok.yaml"
    path.write_text("exp_name: 123\nnum_tries: 3\nnoise_std: 1.0e-3\ntarget_epsilon: .inf\n")
    config = parse_args(build_parser(), ["--config", str(path)])
    assert (config.exp_name, config.num_tries, config.noise_std) == ("123", 3, 0.001)
    assert config.target_epsilon == float("inf")
