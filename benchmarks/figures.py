"""The paper's Figure 4 and Figure 7 on LeNet-300-100 and real MNIST, written to docs/figures/.

- ``figure4_lenet300.png``: accuracy loss against the share of parameters pruned away, for dense nets
  trained with L2 and with L1 regularization, pruned without retraining, pruned once and retrained,
  and pruned iteratively with retraining between the levels (L2). Pruning is the ``global`` rule of
  :class:`lightning_prune.Pruner` (one magnitude threshold over fc1, fc2, fc3), driven from
  plain PyTorch loops (the library's Lightning-free core), which keeps the ~100 short fits cheap.
- ``figure7_lenet300_fc1.png``: histogram of fc1's weights before pruning and after the headline
  recipe of ``examples/reproduce.py`` (Lightning, ``fit_rounds``): the bimodal distribution of the
  paper's Figure 7.
- ``rounds.png``: test error against compression after each round of the headline runs, read from
  ``docs/results/lenet300.json``, ``lenet300_nodropout.json``, ``lenet5.json``, ``lenet5_local.json`` and
  ``lenet5_nodropout.json``
  (no training).
- ``lenet5_changes.png``: every LeNet-5 recipe's change in test error against each seed's own dense
  net, one dot per seed and the median, beside the same rounds with nothing pruned, read from the
  ``docs/results/lenet5*.json`` files and ``ablations.json`` (no training).

The numbers behind the plots go to ``docs/results/figures.json``. Run::

    python benchmarks/figures.py              # ~5 minutes on 2 CPU cores
    python benchmarks/figures.py --only rounds changes
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.lines

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch.nn import functional as F  # noqa: N812

from lightning_prune import Global, Pruner
from lightning_prune.data import MNISTDataModule
from lightning_prune.zoo import LeNet300100

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures"
RESULTS = ROOT / "docs" / "results"
LEVELS = [50, 60, 70, 80, 85, 90, 93, 95, 97, 98, 99]


def load_script(name: str, path: Path) -> Any:
    """The script at ``path`` imported as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_reproduce() -> Any:
    return load_script("reproduce", ROOT / "examples" / "reproduce.py")


def batches(x: torch.Tensor, y: torch.Tensor, size: int, gen: torch.Generator):
    order = torch.randperm(len(y), generator=gen)
    for i in range(0, len(y), size):
        idx = order[i : i + size]
        yield x[idx], y[idx]


def train(
    model: torch.nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    lr: float,
    weight_decay: float,
    l1: float,
    seed: int,
    pruner: Pruner | None = None,
) -> None:
    """SGD (momentum 0.9), cosine over ``epochs``; L2 as weight decay, L1 as ``l1 * sign(w)`` on the weights."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    if pruner is not None:
        pruner.attach(opt)  # pruned weights get no gradient and stay exactly zero
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for xb, yb in batches(*data, 128, gen):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            if l1:
                for p in weights:
                    p.grad.add_(p.detach().sign(), alpha=l1)
            opt.step()
        sched.step()
    if pruner is not None:
        pruner.detach()


@torch.no_grad()
def error(model: torch.nn.Module, data: tuple[torch.Tensor, torch.Tensor]) -> float:
    model.eval()
    x, y = data
    wrong = sum(int((model(x[i : i + 2000]).argmax(1) != y[i : i + 2000]).sum()) for i in range(0, len(y), 2000))
    return 100.0 * wrong / len(y)


def prune_global(model: torch.nn.Module, level: float, pruner: Pruner | None = None) -> Pruner:
    pruner = pruner or Pruner(model, ["fc*"])
    pruner.prune(Global(), level / 100)
    return pruner


def figure4(args: argparse.Namespace, dm: MNISTDataModule) -> dict[str, Any]:
    train_data = dm.train_set.tensors  # type: ignore[union-attr]
    test_data = dm.test_set.tensors  # type: ignore[union-attr]
    regs = {"L2": {"weight_decay": args.l2, "l1": 0.0}, "L1": {"weight_decay": 0.0, "l1": args.l1}}
    out: dict[str, Any] = {"levels_pct": LEVELS, "regularization": regs, "dense_epochs": args.dense_epochs}
    out["retrain_epochs"], out["retrain_lr"] = args.retrain_epochs, args.retrain_lr
    curves: dict[str, list[float]] = {}
    for name, reg in regs.items():
        t = time.perf_counter()
        torch.manual_seed(args.seed)
        dense = LeNet300100()
        train(dense, train_data, args.dense_epochs, args.lr, seed=args.seed, **reg)
        base = error(dense, test_data)
        out[f"{name}_dense_error_pct"] = base
        no_retrain, retrain = [], []
        for level in LEVELS:
            net = copy.deepcopy(dense)
            pruner = prune_global(net, level)
            no_retrain.append(base - error(net, test_data))
            train(net, train_data, args.retrain_epochs, args.retrain_lr, seed=args.seed, pruner=pruner, **reg)
            retrain.append(base - error(net, test_data))
        curves[f"{name} regularization w/o retrain"] = no_retrain
        curves[f"{name} regularization w/ retrain"] = retrain
        if name == "L2":
            net = copy.deepcopy(dense)
            pruner = Pruner(net, ["fc*"])
            iterative = []
            for level in LEVELS:
                prune_global(net, level, pruner)
                train(net, train_data, args.retrain_epochs, args.retrain_lr, seed=args.seed, pruner=pruner, **reg)
                iterative.append(base - error(net, test_data))
            curves["L2 regularization w/ iterative prune and retrain"] = iterative
        print(f"figure 4: {name} done, dense error {base:.2f}%, {time.perf_counter() - t:.0f} s", flush=True)
    out["accuracy_loss_pct_points"] = curves

    styles = {
        "L2 regularization w/o retrain": ("tab:orange", "--", "o"),
        "L1 regularization w/o retrain": ("tab:blue", "--", "s"),
        "L1 regularization w/ retrain": ("tab:purple", "-", "s"),
        "L2 regularization w/ retrain": ("tab:red", "-", "o"),
        "L2 regularization w/ iterative prune and retrain": ("tab:green", "-", "^"),
    }
    fig, ax = plt.subplots(figsize=(8, 5.2))
    for label, (color, ls, marker) in styles.items():
        ax.plot(LEVELS, curves[label], color=color, ls=ls, marker=marker, ms=4, label=label)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_ylim(-4.5, 0.5)
    ax.set_xlim(48, 100)
    ax.set_xlabel("parameters pruned away (%, global magnitude threshold over fc1, fc2, fc3)")
    ax.set_ylabel("accuracy loss (percentage points of test accuracy)")
    ax.set_title(
        f"LeNet-300-100 on MNIST: trade-off curve (cf. Fig. 4 of Han et al.)\n"
        f"dense test error: L2 {out['L2_dense_error_pct']:.2f}%, L1 {out['L1_dense_error_pct']:.2f}%; "
        f"retraining {args.retrain_epochs} epochs per level",
        fontsize=10,
    )
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8.5)
    if any(v < -4.5 for values in curves.values() for v in values):
        ax.text(99, -4.4, "points below -4.5 clipped", ha="right", va="bottom", fontsize=7, color="gray")
    fig.tight_layout()
    path = FIGURES / "figure4_lenet300.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")
    return out


def figure7(args: argparse.Namespace) -> dict[str, Any]:
    reproduce = load_reproduce()
    reproduce.quiet_lightning()
    recipe = reproduce.RECIPES["lenet300"]["full"]
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = reproduce.run_seed("lenet300", recipe, args.seed, args.data_dir, Path(tmp), echo=False)
    dense = run["_dense"].fc1.weight.detach().flatten()
    pruned = run["_pruned"].fc1.weight.detach().flatten()
    alive = pruned[pruned != 0]
    print(f"figure 7: headline recipe, seed {args.seed}, {time.perf_counter() - t:.0f} s", flush=True)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lim = float(max(dense.abs().max(), alive.abs().max()))
    bins = torch.linspace(-lim, lim, 121).numpy()
    axes[0].hist(dense.numpy(), bins=bins, color="tab:blue")
    axes[0].set_title(f"before pruning: {dense.numel():,} weights\n(test error {run['dense_error_pct']:.2f}%)")
    axes[1].hist(alive.numpy(), bins=bins, color="tab:green")
    axes[1].set_title(
        f"after pruning and retraining: {alive.numel():,} weights ({100 * alive.numel() / dense.numel():.1f}%)\n"
        f"(test error {run['pruned_error_pct']:.2f}%; pruned zeros not shown)"
    )
    for ax in axes:
        ax.set_xlabel("weight value")
        ax.set_ylabel("count")
        ax.grid(alpha=0.3)
    fig.suptitle("LeNet-300-100 fc1 (784 x 300) weight distribution (cf. Fig. 7 of Han et al.)")
    fig.tight_layout()
    path = FIGURES / "figure7_lenet300_fc1.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")
    return {
        "seed": args.seed,
        "dense_error_pct": run["dense_error_pct"],
        "pruned_error_pct": run["pruned_error_pct"],
        "compression": run["compression"],
        "fc1_weights": dense.numel(),
        "fc1_remaining": alive.numel(),
        "fc1_dense_std": float(dense.std()),
        "fc1_smallest_surviving_magnitude": float(alive.abs().min()),
    }


def rounds_figure() -> dict[str, Any]:
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    shown = {}
    series = (
        ("lenet300", "tab:red", ", dropout 0.2"),
        ("lenet300_nodropout", "tab:orange", ", no dropout"),
        ("lenet5", "tab:blue", ", dropout 0.5"),
        ("lenet5_local", "tab:green", ", dropout 0.5, local retraining"),
        ("lenet5_nodropout", "tab:purple", ", no dropout"),
    )
    for net, color, what in series:
        path = RESULTS / f"{net}.json"
        if not path.exists():
            continue
        report = json.loads(path.read_text())
        for i, run in enumerate(report["runs"]):
            xs = [r["compression"] for r in run["rounds"]]
            ys = [r["val_error_pct"] for r in run["rounds"]]
            label = f"{report['network']}{what} (seeds {', '.join(map(str, report['seeds']))})" if i == 0 else None
            ax.plot(xs, ys, color=color, marker="o", ms=4, alpha=0.8, label=label)
            ax.axhline(run["dense_error_pct"], color=color, lw=0.7, ls=":", alpha=0.6)
        shown[net] = str(path.relative_to(ROOT))
    ax.set_xscale("log", base=2)
    ax.set_xticks([1, 2, 4, 8, 12, 16, 24, 32])
    ax.get_xaxis().set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("compression after the round (dense weights / remaining weights, log scale)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Test error after each prune-retrain round (dotted: each seed's dense error)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    path = FIGURES / "rounds.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"wrote {path}")
    return {"sources": shown}


LENET5_RECIPES = ("full", "conv1dense", "local", "nodropout", "gentle", "light", "table2", "fc1room", "fc1room_long")


def changes_figure(tables: Any) -> dict[str, Any]:
    """Per LeNet-5 recipe (ordered by compression): each seed's pruned minus dense test error, and the median.

    ``tables`` is ``benchmarks/reproduction_tables.py`` (as a module), which reads the results files.
    """
    columns = []
    control = tables.control_runs()
    if control is not None:
        columns.append(("nothing pruned\n(headline)", 1.0, control, None, "results/ablations.json"))
    for name in (*tables.CONTROL_RECIPES, *LENET5_RECIPES):
        report = tables.load("lenet5", name)
        if report is not None:
            file = tables.path_of("lenet5", name)
            pooled = report["test_images_all_seeds"]
            shown = "(none pruned)" if name in tables.CONTROL_RECIPES else f"{report['median']['compression']:.1f}x"
            label = f"{name}\n{shown}"
            columns.append((label, report["median"]["compression"], report["runs"], pooled, f"results/{file.name}"))
    columns.sort(key=lambda c: c[1])
    fig, ax = plt.subplots(figsize=(12, 4.6))
    seeds = sorted({r["seed"] for c in columns for r in c[2]})
    palette = plt.get_cmap("tab10" if len(seeds) <= 10 else "tab20")
    colors = {s: palette(i % palette.N) for i, s in enumerate(seeds)}
    every = [r["pruned_error_pct"] - r["dense_error_pct"] for c in columns for r in c[2]]
    low, high = min(every) - 0.05, max(every) + 0.03
    for i, (_, _, runs, pooled, _) in enumerate(columns):
        changes = [r["pruned_error_pct"] - r["dense_error_pct"] for r in runs]
        offsets = [(k - (len(runs) - 1) / 2) * 0.06 for k in range(len(runs))]
        for run, change, dx in zip(runs, changes, offsets, strict=True):
            ax.scatter(i + dx, change, s=18, color=colors[run["seed"]], zorder=3)
        ax.hlines(statistics.median(changes), i - 0.3, i + 0.3, color="black", lw=2, zorder=4)
        if pooled is not None:
            ax.annotate(
                f"{pooled['lost']}/{pooled['fixed']}", (i, low + 0.01), ha="center", fontsize=7, color="dimgray"
            )
    ax.axhline(0, color="tab:red", lw=0.8, ls="--")
    ax.set_xticks(range(len(columns)), [c[0] for c in columns], fontsize=7.5)
    ax.set_ylim(low, high)
    ax.set_ylabel("pruned - dense test error (points)")
    ax.set_title(
        "LeNet-5: change against each seed's own dense net (dots: seeds; bar: median; "
        "grey: test images lost/fixed over all seeds)",
        fontsize=9,
    )
    handles = [matplotlib.lines.Line2D([], [], ls="", marker="o", color=colors[s], label=f"seed {s}") for s in seeds]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    out = FIGURES / "lenet5_changes.png"
    fig.savefig(out, dpi=130)
    plt.close(fig)
    print(f"wrote {out}")
    return {"sources": [c[4] for c in columns]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["figure4", "figure7", "rounds", "changes"], nargs="+", default=None)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dense-epochs", type=int, default=15)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--l2", type=float, default=5e-4, help="weight decay of the L2 nets")
    parser.add_argument("--l1", type=float, default=3e-5, help="L1 coefficient of the L1 nets")
    parser.add_argument("--retrain-epochs", type=int, default=2)
    parser.add_argument("--retrain-lr", type=float, default=0.01)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    FIGURES.mkdir(parents=True, exist_ok=True)
    only = set(args.only or ["figure4", "figure7", "rounds", "changes"])
    path = RESULTS / "figures.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    reproduce = load_reproduce()
    command = shlex.join(["python", "benchmarks/figures.py", *sys.argv[1:]])
    for name in ("figure4", "figure7", "rounds", "changes"):
        if name not in only:
            continue
        start = time.perf_counter()
        if name == "figure4":
            dm = MNISTDataModule(data_dir=args.data_dir)
            dm.prepare_data()
            dm.setup("fit")
            dm.setup("test")
            result = figure4(args, dm)
        elif name == "figure7":
            result = figure7(args)
        elif name == "rounds":
            result = rounds_figure()
        else:
            result = changes_figure(load_script("reproduction_tables", ROOT / "benchmarks" / "reproduction_tables.py"))
        wall = round(time.perf_counter() - start, 1)
        report[name] = {**result, "command": command, "wall_time_s": wall, **reproduce.environment()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
