"""The attack experiment on the Lightning Trainer: one ``test_step`` is one try.

The Trainer brings the devices, the processes (``--devices``, ``--strategy``,
``--num_nodes``), the progress bar and the TensorBoard logger. The tries are a
data set (``experiment.tries``); process r of W runs tries r, r + W, ..., each
with randomness from its own index, and at the end the first process gathers
every try's outcome and puts them in index order, so the summary is the one a
single process computes, to the last bit. The other processes send their tries as
they finish them (``experiment.peers``), so a run whose process dies or is stopped
still writes every try that was finished.

Only testing is run, so Lightning wraps nothing in DistributedDataParallel: the
victim's gradients stay each process's own (a DDP wrapper would average them
across processes).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import warnings
from datetime import timedelta

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ProgressBar
from torch.utils.data import DataLoader

from experiment.peers import Peers, next_run_key
from experiment.runs import is_primary_process
from experiment.tries import ShareOfTries, Tries
from user_errors import UserError

log = logging.getLogger("attack")


class StopTries(Exception):
    """SIGINT/SIGTERM during the tries. Not a KeyboardInterrupt: Lightning answers one by
    exiting the interpreter, and a stopped run still writes what its tries found."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)


def _raise_stop(signum, _frame):
    raise StopTries(signum)


def _install_stop_handlers() -> dict:
    return {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}


#: the processes the first one started on its machine (Lightning starts them with the first
#: stage's Trainer; later stages' Trainers find them running)
_children: list = []


class TriesProgressBar(ProgressBar):
    """The Trainer's progress bar for the tries: one bar, "tries", on the first process."""

    def __init__(self):
        super().__init__()
        self._enabled = True
        self.bar = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_test_start(self, trainer, pl_module) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=pl_module.run_setup.config.num_tries,
            desc="tries",
            unit="try",
            leave=False,
            disable=not (self._enabled and trainer.is_global_zero),
        )

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        # Each process knows only its own tries: the first counts its own, times the processes.
        self.bar.update(min(trainer.world_size, self.bar.total - self.bar.n))

    def on_test_end(self, trainer, pl_module) -> None:
        self.bar.close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        if self.bar is not None:
            self.bar.close()


class AttackExperiment(pl.LightningModule):
    """``trainer.test(AttackExperiment(setup))`` attacks the tries of this process's share.

    The victim is a submodule, so the Trainer moves it to this process's device. Each
    process keeps its ``outcomes``; :meth:`collected` gives the first one all of them in
    index order.
    """

    def __init__(self, setup, run_dir=None, writer=None):
        super().__init__()
        # Not "setup": that name is a LightningModule hook.
        self.run_setup = setup
        #: where extensions save files (None: nowhere, as on another machine's processes)
        self.run_dir = run_dir
        self.victim = setup.model
        self.writer = writer
        self.outcomes: list = []
        #: the other processes (several processes only)
        self.peers: Peers | None = None
        #: the tries whose per-try scalars this process logged as they came
        self.logged: set[int] = set()
        self.live_scores: dict = {}

    @property
    def is_primary(self) -> bool:
        trainer = self._trainer
        return trainer.is_global_zero if trainer is not None else is_primary_process()

    @property
    def world_size(self) -> int:
        return self._trainer.world_size if self._trainer is not None else 1

    def test_dataloader(self) -> DataLoader:
        from experiment.trial import composed_batches

        setup = self.run_setup
        tries = Tries(composed_batches(setup.config, setup.dataset, setup.num_classes))
        share = ShareOfTries(len(tries), self.global_rank, self.trainer.world_size)
        # batch_size=None: an item is one whole try, not a sample to be batched.
        return DataLoader(tries, batch_size=None, sampler=share)

    def transfer_batch_to_device(self, batch, device, dataloader_idx):
        # The batch's indices stay on the CPU (they index the data set); a try moves its
        # images to the device itself, --max_size at a time.
        return batch

    def on_test_start(self) -> None:
        from experiment.trial import new_scores

        # Lightning's SIGTERM handler, installed by the Trainer, broadcasts to every process:
        # a collective that never ends when one of them is gone. A signal stops this
        # process's tries; the others learn of it through the store.
        _install_stop_handlers()
        self.run_setup.device = self.device
        self.live_scores = new_scores(self.run_setup)
        if self.trainer.world_size > 1:
            launcher = self.trainer.strategy.launcher
            if getattr(launcher, "procs", None):
                _children[:] = launcher.procs
            self.peers = Peers(
                torch.distributed.distributed_c10d._get_default_store(),
                self.global_rank,
                self.trainer.world_size,
                next_run_key(),
                children=_children if self.global_rank == 0 else (),
            )
            if self.global_rank:
                self.peers.start_heartbeat()

    def test_step(self, batch, batch_idx):
        from experiment.trial import attack_try, log_try

        index, indices = batch
        # Lightning tests under no_grad; a try needs the victim's gradients.
        with torch.enable_grad():
            outcome = attack_try(self.run_setup, int(index), indices)
        self.outcomes.append(outcome)
        for name, scores in self.live_scores.items():
            values = scores.update(outcome.scored[name], outcome.true_counts, outcome.known)
            if self.writer is not None:
                log_try(self.writer, name, values, outcome.index)
        if self.writer is not None:
            self.logged.add(outcome.index)
        log.debug("try %d: %s", outcome.index, outcome.record["methods"])
        if self.peers is not None:
            if self.global_rank:
                self.peers.send(outcome)
            else:
                self.peers.poll()  # a process that died or stopped ends the run now

    def on_test_epoch_end(self) -> None:
        if self.peers is None:
            return
        if self.global_rank:
            self.peers.end()
        else:
            self.peers.wait()

    def collected(self) -> list:
        """Every try's outcome in index order: on the first process, its own and every one the
        others sent (all of them after a complete run)."""
        received = self.peers.received if self.peers is not None and self.is_primary else []
        return sorted(self.outcomes + received, key=lambda outcome: outcome.index)


def build_trainer(config, logger=None) -> pl.Trainer:
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from lightning_modules.training import silence_lightning_noise

    silence_lightning_noise()
    # Lightning's notes on the hardware it found and chose go to its own logger at INFO;
    # attack.py's console says what it did itself (warnings and errors stay).
    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning_fabric").setLevel(logging.WARNING)
    # One item is one try of K images, which the try loads itself: workers would only add
    # a process per device.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    strategy = config.strategy
    if config.devices * config.num_nodes > 1 and strategy in ("auto", "ddp"):
        # A peer that never comes (a node not started) ends the wait after --peer_timeout
        # seconds instead of torch's 30 minutes.
        strategy = _watched_ddp(timeout=timedelta(seconds=config.peer_timeout))
    try:
        return pl.Trainer(
            accelerator="gpu" if config.accelerator == "cuda" else config.accelerator,
            devices=config.devices,
            strategy=strategy,
            num_nodes=config.num_nodes,
            logger=logger if logger is not None else False,
            callbacks=[TriesProgressBar()] if not config.quiet else [],
            enable_progress_bar=not config.quiet,
            enable_model_summary=False,
            enable_checkpointing=False,
            # Gradients are the point; Lightning would test under inference mode.
            inference_mode=False,
            # Tries are shared out by index (ShareOfTries), not by a DistributedSampler.
            use_distributed_sampler=False,
        )
    except (MisconfigurationException, ValueError, RuntimeError) as err:
        raise UserError(f"trainer options: {' '.join(str(err).split())}") from None


def _watched_ddp(**options):
    """Lightning's DDP, less the thread its launcher starts to watch the processes it starts:
    that thread SIGKILLs the first process within 5 s of any other's non-zero exit (a stopped
    one's too), which would take every finished try with it. ``Peers`` watches them instead."""
    from lightning_fabric.utilities.distributed import _set_num_threads_if_needed
    from pytorch_lightning.strategies import DDPStrategy
    from pytorch_lightning.strategies.launchers.subprocess_script import (
        _SubprocessScriptLauncher,
    )

    class Launcher(_SubprocessScriptLauncher):
        def launch(self, function, *args, trainer=None, **kwargs):
            self.cluster_environment.validate_settings(
                num_devices=self.num_processes, num_nodes=self.num_nodes
            )
            if not self.cluster_environment.creates_processes_externally:
                self._call_children_scripts()
            _set_num_threads_if_needed(num_processes=self.num_processes)
            return function(*args, **kwargs)

    class Strategy(DDPStrategy):
        def _configure_launcher(self) -> None:
            super()._configure_launcher()
            if type(self._launcher) is _SubprocessScriptLauncher:
                self._launcher = Launcher(
                    self.cluster_environment, self.num_processes, self.num_nodes
                )

    return Strategy(**options)


def _how_it_stopped(err: BaseException) -> str:
    if isinstance(err, StopTries):
        return f"was stopped by {signal.Signals(err.signum).name}"
    return f"failed: {' '.join(str(err).split())[:300] or type(err).__name__}"


def peer_failure(config, err: BaseException) -> str:
    """One line for a run whose processes did not all join or answer in --peer_timeout."""
    world = config.devices * config.num_nodes
    cause = " ".join(str(err).split())[:200]
    return (
        f"the {world} processes of --devices {config.devices} --num_nodes {config.num_nodes} "
        f"did not all answer within --peer_timeout {config.peer_timeout:g} s ({cause}); start "
        "attack.py on every node with the same options and MASTER_ADDR/MASTER_PORT/NODE_RANK, "
        "or raise --peer_timeout"
    )


def run_tries(module: AttackExperiment, logger=None) -> None:
    """``trainer.test`` over this process's tries, with SIGINT/SIGTERM turned into StopTries
    (the tries done so far stay in ``module.outcomes``)."""
    config = module.run_setup.config
    trainer = build_trainer(config, logger)
    for extension in module.run_setup.extensions:
        extension.bind(module.run_dir, module.writer)
    # Installed just before the tries: a signal in between would skip writing results.json.
    previous = _install_stop_handlers()
    try:
        trainer.test(module, verbose=False)
    except BaseException as err:
        peers = module.peers
        if peers is not None and module.global_rank:
            peers.end(_how_it_stopped(err))
        else:
            if peers is not None:
                with contextlib.suppress(Exception):
                    peers.receive()  # what the others finished before this end
            # The others cannot finish without this process: stop them now.
            for child in _children + list(getattr(trainer.strategy.launcher, "procs", [])):
                if child.poll() is None:
                    child.kill()
        if isinstance(err, torch.distributed.DistError):
            raise UserError(peer_failure(config, err)) from None
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
