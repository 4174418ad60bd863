"""The paper's MNIST networks as LightningModules: LeNet-300-100 and LeNet-5 (Caffe's variant).

Both take ``[B, 1, 28, 28]`` images and return ``[B, 10]`` logits, train with cross-entropy, and log
``train_loss``/``train_acc``, ``val_loss``/``val_acc`` and ``test_loss``/``test_acc`` (accuracy is the
plain share of correct predictions, i.e. ``1 - error`` as the paper reports it).

Layers are named attributes, so pruning patterns can name them: ``fc1, fc2, fc3`` in LeNet-300-100,
``conv1, conv2, fc1, fc2`` in LeNet-5; the dropout modules are ``drop1``, ``drop2``.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn import functional as F  # noqa: N812
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.core.validation import check_choice, check_fraction, check_int, check_number

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "LRSchedule", "LeNet5", "LeNet300100", "MNISTClassifier", "Optimizer"]

Optimizer = Literal["sgd", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
LRSchedule = Literal["none", "cosine", "step"]
LR_SCHEDULES: tuple[str, ...] = ("none", "cosine", "step")


class MNISTClassifier(pl.LightningModule):
    """Shared training logic of the LeNets: cross-entropy, accuracy metrics, optimizer and LR schedule.

    Subclasses create their layers in :meth:`build` and define :meth:`forward`; the constructor (and
    so the command line's ``--model.init_args``) is this one, its arguments saved as hyperparameters.

    Args:
        lr: Learning rate.
        momentum: SGD momentum (ignored by Adam).
        weight_decay: L2 penalty (the paper retrains with L2).
        optimizer: ``"sgd"`` (with momentum) or ``"adam"``.
        lr_schedule: ``"none"``; ``"cosine"`` anneals to 0 over the run's epochs (per epoch); ``"step"``
            divides the rate by 10 at 50% and again at 75% of the run's epochs.
        max_epochs_hint: Length of the run for ``"cosine"``/``"step"`` when the trainer gives none
            (``Trainer(max_epochs=...)`` is used when set).
        dropout: Dropout rate before each hidden-to-next fully connected layer.
    """

    def __init__(
        self,
        lr: float = 0.01,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: Optimizer = "sgd",
        lr_schedule: LRSchedule = "none",
        max_epochs_hint: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_number(lr, "lr", positive=True)
        check_number(momentum, "momentum")
        check_number(weight_decay, "weight_decay")
        check_choice(optimizer, "optimizer", OPTIMIZERS)
        check_choice(lr_schedule, "lr_schedule", LR_SCHEDULES)
        check_int(max_epochs_hint, "max_epochs_hint", minimum=1, optional=True)
        if check_fraction(dropout, "dropout") == 1.0:
            raise ValueError(f"`dropout` must be a number in [0, 1), got {dropout!r}.")
        self.save_hyperparameters()
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.optimizer_name = optimizer
        self.lr_schedule = lr_schedule
        self.max_epochs_hint = max_epochs_hint
        self.dropout = float(dropout)
        self.example_input_array = torch.zeros(1, 1, 28, 28)
        self.train_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=10, average="micro")
        self.build(self.dropout)

    def build(self, dropout: float) -> None:
        """Create the network's layers (called last by the constructor)."""
        raise NotImplementedError(f"{type(self).__name__} must define build(dropout).")

    def _step(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        return F.cross_entropy(logits, y), logits, y

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy on one batch; logs ``train_loss`` and ``train_acc``."""
        loss, logits, y = self._step(batch)
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``val_loss`` and ``val_acc`` (epoch means)."""
        loss, logits, y = self._step(batch)
        self.val_acc(logits, y)
        self.log("val_loss", loss, on_epoch=True)
        self.log("val_acc", self.val_acc, on_epoch=True, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Logs ``test_loss`` and ``test_acc`` (epoch means)."""
        loss, logits, y = self._step(batch)
        self.test_acc(logits, y)
        self.log("test_loss", loss, on_epoch=True)
        self.log("test_acc", self.test_acc, on_epoch=True, prog_bar=True)

    def predict_step(self, batch: Tensor | tuple[Tensor, ...], batch_idx: int) -> Tensor:
        """Predicted classes of a batch (``x`` or ``(x, ...)``)."""
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits: Tensor = self(x)
        return logits.argmax(dim=1)

    def _run_epochs(self) -> int:
        """Epochs the LR schedule spans: the trainer's ``max_epochs`` when set, else ``max_epochs_hint``."""
        trainer = self._trainer
        epochs = getattr(trainer, "max_epochs", None) if trainer is not None else None
        if isinstance(epochs, int) and epochs > 0:
            return epochs
        if self.max_epochs_hint is not None:
            return self.max_epochs_hint
        raise ValueError(
            f"`lr_schedule={self.lr_schedule!r}` needs the run's length: set `Trainer(max_epochs=...)` or the "
            f"model's `max_epochs_hint`; got trainer max_epochs {epochs!r} and max_epochs_hint None."
        )

    def configure_optimizers(self) -> Any:
        """SGD with momentum (or Adam) with L2 weight decay, and the chosen per-epoch LR schedule."""
        if self.optimizer_name == "sgd":
            opt: torch.optim.Optimizer = torch.optim.SGD(
                self.parameters(), lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay
            )
        else:
            opt = torch.optim.Adam(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_schedule == "none":
            return opt
        epochs = self._run_epochs()
        if self.lr_schedule == "cosine":
            scheduler: torch.optim.lr_scheduler.LRScheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
                opt, T_max=epochs
            )
        else:
            milestones = sorted({max(1, epochs // 2), max(1, (3 * epochs) // 4)})
            scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


class LeNet300100(MNISTClassifier):
    """LeNet-300-100: fully connected 784-300-100-10 with ReLU (266,610 parameters).

    ``fc1 -> ReLU -> drop1 -> fc2 -> ReLU -> drop2 -> fc3``; the dropout modules are always present
    (rate ``dropout``, 0 by default) so every configuration has the same module names. Arguments: see
    :class:`MNISTClassifier` (``dropout`` is the rate of ``drop1`` and ``drop2``).

    Example::

        >>> net = LeNet300100()
        >>> sum(p.numel() for p in net.parameters())
        266610
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def build(self, dropout: float) -> None:
        """``fc1``, ``drop1``, ``fc2``, ``drop2``, ``fc3``."""
        self.fc1 = nn.Linear(28 * 28, 300)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(300, 100)
        self.drop2 = nn.Dropout(dropout)
        self.fc3 = nn.Linear(100, 10)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 10]`` of images ``[B, 1, 28, 28]`` (or already flat ``[B, 784]``)."""
        x = x.flatten(1)
        x = self.drop1(F.relu(self.fc1(x)))
        x = self.drop2(F.relu(self.fc2(x)))
        logits: Tensor = self.fc3(x)
        return logits


class LeNet5(MNISTClassifier):
    """LeNet-5 as in Caffe's MNIST example, the variant the paper prunes (431,080 parameters).

    ``conv1`` (20 5x5) -> max-pool 2x2 -> ``conv2`` (50 5x5) -> max-pool 2x2 -> flatten (800) ->
    ``fc1`` (500) -> ReLU -> ``drop1`` -> ``fc2`` (10). As in Caffe, the convolutions have no
    activation after them. ``drop1`` is always present (rate ``dropout``, 0 by default). Arguments:
    see :class:`MNISTClassifier`.

    Example::

        >>> net = LeNet5()
        >>> sum(p.numel() for p in net.parameters())
        431080
        >>> net(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def build(self, dropout: float) -> None:
        """``conv1``, ``conv2``, ``fc1``, ``drop1``, ``fc2``."""
        self.conv1 = nn.Conv2d(1, 20, kernel_size=5)
        self.conv2 = nn.Conv2d(20, 50, kernel_size=5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 10]`` of images ``[B, 1, 28, 28]``."""
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        x = self.drop1(F.relu(self.fc1(x.flatten(1))))
        logits: Tensor = self.fc2(x)
        return logits
