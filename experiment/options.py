"""Command-line parsing shared by the entry points: one-line errors and ``--config`` YAML files.

A config file holds option names as keys (the same names as the flags, without
dashes); flags given on the command line win over it.
"""

from __future__ import annotations

import argparse
import difflib
import math
import sys
from pathlib import Path

from user_errors import UserError


def did_you_mean(word: str, candidates) -> str:
    """``"; did you mean X?"`` for the candidate closest to a mistyped ``word``, else ``""``."""
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f"; did you mean {close[0]}?" if close else ""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``prog: error: ...``) and exit code 2.

    A mistyped option gets the closest valid one suggested. With ``config_type`` (a dataclass with
    one field per option), ``parse_args`` returns that instead of a Namespace: the command line
    becomes the typed configuration once, here, and nothing below the entry point sees argparse.
    """

    def __init__(self, *args, config_type=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.config_type = config_type

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            message = f"unrecognized arguments: {' '.join(extras)}"
            unknown = next((word for word in extras if word.startswith("-")), None)
            if unknown is not None:
                options = [o for o in self._option_string_actions if o.startswith("--")]
                message += did_you_mean(unknown.split("=", 1)[0], options)
            self.error(message)
        return namespace if self.config_type is None else self.config_type(**vars(namespace))


def _actions_by_dest(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}


def _coerce(action: argparse.Action, key: str, value, source: str):
    """Check and convert one config value the way the flag would have been."""
    flag_only = isinstance(
        action,
        argparse._StoreTrueAction | argparse._StoreFalseAction | argparse.BooleanOptionalAction,
    )
    if flag_only:
        if not isinstance(value, bool):
            raise UserError(f"{source}: {key} must be true or false, got {value!r}")
        return value
    if value is None:
        return None
    typed = action.type or (lambda v: v)

    def convert(item):
        # A YAML scalar goes through the text the command line would have given: 2.5 for an
        # integer option is refused as "2.5" is, never truncated to 2, and true is no count.
        return typed(item if isinstance(item, str) else str(item))

    try:
        if action.nargs in ("+", "*") or isinstance(action.nargs, int):
            values = value if isinstance(value, list) else [value]
            value = [convert(v) for v in values]
            chosen = value
        else:
            if isinstance(value, list | dict):
                raise ValueError("expected a single value")
            value = convert(value)
            chosen = [value]
    except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
        raise UserError(f"{source}: bad value {value!r} for {key} ({err})") from None
    if action.choices is not None:
        bad = [v for v in chosen if v not in action.choices]
        if bad:
            valid = ", ".join(map(str, action.choices))
            raise UserError(f"{source}: invalid {key} {bad[0]!r}; valid: {valid}")
    return value


def load_config(parser: argparse.ArgumentParser, path: str) -> dict:
    import yaml  # only runs that use --config pay for it

    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file {path} not found")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"config file {path} is not valid YAML: {first}") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must map option names to values")
    actions = _actions_by_dest(parser)
    unknown = sorted(set(data) - set(actions))
    if unknown:
        hint = did_you_mean(unknown[0], actions)
        raise UserError(
            f"config file {path}: unknown option {unknown[0]!r}"
            + (hint or f"; valid options: {', '.join(sorted(actions))}")
        )
    return {key: _coerce(actions[key], key, value, path) for key, value in data.items()}


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None):
    """Parse ``argv`` with the values of ``--config FILE`` as defaults: the parser's config type."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    if known.config:
        try:
            parser.set_defaults(**load_config(parser, known.config))
        except UserError as err:
            parser.error(str(err))
    return parser.parse_args(argv)


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE.yaml",
        help="YAML file of option values (keys are the option names); command-line flags win",
    )


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def bounded_float(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
):
    """An argparse type: a finite float within the given bounds (open or closed).

    NaN and infinity are refused everywhere: no option here has a meaning for
    them, and downstream they surface as crashes deep inside torch.
    """
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    wanted = "a finite number" + (f" {' and '.join(parts)}" if parts else "")

    def convert(text) -> float:
        value = float(text)
        inside = math.isfinite(value)
        if inside and low is not None:
            inside = value > low if low_open else value >= low
        if inside and high is not None:
            inside = value < high if high_open else value <= high
        if not inside:
            raise argparse.ArgumentTypeError(f"must be {wanted}, got {text}")
        return value

    # argparse names the type in "invalid float value: 'abc'".
    convert.__name__ = "float"
    return convert


finite_float = bounded_float()

_positive = bounded_float(0, low_open=True)


def positive_or_infinite(text) -> float:
    """A finite number > 0, or inf: a privacy budget (inf: no noise) or a clip norm (inf: no
    clipping). A command line gives text; a --config file's YAML may give the float .inf."""
    if str(text).strip().lower() in ("inf", "+inf", "infinity", ".inf"):
        return math.inf
    return _positive(text)


positive_or_infinite.__name__ = "float"
epsilon_value = clip_norm = positive_or_infinite

non_negative_float = bounded_float(0)
positive_float = bounded_float(0, low_open=True)
percentage = bounded_float(0, 100)


#: a share strictly between 0 and 1 (train.py's --val_fraction)
positive_fraction = bounded_float(0, 1, low_open=True, high_open=True)


def add_partition_arguments(group) -> None:
    """train.py's partition of one split into training and held-out parts (attack.py: fit_train/fit_val)."""
    group.add_argument(
        "--train_partition",
        choices=["train", "val", "all"],
        default=None,
        help="train and validate on a seeded partition of this one split (for a data set with only that split on disk) "
        "instead of training on train and validating on val",
    )
    group.add_argument(
        "--val_fraction",
        type=positive_fraction,
        default=0.1,
        help="held-out share of --train_partition",
    )


def add_network_arguments(parser: argparse.ArgumentParser) -> None:
    """The victim network's options, the same for attack.py and train.py."""
    model = parser.add_argument_group("victim model")
    model.add_argument(
        "--model", default="dnn", help="dnn, lenet5, vgg11/13/16/19, resnet18/34/50/101/152"
    )
    model.add_argument("--n_hidden", type=int, default=1, help="dnn: hidden layers (1 = FCN-3)")
    model.add_argument("--n_dim", type=positive_int, default=300, help="dnn: hidden width")
    model.add_argument("--dropout", action="store_true", help="vgg: dropout 0.5 in the classifier")
    model.add_argument(
        "--batchnorm", action="store_true", help="lenet5: batch norm after each conv"
    )
    model.add_argument("--silu", action="store_true", help="lenet5: SiLU activations (LeNet-S)")
    model.add_argument(
        "--leaky_relu", action="store_true", help="lenet5: LeakyReLU(0.01) activations"
    )


def add_data_source_arguments(group) -> None:
    """Which data set and where its files are, the same for attack.py and train.py."""
    group.add_argument(
        "--dataset", default="SYNTH_MNIST", help="MNIST_GRAY, MNIST, CIFAR100, ImageNet or SYNTH_*"
    )
    group.add_argument(
        "--data_root", default="data", help="folder holding MNIST/raw, cifar-100-python, ..."
    )
    group.add_argument(
        "--imagenet_dir",
        default=None,
        help="ImageNet folder with train/ and val/ (None: <data_root>/ImageNet)",
    )
