"""Structured pruning on real MNIST: LeNet-5 and a VGG-style CNN pruned by whole units, shrunk, timed on the CPU.

Per net and seed (the seeds are given on the command line, so they are fixed before anything runs):

1. dense training on 55,000 MNIST training images; 5,000 more are held out for validation (split seed 0);
2. from the dense weights, each *candidate* (a share of units per layer, smallest norm first) is pruned in
   three prune-retrain rounds of :class:`~lightning_prune.StructuredFraction` (its shares x 0.5, 0.8, 1.0),
   each round its own ``Trainer.fit`` (:func:`~lightning_prune.fit_rounds`), biases pruned with their units;
3. the choice, a rule fixed before the runs: the candidate with the most units pruned whose error on the
   5,000 validation images is at most the dense one + 0.10 points; if none is, the lightest;
4. the test error (10,000 official test images) of the dense and the chosen net, image by image (lost,
   fixed, exact McNemar p); every candidate's test error is recorded too, not used to choose;
5. :func:`~lightning_prune.core.structure.remove_dead_units` makes the chosen net really smaller (max
   logit difference and test error checked against the masked net), parameters and multiply-adds;
6. CPU latency, 1 torch thread, batch 1 and 64: dense against structured-and-shrunk in one process,
   interleaved (the order rotates each round), the median over rounds of each round's time per call.

Nets (``--net``): ``lenet5`` (:class:`~lightning_prune.zoo.LeNet5`, Caffe's 20-50-500, dropout 0.5, the
training recipe of ``examples/reproduce.py``: SGD lr 0.05, momentum 0.9, weight decay 5e-4, cosine,
gradients clipped to norm 10, 12 dense epochs) and ``vgg`` (:class:`VGGStyle`: 3x3 convolutions 32-32,
pool, 64-64, pool, each with BatchNorm and ReLU, no padding, then fc 1024-256-10; 6 dense epochs; see
its docs for why unpadded, and with conv biases).
The output layer is never pruned (its units are the classes).

Usage::

    python benchmarks/structured.py --net lenet5 --seeds 0 1    # about 12 min per seed, one core
    python benchmarks/structured.py --net vgg --seeds 0 1       # about 16 min per seed
    python benchmarks/structured.py --net lenet5_long --seeds 0 --reuse-dense   # lenet5's dense net, longer rounds
    python benchmarks/structured.py --measure docs/results/structured_lenet5.json   # latency again, alone
    python benchmarks/structured.py --net lenet5 --tiny --out /tmp/tiny.json       # a smoke test (seconds)

Results go to ``docs/results/structured_<net>.json`` (``--out`` elsewhere); the trained models (dense
state dicts, shrunk nets as :func:`~lightning_prune.core.structure.save_shrunk` files) to ``--work-dir``,
from where ``--measure`` re-times them. MNIST is read offline (:class:`~lightning_prune.data.MNISTDataModule`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_prune import DropoutAdjustment, PruneRetrainCallback, Retraining, Round, StructuredFraction, fit_rounds
from lightning_prune.core.structure import load_shrunk, remove_dead_units, save_shrunk
from lightning_prune.data import MNISTDataModule
from lightning_prune.zoo import LeNet5, MNISTClassifier

ROOT = Path(__file__).resolve().parent.parent
RAMP = (0.5, 0.8, 1.0)
TOLERANCE_PTS = 0.10
VAL_IMAGES = 5000


class VGGStyle(MNISTClassifier):
    """A small VGG-style CNN for MNIST: 3x3 convolutions 32-32, pool, 64-64, pool (BatchNorm, ReLU), fc 1024-256-10.

    Two choices let :func:`~lightning_prune.core.structure.remove_dead_units` remove every pruned filter: the
    convolutions are unpadded (28 -> 26 -> 24 -> 12 -> 10 -> 8 -> 4), so the constant map a pruned filter
    leaves (its BatchNorm shift, through ReLU) reaches every output of the next convolution alike (with
    ``padding=1`` the borders see less of it, and such filters are kept); and they have a bias, though
    BatchNorm follows, so the next convolution has one to absorb that constant exactly.
    """

    def build(self, dropout: float) -> None:
        """``conv1..4`` with ``bn1..4``, ``fc1``, ``drop1``, ``fc2``."""
        widths = (1, 32, 32, 64, 64)
        for i in range(1, 5):
            setattr(self, f"conv{i}", nn.Conv2d(widths[i - 1], widths[i], 3))
            setattr(self, f"bn{i}", nn.BatchNorm2d(widths[i]))
        self.fc1 = nn.Linear(64 * 4 * 4, 256)
        self.drop1 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``[B, 10]`` of images ``[B, 1, 28, 28]``."""
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        x = F.max_pool2d(F.relu(self.bn4(self.conv4(x))), 2)
        return self.fc2(self.drop1(F.relu(self.fc1(x.flatten(1)))))


@dataclass
class NetSpec:
    """What one net trains: the model, its dense epochs, the layers pruned and the candidate shares of units."""

    model: type[MNISTClassifier]
    model_kwargs: dict[str, Any]
    dense_epochs: int
    round_epochs: tuple[int, ...]
    layers: tuple[str, ...]
    candidates: dict[str, dict[str, float]]
    dropout_links: dict[str, str] | None = None
    gradient_clip_val: float | None = 10.0
    dense_key: str = ""
    notes: str = ""


_SGD = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "lr_schedule": "cosine"}
NETS: dict[str, NetSpec] = {
    "lenet5": NetSpec(
        model=LeNet5,
        model_kwargs={**_SGD, "dropout": 0.5},
        dense_epochs=12,
        round_epochs=(2, 2, 4),
        layers=("conv1", "conv2", "fc1"),
        candidates={  # units left: conv1 / conv2 / fc1 of 20 / 50 / 500
            "light": {"conv1": 0.4, "conv2": 0.5, "fc1": 0.8},  # 12 / 25 / 100
            "medium": {"conv1": 0.5, "conv2": 0.6, "fc1": 0.88},  # 10 / 20 / 60
            "heavy": {"conv1": 0.7, "conv2": 0.76, "fc1": 0.9},  # 6 / 12 / 50
        },
        dropout_links={"drop1": "fc1"},  # D = 0.5 sqrt(fc1's remaining share): fc1 loses units, fc2 is not pruned
        dense_key="lenet5",
        notes="drop1 (0.5) before fc2 is linked to fc1 for the dropout adjustment: fc2 (the classes) is not pruned.",
    ),
    "vgg": NetSpec(
        model=VGGStyle,
        model_kwargs={**_SGD, "dropout": 0.0},
        dense_epochs=6,
        round_epochs=(1, 1, 3),
        layers=("conv1", "conv2", "conv3", "conv4", "fc1"),
        candidates={  # units left of 32 / 32 / 64 / 64 / 256
            "light": {"conv1": 0.25, "conv2": 0.5, "conv3": 0.5, "conv4": 0.5, "fc1": 0.75},  # 24/16/32/32/64
            "heavy": {"conv1": 0.5, "conv2": 0.75, "conv3": 0.75, "conv4": 0.75, "fc1": 0.9},  # 16/8/16/16/26
        },
        dense_key="vgg",
    ),
}
# Written after lenet5 (three rounds of 2, 2, 4 epochs) lost 0.27 points or more on every candidate: the last round
# three times as long (the dense net's 12 epochs in all), fc1 pruned less (it costs little time), and the lightest
# candidate of lenet5 again, retrained longer. The same rule chooses.
NETS["lenet5_long"] = replace(
    NETS["lenet5"],
    round_epochs=(2, 2, 8),
    candidates={  # units left: conv1 / conv2 / fc1 of 20 / 50 / 500
        "gentle": {"conv1": 0.3, "conv2": 0.4, "fc1": 0.5},  # 14 / 30 / 250
        "mid": {"conv1": 0.4, "conv2": 0.5, "fc1": 0.6},  # 12 / 25 / 200
        "light": {"conv1": 0.4, "conv2": 0.5, "fc1": 0.8},  # 12 / 25 / 100, lenet5's lightest
    },
)


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def quiet() -> None:
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*The number of training batches.*", ".*GPU available.*"):
        warnings.filterwarnings("ignore", message)
    warnings.filterwarnings("ignore", category=FutureWarning)


def environment() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": f"{cpu}, {os.cpu_count()} logical cores (shared), no GPU",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "torch_threads": torch.get_num_threads(),
    }


@torch.inference_mode()
def wrong(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Which images ``model`` (in eval mode) gets wrong."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + 1000]).argmax(1) != y[i : i + 1000] for i in range(0, len(y), 1000)])
    model.train(was)
    return out


@torch.inference_mode()
def logits(model: nn.Module, x: Tensor) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + 1000]) for i in range(0, len(x), 1000)])


def pct(mask: Tensor) -> float:
    return round(100.0 * float(mask.float().mean()), 3)


def mcnemar(dense_wrong: Tensor, pruned_wrong: Tensor) -> dict[str, Any]:
    """Images newly wrong (lost) and newly right (fixed), and the exact two-sided McNemar p."""
    lost, fixed = int((pruned_wrong & ~dense_wrong).sum()), int((dense_wrong & ~pruned_wrong).sum())
    n = lost + fixed
    tail = sum(math.comb(n, i) for i in range(min(lost, fixed) + 1)) / 2**n if n else 0.5
    return {"lost": lost, "fixed": fixed, "mcnemar_p": float(f"{min(1.0, 2 * tail):.3g}")}


def multiply_adds(model: nn.Module, x: Tensor) -> int:
    """Multiply-adds of the Linear and Conv2d layers for one forward pass of ``x`` (per image: ``x`` of one)."""
    total = 0

    def count(module: nn.Module, inputs: Any, out: Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]
        else:
            total += out.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    with torch.inference_mode():
        model.eval()(x)
    for hook in hooks:
        hook.remove()
    return total


def units(model: nn.Module, layers: tuple[str, ...]) -> dict[str, int]:
    modules = dict(model.named_modules())
    return {n: int(modules[n].weight.shape[0]) for n in layers}


def relative(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it (results files name such paths)."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def trainer_kwargs(spec: NetSpec, tiny: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "gradient_clip_val": spec.gradient_clip_val,
    }
    if tiny:
        kwargs["limit_val_batches"] = 1
    return kwargs


# ---------------------------------------------------------------------------------------------------------------------
# Training and choosing
# ---------------------------------------------------------------------------------------------------------------------


def callback(spec: NetSpec, shares: Mapping[str, float], round_epochs: tuple[int, ...]) -> PruneRetrainCallback:
    """Three rounds of StructuredFraction, the shares ramped (x 0.5, 0.8, 1.0), biases pruned with their units."""
    rounds = [
        Round(level={layer: round(share * f, 4) for layer, share in shares.items()}, epochs=e)
        for f, e in zip(RAMP, round_epochs, strict=True)
    ]
    return PruneRetrainCallback(
        criterion=StructuredFraction(),
        layers=list(spec.layers),
        prune_bias=True,
        rounds=rounds,
        retrain=Retraining(lr_scale=1.0, weight_decay=5e-4),
        dropout=DropoutAdjustment(links=spec.dropout_links) if spec.dropout_links else None,
        verbose=False,
    )


def run_seed(net: str, spec: NetSpec, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """Dense training, every candidate's rounds, the choice, the test, the shrink; models saved to the work dir."""
    tiny = args.tiny
    dm = MNISTDataModule(
        data_dir=args.data_dir, batch_size=128, val_split=VAL_IMAGES if not tiny else 256, seed=0,
        subset=2048 if tiny else None,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert dm.val_set is not None and dm.test_set is not None
    val_x = torch.stack([dm.val_set[i][0] for i in range(len(dm.val_set))])
    val_y = torch.tensor([int(dm.val_set[i][1]) for i in range(len(dm.val_set))])
    test_x, test_y = dm.test_set.tensors
    if tiny:
        test_x, test_y = test_x[:1000], test_y[:1000]
    dense_epochs = 1 if tiny else spec.dense_epochs
    round_epochs = (1,) * len(RAMP) if tiny else spec.round_epochs

    pl.seed_everything(seed, workers=True, verbose=False)
    dense = spec.model(**spec.model_kwargs)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    dense_path = work / f"{spec.dense_key}_seed{seed}_dense.pt"
    start = time.perf_counter()
    reused = args.reuse_dense and dense_path.exists() and not tiny
    if reused:  # the same dense net: same model, data, epochs and seed
        dense.load_state_dict(torch.load(dense_path, weights_only=True))
    else:
        trainer = pl.Trainer(max_epochs=dense_epochs, enable_checkpointing=False, **trainer_kwargs(spec, tiny))
        trainer.fit(dense, datamodule=dm)
        torch.save(dense.state_dict(), dense_path)
    dense_s = time.perf_counter() - start
    dense_val, dense_test = wrong(dense, val_x, val_y), wrong(dense, test_x, test_y)
    print(f"[{net} seed {seed}] dense: val {pct(dense_val)}%, test {pct(dense_test)}% ({dense_s:.0f} s)", flush=True)

    candidates: dict[str, dict[str, Any]] = {}
    models: dict[str, tuple[nn.Module, dict[str, Tensor]]] = {}
    for name, shares in spec.candidates.items():
        pl.seed_everything(seed, workers=True, verbose=False)
        model = spec.model(**spec.model_kwargs)
        model.load_state_dict(dense.state_dict())
        prune = callback(spec, shares, round_epochs)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            fit_rounds(
                model, prune, datamodule=dm, dense_epochs=0, trainer_kwargs=trainer_kwargs(spec, tiny),
                checkpoint_dir=tmp, resume=False,
            )  # fmt: skip
        assert prune.pruner is not None
        masks = {n: k.detach().cpu().clone() for n, k in prune.pruner.masks.items()}
        val, test = wrong(model, val_x, val_y), wrong(model, test_x, test_y)
        alive = {n: int(masks[f"{n}.weight"].flatten(1).any(1).sum()) for n in spec.layers}
        candidates[name] = {
            "shares": dict(shares),
            "units_left": alive,
            "val_error_pct": pct(val),
            "test_error_pct": pct(test),
            "train_s": round(time.perf_counter() - start, 1),
        }
        models[name] = (model, masks)
        print(f"[{net} seed {seed}] {name}: units {alive}, val {pct(val)}%, test {pct(test)}%", flush=True)

    bound = pct(dense_val) + TOLERANCE_PTS
    passing = [n for n in spec.candidates if candidates[n]["val_error_pct"] <= bound + 1e-9]
    chosen = passing[-1] if passing else next(iter(spec.candidates))
    model, masks = models[chosen]
    pruned_test = wrong(model, test_x, test_y)

    shrunk = copy.deepcopy(model).eval()
    report = remove_dead_units(shrunk, test_x[:256], masks)
    diff = float((logits(shrunk, test_x) - logits(model, test_x)).abs().max())
    shrunk_test = wrong(shrunk, test_x, test_y)
    shrunk_path = work / f"{net}_seed{seed}_{chosen}.safetensors"
    save_shrunk(shrunk, shrunk_path)
    one = test_x[:1]
    return {
        "seed": seed,
        "dense": {
            "val_error_pct": pct(dense_val),
            "test_error_pct": pct(dense_test),
            "units": units(dense, spec.layers),
            "params": n_params(dense),
            "multiply_adds_per_image": multiply_adds(dense, one),
            "train_s": None if reused else round(dense_s, 1),
            "reused_from": relative(dense_path) if reused else None,
        },
        "candidates": candidates,
        "rule": f"the candidate with the most units pruned whose validation error <= dense + {TOLERANCE_PTS} points",
        "chosen": chosen,
        "chosen_within_tolerance": bool(passing),
        "test": {
            "dense_error_pct": pct(dense_test),
            "pruned_error_pct": pct(pruned_test),
            "delta_pts": round(pct(pruned_test) - pct(dense_test), 3),
            **mcnemar(dense_test, pruned_test),
        },
        "shrunk": {
            "units": units(shrunk, spec.layers),
            "params": n_params(shrunk),
            "multiply_adds_per_image": multiply_adds(shrunk, one),
            "max_abs_logit_diff_vs_masked": float(f"{diff:.3g}"),
            "test_error_pct": pct(shrunk_test),
            "removed_units": report.removed_units,
            "kept_dead_units": {n: list(p.kept) for n, p in report.plan.layers.items() if p.kept},
        },
        "files": {"dense": relative(dense_path), "shrunk": relative(shrunk_path)},
        "_models": (dense, shrunk),
    }


# ---------------------------------------------------------------------------------------------------------------------
# Latency
# ---------------------------------------------------------------------------------------------------------------------


def per_call(model: nn.Module, x: Tensor, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        model(x)
    return (time.perf_counter() - start) / n


@torch.inference_mode()
def latency(variants: Mapping[str, nn.Module], images: Tensor, rounds: int, sample_ms: float) -> dict[str, Any]:
    """Per batch size: each variant's median time per call over ``rounds`` interleaved rounds, and the ratios."""
    torch.set_num_threads(1)
    names = list(variants)
    for model in variants.values():
        model.eval()
    out: dict[str, Any] = {}
    for batch in (1, 64):
        x = images[:batch].clone()
        calls = {}
        for name in names:
            per_call(variants[name], x, 20)  # warm-up
            calls[name] = max(5, int(sample_ms * 1e-3 / per_call(variants[name], x, 20)))
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                times[name].append(per_call(variants[name], x, calls[name]))
        base = times[names[0]]
        out[str(batch)] = {
            name: {
                "median_us": round(statistics.median(t) * 1e6, 1),
                "min_us": round(min(t) * 1e6, 1),
                "max_us": round(max(t) * 1e6, 1),
                "speedup_median": round(statistics.median(b / a for a, b in zip(t, base, strict=True)), 2),
                "speedup_min": round(min(b / a for a, b in zip(t, base, strict=True)), 2),
                "speedup_max": round(max(b / a for a, b in zip(t, base, strict=True)), 2),
            }
            for name, t in times.items()
        }
    return {"rounds": rounds, "sample_ms": sample_ms, "threads": 1, "load_avg_1min": os.getloadavg()[0], "batch": out}


# ---------------------------------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------------------------------


def print_run(net: str, run: dict[str, Any]) -> None:
    d, s, t = run["dense"], run["shrunk"], run["test"]
    print(f"\n### {net}, seed {run['seed']}: candidates (validation: {VAL_IMAGES} held-out training images)\n")
    print("| candidate | units left | val error % | test error % |")
    print("|---|---|---:|---:|")
    print(f"| dense | {d['units']} | {d['val_error_pct']:.2f} | {d['test_error_pct']:.2f} |")
    for name, c in run["candidates"].items():
        mark = " (chosen)" if name == run["chosen"] else ""
        print(f"| {name}{mark} | {c['units_left']} | {c['val_error_pct']:.2f} | {c['test_error_pct']:.2f} |")
    print(
        f"\nChosen: {run['chosen']} ({'within' if run['chosen_within_tolerance'] else 'none within'} +{TOLERANCE_PTS} "
        f"points on validation). Test error {t['dense_error_pct']:.2f}% -> {t['pruned_error_pct']:.2f}% "
        f"({t['delta_pts']:+.2f} points; {t['lost']} images lost, {t['fixed']} fixed, McNemar p {t['mcnemar_p']})."
    )
    print(
        f"Shrunk: parameters {d['params']:,} -> {s['params']:,}, multiply-adds per image "
        f"{d['multiply_adds_per_image']:,} -> {s['multiply_adds_per_image']:,}; max |logit diff| vs the masked net "
        f"{s['max_abs_logit_diff_vs_masked']:.2g}, test error {s['test_error_pct']:.2f}%; dead units kept: "
        f"{s['kept_dead_units'] or 'none'}."
    )
    lat = run.get("latency")
    if lat:
        print(
            f"\nCPU latency, 1 thread, median of {lat['rounds']} interleaved rounds (~{lat['sample_ms']:g} ms each):\n"
        )
        print("| batch | dense (us) | structured, shrunk (us) | speed-up: median [min, max] over rounds |")
        print("|---:|---:|---:|---:|")
        for batch, row in lat["batch"].items():
            dense_t, shrunk_t = row["dense"], row["structured, shrunk"]
            print(
                f"| {batch} | {dense_t['median_us']:.1f} | {shrunk_t['median_us']:.1f} | "
                f"{shrunk_t['speedup_median']:.2f}x [{shrunk_t['speedup_min']:.2f}, {shrunk_t['speedup_max']:.2f}] |"
            )


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    deltas = [r["test"]["delta_pts"] for r in runs]
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "test_delta_pts": deltas}
    if all("latency" in r for r in runs):
        for batch in ("1", "64"):
            out[f"speedup_batch{batch}"] = [
                r["latency"]["batch"][batch]["structured, shrunk"]["speedup_median"] for r in runs
            ]
    return out


def measure(path: Path, args: argparse.Namespace) -> None:
    """Re-time the dense and shrunk nets a results file names (alone on the machine), and write it back."""
    report = json.loads(path.read_text())
    spec = NETS[report["net"]]  # the dense and shrunk files of the run
    dm = MNISTDataModule(data_dir=args.data_dir)
    dm.prepare_data()
    dm.setup("test")
    assert dm.test_set is not None
    images = dm.test_set.tensors[0][:64]
    for run in report["runs"]:
        dense = spec.model(**spec.model_kwargs)
        dense.load_state_dict(torch.load(ROOT / run["files"]["dense"], weights_only=True))
        shrunk = spec.model(**spec.model_kwargs)
        load_shrunk(shrunk, ROOT / run["files"]["shrunk"])
        run["latency"] = latency(
            {"dense": dense, "structured, shrunk": shrunk}, images, args.timing_rounds, args.sample_ms
        )
        run["latency"]["measured"] = environment()["date"]
        print_run(report["net"], run)
    report["summary"] = summary(report["runs"])
    report["measure_command"] = "python " + shlex.join(sys.argv)
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--net", choices=sorted(NETS), default="lenet5")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--work-dir", default=str(ROOT / "benchmarks" / "structured_runs"))
    parser.add_argument("--out", help="results file (default docs/results/structured_<net>.json)")
    parser.add_argument("--tiny", action="store_true", help="2,048 training images, one epoch per phase: a smoke test")
    parser.add_argument("--timing-rounds", type=int, default=41)
    parser.add_argument("--sample-ms", type=float, default=20.0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for training (timing always uses 1)")
    parser.add_argument("--measure", type=Path, help="re-time the nets of this results file and update it")
    parser.add_argument("--reuse-dense", action="store_true", help="load the dense net of an earlier run of the seed")
    args = parser.parse_args()
    quiet()
    torch.set_num_threads(args.threads)
    if args.measure is not None:
        measure(args.measure, args)
        return
    spec = NETS[args.net]
    out = Path(args.out) if args.out else ROOT / "docs" / "results" / f"structured_{args.net}.json"
    print(f"# Structured pruning, {args.net}, seeds {args.seeds} (fixed before the runs); {environment()}", flush=True)
    test = MNISTDataModule(data_dir=args.data_dir)
    test.prepare_data()
    test.setup("test")
    assert test.test_set is not None
    images = test.test_set.tensors[0][:64]  # the latency inputs: real test images
    report: dict[str, Any] = {
        "net": args.net,
        "command": "python " + shlex.join(sys.argv),
        **environment(),
        "tolerance_pts": TOLERANCE_PTS,
        "ramp": list(RAMP),
        "spec": {k: v for k, v in vars(spec).items() if k != "model"} | {"model": spec.model.__name__},
        "tiny": args.tiny,
        "runs": [],
    }
    for seed in args.seeds:
        run = run_seed(args.net, spec, seed, args)
        dense, shrunk = run.pop("_models")
        rounds = 3 if args.tiny else args.timing_rounds
        run["latency"] = latency({"dense": dense, "structured, shrunk": shrunk}, images, rounds, args.sample_ms)
        torch.set_num_threads(args.threads)
        report["runs"].append(run)
        print_run(args.net, run)
        report["summary"] = summary(report["runs"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
