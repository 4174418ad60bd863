"""Ablations of the paper's retraining tricks on real MNIST, over seeds, into docs/results/ablations.json.

Each ablation changes one thing of a headline recipe of ``examples/reproduce.py`` and runs every arm
with the same seeds (0, 1, 2 by default; a seed's dense net is the same in every arm that shares the
dense phase, so arms are paired comparisons):

1. ``iterative_vs_oneshot`` (LeNet-300-100): the headline's 5 iterative rounds against ONE prune to
   the same per-layer sparsity (``criterion="fraction"`` with each seed's final per-layer shares of
   the iterative run) retrained for the same total number of epochs.
2. ``dropout_adjustment`` (LeNet-300-100): the headline net (dropout 0.2) with the dropout adjustment
   on (``D_r = D_o * sqrt(C_ir / C_io)``) and off (the rate stays 0.2 while retraining; the recipe's
   ``adjust_dropout=False``, the callback's ``dropout=None``); the same pair with dropout 0.5; and the
   paper's net without dropout (recipe ``nodropout``).
3. ``local_retraining`` (LeNet-5): the headline (every layer retrains in every round) against the
   paper's alternation (prune FC -> retrain FC only, prune conv -> retrain conv only, recipe ``local``).
4. ``retrain_lr`` (LeNet-300-100): the paper's retraining rate (``lr_scale`` 0.1 of the dense rate)
   against the headline's rate rewound to the dense rate (``lr_scale`` 1.0).
5. ``dense_control`` (both nets): a dense net trained for as many epochs as the whole pipeline (dense
   training plus every retraining epoch), beside the pipeline's dense and pruned nets: does the
   pruned net end where it does only because it trained longer?
6. ``nothing_pruned`` (LeNet-5): the headline's rounds with every quality set to 0, so that nothing
   is pruned and only the retraining schedule runs (rewound learning rate, short rounds, dropout
   and L2 as in the headline): how much of the pruned net's change comes from the schedule alone?
7. ``conv_unpruned`` (LeNet-5): the headline's rounds with the conv layers' qualities set to 0 (only
   fc1 and fc2 pruned, as much as in the headline): is the loss in pruning the conv layers?
8. ``last_round`` (LeNet-5): the last round 6 epochs long (recipe ``fc1room``, 12.6x) against 12
   (``fc1room_long``), each beside the same schedule with nothing pruned (``nothing_pruned``'s control
   and recipe ``control_long``): does a longer last round help the pruned net, the schedule, or both?

An arm changes a recipe in the recipe's own terms (a ``reproduce.Recipe``, whose ``callback``
settings ``reproduce.callback_kwargs`` turns into the callback's arguments), so that its
``recipe_key`` stays that of the runs stored before. An arm that is a recipe of ``reproduce.py`` is
read from its results file in ``docs/results/`` when that file holds the seed with the current
recipe, instead of being trained again; any other arm's seed is read from
``docs/results/ablations.json`` when an earlier run there trained the same net and recipe (the same
``recipe_key``). So ``--seeds 0 1 2 3 4`` after a run of ``--seeds 0 1 2`` trains only seeds 3 and
4. Each ablation is written into the file as soon as it ends, keeping the others (re-read just
before writing: two runs of different ablations can go side by side). Run::

    python benchmarks/ablations.py                       # ~2 h on 2 CPU cores (3 seeds, headline runs cached)
    python benchmarks/ablations.py --only retrain_lr --seeds 0
    python benchmarks/ablations.py --only nothing_pruned --seeds 0 1 2 3 4 5 6 7 8 9 --no-train-recipes
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.util
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
ABLATIONS = (
    "iterative_vs_oneshot",
    "dropout_adjustment",
    "local_retraining",
    "retrain_lr",
    "dense_control",
    "nothing_pruned",
    "conv_unpruned",
    "last_round",
)


def load_reproduce() -> Any:
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "examples" / "reproduce.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module
    spec.loader.exec_module(module)
    return module


def recipe_key(net: str, recipe: Any) -> str:
    """A short hash of ``net`` and ``recipe`` (its notes aside): two runs with one key trained the same thing.

    Example::

        >>> r = load_reproduce().RECIPES["lenet5"]["full"]
        >>> recipe_key("lenet5", r) == recipe_key("lenet5", dataclasses.replace(r, notes="reworded"))
        True
    """
    fields = {**dataclasses.asdict(recipe), "notes": ""}
    text = json.dumps({"net": net, "recipe": fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Runner:
    def __init__(
        self,
        reproduce: Any,
        data_dir: str,
        seeds: list[int],
        previous: dict[str, Any] | None = None,
        train_recipes: bool = True,
    ):
        self.reproduce = reproduce
        self.data_dir = data_dir
        self.seeds = seeds
        self.previous = previous or {}
        self.train_recipes = train_recipes

    def reused(self, key: str, seed: int) -> dict[str, Any] | None:
        """Seed ``seed`` of a run with recipe key ``key`` in ``previous`` (an earlier ablations.json), if any."""
        for name, ablation in self.previous.items():
            for earlier in ablation.get("arms", []):
                for run in earlier["runs"]:
                    if run.get("recipe_key") == key and run["seed"] == seed:
                        return {**run, "source": f"docs/results/ablations.json ({name}: {ablation['command']})"}
        return None

    def cached(self, net: str, name: str, seed: int) -> dict[str, Any] | None:
        """Seed ``seed`` of recipe ``name``'s results file, if that file was made with the current recipe."""
        path = self.reproduce.results_path(net, name)
        if not path.exists():
            return None
        report = json.loads(path.read_text())
        stored = dataclasses.replace(self.reproduce.Recipe(**report["recipe"]), notes="")
        current = json.loads(json.dumps(dataclasses.asdict(self.reproduce.RECIPES[net][name])))
        if stored != dataclasses.replace(self.reproduce.Recipe(**current), notes=""):
            return None
        for run in report["runs"]:
            if run["seed"] == seed:
                return {**run, "source": f"docs/results/{path.name} (command: {report['command']})"}
        return None

    def run(
        self, net: str, recipe: Any, label: str, name: str | None = None, seeds: list[int] | None = None
    ) -> list[dict[str, Any]]:
        """One run per seed (``self.seeds`` unless given) of ``recipe``, reusing earlier runs where it can.

        A named recipe's seed is read from its results file, any other recipe's from ``previous``.
        Without ``train_recipes``, a named recipe's seed that its results file lacks is left out.
        """
        key = recipe_key(net, recipe)
        runs = []
        for seed in self.seeds if seeds is None else seeds:
            cached = self.cached(net, name, seed) if name is not None else self.reused(key, seed)
            if cached is not None:
                print(f"-- {label}, seed {seed}: from {cached['source']}", flush=True)
                runs.append({**cached, "recipe_key": key})
                continue
            if name is not None and not self.train_recipes:
                print(f"-- {label}, seed {seed}: not in its results file, left out (--no-train-recipes)", flush=True)
                continue
            print(f"-- {label}, seed {seed}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                run = self.reproduce.run_seed(net, recipe, seed, self.data_dir, Path(tmp), echo=False)
            print(
                f"   test error {run['dense_error_pct']:.2f}% -> {run['pruned_error_pct']:.2f}%, "
                f"{run['compression']:.1f}x, {run['wall_time_s']:.0f} s",
                flush=True,
            )
            runs.append({**{k: v for k, v in run.items() if not k.startswith("_")}, "recipe_key": key})
        return runs

    def recipe(self, net: str, name: str, label: str) -> list[dict[str, Any]]:
        return self.run(net, self.reproduce.RECIPES[net][name], label, name=name)

    def dense_only(self, net: str, recipe: Any, epochs: int, label: str) -> list[dict[str, Any]]:
        """Per seed: the recipe's dense net trained for ``epochs`` epochs, and its test error."""
        runs = []
        for seed in self.seeds:
            print(f"-- {label}, seed {seed}", flush=True)
            start = time.perf_counter()
            pl.seed_everything(seed, workers=True, verbose=False)
            dm = self.reproduce.MNISTDataModule(
                data_dir=self.data_dir, batch_size=recipe.batch_size, subset=recipe.subset
            )
            model = self.reproduce.NETS[net](**recipe.model)
            kwargs = self.reproduce.trainer_kwargs(recipe, [])
            trainer = pl.Trainer(**kwargs, max_epochs=epochs, enable_checkpointing=False)
            trainer.fit(model, datamodule=dm)
            error = self.reproduce.test_error(model, dm, recipe.test_images)
            print(f"   test error {error:.2f}% after {epochs} dense epochs", flush=True)
            runs.append(
                {
                    "seed": seed,
                    "epochs": epochs,
                    "error_pct": round(error, 3),
                    "wall_time_s": round(time.perf_counter() - start, 1),
                }
            )
        return runs


def arm(name: str, runs: list[dict[str, Any]], **what: Any) -> dict[str, Any]:
    """An arm's per-seed results and their medians."""
    keep = (
        "seed",
        "recipe_key",
        "dense_error_pct",
        "pruned_error_pct",
        "compression",
        "weights_after",
        "remaining_pct",
    )
    per_seed = [
        {**{k: r[k] for k in keep}, "change": round(r["pruned_error_pct"] - r["dense_error_pct"], 3)} for r in runs
    ]
    median = {
        k: statistics.median(r[k] for r in per_seed)
        for k in ("dense_error_pct", "pruned_error_pct", "change", "compression")
    }
    no_loss = sum(r["change"] <= 0 for r in per_seed)
    sources = sorted({r.get("source", "this script") for r in runs})
    return {
        "arm": name,
        **what,
        **median,
        "seeds_no_loss": f"{no_loss}/{len(runs)}",
        "runs": per_seed,
        "sources": sources,
    }


def iterative_vs_oneshot(r: Runner) -> dict[str, Any]:
    full = r.reproduce.RECIPES["lenet300"]["full"]
    iterative = r.recipe("lenet300", "full", "LeNet-300-100, iterative (headline)")
    oneshot_runs = []
    for seed, it in zip(r.seeds, iterative, strict=True):
        amounts = {name.removesuffix(".weight"): 1 - pct / 100 for name, pct in it["remaining_pct"].items()}
        amounts.pop("total")
        oneshot = copy.deepcopy(full)
        oneshot.callback["rounds"] = [{"criterion": "fraction", "amount": amounts, "epochs": full.retrain_epochs}]
        (single,) = r.run("lenet300", oneshot, "LeNet-300-100, one-shot to the same per-layer sparsity", seeds=[seed])
        oneshot_runs.append(single)
    rounds = len(full.callback["rounds"])
    return {
        "net": "lenet300",
        "what": "one prune to the iterative run's final per-layer sparsity, same total retraining epochs",
        "arms": [
            arm(f"iterative ({rounds} rounds, std rule)", iterative, retrain_epochs=full.retrain_epochs),
            arm("one-shot (1 round, fraction rule)", oneshot_runs, retrain_epochs=full.retrain_epochs),
        ],
    }


def dropout_adjustment(r: Runner) -> dict[str, Any]:
    full = r.reproduce.RECIPES["lenet300"]["full"]
    arms = [arm("dropout 0.2, adjusted (headline)", r.recipe("lenet300", "full", "LeNet-300-100 (headline)"))]
    for rate, adjust in ((0.2, False), (0.5, True), (0.5, False)):
        recipe = copy.deepcopy(full)
        recipe.model["dropout"] = rate
        recipe.callback["adjust_dropout"] = adjust
        runs = r.run("lenet300", recipe, f"LeNet-300-100 dropout {rate}, adjust_dropout={adjust}")
        arms.append(arm(f"dropout {rate}, {'adjusted' if adjust else 'not adjusted'}", runs))
    arms.append(arm("no dropout (recipe nodropout)", r.recipe("lenet300", "nodropout", "LeNet-300-100, no dropout")))
    return {
        "net": "lenet300",
        "what": "dropout rate of drop1, drop2 and whether it shrinks while retraining",
        "arms": arms,
    }


def local_retraining(r: Runner) -> dict[str, Any]:
    return {
        "net": "lenet5",
        "what": "same rounds; every layer retraining in every round vs the paper's train_only alternation",
        "arms": [
            arm("all layers retrain (headline)", r.recipe("lenet5", "full", "LeNet-5 (headline)")),
            arm("train_only alternation (paper)", r.recipe("lenet5", "local", "LeNet-5, local retraining")),
        ],
    }


def retrain_lr(r: Runner) -> dict[str, Any]:
    full = r.reproduce.RECIPES["lenet300"]["full"]
    rewound = r.recipe("lenet300", "full", "LeNet-300-100, lr_scale 1.0 (headline)")
    paper = copy.deepcopy(full)
    paper.callback["retrain_lr_scale"] = 0.1
    low = r.run("lenet300", paper, "LeNet-300-100, lr_scale 0.1 (paper)")
    return {
        "net": "lenet300",
        "what": "retraining learning rate: 1/10 of the dense rate (paper) vs the dense rate, cosine per round",
        "arms": [arm("lr_scale 0.1 (paper)", low), arm("lr_scale 1.0 (headline)", rewound)],
    }


def dense_control(r: Runner) -> dict[str, Any]:
    nets = {}
    for net in ("lenet300", "lenet5"):
        recipe = r.reproduce.RECIPES[net]["full"]
        total = recipe.dense_epochs + recipe.retrain_epochs
        pipeline = r.recipe(net, "full", f"{net} (headline)")
        long = r.dense_only(net, recipe, total, f"{net}, dense for {total} epochs")
        per_seed = [
            {
                "seed": p["seed"],
                "dense_error_pct": p["dense_error_pct"],
                "long_dense_error_pct": d["error_pct"],
                "pruned_error_pct": p["pruned_error_pct"],
                "compression": p["compression"],
            }
            for p, d in zip(pipeline, long, strict=True)
        ]
        beaten = sum(s["pruned_error_pct"] <= s["long_dense_error_pct"] for s in per_seed)
        nets[net] = {
            "dense_epochs": recipe.dense_epochs,
            "long_dense_epochs": total,
            **{
                k: statistics.median(s[k] for s in per_seed)
                for k in ("dense_error_pct", "long_dense_error_pct", "pruned_error_pct", "compression")
            },
            "seeds_pruned_at_most_long_dense": f"{beaten}/{len(per_seed)}",
            "runs": per_seed,
        }
    return {"what": "dense nets trained as long as the whole pipeline (dense + all retraining epochs)", "nets": nets}


def spared(reproduce: Any, layers: tuple[str, ...] | None = None) -> Any:
    """The LeNet-5 headline recipe with ``layers`` (all: ``None``) at quality 0 in every round."""
    headline = reproduce.RECIPES["lenet5"]["full"]
    rounds = reproduce.zero_quality(headline.callback["rounds"], layers)
    return dataclasses.replace(headline, callback={**headline.callback, "rounds": rounds})


def lenet5_spared(r: Runner, layers: tuple[str, ...] | None, what: str, arms: tuple[str, str]) -> dict[str, Any]:
    """The LeNet-5 headline against the same rounds with ``layers`` (all: ``None``) left unpruned."""
    control = spared(r.reproduce, layers)
    return {
        "net": "lenet5",
        "what": what,
        "arms": [
            arm(arms[0], r.recipe("lenet5", "full", "LeNet-5 (headline)")),
            arm(arms[1], r.run("lenet5", control, f"LeNet-5, quality 0 for {layers or 'every layer'}")),
        ],
    }


def nothing_pruned(r: Runner) -> dict[str, Any]:
    what = "the headline's rounds and retraining with every quality 0 (nothing pruned) vs the headline"
    return lenet5_spared(r, None, what, ("headline (pruned)", "same rounds, nothing pruned"))


def conv_unpruned(r: Runner) -> dict[str, Any]:
    what = "the headline's rounds with conv1 and conv2 at quality 0 (only fc1, fc2 pruned) vs the headline"
    return lenet5_spared(r, ("conv1", "conv2"), what, ("headline (all layers pruned)", "conv layers not pruned"))


def last_round(r: Runner) -> dict[str, Any]:
    control = spared(r.reproduce)
    return {
        "net": "lenet5",
        "what": "the last round 6 vs 12 epochs long, at 12.6x (fc1room's shares) and with nothing pruned",
        "arms": [
            arm("12.6x, last round 6 epochs (fc1room)", r.recipe("lenet5", "fc1room", "LeNet-5, fc1room")),
            arm(
                "12.6x, last round 12 epochs (fc1room_long)",
                r.recipe("lenet5", "fc1room_long", "LeNet-5, fc1room_long"),
            ),
            arm("nothing pruned, last round 6 epochs", r.run("lenet5", control, "LeNet-5, quality 0 for every layer")),
            arm(
                "nothing pruned, last round 12 epochs (control_long)",
                r.recipe("lenet5", "control_long", "LeNet-5, control_long"),
            ),
        ],
    }


def table(name: str, result: dict[str, Any]) -> str:
    """The ablation as Markdown rows (medians over seeds)."""
    if name == "dense_control":
        lines = [
            "| net | dense (recipe) | dense, as long as the pipeline | pruned | compression | pruned <= long dense |"
        ]
        lines.append("|---|---:|---:|---:|---:|---|")
        for net, n in result["nets"].items():
            lines.append(
                f"| {net} | {n['dense_error_pct']:.2f}% ({n['dense_epochs']} ep.) | {n['long_dense_error_pct']:.2f}% "
                f"({n['long_dense_epochs']} ep.) | {n['pruned_error_pct']:.2f}% | {n['compression']:.1f}x | "
                f"{n['seeds_pruned_at_most_long_dense']} seeds |"
            )
        return "\n".join(lines)
    lines = [
        "| arm | dense error | pruned error | change | compression | seeds without loss |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for a in result["arms"]:
        lines.append(
            f"| {a['arm']} | {a['dense_error_pct']:.2f}% | {a['pruned_error_pct']:.2f}% | {a['change']:+.2f} | "
            f"{a['compression']:.1f}x | {a['seeds_no_loss']} |"
        )
    return "\n".join(lines)


def read_report(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, name: str, result: dict[str, Any]) -> None:
    """Write ablation ``name`` into the report at ``path``, re-read first so that other ablations written since stay."""
    report = read_report(path)
    report[name] = result
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=ABLATIONS, nargs="+", default=None)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--no-train-recipes",
        dest="train_recipes",
        action="store_false",
        help="arms that are recipes of reproduce.py only read their results files: seeds those lack are left out",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    reproduce = load_reproduce()
    reproduce.quiet_lightning()
    path = RESULTS / "ablations.json"
    runner = Runner(reproduce, args.data_dir, args.seeds, previous=read_report(path), train_recipes=args.train_recipes)
    for name in args.only or ABLATIONS:
        start = time.perf_counter()
        result = globals()[name](runner)
        result.update(
            seeds=args.seeds,
            command=shlex.join(["python", "benchmarks/ablations.py", *sys.argv[1:]]),
            wall_time_s=round(time.perf_counter() - start, 1),
            **reproduce.environment(),
        )
        save(path, name, result)
        print(f"\n{name} (median over seeds {', '.join(map(str, args.seeds))}):\n{table(name, result)}\n", flush=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
