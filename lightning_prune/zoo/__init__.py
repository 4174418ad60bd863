"""Models of the paper's experiments: LeNet-300-100 and LeNet-5 for MNIST."""

from lightning_prune.zoo.lenet import LeNet5, LeNet300100, MNISTClassifier

__all__ = ["LeNet5", "LeNet300100", "MNISTClassifier"]
