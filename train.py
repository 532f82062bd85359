"""Train a victim network and save checkpoints by stage: ``python train.py --help``."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path

#: seconds the interpreter may take to shut down after an interruption before the exit is forced
EXIT_GRACE_SECONDS = 30


def exit_within(code: int, seconds: float) -> None:
    """Force exit ``code`` if shutting down takes longer than ``seconds``.

    Seen once in the full suite: after Ctrl-C during training the message was printed and the
    checkpoint saved, but the interpreter's shutdown then waited for over 120 s (the interrupt
    can land while a logger's writer thread holds a lock). A daemon timer keeps running
    through that wait and ends the process with the exit code it was going to have.
    """
    timer = threading.Timer(seconds, os._exit, args=(code,))
    timer.daemon = True
    timer.start()


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except KeyboardInterrupt:
        # Ctrl-C while loading data or building the model: nothing to resume, no traceback.
        print("train.py: interrupted before training started", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    from experiment.options import parse_args
    from experiment.train_cli import build_parser

    args = parse_args(build_parser(), argv)
    from experiment.runs import check_output_dir
    from lightning_modules.training import TrainingInterrupted, train
    from user_errors import UserError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if not args.dryrun:
            # Before any work: a run must not train for hours and then fail to save its
            # checkpoints.
            check_output_dir(args.model_path, "--model_path")
            check_output_dir(Path(args.log_dir) / args.exp_name, "--log_dir")
        saved = train(args)
    except UserError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    except TrainingInterrupted as stop:
        where = f"; resume with --resume {stop.checkpoint}" if stop.checkpoint else ""
        print(f"train.py: interrupted{where}", file=sys.stderr)
        exit_within(128 + stop.signum, EXIT_GRACE_SECONDS)
        return 128 + stop.signum
    if saved:
        logging.getLogger("train").info("checkpoints: %s", ", ".join(str(path) for path in saved))
    return 0


if __name__ == "__main__":
    sys.exit(main())
