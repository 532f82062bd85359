"""Restore batch labels from shared gradients: ``python attack.py --help``."""

from __future__ import annotations

import logging
import sys


def main(argv: list[str] | None = None) -> int:
    from attacks.cli import build_parser
    from experiment.options import parse_args

    parser = build_parser()
    args = parse_args(parser, argv)
    from attacks import runner, stages
    from experiment.errors import UserError
    from experiment.logs import open_run

    try:
        stages.check_given_options(sys.argv[1:] if argv is None else argv, args)
        setup = stages.prepare_sweep(args) if args.checkpoints else runner.prepare(args)
    except UserError as err:
        print(f"attack.py: error: {err}", file=sys.stderr)
        return 2
    with open_run(args.log_dir, args.exp_name, "attack") as (run_dir, writer):
        if setup.datamodule.is_synthetic:
            logging.getLogger("attack").info(
                "data: %s is SYNTHETIC (generated in memory, no files read); use --dataset MNIST_GRAY/CIFAR100/ImageNet "
                "with --data_root for real data",
                setup.datamodule.name,
            )
        try:
            (stages.run_sweep if args.checkpoints else runner.run)(setup, run_dir, writer)
        except KeyboardInterrupt:
            return 130
        except UserError as err:
            print(f"attack.py: error: {err}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
