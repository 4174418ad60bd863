"""The Markdown tables of docs/reproduction.md, read from the results files of ``examples/reproduce.py``.

No training: it reads ``docs/results/<net>[_<recipe>].json`` and prints the summary table, the
per-layer tables (Table 2 of the paper beside ours) and the per-seed tables, so that the page's
numbers are pasted from the runs, not typed. Run::

    python benchmarks/reproduction_tables.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"

ROWS = (
    ("lenet300", "full", "LeNet-300-100, ours (dropout 0.2)"),
    ("lenet300", "gentle", "LeNet-300-100, ours, 4 rounds"),
    ("lenet300", "push", "LeNet-300-100, ours, 6 rounds"),
    ("lenet300", "nodropout", "LeNet-300-100, ours, no dropout (paper's net)"),
    ("lenet5", "full", "LeNet-5, ours (dropout 0.5)"),
    ("lenet5", "gentle", "LeNet-5, ours, 3 rounds"),
    ("lenet5", "local", "LeNet-5, ours, paper's local retraining"),
    ("lenet5", "nodropout", "LeNet-5, ours, no dropout (paper's net)"),
    ("lenet5", "conv1dense", "LeNet-5, ours, conv1 not pruned"),
    ("lenet5", "light", "LeNet-5, ours, conv1 not pruned, conv2 and fc2 less"),
    ("lenet5", "table2", "LeNet-5, ours, the paper's Table 2 shares"),
    ("lenet5", "fc1room", "LeNet-5, ours, 12.6x with conv1 whole and fc1 at 4.2%"),
    ("lenet5", "fc1room_long", "LeNet-5, ours, the same 12.6x with a 12-epoch last round"),
)


def path_of(net: str, recipe: str) -> Path:
    return RESULTS / (f"{net}.json" if recipe == "full" else f"{net}_{recipe}.json")


def load(net: str, recipe: str) -> dict[str, Any] | None:
    path = path_of(net, recipe)
    return json.loads(path.read_text()) if path.exists() else None


def required(net: str, recipe: str) -> dict[str, Any]:
    report = load(net, recipe)
    if report is None:
        raise FileNotFoundError(f"{path_of(net, recipe)} does not exist: run examples/reproduce.py for it first.")
    return report


def no_loss(report: dict[str, Any]) -> str:
    return report["targets"]["seeds_with_pruned_error_at_most_dense"]


def summary() -> str:
    lines = [
        "| network | seeds | dense error | pruned error | change | seeds without loss | test images lost / fixed "
        "(McNemar p) | weights | compression | time per seed |",
        "|---|---|---:|---:|---:|---|---|---|---:|---:|",
    ]
    papers = {}
    for net, recipe, label in ROWS:
        report = load(net, recipe)
        if report is None:
            continue
        paper = report["paper"]
        if net not in papers:
            papers[net] = True
            lines.append(
                f"| {report['network']}, paper | | {paper['dense_error_pct']:.2f}% | "
                f"{paper['pruned_error_pct']:.2f}% | {paper['pruned_error_pct'] - paper['dense_error_pct']:+.2f} | | | "
                f"{paper['weights_before'] // 1000}K -> {paper['weights_after'] // 1000}K | {paper['compression']}x | |"
            )
        m = report["median"]
        pooled = report["test_images_all_seeds"]
        lines.append(
            f"| {label} | {len(report['seeds'])} | {m['dense_error_pct']:.2f}% | {m['pruned_error_pct']:.2f}% | "
            f"{m['error_change_pct_points']:+.2f} | {no_loss(report)} | {pooled['lost']} / {pooled['fixed']} "
            f"({pooled['mcnemar_p']:.2g}) | {m['weights_before']:,.0f} -> {m['weights_after']:,.0f} | "
            f"{m['compression']:.1f}x | {m['wall_time_s']:.0f} s |"
        )
    return "\n".join(lines)


def per_layer(net: str, recipe: str) -> str:
    report = required(net, recipe)
    runs = report["runs"]
    names = list(runs[0]["remaining_pct"])
    seeds = " / ".join(str(s) for s in report["seeds"])
    lines = [
        f"| layer | weights | paper remaining | ours remaining (median) | seeds {seeds} |",
        "|---|---:|---:|---:|---|",
    ]
    for name in names:
        weights = runs[0]["weights_before"] if name == "total" else runs[0]["layers"][name]["weights"]
        values = [r["remaining_pct"][name] for r in runs]
        shown = name.removesuffix(".weight")
        lines.append(
            f"| {shown} | {weights:,} | {report['paper']['remaining_pct'][name]}% | {statistics.median(values):.2f}% | "
            f"{' / '.join(f'{v:.2f}' for v in values)} |"
        )
    return "\n".join(lines)


def per_seed(net: str, recipe: str) -> str:
    report = required(net, recipe)
    lines = [
        "| seed | dense error | pruned error | change | lost / fixed (McNemar p) | weights after | compression | "
        "wall time |",
        "|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in report["runs"]:
        t = r["test_images"]
        lines.append(
            f"| {r['seed']} | {r['dense_error_pct']:.2f}% | {r['pruned_error_pct']:.2f}% | "
            f"{r['pruned_error_pct'] - r['dense_error_pct']:+.2f} | {t['lost']} / {t['fixed']} "
            f"({t['mcnemar_p']:.2g}) | {r['weights_after']:,} | {r['compression']:.1f}x | {r['wall_time_s']:.0f} s |"
        )
    m = report["median"]
    lines.append(
        f"| **median** | **{m['dense_error_pct']:.2f}%** | **{m['pruned_error_pct']:.2f}%** | "
        f"**{m['error_change_pct_points']:+.2f}** | | **{m['weights_after']:,.0f}** | **{m['compression']:.1f}x** | "
        f"**{m['wall_time_s']:.0f} s** |"
    )
    return "\n".join(lines)


def rounds(net: str, recipe: str) -> str:
    """Per seed: compression and test error after each round."""
    report = required(net, recipe)
    lines = []
    for r in report["runs"]:
        steps = ", ".join(f"{p['compression']:.1f}x {p['val_error_pct']:.2f}%" for p in r["rounds"][1:])
        lines.append(f"- seed {r['seed']}: dense {r['dense_error_pct']:.2f}%; {steps}")
    return "\n".join(lines)


LENET5_PLACEMENTS = ("full", "conv1dense", "gentle", "light", "table2", "fc1room", "fc1room_long")


def changes_per_seed(net: str, recipes: tuple[str, ...]) -> str:
    """One row per recipe: where its weights are, each seed's change against its own dense net, the pooled counts."""
    reports = {name: r for name in recipes if (r := load(net, name)) is not None}
    if not reports:
        return ""
    seeds = sorted({s for r in reports.values() for s in r["seeds"]})
    layers = [k for k in next(iter(reports.values()))["median"]["remaining_pct"] if k != "total"]
    lines = [
        f"| recipe | compression | {' / '.join(k.removesuffix('.weight') for k in layers)} left | "
        + " | ".join(f"seed {s}" for s in seeds)
        + " | median | lost / fixed (McNemar p) |",
        "|---|---:|---|" + "---:|" * len(seeds) + "---:|---|",
    ]
    for name, report in reports.items():
        by_seed = {r["seed"]: r["pruned_error_pct"] - r["dense_error_pct"] for r in report["runs"]}
        m, pooled = report["median"], report["test_images_all_seeds"]
        left = " / ".join(f"{m['remaining_pct'][k]:.3g}%" for k in layers)
        cells = " | ".join(f"{by_seed[s]:+.2f}" if s in by_seed else "-" for s in seeds)
        lines.append(
            f"| `{name}` | {m['compression']:.1f}x | {left} | {cells} | {m['error_change_pct_points']:+.2f} | "
            f"{pooled['lost']} / {pooled['fixed']} ({pooled['mcnemar_p']:.2g}) |"
        )
    return "\n".join(lines)


CONTROL = ("nothing_pruned", "same rounds, nothing pruned")
"""The ablation and arm of docs/results/ablations.json that runs the LeNet-5 headline's rounds with nothing pruned."""


def schedule(report: dict[str, Any]) -> tuple[Any, ...]:
    """What a recipe trains apart from how much it prunes: dense phase, model, data, each round's layers and epochs."""
    recipe = report["recipe"]
    callback = {k: v for k, v in recipe["callback"].items() if k != "rounds"}
    phases = [(r.get("layers"), r.get("train_only"), r["epochs"]) for r in recipe["callback"]["rounds"]]
    rest = {k: v for k, v in recipe.items() if k not in ("callback", "notes")}
    return json.dumps(rest, sort_keys=True), json.dumps(callback, sort_keys=True), json.dumps(phases)


def control_runs() -> list[dict[str, Any]] | None:
    """The nothing-pruned control's per-seed runs in docs/results/ablations.json (``None``: not run yet)."""
    path = RESULTS / "ablations.json"
    ablation = json.loads(path.read_text()).get(CONTROL[0]) if path.exists() else None
    if ablation is None:
        return None
    (arm,) = [a for a in ablation["arms"] if a["arm"] == CONTROL[1]]
    return arm["runs"]


CONTROL_RECIPES = ("control_long",)
"""Recipes of ``examples/reproduce.py`` that prune nothing: each is the control of the recipes on its schedule."""


def controls(net: str) -> list[tuple[str, dict[str, Any], list[dict[str, Any]]]]:
    """Every nothing-pruned control of ``net`` there are results for: (row label, a report on its schedule, runs).

    The first is the ablation's (the headline's rounds, its schedule read from the headline's results
    file), then each of :data:`CONTROL_RECIPES` from its own results file.
    """
    found = []
    runs, headline = control_runs(), load(net, "full")
    if runs is not None and headline is not None:
        found.append(("nothing pruned, against its dense net", headline, runs))
    for name in CONTROL_RECIPES:
        report = load(net, name)
        if report is not None:
            found.append((f"`{name}` (nothing pruned), against its dense net", report, report["runs"]))
    return found


def against_control(net: str, recipes: tuple[str, ...]) -> str:
    """Each seed's pruned error against the same seed's net trained by the same rounds with nothing pruned.

    Per control (:func:`controls`): a row of the control against its dense net, then one row per
    recipe that trains on the control's schedule, pruned error minus the control's error on the same
    seed. One column per seed of any control. Empty without a control.

    Raises:
        ValueError: if a recipe's seed starts from another dense net than the control's same seed.
    """
    found = controls(net)
    if not found:
        return ""
    seeds = sorted({r["seed"] for _, _, runs in found for r in runs})
    lines = [
        "| | compression | " + " | ".join(f"seed {s}" for s in seeds) + " | median |",
        "|---|---:|" + "---:|" * len(seeds) + "---:|",
    ]

    def row(label: str, compression: float, changes: dict[int, float]) -> str:
        cells = " | ".join(f"{changes[s]:+.2f}" if s in changes else "-" for s in seeds)
        median = statistics.median(changes.values())
        return f"| {label} | {compression:.1f}x | {cells} | {median:+.2f} |"

    for label, on_schedule, runs in found:
        control = {r["seed"]: r for r in runs}
        changes = {s: r["pruned_error_pct"] - r["dense_error_pct"] for s, r in control.items()}
        lines.append(row(label, 1.0, changes))
        for name in recipes:
            report = load(net, name)
            if report is None or schedule(report) != schedule(on_schedule):
                continue
            for r in report["runs"]:
                if r["seed"] in control and r["dense_error_pct"] != control[r["seed"]]["dense_error_pct"]:
                    raise ValueError(
                        f"{name}, seed {r['seed']}: dense error {r['dense_error_pct']}% against the control's "
                        f"{control[r['seed']]['dense_error_pct']}%; the two must start from the same dense net"
                    )
            pruned = {r["seed"]: r["pruned_error_pct"] for r in report["runs"]}
            changes = {s: e - control[s]["pruned_error_pct"] for s, e in pruned.items() if s in control}
            if changes:
                lines.append(row(f"`{name}`, against nothing pruned", report["median"]["compression"], changes))
    return "\n".join(lines)


def main() -> None:
    print("## Summary\n")
    print(summary())
    print("\n## LeNet-5: where the weights go (change against each seed's own dense net)\n")
    print(changes_per_seed("lenet5", LENET5_PLACEMENTS))
    print("\n## LeNet-5 against the same rounds with nothing pruned (error difference, points)\n")
    print(against_control("lenet5", LENET5_PLACEMENTS))
    for net, recipe, label in ROWS:
        report = load(net, recipe)
        if report is None:
            continue
        print(f"\n## {label} ({report['command']})\n")
        print(per_layer(net, recipe))
        print()
        print(per_seed(net, recipe))
        print("\nafter each round:\n")
        print(rounds(net, recipe))


if __name__ == "__main__":
    main()
