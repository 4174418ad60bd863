"""Reproduce Han et al. (2015) on real MNIST: LeNet-300-100 and LeNet-5, dense -> prune/retrain -> Table 2.

The pipeline, per seed: train the dense net, then run the tuned prune-retrain rounds of a
:class:`~lightning_prune.PruneRetrainCallback`, each round as its own ``Trainer.fit``
(:func:`lightning_prune.fit_rounds`, so every round restarts the cosine learning-rate schedule),
measure the test error of the dense and of the pruned net on the 10,000 MNIST test images, and print
the per-layer table (the shape of the paper's Table 2) with the paper's remaining share beside ours.
Results go to ``docs/results/<net>.json`` (``<net>_<recipe>.json`` for the other recipes); see
docs/reproduction.md for what they gave.

Run::

    python examples/reproduce.py --net lenet300 --quick            # ~1 min on 2 CPU cores
    python examples/reproduce.py --net lenet300 --seeds 0 1 2      # headline recipe, ~1.5 min per seed
    python examples/reproduce.py --net lenet5 --seeds 0 1 2        # headline recipe, ~7 min per seed
    python examples/reproduce.py --net lenet5 --recipe alllayers   # no local retraining (~23x)
    python examples/reproduce.py --net lenet300 --recipe push      # further than the headline (~27x)
    python examples/reproduce.py --net lenet300 --tiny --out /tmp/tiny.json   # seconds: a smoke test

MNIST is read offline (see :class:`lightning_prune.data.MNISTDataModule`); ``--data-dir`` is where
its IDX files live or are written. On a shared CPU, keep ``--threads 1``: two intra-op threads on two
busy cores made a LeNet-300-100 step about 60x slower here (spin-waiting threads).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lightning_prune import PruneRetrainCallback, fit_rounds, format_table
from lightning_prune.data import MNISTDataModule
from lightning_prune.zoo import LeNet5, LeNet300100, MNISTClassifier

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"

NETS: dict[str, type[MNISTClassifier]] = {"lenet300": LeNet300100, "lenet5": LeNet5}

PAPER: dict[str, dict[str, Any]] = {
    "lenet300": {
        "name": "LeNet-300-100",
        "dense_error_pct": 1.64,
        "pruned_error_pct": 1.59,
        "weights_before": 267_000,
        "weights_after": 22_000,
        "compression": 12,
        "remaining_pct": {"fc1.weight": 8, "fc2.weight": 9, "fc3.weight": 26, "total": 8},
        "dense_error_cap_pct": 1.7,
        "budget_s": 300,
    },
    "lenet5": {
        "name": "LeNet-5",
        "dense_error_pct": 0.80,
        "pruned_error_pct": 0.77,
        "weights_before": 431_000,
        "weights_after": 36_000,
        "compression": 12,
        "remaining_pct": {"conv1.weight": 66, "conv2.weight": 12, "fc1.weight": 8, "fc2.weight": 19, "total": 8},
        "dense_error_cap_pct": 0.9,
        "budget_s": 1800,
    },
}
"""The paper's Table 1 and Table 2 numbers, and this project's targets (dense error cap, time budget)."""


def _quality_rounds(qualities: dict[str, list[float]], epochs: list[int], **extra: Any) -> list[dict[str, Any]]:
    """Rounds with per-layer qualities rising from round to round: ``{layer: [q_round1, q_round2, ...]}``."""
    return [{"quality": {k: v[i] for k, v in qualities.items()}, "epochs": e, **extra} for i, e in enumerate(epochs)]


@dataclass
class Recipe:
    """What a run trains: the dense model, the data, and the prune-retrain callback (its rounds)."""

    model: dict[str, Any]
    dense_epochs: int
    callback: dict[str, Any]
    batch_size: int = 128
    subset: int | None = None
    limit_train_batches: int | float | None = None
    limit_val_batches: int | float | None = None
    test_images: int | None = None
    notes: str = ""

    @property
    def retrain_epochs(self) -> int:
        return sum(r.get("epochs", 0) for r in self.callback.get("rounds", []))


# LeNet-300-100: five rounds of Han's std rule, qualities rising per layer (fc1 pruned hardest, the
# output layer fc3 least), each round retraining with a fresh cosine schedule from the dense rate
# (learning-rate "rewinding": lr_scale 1.0; the paper's 0.1 retrains worse here, see the ablations).
_L300_Q = {"fc1": [0.8, 1.3, 1.8, 2.3, 2.8], "fc2": [0.6, 1.0, 1.4, 1.7, 2.0], "fc3": [0.4, 0.6, 0.8, 1.0, 1.2]}
_L300_PUSH_Q = {k: [*v, v[-1]] for k, v in _L300_Q.items()} | {"fc1": [*_L300_Q["fc1"], 3.3]}
_L300_MODEL = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine"}
_L300_CB = {"retrain_lr_scale": 1.0, "retrain_weight_decay": 5e-4}

# LeNet-5: local retraining as in the paper: prune the FC layers and retrain only them (conv frozen),
# prune the conv layers and retrain only them (twice), then a last joint round. The "mild" variant
# prunes conv2 less and retrains the last round at 0.3 of the dense rate: 18x, and no better
# (docs/results/lenet5_mild.json). "alllayers" is the full recipe without local retraining: every
# round retrains every layer (docs/results/lenet5_alllayers.json).
_L5_MODEL = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine"}
_L5_CB = {"retrain_lr_scale": 1.0, "retrain_weight_decay": 5e-4}
_L5_ROUNDS = [
    {"layers": ["fc*"], "quality": {"fc1": 1.0, "fc2": 0.5}, "train_only": ["fc*"], "epochs": 2},
    {"layers": ["conv*"], "quality": {"conv1": 0.25, "conv2": 0.8}, "train_only": ["conv*"], "epochs": 2},
    {"layers": ["fc*"], "quality": {"fc1": 1.8, "fc2": 1.1}, "train_only": ["fc*"], "epochs": 2},
    {"layers": ["conv*"], "quality": {"conv1": 0.5, "conv2": 1.3}, "train_only": ["conv*"], "epochs": 2},
    {"quality": {"conv1": 0.5, "conv2": 1.3, "fc1": 1.8, "fc2": 1.1}, "epochs": 6},
]
_L5_MILD_ROUNDS = [
    {"layers": ["fc*"], "quality": {"fc1": 1.0, "fc2": 0.5}, "train_only": ["fc*"], "epochs": 2},
    {"layers": ["conv*"], "quality": {"conv1": 0.25, "conv2": 0.6}, "train_only": ["conv*"], "epochs": 2},
    {"layers": ["fc*"], "quality": {"fc1": 1.8, "fc2": 1.1}, "train_only": ["fc*"], "epochs": 2},
    {"layers": ["conv*"], "quality": {"conv1": 0.4, "conv2": 1.0}, "train_only": ["conv*"], "epochs": 2},
    {"quality": {"conv1": 0.4, "conv2": 1.0, "fc1": 1.8, "fc2": 1.1}, "epochs": 6, "lr_scale": 0.3},
]

RECIPES: dict[str, dict[str, Recipe]] = {
    "lenet300": {
        "full": Recipe(
            model=_L300_MODEL,
            dense_epochs=20,
            callback={**_L300_CB, "rounds": _quality_rounds(_L300_Q, [4, 4, 4, 4, 12])},
            notes="5 rounds of Han's std rule, qualities rising; lr rewound to the dense rate each round.",
        ),
        "push": Recipe(
            model=_L300_MODEL,
            dense_epochs=20,
            callback={**_L300_CB, "rounds": _quality_rounds(_L300_PUSH_Q, [4, 4, 4, 4, 4, 12])},
            notes="The full recipe plus a sixth round pruning fc1 further (quality 3.3).",
        ),
        "quick": Recipe(
            model=_L300_MODEL,
            dense_epochs=8,
            callback={**_L300_CB, "rounds": _quality_rounds(_L300_Q, [2, 2, 2, 2, 4])},
            notes="The full recipe's qualities with fewer epochs.",
        ),
        "tiny": Recipe(
            model=_L300_MODEL,
            dense_epochs=2,
            callback={**_L300_CB, "min_remaining": 0.01, "rounds": _quality_rounds(_L300_Q, [1, 1])},
            batch_size=64,
            subset=2048,
            limit_val_batches=1,
            test_images=1000,
            notes="Smoke test: 2,048 training images, 1,000 test images, the first two rounds.",
        ),
    },
    "lenet5": {
        "full": Recipe(
            model=_L5_MODEL,
            dense_epochs=12,
            callback={**_L5_CB, "rounds": _L5_ROUNDS},
            notes="Local retraining (FC, conv alternately, frozen rest), then a joint round.",
        ),
        "alllayers": Recipe(
            model=_L5_MODEL,
            dense_epochs=12,
            callback={**_L5_CB, "rounds": [{k: v for k, v in r.items() if k != "train_only"} for r in _L5_ROUNDS]},
            notes="The full recipe's rounds, every layer retraining in every round (no local retraining).",
        ),
        "mild": Recipe(
            model=_L5_MODEL,
            dense_epochs=12,
            callback={**_L5_CB, "rounds": _L5_MILD_ROUNDS},
            notes="Milder conv pruning, last round at 0.3 of the dense rate.",
        ),
        "quick": Recipe(
            model=_L5_MODEL,
            dense_epochs=3,
            callback={**_L5_CB, "rounds": [{**r, "epochs": 1} for r in _L5_ROUNDS]},
            notes="The full recipe's qualities with one epoch per phase.",
        ),
        "tiny": Recipe(
            model=_L5_MODEL,
            dense_epochs=1,
            callback={**_L5_CB, "min_remaining": 0.01, "rounds": [{**r, "epochs": 1} for r in _L5_ROUNDS[:2]]},
            batch_size=64,
            subset=1024,
            limit_val_batches=1,
            test_images=1000,
            notes="Smoke test: 1,024 training images, 1,000 test images, the first two rounds.",
        ),
    },
}


class Recorder(Callback):
    """Records the validation (= test set) error and the share of weights left after every epoch."""

    def __init__(self, prune: PruneRetrainCallback, echo: bool = True):
        self.prune = prune
        self.echo = echo
        self.curve: list[dict[str, Any]] = []
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        metrics = trainer.callback_metrics
        rounds = len(self.prune.done_rounds)
        pruner = self.prune.pruner
        remaining = 100.0 * (1.0 - pruner.sparsity()) if pruner is not None and pruner.masks else 100.0
        row = {
            "phase": f"round-{rounds}" if rounds else "dense",
            "epoch": trainer.current_epoch,
            "remaining_pct": round(remaining, 3),
            "val_error_pct": round(100.0 * (1.0 - float(metrics["val_acc"])), 3) if "val_acc" in metrics else None,
            "train_loss": round(float(metrics["train_loss"]), 5) if "train_loss" in metrics else None,
            "elapsed_s": round(time.perf_counter() - self.start, 1),
        }
        self.curve.append(row)
        if self.echo:
            print(
                f"  {row['phase']:>8} epoch {row['epoch']:>2}: {row['remaining_pct']:6.2f}% of weights, "
                f"test error {row['val_error_pct']}%, {row['elapsed_s']} s",
                flush=True,
            )


@torch.no_grad()
def test_error(model: torch.nn.Module, dm: MNISTDataModule, images: int | None = None) -> float:
    """Top-1 error in percent on the first ``images`` (all: ``None``) of the 10,000 MNIST test images."""
    if dm.test_set is None:
        dm.prepare_data()
        dm.setup("test")
    assert dm.test_set is not None
    x, y = dm.test_set.tensors
    if images is not None:
        x, y = x[:images], y[:images]
    was_training = model.training
    model.eval()
    wrong = 0
    for i in range(0, len(y), 1000):
        wrong += int((model(x[i : i + 1000]).argmax(1) != y[i : i + 1000]).sum())
    model.train(was_training)
    return 100.0 * wrong / len(y)


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners (GPU available, model summary...) and known-harmless warnings."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*The number of training batches.*")
    warnings.filterwarnings("ignore", ".*GPU available but not used.*")


def trainer_kwargs(recipe: Recipe, callbacks: list[Callback]) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
    }
    if recipe.limit_train_batches is not None:
        kwargs["limit_train_batches"] = recipe.limit_train_batches
    if recipe.limit_val_batches is not None:
        kwargs["limit_val_batches"] = recipe.limit_val_batches
    return kwargs


def layer_names(stats: list[Any]) -> list[str]:
    return [s.name for s in stats]


def run_seed(
    net: str,
    recipe: Recipe,
    seed: int,
    data_dir: str,
    checkpoint_dir: Path,
    echo: bool = True,
    model_overrides: dict[str, Any] | None = None,
    callback_overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Dense training, prune-retrain rounds and evaluation of one seed; returns its results (and models).

    The returned dict holds plain values, plus ``"_dense"`` and ``"_pruned"``: the two models (the
    caller drops them before writing JSON).
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    dm = MNISTDataModule(data_dir=data_dir, batch_size=recipe.batch_size, subset=recipe.subset)
    model = NETS[net](**{**recipe.model, **(model_overrides or {})})
    prune = PruneRetrainCallback(verbose=False, **{**copy.deepcopy(recipe.callback), **(callback_overrides or {})})
    recorder = Recorder(prune, echo=echo)
    start = time.perf_counter()
    results = fit_rounds(
        model,
        prune,
        datamodule=dm,
        dense_epochs=recipe.dense_epochs,
        trainer_kwargs=trainer_kwargs(recipe, [recorder]),
        checkpoint_dir=checkpoint_dir,
        resume=False,
    )
    train_s = time.perf_counter() - start

    dense = NETS[net](**{**recipe.model, **(model_overrides or {})})
    checkpoint = torch.load(checkpoint_dir / "dense.ckpt", map_location="cpu", weights_only=True)
    dense.load_state_dict(checkpoint["state_dict"])
    dense_error = test_error(dense, dm, recipe.test_images)
    pruned_error = test_error(model, dm, recipe.test_images)
    wall_s = time.perf_counter() - start

    assert prune.pruner is not None
    stats = prune.pruner.stats()
    before = sum(s.weights for s in stats)
    after = sum(s.remaining for s in stats)
    params = sum(p.numel() for p in model.parameters())
    pruned_params = before - after
    return {
        "seed": seed,
        "dense_error_pct": round(dense_error, 3),
        "pruned_error_pct": round(pruned_error, 3),
        "weights_before": before,
        "weights_after": after,
        "compression": round(before / after, 2),
        "params_before": params,
        "params_after": params - pruned_params,
        "compression_with_biases": round(params / (params - pruned_params), 2),
        "layers": {s.name: s.as_dict() for s in stats},
        "remaining_pct": {s.name: round(s.remaining_pct, 2) for s in stats} | {"total": round(100 * after / before, 2)},
        "rounds": [
            {
                "name": r.name,
                "epochs": r.epochs,
                "remaining": r.remaining,
                "compression": round(r.compression, 2),
                "val_error_pct": round(100 * (1 - r.metrics["val_acc"]), 3) if "val_acc" in r.metrics else None,
            }
            for r in results
        ],
        "curve": recorder.curve,
        "train_s": round(train_s, 1),
        "wall_time_s": round(wall_s, 1),
        "table": format_table(stats),
        "_dense": dense,
        "_pruned": model,
        "_stats": stats,
    }


def comparison_table(net: str, runs: list[dict[str, Any]]) -> str:
    """Per layer: weights, the paper's remaining share, ours (median over seeds, with the range)."""
    paper = PAPER[net]["remaining_pct"]
    names = [*runs[0]["remaining_pct"]]
    rows = [("layer", "weights", "paper remaining", "ours remaining", "range over seeds")]
    for name in names:
        values = [r["remaining_pct"][name] for r in runs]
        weights = runs[0]["weights_before"] if name == "total" else runs[0]["layers"][name]["weights"]
        rows.append(
            (
                name,
                f"{weights:,}",
                f"{paper[name]}%",
                f"{statistics.median(values):.2f}%",
                f"{min(values):.2f}-{max(values):.2f}%" if len(values) > 1 else "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(len(lines) - 1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize(net: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds of the headline numbers, and which targets they meet."""
    keys = ["dense_error_pct", "pruned_error_pct", "weights_before", "weights_after", "compression", "wall_time_s"]
    median = {k: statistics.median(r[k] for r in runs) for k in keys}
    changes = [round(r["pruned_error_pct"] - r["dense_error_pct"], 3) for r in runs]
    median["error_change_pct_points"] = statistics.median(changes)
    median["remaining_pct"] = {
        name: statistics.median(r["remaining_pct"][name] for r in runs) for name in runs[0]["remaining_pct"]
    }
    paper = PAPER[net]
    per_seed_no_loss = [r["pruned_error_pct"] <= r["dense_error_pct"] for r in runs]
    targets = {
        "dense_error_at_most_paper_cap": median["dense_error_pct"] <= paper["dense_error_cap_pct"],
        "compression_at_least_12x": median["compression"] >= 12,
        "compression_at_least_20x": median["compression"] >= 20,
        "median_pruned_error_at_most_median_dense": median["pruned_error_pct"] <= median["dense_error_pct"],
        "median_error_change_at_most_zero": median["error_change_pct_points"] <= 0,
        "seeds_with_pruned_error_at_most_dense": f"{sum(per_seed_no_loss)}/{len(runs)}",
        "wall_time_within_budget": median["wall_time_s"] <= paper["budget_s"],
        "budget_s": paper["budget_s"],
    }
    return {"median": median, "targets": targets}


def environment() -> dict[str, Any]:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores (shared), no GPU",
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--net", choices=sorted(NETS), default="lenet300")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer epochs (LeNet-300-100: about 2 minutes)")
    mode.add_argument("--tiny", action="store_true", help="512 images, 1 epoch per phase: a smoke test")
    mode.add_argument("--recipe", default=None, help="a named recipe of RECIPES[net] (full, push, quick, tiny)")
    parser.add_argument("--data-dir", default=os.environ.get("MNIST_DATA_DIR", "data"), help="MNIST root folder")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default docs/results/<net>[_mode].json)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="keep phase checkpoints here")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is best on a busy CPU)")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    quiet_lightning()
    name = "quick" if args.quick else "tiny" if args.tiny else args.recipe or "full"
    if name not in RECIPES[args.net]:
        parser.error(f"--recipe {name!r} does not exist for {args.net}; choose from {sorted(RECIPES[args.net])}.")
    recipe = RECIPES[args.net][name]
    out = args.out or RESULTS / (f"{args.net}.json" if name == "full" else f"{args.net}_{name}.json")
    paper = PAPER[args.net]
    print(
        f"{paper['name']}, recipe {name!r}: {recipe.dense_epochs} dense epochs, "
        f"{len(recipe.callback['rounds'])} rounds / {recipe.retrain_epochs} retraining epochs; seeds {args.seeds}",
        flush=True,
    )

    runs = []
    with tempfile.TemporaryDirectory(prefix="reproduce-") as tmp:
        for seed in args.seeds:
            print(f"seed {seed}", flush=True)
            ckpt = (args.checkpoint_dir or Path(tmp)) / f"{args.net}-{name}-seed{seed}"
            run = run_seed(args.net, recipe, seed, args.data_dir, ckpt, echo=not args.quiet)
            print(run["table"])
            print(
                f"seed {seed}: test error {run['dense_error_pct']:.2f}% dense -> {run['pruned_error_pct']:.2f}% "
                f"pruned, {run['weights_before']:,} -> {run['weights_after']:,} weights "
                f"({run['compression']:.1f}x), {run['wall_time_s']:.0f} s",
                flush=True,
            )
            runs.append({k: v for k, v in run.items() if not k.startswith("_")})

    summary = summarize(args.net, runs)
    med = summary["median"]
    report = {
        "net": args.net,
        "network": paper["name"],
        "recipe_name": name,
        "command": shlex.join(["python", "examples/reproduce.py", *(sys.argv[1:] if argv is None else argv)]),
        **environment(),
        "seeds": args.seeds,
        "recipe": asdict(recipe),
        "paper": {k: v for k, v in paper.items() if k not in ("dense_error_cap_pct", "budget_s")},
        **summary,
        "runs": runs,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")

    which = "median of seeds " + ", ".join(map(str, args.seeds)) if len(runs) > 1 else f"seed {args.seeds[0]}"
    print()
    print(f"{paper['name']} (Table 2 of the paper vs this run, {which}):")
    print(comparison_table(args.net, runs))
    print(
        f"test error: dense {med['dense_error_pct']:.2f}% -> pruned {med['pruned_error_pct']:.2f}% "
        f"(paper {paper['dense_error_pct']:.2f}% -> {paper['pruned_error_pct']:.2f}%); median change per seed "
        f"{med['error_change_pct_points']:+.2f} points"
    )
    print(
        f"weights: {med['weights_before']:,.0f} -> {med['weights_after']:,.0f}, {med['compression']:.1f}x "
        f"(paper {paper['weights_before'] // 1000}K -> {paper['weights_after'] // 1000}K, {paper['compression']}x); "
        f"wall time {med['wall_time_s']:.0f} s per seed"
    )
    print(f"targets: {json.dumps(summary['targets'])}")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
