"""Ablations of the paper's retraining tricks on real MNIST, one seed each, into docs/results/ablations.json.

Each ablation changes one thing of the headline recipes of ``examples/reproduce.py``:

1. ``iterative_vs_oneshot`` (LeNet-300-100): the headline's 5 iterative rounds against ONE prune to
   the same per-layer sparsity (``criterion="fraction"`` with the iterative run's final per-layer
   shares) retrained for the same total number of epochs.
2. ``dropout_adjustment`` (LeNet-300-100 built with dropout 0.5): ``adjust_dropout=True``
   (``D_r = D_o * sqrt(C_ir / C_io)``) against ``False`` (dropout stays 0.5 while retraining).
3. ``local_retraining`` (LeNet-5): the headline's alternation (prune FC -> retrain FC only, prune
   conv -> retrain conv only, then a joint round) against the same rounds retraining every layer.
4. ``retrain_lr`` (LeNet-300-100): the paper's retraining rate (``lr_scale`` 0.1 of the dense rate)
   against the headline's rate rewound to the dense rate (``lr_scale`` 1.0).

An arm equal to a headline run (same recipe, seed 0) is taken from ``docs/results/<net>.json`` when
that file holds it, instead of being trained again. Run::

    python benchmarks/ablations.py                 # ~15 minutes on 2 CPU cores
    python benchmarks/ablations.py --only retrain_lr
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.util
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
ABLATIONS = ("iterative_vs_oneshot", "dropout_adjustment", "local_retraining", "retrain_lr")


def load_reproduce() -> Any:
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


class Runner:
    def __init__(self, reproduce: Any, data_dir: str, seed: int):
        self.reproduce = reproduce
        self.data_dir = data_dir
        self.seed = seed

    def headline(self, net: str) -> dict[str, Any] | None:
        """Seed ``self.seed`` of docs/results/<net>.json, if it was made with the current full recipe."""
        path = RESULTS / f"{net}.json"
        if not path.exists():
            return None
        report = json.loads(path.read_text())
        recipe = dataclasses.asdict(self.reproduce.RECIPES[net]["full"])
        recipe.pop("notes")
        if json.loads(json.dumps(recipe)) != {k: v for k, v in report["recipe"].items() if k != "notes"}:
            return None
        for run in report["runs"]:
            if run["seed"] == self.seed:
                return {**run, "source": f"docs/results/{net}.json (command: {report['command']})"}
        return None

    def run(self, net: str, recipe: Any, label: str) -> dict[str, Any]:
        print(f"-- {label}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run = self.reproduce.run_seed(net, recipe, self.seed, self.data_dir, Path(tmp), echo=False)
        print(run["table"])
        print(
            f"   test error {run['dense_error_pct']:.2f}% -> {run['pruned_error_pct']:.2f}%, "
            f"{run['compression']:.1f}x, {run['wall_time_s']:.0f} s",
            flush=True,
        )
        return {k: v for k, v in run.items() if not k.startswith("_") and k not in ("curve", "table", "layers")}

    def full(self, net: str, label: str) -> dict[str, Any]:
        cached = self.headline(net)
        if cached is not None:
            print(f"-- {label}: from {cached['source']}", flush=True)
            return {k: v for k, v in cached.items() if k not in ("curve", "table", "layers")}
        return self.run(net, self.reproduce.RECIPES[net]["full"], label)


def arm(name: str, run: dict[str, Any], **what: Any) -> dict[str, Any]:
    keep = ("dense_error_pct", "pruned_error_pct", "compression", "weights_after", "remaining_pct", "wall_time_s")
    return {"arm": name, **what, **{k: run[k] for k in keep}, "source": run.get("source", "this script")}


def iterative_vs_oneshot(r: Runner) -> dict[str, Any]:
    full = r.reproduce.RECIPES["lenet300"]["full"]
    iterative = r.full("lenet300", "LeNet-300-100, iterative (headline)")
    amounts = {name.removesuffix(".weight"): 1 - pct / 100 for name, pct in iterative["remaining_pct"].items()}
    amounts.pop("total")
    oneshot = copy.deepcopy(full)
    oneshot.callback["rounds"] = [{"criterion": "fraction", "amount": amounts, "epochs": full.retrain_epochs}]
    single = r.run("lenet300", oneshot, "LeNet-300-100, one-shot to the same per-layer sparsity")
    return {
        "net": "lenet300",
        "what": "one prune to the iterative run's final per-layer sparsity, same total retraining epochs",
        "arms": [
            arm("iterative (5 rounds, std rule)", iterative, retrain_epochs=full.retrain_epochs),
            arm("one-shot (1 round, fraction rule)", single, retrain_epochs=full.retrain_epochs),
        ],
    }


def dropout_adjustment(r: Runner) -> dict[str, Any]:
    full = r.reproduce.RECIPES["lenet300"]["full"]
    arms = []
    for adjust in (True, False):
        recipe = copy.deepcopy(full)
        recipe.model["dropout"] = 0.5
        recipe.callback["adjust_dropout"] = adjust
        run = r.run("lenet300", recipe, f"LeNet-300-100 dropout 0.5, adjust_dropout={adjust}")
        arms.append(arm(f"adjust_dropout={adjust}", run, dropout=0.5))
    return {"net": "lenet300", "what": "LeNet-300-100 built with dropout 0.5 (drop1, drop2)", "arms": arms}


def local_retraining(r: Runner) -> dict[str, Any]:
    full = r.reproduce.RECIPES["lenet5"]["full"]
    local = r.full("lenet5", "LeNet-5, local retraining (headline)")
    everything = copy.deepcopy(full)
    everything.callback["rounds"] = [
        {k: v for k, v in rd.items() if k != "train_only"} for rd in full.callback["rounds"]
    ]
    all_layers = r.run("lenet5", everything, "LeNet-5, every round retrains all layers")
    return {
        "net": "lenet5",
        "what": "same rounds; train_only alternation (paper) vs all layers retraining in every round",
        "arms": [arm("train_only alternation (paper)", local), arm("all layers retrain", all_layers)],
    }


def retrain_lr(r: Runner) -> dict[str, Any]:
    full = r.reproduce.RECIPES["lenet300"]["full"]
    rewound = r.full("lenet300", "LeNet-300-100, lr_scale 1.0 (headline)")
    paper = copy.deepcopy(full)
    paper.callback["retrain_lr_scale"] = 0.1
    low = r.run("lenet300", paper, "LeNet-300-100, lr_scale 0.1 (paper)")
    return {
        "net": "lenet300",
        "what": "retraining learning rate: 1/10 of the dense rate (paper) vs the dense rate, cosine per round",
        "arms": [arm("lr_scale 0.1 (paper)", low), arm("lr_scale 1.0 (headline)", rewound)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=ABLATIONS, nargs="+", default=None)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reproduce = load_reproduce()
    reproduce.quiet_lightning()
    runner = Runner(reproduce, args.data_dir, args.seed)
    path = RESULTS / "ablations.json"
    report: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for name in args.only or ABLATIONS:
        start = time.perf_counter()
        result = globals()[name](runner)
        result.update(
            seed=args.seed,
            command=shlex.join(["python", "benchmarks/ablations.py", *sys.argv[1:]]),
            wall_time_s=round(time.perf_counter() - start, 1),
            **reproduce.environment(),
        )
        report[name] = result
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        for a in result["arms"]:
            print(
                f"{name}: {a['arm']}: {a['dense_error_pct']:.2f}% -> {a['pruned_error_pct']:.2f}%, "
                f"{a['compression']:.1f}x",
                flush=True,
            )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
