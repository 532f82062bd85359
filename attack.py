"""Restore batch labels from shared gradients: ``python attack.py --help``."""

from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

# torch's C++ warnings (a store connection closed when a process of a multi-process run is
# gone, say) print a native stack trace; the run reports such an end itself, in one line.
os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt as stop:
        # Ctrl-C while loading data or models: nothing was written, so one line is enough.
        # A run's own interruption (tries kept, results.json incomplete) ends here too,
        # with 128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM.
        signum = getattr(stop, "signum", signal.SIGINT)
        if not getattr(stop, "signum", None):
            print("attack.py: interrupted", file=sys.stderr)
        return 128 + signum


def _main(argv: list[str] | None) -> int:
    from experiment.cli import build_parser, given_options
    from experiment.options import parse_args

    parser = build_parser()
    config = parse_args(parser, argv)
    from experiment import runner, stages, victims
    from experiment.logs import open_run, quiet_console
    from experiment.runs import (
        RUN_DIR_VARIABLE,
        check_output_dir,
        check_output_file,
        is_primary_process,
    )
    from user_errors import UserError

    try:
        # Before any work: a run must not end by failing to save what it did.
        check_output_dir(Path(config.log_dir) / config.exp_name, "--log_dir")
        if config.results:
            check_output_file(config.results, "--results")
        victims.check_given_options(given_options(sys.argv[1:] if argv is None else argv), config)
        setup = stages.prepare_sweep(config) if config.checkpoints else runner.prepare(config)
    except UserError as err:
        print(f"attack.py: error: {err}", file=sys.stderr)
        return 2
    if not is_primary_process():
        # A process Lightning started for --devices > 1: it runs its share of the tries and
        # says only what goes wrong; the first process writes the run folder.
        folder = os.environ.get(RUN_DIR_VARIABLE)
        quiet_console("attack")
        return _run(config, setup, Path(folder) if folder else None)
    with open_run(config.log_dir, config.exp_name, "attack") as (run_dir, logger):
        # The processes Lightning starts run this command again and save into this folder.
        os.environ[RUN_DIR_VARIABLE] = str(run_dir)
        try:
            if setup.datamodule.is_synthetic:
                logging.getLogger("attack").info(
                    "data: %s is SYNTHETIC (generated in memory, no files read); use --dataset "
                    "MNIST_GRAY/CIFAR100/ImageNet with --data_root for real data",
                    setup.datamodule.name,
                )
            return _run(config, setup, run_dir, logger)
        finally:
            os.environ.pop(RUN_DIR_VARIABLE, None)


def _run(config, setup, run_dir: Path | None, logger=None) -> int:
    from experiment import runner, stages
    from user_errors import UserError

    try:
        (stages.run_sweep if config.checkpoints else runner.run)(setup, run_dir, logger)
    except UserError as err:
        print(f"attack.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
