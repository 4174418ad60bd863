"""Time of a sensitivity sweep on LeNet-5 / MNIST, with and without re-using the part before each layer.

LeNet-5 (Caffe variant, :class:`lightning_prune.zoo.LeNet5`) is trained briefly on MNIST (SGD,
``--epochs`` epochs over ``--train-subset`` training images), then each of its 4 layers is pruned
alone at 10 quality levels (threshold ``quality * std(W)``, no retraining) and evaluated on the
10,000 MNIST test images: Han et al.'s sensitivity analysis (their Figure 5).

Two ways of running the same sweep are timed, interleaved (``--repeats`` rounds, the order swapped
every round, so load on a shared machine hits both alike), and their rows checked equal:

* ``suffix``: :func:`lightning_prune.core.sensitivity.sweep` as shipped: the model is traced with
  torch.fx, and for each layer the values before it are computed once and kept, so each level runs
  only the network from that layer on;
* ``full``: the same sweep with ``cache_bytes=0``: a full forward pass for every level.

Both times include everything the sweep does: the baseline pass, the trace and its check, the
cached prefix passes, the masks, and the weight restores. Outputs: a markdown table (command, date,
machine) on stdout, the per-layer table and a suggested ``quality`` mapping, the figure in
``docs/figures/sensitivity_lenet5.png`` and the rows in ``docs/results/sensitivity_lenet5.csv``.

Usage::

    python benchmarks/sensitivity.py                    # ~4-5 min on 2 shared CPU cores
    python benchmarks/sensitivity.py --repeats 1 --train-subset 20000
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning
import lightning.pytorch as pl
import torch

from lightning_prune.core.sensitivity import SensitivityResult, sweep
from lightning_prune.data import MNISTDataModule
from lightning_prune.zoo import LeNet5

ROOT = Path(__file__).resolve().parent.parent
LEVELS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5)
MODES = ("suffix", "full")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def train(args: argparse.Namespace) -> tuple[LeNet5, MNISTDataModule, float]:
    pl.seed_everything(args.seed, verbose=False)
    dm = MNISTDataModule(
        data_dir=args.data_dir, batch_size=128, val_batch_size=args.batch_size, subset=args.train_subset
    )
    model = LeNet5(lr=0.01, momentum=0.9, weight_decay=5e-4)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    return model, dm, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, default=None, help="training images used (default: all 60,000)")
    parser.add_argument("--batch-size", type=int, default=250, help="evaluation batch size")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds of each mode")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=0.005, help="accuracy drop for the suggested quality")
    parser.add_argument("--png", default=str(ROOT / "docs/figures/sensitivity_lenet5.png"))
    parser.add_argument("--csv", default=str(ROOT / "docs/results/sensitivity_lenet5.csv"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    model, dm, train_s = train(args)
    dm.setup("test")
    batches = list(dm.test_dataloader())
    n_images = sum(len(y) for _, y in batches)

    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    results: dict[str, SensitivityResult] = {}
    for round_ in range(args.repeats):
        for mode in MODES if round_ % 2 == 0 else MODES[::-1]:
            start = time.perf_counter()
            result = sweep(model, batches, LEVELS, cache_bytes=0 if mode == "full" else None)
            times[mode].append(time.perf_counter() - start)
            print(f"round {round_ + 1} {mode:>6}: {times[mode][-1]:6.1f} s", file=sys.stderr, flush=True)
            if mode in results:
                assert result.rows == results[mode].rows, f"{mode}: rows differ between rounds"
            results[mode] = result
    assert results["suffix"].rows == results["full"].rows, "the suffix path and full forward passes disagree"
    assert results["suffix"].baseline == results["full"].baseline
    result = results["suffix"]

    evaluations = len(result.rows) + 1
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    print(f"Command: `{command}`  ")
    print(f"Date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}  ")
    print(
        f"Machine: {cpu_name()}, {os.cpu_count()} CPUs visible, torch {torch.__version__} "
        f"({args.threads} thread{'s' if args.threads > 1 else ''}), lightning {lightning.__version__}, "
        f"Python {platform.python_version()}, {platform.system()}  "
    )
    print(
        f"Model: LeNet-5 trained {args.epochs} epoch(s) on {dm.subset or 60000:,} MNIST images ({train_s:.0f} s), "
        f"test accuracy {100 * result.baseline:.2f}%; sweep: 4 layers x {len(LEVELS)} levels on {n_images:,} "
        f"test images (batches of {args.batch_size}), {args.repeats} interleaved round(s) per mode.\n"
    )
    print("| mode | what runs per level | median [min, max] s | vs full |")
    print("|---|---|---|---|")
    full = statistics.median(times["full"])
    for mode, what in (
        ("suffix", "the layer and what follows it (torch.fx split, prefix cached)"),
        ("full", f"the whole network ({evaluations} full passes over the test set)"),
    ):
        t = times[mode]
        print(
            f"| `{mode}` | {what} | {statistics.median(t):.1f} [{min(t):.1f}, {max(t):.1f}] | "
            f"{full / statistics.median(t):.2f}x faster |"
            if mode == "suffix"
            else f"| `{mode}` | {what} | {statistics.median(t):.1f} [{min(t):.1f}, {max(t):.1f}] | 1.00x |"
        )
    print()
    print(result.table())
    print()
    print(result.quality_yaml(args.tolerance), end="")

    Path(args.png).parent.mkdir(parents=True, exist_ok=True)
    Path(args.csv).parent.mkdir(parents=True, exist_ok=True)
    result.plot(args.png, title="LeNet-5 on MNIST: each layer pruned alone (threshold = quality x std), no retraining")
    result.to_csv(args.csv)
    print(f"\nwrote {os.path.relpath(args.png, ROOT)} and {os.path.relpath(args.csv, ROOT)}")


if __name__ == "__main__":
    main()
