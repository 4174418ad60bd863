"""benchmarks/reproduction_tables.py on small hand-made results files: the cross-recipe table of LeNet-5."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def tables():
    with pytest.MonkeyPatch.context() as mp:
        yield load_script("benchmarks/reproduction_tables.py", "reproduction_tables_under_test", mp)


def write_report(path: Path, changes: dict[int, float], compression: float, recipe: dict | None = None) -> None:
    runs = [{"seed": s, "dense_error_pct": 0.6, "pruned_error_pct": 0.6 + c} for s, c in changes.items()]
    median = {"compression": compression, "error_change_pct_points": sorted(changes.values())[len(changes) // 2]}
    median["remaining_pct"] = {"conv1.weight": 100.0, "fc1.weight": 2.5, "total": 5.0}
    pooled = {"lost": 9, "fixed": 7, "mcnemar_p": 0.8}
    report = {"seeds": list(changes), "runs": runs, "median": median, "test_images_all_seeds": pooled}
    report["recipe"] = recipe
    path.write_text(json.dumps(report))


def test_changes_per_seed_has_a_column_per_seed_and_a_dash_where_a_recipe_lacks_one(
    tables, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    write_report(tmp_path / "lenet5.json", {0: -0.03, 1: 0.04, 2: 0.07}, 26.9)
    write_report(tmp_path / "lenet5_light.json", {0: -0.06, 1: -0.02}, 16.5)
    lines = tables.changes_per_seed("lenet5", ("full", "light", "absent")).splitlines()
    assert lines[0].startswith("| recipe | compression | conv1 / fc1 left | seed 0 | seed 1 | seed 2 | median |")
    assert lines[2] == "| `full` | 26.9x | 100% / 2.5% | -0.03 | +0.04 | +0.07 | +0.04 | 9 / 7 (0.8) |"
    assert lines[3] == "| `light` | 16.5x | 100% / 2.5% | -0.06 | -0.02 | - | -0.02 | 9 / 7 (0.8) |"
    assert len(lines) == 4


def test_changes_per_seed_is_empty_without_results_files(tables, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    assert tables.changes_per_seed("lenet5", ("full",)) == ""


def test_against_control_pairs_each_seed_with_its_unpruned_run_on_the_same_schedule(
    tables, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    rounds = [{"layers": ["fc*"], "quality": {"fc1": 1.0}, "epochs": 2}, {"quality": {"fc1": 1.8}, "epochs": 6}]
    recipe = {"model": {"dropout": 0.5}, "dense_epochs": 12, "callback": {"rounds": rounds}, "notes": "headline"}
    write_report(tmp_path / "lenet5.json", {0: 0.05, 1: 0.0}, 26.9, recipe=recipe)
    by_share = [{"criterion": "fraction", "layers": ["fc*"], "amount": {"fc1": 0.9}, "epochs": 2}, rounds[1]]
    write_report(tmp_path / "lenet5_share.json", {0: 0.1, 1: -0.1}, 12.6, recipe={**recipe, "notes": "x"})
    report = json.loads((tmp_path / "lenet5_share.json").read_text())
    report["recipe"]["callback"]["rounds"] = by_share
    (tmp_path / "lenet5_share.json").write_text(json.dumps(report))
    longer = {**recipe, "callback": {"rounds": [rounds[0], {**rounds[1], "epochs": 8}]}}
    write_report(tmp_path / "lenet5_gentle.json", {0: 0.0}, 16.0, recipe=longer)
    control = [{"seed": s, "dense_error_pct": 0.6, "pruned_error_pct": e} for s, e in ((0, 0.55), (1, 0.62))]
    arms = [{"arm": "headline (pruned)", "runs": []}, {"arm": "same rounds, nothing pruned", "runs": control}]
    (tmp_path / "ablations.json").write_text(json.dumps({"nothing_pruned": {"arms": arms}}))
    lines = tables.against_control("lenet5", ("full", "gentle", "share")).splitlines()
    assert lines[0] == "| | compression | seed 0 | seed 1 | median |"
    assert lines[2] == "| nothing pruned, against its dense net | 1.0x | -0.05 | +0.02 | -0.01 |"
    assert lines[3] == "| `full`, against nothing pruned | 26.9x | +0.10 | -0.02 | +0.04 |"
    assert lines[4] == "| `share`, against nothing pruned | 12.6x | +0.15 | -0.12 | +0.01 |"
    assert len(lines) == 5  # gentle's last round is longer: another schedule, no control for it


def test_against_control_is_empty_without_the_control(tables, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    write_report(tmp_path / "lenet5.json", {0: 0.05}, 26.9)
    assert tables.against_control("lenet5", ("full",)) == ""


def test_against_control_refuses_a_seed_whose_dense_net_is_not_the_controls(tables, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    recipe = {"model": {}, "dense_epochs": 12, "callback": {"rounds": [{"quality": {"fc1": 1.0}, "epochs": 2}]}}
    write_report(tmp_path / "lenet5.json", {0: 0.05}, 26.9, recipe=recipe)
    control = [{"seed": 0, "dense_error_pct": 0.7, "pruned_error_pct": 0.6}]
    arms = [{"arm": "same rounds, nothing pruned", "runs": control}]
    (tmp_path / "ablations.json").write_text(json.dumps({"nothing_pruned": {"arms": arms}}))
    with pytest.raises(ValueError, match=r"full, seed 0: dense error 0.6% against the control's 0.7%"):
        tables.against_control("lenet5", ("full",))


def test_against_control_pairs_a_recipe_with_the_control_recipe_on_its_schedule(tables, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    short = [{"layers": ["fc*"], "quality": {"fc1": 1.0}, "epochs": 2}, {"quality": {"fc1": 1.8}, "epochs": 6}]
    recipe = {"model": {}, "dense_epochs": 12, "callback": {"rounds": short}}
    long = {**recipe, "callback": {"rounds": [short[0], {**short[1], "epochs": 12}]}}
    unpruned = {**long, "callback": {"rounds": [{**r, "quality": {"fc1": 0.0}} for r in long["callback"]["rounds"]]}}
    write_report(tmp_path / "lenet5.json", {0: 0.05}, 26.9, recipe=recipe)
    write_report(tmp_path / "lenet5_fc1room_long.json", {10: 0.02, 11: -0.04}, 12.6, recipe=long)
    write_report(tmp_path / "lenet5_control_long.json", {10: -0.03, 11: -0.01, 12: 0.0}, 1.0, recipe=unpruned)
    control = [{"seed": 0, "dense_error_pct": 0.6, "pruned_error_pct": 0.62}]
    arms = [{"arm": "same rounds, nothing pruned", "runs": control}]
    (tmp_path / "ablations.json").write_text(json.dumps({"nothing_pruned": {"arms": arms}}))
    lines = tables.against_control("lenet5", ("full", "fc1room_long")).splitlines()
    assert lines[0] == "| | compression | seed 0 | seed 10 | seed 11 | seed 12 | median |"
    assert lines[2] == "| nothing pruned, against its dense net | 1.0x | +0.02 | - | - | - | +0.02 |"
    assert lines[3] == "| `full`, against nothing pruned | 26.9x | +0.03 | - | - | - | +0.03 |"
    control_long = "| `control_long` (nothing pruned), against its dense net | 1.0x |"
    assert lines[4] == control_long + " - | -0.03 | -0.01 | +0.00 | -0.01 |"
    assert lines[5] == "| `fc1room_long`, against nothing pruned | 12.6x | - | +0.05 | -0.03 | - | +0.01 |"
    assert len(lines) == 6
