"""The data sets by name: ``DATASETS``, ``build_datamodule`` and ``dataset_info``."""

from __future__ import annotations

from datamodules.base import ImageClassificationDataModule
from datamodules.cifar import CIFAR100DataModule
from datamodules.imagenet import ImageNetDataModule
from datamodules.mnist import MNISTDataModule, MNISTGrayDataModule
from datamodules.synthetic import (
    SyntheticCIFAR100DataModule,
    SyntheticImageNetDataModule,
    SyntheticMNISTDataModule,
)
from user_errors import UserError

DATASETS: dict[str, type[ImageClassificationDataModule]] = {
    module.name: module
    for module in (
        MNISTGrayDataModule,
        MNISTDataModule,
        CIFAR100DataModule,
        ImageNetDataModule,
        SyntheticMNISTDataModule,
        SyntheticCIFAR100DataModule,
        SyntheticImageNetDataModule,
    )
}


def datamodule_class(name: str) -> type[ImageClassificationDataModule]:
    """The DataModule class of ``name``; UserError listing the valid names otherwise."""
    try:
        return DATASETS[name]
    except (KeyError, TypeError):
        raise UserError(
            f"unknown dataset '{name}'; valid datasets: {', '.join(DATASETS)}"
        ) from None


def build_datamodule(name: str, **kwargs) -> ImageClassificationDataModule:
    """The DataModule of data set ``name``, built with the base class's keyword arguments."""
    return datamodule_class(name)(**kwargs)


def dataset_info(name: str) -> tuple[int, tuple[int, int, int], bool]:
    """``(num_classes, input_shape, is_synthetic)`` of ``name``, without touching any file."""
    module = datamodule_class(name)
    return module.num_classes, module.input_shape, module.is_synthetic
