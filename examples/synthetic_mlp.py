"""Prune-retrain end to end on synthetic data: a dense MLP, Han's threshold, retraining, the report.

The data are 20-class Gaussian clusters in 256 dimensions, learnable but not trivially so. The net is
trained dense for ``--dense-epochs``, pruned with ``threshold = quality * std(W)`` per layer (the
first layer, the largest, pruned hardest, as in the paper), retrained, pruned again at the same
threshold (catching the weights retraining pushed under it) and retrained. About 7x fewer weights at
the dense accuracy. Run::

    python examples/synthetic_mlp.py            # about 20 seconds on 2 CPU cores
    python examples/synthetic_mlp.py --help
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import torch
import torchmetrics
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import PruneRetrainCallback, Std


def clusters(n: int, seed: int, dim: int = 256, classes: int = 20) -> TensorDataset:
    """Gaussian clusters around fixed random centres (the centres do not depend on ``seed``)."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 0.35
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centres[y] + torch.randn(n, dim, generator=gen)
    return TensorDataset(x, y)


class MLP(pl.LightningModule):
    """A 256-300-100-20 MLP, shaped like LeNet-300-100."""

    def __init__(self, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(256, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 20))
        self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.val_acc(self(x), y)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense-epochs", type=int, default=6)
    parser.add_argument("--retrain-epochs", type=int, default=4, help="epochs after each of the two prunes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pl.seed_everything(args.seed)
    train = DataLoader(clusters(20_000, seed=1), batch_size=128, shuffle=True)
    val = DataLoader(clusters(5_000, seed=2), batch_size=1000)
    first, second = args.dense_epochs, args.dense_epochs + args.retrain_epochs
    prune = PruneRetrainCallback(
        criterion=Std(quality={"net.0": 1.6, "net.2": 1.2, "net.4": 0.8}),
        prune_epochs=[first, second],
    )
    trainer = pl.Trainer(
        max_epochs=second + args.retrain_epochs,
        callbacks=[prune],
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
    )
    model = MLP()

    dense = {}

    class RecordDense(pl.Callback):
        def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            if trainer.current_epoch == first:
                dense.update(val_acc=float(trainer.callback_metrics["val_acc"]))

    trainer.callbacks.insert(0, RecordDense())
    trainer.fit(model, train, val)
    pruned_acc = trainer.validate(model, val, verbose=False)[0]["val_acc"]
    stats = prune.pruner.stats()
    total, left = sum(s.weights for s in stats), sum(s.remaining for s in stats)
    print(f"\ndense val accuracy : {dense['val_acc']:.4f}")
    print(f"pruned val accuracy: {pruned_acc:.4f}")
    print(f"weights            : {total} -> {left} ({total / left:.1f}x fewer)")


if __name__ == "__main__":
    main()
