"""Two-process CPU DDP run of LabelLeakageCallback, for tests/test_label_leakage.py.

``python tests/ddp_leakage_script.py OUT``: Lightning's DDP launcher runs this
script again as rank 1. Beside the callback, a recorder counts every rank's
labels itself (an all-gather of the equal-sized label vectors) and rank zero
writes OUT/record.json: per attacked step, what the callback scored against and
restored, next to the independently gathered counts. TensorBoard events go to
OUT/tb.
"""

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

from callbacks import LabelLeakageCallback
from tests.tiny_training import (
    TinyClassifier,
    cpu_trainer,
    labelled_data,
    loader,
    tensorboard_logger,
)

BATCH_SIZE = 8
WORLD_SIZE = 2
NUM_CLASSES = 10


class Recorder(pl.Callback):
    """Runs after the leakage callback; checks it against labels gathered independently."""

    def __init__(self, leakage: LabelLeakageCallback, out: Path):
        self.leakage = leakage
        self.out = out
        self.labels = None
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.labels = batch[1]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        gathered = pl_module.all_gather(self.labels)  # (ranks, batch)
        rank_counts = [
            torch.bincount(labels, minlength=NUM_CLASSES).tolist() for labels in gathered
        ]
        if not trainer.is_global_zero:
            return
        result = self.leakage.last_result
        assert result.step == trainer.global_step, "the callback did not attack this step"
        self.steps.append(
            {
                "step": result.step,
                "num_images": result.num_images,
                "true_counts": result.true_counts.tolist(),
                "restored": result.restorations["iLRG"].counts.tolist(),
                "rank_counts": rank_counts,
                "global_counts": torch.tensor(rank_counts).sum(dim=0).tolist(),
            }
        )

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            record = {
                "batch_size": BATCH_SIZE,
                "world_size": trainer.world_size,
                "steps": self.steps,
            }
            (self.out / "record.json").write_text(json.dumps(record))


def main(out: Path) -> None:
    torch.set_num_threads(1)
    pl.seed_everything(0, verbose=False)
    leakage = LabelLeakageCallback()
    trainer = cpu_trainer(
        logger=tensorboard_logger(out),
        callbacks=[leakage, Recorder(leakage, out)],
        devices=WORLD_SIZE,
        strategy="ddp",
        max_epochs=1,
    )
    # 4 steps of 2 x 8 samples; Lightning gives each rank its half through a DistributedSampler.
    data = labelled_data(num_samples=4 * WORLD_SIZE * BATCH_SIZE, num_classes=NUM_CLASSES)
    trainer.fit(TinyClassifier(num_classes=NUM_CLASSES), loader(data, BATCH_SIZE, shuffle=True))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
