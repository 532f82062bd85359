"""A run's folder, its readable log and its TensorBoard writer."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from pathlib import Path

from experiment.runs import new_run_dir

#: ``log.info(..., extra=RESULT)`` marks a record as the run's result: it goes to stdout, so
#: ``attack.py > table.txt`` keeps the table while progress and logs stay on stderr.
RESULT = {"result": True}


#: ``extra=FILE_ONLY``: a record for ``run.log`` only (a sweep's per-stage tables)
FILE_ONLY = {"file_only": True}


def _is_result(record: logging.LogRecord) -> bool:
    return getattr(record, "result", False)


def _on_console(record: logging.LogRecord) -> bool:
    return not (_is_result(record) or getattr(record, "file_only", False))


def run_logger(run_dir: Path):
    """The Trainer's TensorBoard logger, writing into the run folder itself.

    It stays open over several ``trainer.test`` calls and the summary written after
    the last one: Lightning's finalize only flushes it, ``open_run`` closes it.
    """
    from pytorch_lightning.loggers import TensorBoardLogger

    class RunLogger(TensorBoardLogger):
        def finalize(self, status: str) -> None:
            self.experiment.flush()

        def save(self) -> None:
            # No hparams.yaml: results.json records the configuration.
            self.experiment.flush()

    run_dir = Path(run_dir)
    return RunLogger(
        save_dir=str(run_dir.parent.parent),
        name=run_dir.parent.name,
        version=run_dir.name,
        default_hp_metric=False,
    )


@contextmanager
def open_run(log_dir: str, exp_name: str, logger_name: str):
    """Create ``<log_dir>/<exp_name>/version_<n>``; log to ``run.log`` and the console; yield
    (dir, TensorBoard logger).

    On the console, records logged with ``extra=RESULT`` go to stdout and all others to stderr.
    """
    run_dir = new_run_dir(log_dir, exp_name)
    logger = logging.getLogger(logger_name)
    logger.setLevel(logging.INFO)
    file_handler = logging.FileHandler(run_dir / "run.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(_on_console)
    results = logging.StreamHandler(sys.stdout)
    results.addFilter(_is_result)
    for handler in (console, results):
        handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(file_handler)
    logger.addHandler(console)
    logger.addHandler(results)
    logger.propagate = False
    tensorboard = run_logger(run_dir)
    logger.info("run folder: %s", run_dir)
    try:
        yield Path(run_dir), tensorboard
    finally:
        tensorboard.experiment.close()
        for handler in (file_handler, console, results):
            logger.removeHandler(handler)
            handler.close()


def quiet_console(logger_name: str) -> None:
    """Warnings and errors only, to stderr: a process that runs a share of another's run."""
    logger = logging.getLogger(logger_name)
    logger.setLevel(logging.WARNING)
    logger.addHandler(logging.StreamHandler(sys.stderr))
    logger.propagate = False
