"""CIFAR-100 from the pickles of the extracted official archive, unpickled safely.

``<data_root>/cifar-100-python/train`` is the train split, ``.../test`` the val split.
No md5 check: the shared copy is re-packed (other image order, no
``coarse_labels``/``filenames``), so only the keys and shapes are checked.
"""

from __future__ import annotations

import builtins
import codecs
import importlib
import pickle
from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import v2

from datamodules.base import (
    Augmentation,
    ImageClassificationDataModule,
    InMemoryImageDataset,
    LabelledImageDataset,
    short_reason,
    try_download,
)
from user_errors import DataError

CIFAR_FILES = {"train": "train", "val": "test"}
SAFE_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "bytes",
        "bytearray",
        "str",
        "int",
        "float",
        "complex",
        "bool",
    }
)


def _numpy_function(module: str, name: str):
    # numpy 2 moved numpy.core to numpy._core; pickles may name either module.
    for prefix in ("numpy._core", "numpy.core"):
        try:
            return getattr(importlib.import_module(f"{prefix}.{module}"), name)
        except (ImportError, AttributeError):
            continue
    raise DataError(f"this numpy has no {module}.{name} to rebuild arrays with")


# The functions that rebuild an ndarray: _reconstruct (protocols 0-4), _frombuffer (protocol 5).
ARRAY_REBUILDERS = {("multiarray", "_reconstruct"), ("numeric", "_frombuffer")}


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in builtin containers and refuses every other global.

    A pickle can name any callable and run it while loading; allowing only the
    names that rebuild an ndarray keeps an untrusted data file from executing code.
    """

    def __init__(self, file, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self.path = path

    def find_class(self, module: str, name: str):
        package, _, submodule = module.rpartition(".")
        if package in ("numpy.core", "numpy._core") and (submodule, name) in ARRAY_REBUILDERS:
            return _numpy_function(submodule, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module in ("builtins", "__builtin__") and name in SAFE_BUILTINS:
            return getattr(builtins, name)
        if module == "_codecs" and name == "encode":
            # Protocol-2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
            return codecs.encode
        raise DataError(
            f"{self.path}: refusing to unpickle {module}.{name}: "
            "a CIFAR file holds only numpy arrays and builtin containers"
        )


def load_pickle(path: Path) -> object:
    try:
        with open(path, "rb") as f:
            return NumpyOnlyUnpickler(f, path).load()
    except DataError:
        raise
    except (
        OSError,
        EOFError,
        pickle.UnpicklingError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
    ) as exc:
        raise DataError(f"{path}: cannot unpickle ({short_reason(exc)})") from exc


def read_cifar100(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 3, 32, 32)`` and fine labels int64 ``(N,)`` of one CIFAR-100 pickle."""
    batch = load_pickle(path)
    if not isinstance(batch, dict) or "data" not in batch or "fine_labels" not in batch:
        keys = (
            ", ".join(sorted(map(str, batch))) if isinstance(batch, dict) else type(batch).__name__
        )
        raise DataError(f"{path}: expected a dict with 'data' and 'fine_labels', found {keys}")
    data = batch["data"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != 3072
    ):
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise DataError(f"{path}: 'data' must be uint8 N x 3072, found {dtype} {shape}")
    try:
        labels = np.asarray(batch["fine_labels"], dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{path}: 'fine_labels' are not integers ({short_reason(exc)})") from exc
    if len(labels) != len(data):
        raise DataError(f"{path}: {len(labels)} fine_labels for {len(data)} images")
    if labels.size and (labels.min() < 0 or labels.max() > 99):
        raise DataError(f"{path}: fine_labels out of range 0-99 ({labels.min()}..{labels.max()})")
    # Each row is the R, G and B planes of a 32x32 image, row-major.
    return data.reshape(-1, 3, 32, 32), labels


class CIFAR100DataModule(ImageClassificationDataModule):
    """CIFAR-100, 3x32x32, 100 fine classes; augmentation: random crop (padding 4) + flip."""

    name = "CIFAR100"
    num_classes = 100
    input_shape = (3, 32, 32)
    mean = (0.5071, 0.4865, 0.4409)
    std = (0.2673, 0.2564, 0.2762)

    @property
    def folder(self) -> Path:
        return self.data_root / "cifar-100-python"

    @classmethod
    def train_augmentation(cls) -> Augmentation:
        return v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

    def _locate(self, split: str) -> list[Path]:
        wanted = ("train", "val") if split == "all" else (split,)

        def present() -> list[Path]:
            paths = [self.folder / CIFAR_FILES[s] for s in wanted]
            return [p for p in paths if p.is_file()]

        if found := present():
            return found

        def download() -> None:
            from torchvision.datasets import CIFAR100

            CIFAR100(root=str(self.data_root), train=split != "val", download=True)

        failure = try_download(download, self.download, creates=self.data_root)
        if failure is None and (found := present()):
            return found
        expected = " and ".join(CIFAR_FILES[s] for s in wanted)
        raise DataError(
            f"CIFAR100 {split} split not found: expected {expected} in {self.folder} "
            f"({failure or 'download finished but the files are still missing'})"
        )

    def _build_dataset(self, split: str) -> LabelledImageDataset:
        paths = self._locate(split)
        parts = [read_cifar100(path) for path in paths]
        images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        return InMemoryImageDataset(
            torch.from_numpy(np.ascontiguousarray(images)),
            torch.from_numpy(labels),
            image_shape=self.input_shape,
            mean=self.mean,
            std=self.std,
            source=", ".join(map(str, paths)),
            augmentation=self.train_augmentation(),
        )
