"""The data set and DataModule contracts shared by every real and synthetic data set.

A :class:`LabelledImageDataset` knows its labels without decoding a single image
(batch composition needs only ``targets``) and hands out normalised float32
images, one at a time through ``ds[i]`` or as a batch through ``ds.load(indices)``.
Subclasses only say how to produce raw pixels in ``[0, 1]``; normalisation and
train-time augmentation happen here.

An :class:`ImageClassificationDataModule` builds those data sets by split name
(``train``, ``val``, ``all``) and wraps them in the Lightning hooks.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import ClassVar

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from datamodules.names import SPLITS
from user_errors import DataError, UserError

"""Split names that ``dm.dataset(split)`` accepts: ``all`` is train then val."""

Augmentation = Callable[[torch.Tensor], torch.Tensor]


def check_split(split: str, valid: Sequence[str] = SPLITS, what: str = "split") -> str:
    if split not in valid:
        raise UserError(f"unknown {what} '{split}'; valid {what}s: {', '.join(valid)}")
    return split


def short_reason(exc: BaseException, limit: int = 160) -> str:
    """One line that says why ``exc`` happened, short enough for an error message."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def try_download(
    download: Callable[[], object], enabled: bool, creates: Path | None = None
) -> str | None:
    """Run ``download``; return None on success, else a short reason for the error message.

    Any failure counts (no network, a read-only folder, a bad mirror): the caller
    turns the reason into a single-line ``DataError`` that names the files it needed.
    ``creates`` is the folder the download makes; on failure the folders that did
    not exist before and are still empty are removed, so a failed run leaves nothing.
    """
    if not enabled:
        return "download disabled"
    made = []
    if creates is not None:
        folder = Path(creates)
        while not folder.exists() and folder.parent != folder:
            made.append(folder)
            folder = folder.parent
    try:
        download()
    except Exception as exc:  # the reason goes into the DataError the caller raises
        for folder in made:  # deepest first
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or not ours to remove): keep it and what holds it
        if _offline(exc):
            return "no network to download it"
        # torchvision lists every mirror and file it tried; the last line is the cause.
        lines = [line for line in str(exc).splitlines() if line.strip()]
        return f"download failed: {short_reason(RuntimeError(lines[-1]) if lines else exc)}"
    return None


def _offline(exc: BaseException) -> bool:
    """No route to the mirrors at all (a name that does not resolve, no connection): the usual
    offline case, said in four words instead of the last mirror's urlopen error."""
    import socket
    import urllib.error

    seen = exc
    for _ in range(8):  # the cause chain, bounded
        if isinstance(seen, urllib.error.URLError):
            return isinstance(seen.reason, OSError)
        if isinstance(seen, (socket.gaierror, ConnectionError)):
            return True
        if seen.__cause__ is None and seen.__context__ is None:
            break
        seen = seen.__cause__ or seen.__context__
    return "urlopen error" in str(exc) and "Errno" in str(exc)


class LabelledImageDataset(Dataset):
    """Labelled images of one shape, normalised with a fixed per-channel mean and std.

    Attributes:
        targets: LongTensor ``(N,)`` of class indices, known without decoding images.
        image_shape: ``(C, H, W)`` of every image this data set returns.
        source: where the data came from (a folder, files, or ``synthetic ...``).
        augment: whether ``ds[i]`` and ``ds.load`` apply the train-time augmentation;
            only the view returned by :meth:`augmented` has it set, so attacks and
            evaluation always see un-augmented images.
    """

    def __init__(
        self,
        targets: torch.Tensor,
        image_shape: tuple[int, int, int],
        mean: Sequence[float],
        std: Sequence[float],
        source: str,
        augmentation: Augmentation | None = None,
    ) -> None:
        self.targets = torch.as_tensor(targets, dtype=torch.long).reshape(-1).contiguous()
        self.image_shape = tuple(image_shape)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.source = source
        self.augmentation = augmentation
        self.augment = False

    def __len__(self) -> int:
        return self.targets.numel()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.load([index])
        return images[0], int(labels[0])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        # DataLoader fetches a whole batch through this, so ``load`` can vectorise it.
        images, labels = self.load(indices)
        return list(zip(images, labels.tolist()))

    def load(self, indices: Sequence[int] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images ``(n, C, H, W)`` float32, normalised, and labels LongTensor ``(n,)``."""
        index = self._check_indices(indices)
        if self.augment and index.numel() > 0:
            pixels = torch.stack([self._augmented_pixels(int(i)) for i in index])
        else:
            pixels = self._pixels(index)
        return self.normalise(pixels), self.targets[index]

    #: whether images are decoded from files as they are used (so can still fail after loading)
    decodes_files: ClassVar[bool] = False

    def check_readable(self, indices: Sequence[int] | torch.Tensor) -> None:
        """DataError naming the first of these samples whose file cannot be decoded.

        Data held in memory were checked when loaded: nothing to do.
        """

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """Map pixels in ``[0, 1]`` to the normalised images that the networks see."""
        return ((pixels - self.mean) / self.std).to(torch.float32)

    def augmented(self) -> LabelledImageDataset:
        """A view of the same data that applies the train-time augmentation (if any)."""
        if self.augmentation is None:
            return self
        view = copy.copy(self)
        view.augment = True
        return view

    def _pixels(self, index: torch.Tensor) -> torch.Tensor:
        """Un-augmented pixels ``(n, C, H, W)`` float32 in ``[0, 1]`` of valid indices."""
        raise NotImplementedError

    def _augmented_pixels(self, index: int) -> torch.Tensor:
        """One augmented image ``(C, H, W)`` in ``[0, 1]``."""
        return self.augmentation(self._pixels(torch.tensor([index]))[0])

    def _check_indices(self, indices: Sequence[int] | torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(indices)
        if index.numel() == 0:
            return torch.zeros(0, dtype=torch.long)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise IndexError("indices must be a 1-D sequence of integers")
        index = index.long()
        n = len(self)
        if int(index.min()) < -n or int(index.max()) >= n:
            raise IndexError(f"index out of range for a data set of {n} samples")
        return torch.where(index < 0, index + n, index)


class InMemoryImageDataset(LabelledImageDataset):
    """Images kept as uint8 ``(N, c, H, W)``; converted to float one batch at a time.

    When ``image_shape`` asks for 3 channels of 1-channel images (MNIST as RGB),
    the gray channel is repeated.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, **kwargs) -> None:
        super().__init__(targets, **kwargs)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] != len(self):
            raise ValueError("images must be uint8 (N, c, H, W) with one label per image")
        if images.shape[1] not in (1, self.image_shape[0]) or tuple(images.shape[2:]) != tuple(
            self.image_shape[1:]
        ):
            raise ValueError(
                f"images of shape {tuple(images.shape[1:])} do not fit {self.image_shape}"
            )
        self.images = images

    def _pixels(self, index: torch.Tensor) -> torch.Tensor:
        pixels = self.images[index].to(torch.float32).div_(255.0)
        return pixels.expand(-1, self.image_shape[0], -1, -1)


class EpochShuffle(RandomSampler):
    """A random order of the samples that depends only on ``(seed, epoch)``.

    Lightning calls ``set_epoch`` at the start of every epoch, so a run resumed
    from an end-of-epoch checkpoint sees the same batches as one that never
    stopped. A run resumed mid-epoch passes ``resume=(epoch, position)``: that
    epoch's order then starts at ``position``, where the stopped run left it.
    Being a ``RandomSampler``, it is replaced by Lightning's seeded
    ``DistributedSampler`` under DDP, which does the same per process (but
    restarts a resumed epoch from its beginning).
    """

    def __init__(self, data: Dataset, seed: int, resume: tuple[int, int] | None = None) -> None:
        super().__init__(data)
        self.seed = int(seed)
        self.epoch = 0
        self.resume = resume

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        # One seed per epoch drawn from the run's seed, so no two (seed, epoch) pairs share a stream.
        first = torch.Generator().manual_seed(self.seed)
        seeds = torch.randint(2**62, (self.epoch + 1,), generator=first)
        generator = torch.Generator().manual_seed(int(seeds[-1]))
        order = torch.randperm(len(self.data_source), generator=generator).tolist()
        start = 0
        if self.resume is not None and self.epoch >= self.resume[0]:
            # Only the epoch that was interrupted starts late; the ones after it are whole.
            start = self.resume[1] if self.epoch == self.resume[0] else 0
            self.resume = None
        yield from order[start:]


def split_indices(
    n: int, val_fraction: float, seed: int, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted, disjoint (train, val) indices of ``n`` samples; ``val_fraction`` of them,
    at least one and at most all but one, held out, in a seeded random choice."""
    if n < 2:
        raise UserError(f"cannot partition {what}: it has {n} sample(s)")
    n_val = min(max(round(val_fraction * n), 1), n - 1)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    return order[n_val:].sort().values, order[:n_val].sort().values


class ImageClassificationDataModule(pl.LightningDataModule):
    """Base of every data set in ``DATASETS``: splits, partitions and dataloaders.

    Args:
        data_root: folder that holds ``MNIST/raw``, ``cifar-100-python`` and ``ImageNet``.
        split: the split an attack draws its batches from (``train``, ``val``, ``all``);
            stored for the attack runner, the Lightning hooks do not use it.
        imagenet_dir: ImageNet folder with ``train/`` and ``val/`` (default
            ``<data_root>/ImageNet``); other data sets ignore it.
        batch_size, num_workers: of the dataloaders.
        seed: seeds the train/val partition, the shuffling and the synthetic data.
        augment: augment the training loader's images (never the other loaders,
            never ``dataset(split)``, so never what is attacked).
        train_partition: ``None`` trains on ``train`` and validates on ``val``; a split
            name trains and validates on a seeded disjoint partition of that split
            (``val_fraction`` of it held out), for when only one split is at hand.
        val_fraction: the held-out share of ``train_partition``.
        download: try torchvision's download when files are missing (MNIST, CIFAR-100).
    """

    name: ClassVar[str]
    num_classes: ClassVar[int]
    input_shape: ClassVar[tuple[int, int, int]]
    mean: ClassVar[tuple[float, ...]]
    std: ClassVar[tuple[float, ...]]
    is_synthetic: ClassVar[bool] = False

    def __init__(
        self,
        data_root: str | Path = "data",
        split: str = "train",
        imagenet_dir: str | Path | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        augment: bool = False,
        train_partition: str | None = None,
        val_fraction: float = 0.1,
        download: bool = True,
    ) -> None:
        super().__init__()
        check_split(split)
        if train_partition is not None:
            check_split(train_partition, SPLITS, what="train_partition split")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise UserError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        if not 0.0 < float(val_fraction) < 1.0:
            raise UserError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction!r}")
        self.save_hyperparameters(logger=False)
        self.data_root = Path(data_root)
        self.split = split
        self.imagenet_dir = Path(imagenet_dir) if imagenet_dir is not None else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = int(seed)
        self.augment = bool(augment)
        self.train_partition = train_partition
        #: (epoch, samples already trained on in it) of a resumed run, from its checkpoint
        self._resume_position: tuple[int, int] | None = None
        self.val_fraction = float(val_fraction)
        self.download = bool(download)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self._datasets: dict[str, LabelledImageDataset] = {}

    # --- data sets -------------------------------------------------------------------

    def dataset(self, split: str) -> LabelledImageDataset:
        """The un-augmented data set of ``split``; raises ``DataError`` when files are missing/bad."""
        check_split(split)
        if split not in self._datasets:
            try:
                self._datasets[split] = self._build_dataset(split)
            except DataError as err:
                raise DataError(f"{err}{self._other_splits(split)}") from None
        return self._datasets[split]

    def _other_splits(self, split: str) -> str:
        """What to say when ``split`` is missing but another split's files are here."""
        wanted = ("train", "val") if split == "all" else (split,)
        here = [s for s in self.splits_on_disk() if s not in wanted]
        if not here or split == "all":
            return ""
        other = here[0]
        return (
            f"; only the {other} split is on disk: attack.py --split {other} "
            f"(or fit_train/fit_val), train.py --train_partition {other}"
        )

    def _build_dataset(self, split: str) -> LabelledImageDataset:
        raise NotImplementedError

    def splits_on_disk(self) -> tuple[str, ...]:
        """Which of ``train`` and ``val`` have their files at hand now; nothing is downloaded."""
        enabled, self.download = self.download, False
        present = []
        try:
            for split in ("train", "val"):
                try:
                    self._locate(split)
                except UserError:
                    continue
                present.append(split)
        finally:
            self.download = enabled
        return tuple(present)

    def _locate(self, split: str) -> object:
        """Find (downloading first, where possible) the files of ``split``; DataError if absent."""
        return None

    @classmethod
    def train_augmentation(cls) -> Augmentation | None:
        """The train-time augmentation of this data set's pixels in ``[0, 1]`` (None: none)."""
        return None

    def partition_indices(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sorted, disjoint (train, val) indices into ``dataset(train_partition)``.

        The same ``seed`` gives the same partition; ``val_fraction`` of the split,
        at least one sample and at most all but one, is held out.
        """
        if self.train_partition is None:
            raise UserError("partition_indices needs train_partition to name a split")
        return split_indices(
            len(self.dataset(self.train_partition)),
            self.val_fraction,
            self.seed,
            f"the {self.train_partition} split of {self.name}",
        )

    # --- Lightning hooks -------------------------------------------------------------

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node: the place for downloads.
        for split in self._fit_splits():
            self._locate(split)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit") and self.train_set is None:
            self.train_set = self._training_set()
        if self.val_set is None:
            self.val_set = self._held_out_set()

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            self.setup("fit")
        sampler = EpochShuffle(self.train_set, self.seed, resume=self._resume_position)
        return self._loader(self.train_set, sampler=sampler)

    def state_dict(self) -> dict:
        """Where the training data stand: saved in every checkpoint Lightning writes.

        ``batches_done`` counts the optimizer steps of the current epoch (the batches
        whose update is in the saved weights), so ``--resume`` from a mid-epoch
        checkpoint continues with the next batch of the same shuffled order.
        """
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return {}
        return {
            "epoch": int(trainer.current_epoch),
            "batches_done": int(trainer.fit_loop.epoch_loop.batch_progress.current.processed),
            "batch_size": int(self.batch_size),
        }

    def load_state_dict(self, state_dict: dict) -> None:
        # Lightning restores the datamodule before it asks for the dataloaders.
        if {"epoch", "batches_done", "batch_size"} <= set(state_dict):
            self._resume_position = (
                int(state_dict["epoch"]),
                int(state_dict["batches_done"]) * int(state_dict["batch_size"]),
            )

    def val_dataloader(self) -> DataLoader:
        if self.val_set is None:
            self.setup("validate")
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """The held-out data, as in ``val_dataloader`` (there is no third split)."""
        if self.val_set is None:
            self.setup("test")
        return self._loader(self.val_set, shuffle=False)

    def _fit_splits(self) -> tuple[str, ...]:
        return (self.train_partition,) if self.train_partition else ("train", "val")

    def _training_set(self) -> Dataset:
        if self.train_partition is None:
            data = self.dataset("train")
            return data.augmented() if self.augment else data
        train_index, _ = self.partition_indices()
        data = self.dataset(self.train_partition)
        return Subset(data.augmented() if self.augment else data, train_index.tolist())

    def _held_out_set(self) -> Dataset:
        if self.train_partition is None:
            return self.dataset("val")
        _, val_index = self.partition_indices()
        return Subset(self.dataset(self.train_partition), val_index.tolist())

    def _loader(self, data: Dataset, shuffle: bool = False, sampler=None) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )
