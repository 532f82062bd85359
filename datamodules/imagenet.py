"""ImageNet (ILSVRC-2012) in the ImageFolder layout ``<imagenet_dir>/{train,val}/<wnid>/*.JPEG``.

Class indices: the wnid folders of all splits present (train and val), sorted;
a class's index is its position in that list. With the full data set these are
the 1000 wnids and the standard 0-999 indices, also when one split holds only
some of the classes. With fewer than 1000 class folders in total the indices
are positions among the folders found, which then differ from the standard
ones; more than 1000 class folders is an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from datamodules.base import (
    Augmentation,
    ImageClassificationDataModule,
    LabelledImageDataset,
    short_reason,
)
from user_errors import DataError

IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")
IMAGENET_CLASSES = 1000
SPLIT_FOLDERS = {"train": "train", "val": "val"}


class ImageFileDataset(LabelledImageDataset):
    """Image files decoded with PIL one at a time: RGB, ``eval_transform``, ``[0, 1]`` pixels.

    The augmented view decodes with ``augmentation`` (on the PIL image) instead of
    ``eval_transform``; a file that does not decode raises DataError naming it.
    """

    decodes_files = True

    def __init__(self, files: list[str], targets: torch.Tensor, eval_transform, **kwargs) -> None:
        super().__init__(targets, **kwargs)
        if len(files) != len(self):
            raise ValueError("one label per file is needed")
        self.files = files
        self.eval_transform = eval_transform

    def _pixels(self, index: torch.Tensor) -> torch.Tensor:
        if index.numel() == 0:
            return torch.zeros((0, *self.image_shape))
        return torch.stack(
            [self._decode(self.files[i], self.eval_transform) for i in index.tolist()]
        )

    def _augmented_pixels(self, index: int) -> torch.Tensor:
        return self._decode(self.files[index], self.augmentation)

    def check_readable(self, indices: Sequence[int] | torch.Tensor) -> None:
        # A full decode (load), without the resizing: a truncated JPEG fails only there.
        for i in self._check_indices(indices).tolist():
            path = self.files[i]
            try:
                with Image.open(path) as image:
                    image.load()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
                raise DataError(f"{path}: cannot decode the image ({short_reason(exc)})") from exc

    def _decode(self, path: str, transform) -> torch.Tensor:
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise DataError(f"{path}: cannot decode the image ({short_reason(exc)})") from exc
        pixels = F.pil_to_tensor(transform(rgb)).to(torch.float32).div_(255.0)
        if tuple(pixels.shape) != self.image_shape:
            raise DataError(
                f"{path}: decoded to {tuple(pixels.shape)}, expected {self.image_shape}"
            )
        return pixels


def _class_folders(split_dir: Path) -> list[str]:
    with os.scandir(split_dir) as entries:
        return [entry.name for entry in entries if entry.is_dir()]


def _image_files(class_dir: Path) -> list[str]:
    with os.scandir(class_dir) as entries:
        names = [e.name for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES)]
    return [str(class_dir / name) for name in sorted(names)]


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet, 3x224x224 (Resize 256 + CenterCrop 224), 1000 classes; never downloaded.

    Augmentation: RandomResizedCrop(224) + horizontal flip.
    """

    name = "ImageNet"
    num_classes = IMAGENET_CLASSES
    input_shape = (3, 224, 224)
    mean = (0.485, 0.456, 0.406)
    std = (0.229, 0.224, 0.225)

    @property
    def folder(self) -> Path:
        return self.imagenet_dir if self.imagenet_dir is not None else self.data_root / "ImageNet"

    @classmethod
    def train_augmentation(cls) -> Augmentation:
        return v2.Compose([v2.RandomResizedCrop(224), v2.RandomHorizontalFlip()])

    def _expected_layout(self, split: str) -> str:
        splits = ("train", "val") if split == "all" else (split,)
        layouts = " or ".join(f"{self.folder / SPLIT_FOLDERS[s]}/<wnid>/*.JPEG" for s in splits)
        return f"expected {layouts} (one folder per class; ImageNet is never downloaded)"

    def _locate(self, split: str) -> list[Path]:
        splits = ("train", "val") if split == "all" else (split,)
        found = [
            self.folder / SPLIT_FOLDERS[s]
            for s in splits
            if (self.folder / SPLIT_FOLDERS[s]).is_dir()
        ]
        if not found:
            raise DataError(f"ImageNet {split} split not found: {self._expected_layout(split)}")
        return found

    def class_names(self) -> list[str]:
        """Sorted wnid folders of every split present; a class's index is its position."""
        names = set()
        for split_dir in (self.folder / s for s in SPLIT_FOLDERS.values()):
            if split_dir.is_dir():
                names.update(_class_folders(split_dir))
        if len(names) > IMAGENET_CLASSES:
            raise DataError(
                f"{self.folder}: {len(names)} class folders in train/ and val/, ImageNet has {IMAGENET_CLASSES}"
            )
        return sorted(names)

    def _build_dataset(self, split: str) -> LabelledImageDataset:
        split_dirs = self._locate(split)
        index_of = {name: k for k, name in enumerate(self.class_names())}
        files: list[str] = []
        labels: list[int] = []
        for split_dir in split_dirs:
            for name in sorted(_class_folders(split_dir)):
                class_files = _image_files(split_dir / name)
                files.extend(class_files)
                labels.extend([index_of[name]] * len(class_files))
        if not files:
            raise DataError(f"ImageNet {split} split has no images: {self._expected_layout(split)}")
        return ImageFileDataset(
            files,
            torch.tensor(labels, dtype=torch.long),
            eval_transform=v2.Compose([v2.Resize(256), v2.CenterCrop(224)]),
            image_shape=self.input_shape,
            mean=self.mean,
            std=self.std,
            source=", ".join(map(str, split_dirs)),
            augmentation=self.train_augmentation(),
        )
