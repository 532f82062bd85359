"""The parts of a data set that attack.py draws from: whole splits, or train.py's own partition.

``train``, ``val`` and ``all`` are the data set's splits. ``fit_train`` and
``fit_val`` are what ``train.py`` trained and validated on: with
``--train_partition SPLIT`` the seeded disjoint parts of that one split, else
the ``train`` and ``val`` splits. Attacking ``fit_train`` attacks batches the
model learned from, as the paper does; the auxiliary attacks take their samples
from a part that shares no sample with the attacked one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from datamodules.base import ImageClassificationDataModule, split_indices
from datamodules.names import VIEWS
from user_errors import UserError


@dataclass(frozen=True)
class Partition:
    """train.py's ``--train_partition split --val_fraction f --seed s``."""

    split: str
    val_fraction: float
    seed: int


@dataclass
class DataView:
    """A part of a data set with the interface the attack loop uses (``targets``, ``load``).

    ``members`` maps each split it draws from to the indices it holds there, so
    two views can be checked for a common sample.
    """

    name: str
    base: object
    indices: torch.Tensor | None
    members: dict[str, torch.Tensor | None]

    @property
    def targets(self) -> torch.Tensor:
        return self.base.targets if self.indices is None else self.base.targets[self.indices]

    @property
    def source(self):
        return getattr(self.base, "source", None)

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def decodes_files(self) -> bool:
        return self.base.decodes_files

    def _base_indices(self, indices) -> torch.Tensor:
        indices = torch.as_tensor(indices, dtype=torch.long)
        return indices if self.indices is None else self.indices[indices]

    def load(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return self.base.load(self._base_indices(indices))

    def check_readable(self, indices) -> None:
        self.base.check_readable(self._base_indices(indices))

    def overlaps(self, other: DataView) -> bool:
        """Do the two views share a sample?  (None in ``members`` stands for the whole split.)"""
        for split, mine in self.members.items():
            if split not in other.members:
                continue
            theirs = other.members[split]
            if mine is None or theirs is None or bool(torch.isin(mine, theirs).any()):
                return True
        return False


def data_view(
    datamodule: ImageClassificationDataModule, name: str, partition: Partition | None = None
) -> DataView:
    """The view ``name``; ``partition`` (None: train.py trained on the train split) defines fit_*."""
    if name not in VIEWS:
        raise UserError(f"unknown split '{name}'; valid splits: {', '.join(VIEWS)}")
    if name in ("train", "val"):
        return DataView(name, datamodule.dataset(name), None, {name: None})
    if name == "all":
        return DataView(name, datamodule.dataset("all"), None, {"train": None, "val": None})
    part = name.removeprefix("fit_")
    if partition is None:
        return DataView(name, datamodule.dataset(part), None, {part: None})
    base = datamodule.dataset(partition.split)
    what = f"the {partition.split} split of {datamodule.name}"
    train_index, val_index = split_indices(len(base), partition.val_fraction, partition.seed, what)
    indices = train_index if part == "train" else val_index
    members = (
        {"train": indices, "val": indices}
        if partition.split == "all"
        else {partition.split: indices}
    )
    return DataView(name, base, indices, members)


#: the held-out data of each view: where --aux_split auto takes the auxiliary samples
COUNTERPART = {"train": "val", "val": "train", "fit_train": "fit_val", "fit_val": "fit_train"}


def auxiliary_sample(
    view: DataView, num_classes: int, per_class: int, generator: torch.Generator
) -> torch.Tensor:
    """Up to ``per_class`` seeded random indices into ``view`` of every class (fewer where it has fewer)."""
    targets = view.targets
    order = torch.randperm(targets.numel(), generator=generator)
    shuffled = targets[order]
    # Rank of each sample among its class in the shuffled order: a stable sort by class
    # keeps the shuffle within a class, and position minus the class's start is the rank.
    by_class = torch.sort(shuffled, stable=True)
    starts = torch.searchsorted(by_class.values, by_class.values, side="left")
    rank = torch.arange(targets.numel()) - starts
    chosen = by_class.indices[rank < per_class]
    return order[chosen].sort().values
