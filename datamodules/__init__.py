"""Real and synthetic image classification data sets as LightningDataModules.

The exports load on first use (PEP 562): ``datamodules.names``, which option parsers read,
imports neither torch nor Lightning.
"""

__all__ = [
    "DATASETS",
    "ImageClassificationDataModule",
    "LabelledImageDataset",
    "build_datamodule",
    "dataset_info",
]


def __getattr__(name: str):
    if name in ("ImageClassificationDataModule", "LabelledImageDataset"):
        from datamodules import base

        return getattr(base, name)
    if name in ("DATASETS", "build_datamodule", "dataset_info"):
        from datamodules import registry

        return getattr(registry, name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
