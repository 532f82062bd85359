"""MNIST from the official IDX files, read with numpy (gzip'd or not).

``<data_root>/MNIST/raw/`` holds ``train-*`` (the train split) and ``t10k-*`` (the
val split). Either split may be absent; ``all`` is the splits that are present.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from datamodules.base import (
    ImageClassificationDataModule,
    InMemoryImageDataset,
    LabelledImageDataset,
    short_reason,
    try_download,
)
from user_errors import DataError

IDX_IMAGES_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension
MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path, magic: int) -> np.ndarray:
    """The uint8 array of an IDX file (``.gz`` is decompressed); DataError if malformed."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read the file ({short_reason(exc)})") from exc
    if len(data) < 4:
        raise DataError(f"{path}: truncated IDX file ({len(data)} bytes, no header)")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise DataError(
            f"{path}: not an IDX file of this kind (magic number {found}, expected {magic})"
        )
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(
            f"{path}: truncated IDX file (header needs {header} bytes, file has {len(data)})"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(data) != expected:
        problem = "truncated IDX file" if len(data) < expected else "IDX file has trailing bytes"
        raise DataError(
            f"{path}: {problem} (header says {'x'.join(map(str, dims))}, "
            f"so {expected} bytes, file has {len(data)})"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def read_mnist(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``(N, 28, 28)`` and labels int64 ``(N,)`` of one MNIST split."""
    images = read_idx(images_path, IDX_IMAGES_MAGIC)
    labels = read_idx(labels_path, IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise DataError(
            f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, MNIST is 28x28"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}"
        )
    if labels.size and labels.max() > 9:
        raise DataError(f"{labels_path}: label {labels.max()} out of range, MNIST labels are 0-9")
    return images, labels.astype(np.int64)


class MNISTGrayDataModule(ImageClassificationDataModule):
    """MNIST digits, 1x28x28; never augmented."""

    name = "MNIST_GRAY"
    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)

    @property
    def raw_dir(self) -> Path:
        return self.data_root / "MNIST" / "raw"

    def _split_files(self, split: str) -> tuple[Path, Path] | None:
        found = []
        for stem in MNIST_FILES[split]:
            candidates = [self.raw_dir / stem, self.raw_dir / f"{stem}.gz"]
            path = next((p for p in candidates if p.is_file()), None)
            if path is None:
                return None
            found.append(path)
        return found[0], found[1]

    def _locate(self, split: str) -> list[tuple[Path, Path]]:
        wanted = ("train", "val") if split == "all" else (split,)

        def present() -> list[tuple[Path, Path]]:
            return [files for s in wanted if (files := self._split_files(s)) is not None]

        if found := present():
            return found

        def download() -> None:
            from torchvision.datasets import MNIST

            MNIST(root=str(self.data_root), train=split != "val", download=True)

        failure = try_download(download, self.download, creates=self.raw_dir)
        if failure is None and (found := present()):
            return found
        expected = " and ".join(f"{stem}(.gz)" for s in wanted for stem in MNIST_FILES[s])
        raise DataError(
            f"MNIST {split} split not found: expected {expected} in {self.raw_dir} "
            f"({failure or 'download finished but the files are still missing'})"
        )

    def _build_dataset(self, split: str) -> LabelledImageDataset:
        parts = [read_mnist(images, labels) for images, labels in self._locate(split)]
        images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        return InMemoryImageDataset(
            torch.from_numpy(images).unsqueeze(1),
            torch.from_numpy(labels),
            image_shape=self.input_shape,
            mean=self.mean,
            std=self.std,
            source=str(self.raw_dir),
            augmentation=self.train_augmentation(),
        )


class MNISTDataModule(MNISTGrayDataModule):
    """The same MNIST digits as 3x28x28 (the gray channel repeated)."""

    name = "MNIST"
    input_shape = (3, 28, 28)
    mean = (0.1307,) * 3
    std = (0.3081,) * 3
