"""Step time of local retraining (only the classifier trains, the conv layers frozen) vs a full retrain.

Han et al. retrain only the FC layers after pruning them, with the conv layers frozen: backprop then
stops at the frozen prefix. This script measures what that saves per training step, with
``PruneRetrainCallback(retrain=Retraining(train_only=["fc*"]))`` against the same callback retraining
everything, on LeNet-5 (Caffe variant) and on a VGG-style net for 32x32 inputs, both 90% pruned,
interleaved round-robin in one run (medians over rounds, ratio per round).

Usage::

    python benchmarks/local_retraining.py                 # ~1-2 min on 2 CPU cores
    python benchmarks/local_retraining.py --rounds 9 --steps 60
"""

from __future__ import annotations

import argparse
import datetime
import logging
import platform
import statistics
import time
import warnings

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import Fraction, PruneRetrainCallback, Retraining


def lenet5() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 20, 5), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(800, 500), nn.ReLU(), nn.Linear(500, 10),
    )  # fmt: skip


def vgg_small() -> nn.Module:
    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(3, 32), *block(32, 32), nn.MaxPool2d(2), *block(32, 64), *block(64, 64), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 512), nn.ReLU(), nn.Dropout(0.5), nn.Linear(512, 10),
    )  # fmt: skip


MODELS = {"lenet5": (lenet5, (1, 28, 28)), "vgg-small": (vgg_small, (3, 32, 32))}


class Net(pl.LightningModule):
    def __init__(self, name: str):
        super().__init__()
        self.net = MODELS[name][0]()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class StepTimer(Callback):
    """Median time of the steps of the last epoch, after ``skip`` warm-up steps."""

    def __init__(self, skip: int):
        self.skip, self.times, self.start = skip, [], 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: object) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if trainer.current_epoch == 1:
            self.times.append(time.perf_counter() - self.start)

    def median(self) -> float:
        return statistics.median(self.times[self.skip :])


def measure(name: str, local: bool, steps: int, batch_size: int, skip: int) -> float:
    torch.manual_seed(0)
    shape = MODELS[name][1]
    data = TensorDataset(
        torch.randn(batch_size * (steps + skip), *shape), torch.randint(0, 10, (batch_size * (steps + skip),))
    )
    timer = StepTimer(skip)
    classifier = ["net.5", "net.7"] if name == "lenet5" else ["net.15", "net.18"]
    prune = PruneRetrainCallback(
        criterion=Fraction(amount=0.9),
        prune_epochs=[1],
        retrain=Retraining(train_only=classifier if local else None),
        verbose=False,
    )
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[prune, timer], limit_train_batches=steps + skip,
    )  # fmt: skip
    trainer.fit(Net(name), DataLoader(data, batch_size=batch_size))
    return timer.median()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")

    print(f"# {datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"lightning {lightning.__version__}, {args.threads} threads, batch {args.batch_size}")  # fmt: skip
    print("\n| model | full retrain (ms/step) | classifier only (ms/step) | ratio local/full (median, min-max) |")
    print("|---|---:|---:|---:|")
    for name in MODELS:
        full, local, ratios = [], [], []
        for r in range(args.rounds):
            order = [False, True] if r % 2 == 0 else [True, False]
            got = {flag: measure(name, flag, args.steps, args.batch_size, args.skip) for flag in order}
            full.append(got[False])
            local.append(got[True])
            ratios.append(got[True] / got[False])
        print(
            f"| {name} | {1e3 * statistics.median(full):.2f} | {1e3 * statistics.median(local):.2f} | "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )


if __name__ == "__main__":
    main()
