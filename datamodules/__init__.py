"""Data for DreamBooth: safe image loading, the dataset and batch contract, class images, the DataModule."""

from datamodules.dreambooth import DreamBoothDataModule

__all__ = ["DreamBoothDataModule"]
