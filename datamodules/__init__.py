"""Real and synthetic image classification data sets as LightningDataModules."""

from datamodules.base import ImageClassificationDataModule, LabelledImageDataset
from datamodules.registry import DATASETS, build_datamodule, dataset_info

__all__ = [
    "DATASETS",
    "ImageClassificationDataModule",
    "LabelledImageDataset",
    "build_datamodule",
    "dataset_info",
]
