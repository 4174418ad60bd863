"""Datasets for the paper's experiments: MNIST as an offline-capable Lightning data module."""

from lightning_prune.data.mnist import MNISTDataError, MNISTDataModule

__all__ = ["MNISTDataError", "MNISTDataModule"]
