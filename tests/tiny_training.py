"""A small LightningModule, its data and a quiet CPU Trainer, for tests of training callbacks."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


class TinyClassifier(pl.LightningModule):
    """Linear-ReLU(-Dropout)-Linear trained with mean cross-entropy on ``(x, y)`` batches."""

    def __init__(self, in_dim=12, dim=16, num_classes=10, dropout=0.0, lr=0.1, bias=True):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, dim),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(dim, num_classes, bias=bias),
        )
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def labelled_data(num_samples=64, num_classes=10, in_dim=12, noise=0.0, seed=0) -> TensorDataset:
    """Random labels; every input is one shared vector (plus ``noise``).

    Without noise every sample has the same embedding and so the same softmax,
    at every point of training: iLRG's assumption holds exactly and it restores
    the counts exactly. A score below 1 then means the callback attacked the
    wrong gradient or scored against the wrong counts.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num_samples,), generator=generator)
    shared_input = torch.randn(1, in_dim, generator=generator)
    inputs = shared_input + noise * torch.randn(num_samples, in_dim, generator=generator)
    return TensorDataset(inputs, labels)


def loader(dataset, batch_size=16, shuffle=False) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle)


def tensorboard_logger(root: Path) -> TensorBoardLogger:
    return TensorBoardLogger(str(root), name="", version="tb", default_hp_metric=False)


def cpu_trainer(logger=False, callbacks=(), **options) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=list(callbacks),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    return pl.Trainer(**{**defaults, **options})


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the TensorBoard events under ``log_dir``: [(step, value), ...]."""
    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }
