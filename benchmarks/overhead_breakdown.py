"""Where the callback's step overhead on LeNet-300-100 comes from: masking work vs. everything else.

Interleaved fits (``--rounds``, order reversed every other round), 200 timed steps each, 1 torch
thread, synthetic MNIST-shaped data, the models and timer of ``benchmarks/overhead.py``:

* ``plain``: no callback;
* ``callback``: ``PruneRetrainCallback``, 90% of every weight pruned at epoch 0 (gradients masked each step);
* ``nothing-to-mask``: the same callback with ``Fraction(amount=0)``: every hook runs, no tensor is masked;
* ``no-logging``: as ``callback``, with the module's ``log`` disabled (the callback logs sparsity per epoch).

Usage::

    python benchmarks/overhead_breakdown.py             # ~2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).parent))
from overhead import LeNet300, StepTimer

from lightning_prune import Fraction, PruneRetrainCallback

VARIANTS = ("plain", "callback", "nothing-to-mask", "no-logging")


def run(variant: str, loader: DataLoader) -> float:
    torch.manual_seed(0)
    model = LeNet300()
    callbacks = []
    if variant != "plain":
        amount = 0.0 if variant == "nothing-to-mask" else 0.9
        callbacks.append(PruneRetrainCallback(criterion=Fraction(amount=amount), prune_epochs=[0], verbose=False))
        if variant == "no-logging":
            model.log = lambda *args, **kwargs: None
    timer = StepTimer(epoch=1, skip=5, probe=None)
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[timer, *callbacks],
    )  # fmt: skip
    trainer.fit(model, loader)
    return statistics.median(timer.times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    gen = torch.Generator().manual_seed(0)
    n = 205 * 128
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    loader = DataLoader(data, batch_size=128)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            times[variant].append(run(variant, loader))
    print("| variant | median step (ms) | ratio to plain (median over rounds) |\n|---|---:|---:|")
    for variant, values in times.items():
        ratio = statistics.median(a / b for a, b in zip(values, times["plain"], strict=True))
        print(f"| {variant} | {1e3 * statistics.median(values):.3f} | {ratio:.3f}x |")


if __name__ == "__main__":
    main()
