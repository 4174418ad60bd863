"""benchmarks/reproduction_tables.py on small hand-made results files: the cross-recipe table of LeNet-5."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tables():
    spec = importlib.util.spec_from_file_location(
        "reproduction_tables_under_test", ROOT / "benchmarks" / "reproduction_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        yield module


def write_report(path: Path, changes: dict[int, float], compression: float) -> None:
    runs = [{"seed": s, "dense_error_pct": 0.6, "pruned_error_pct": 0.6 + c} for s, c in changes.items()]
    median = {"compression": compression, "error_change_pct_points": sorted(changes.values())[len(changes) // 2]}
    median["remaining_pct"] = {"conv1.weight": 100.0, "fc1.weight": 2.5, "total": 5.0}
    pooled = {"lost": 9, "fixed": 7, "mcnemar_p": 0.8}
    report = {"seeds": list(changes), "runs": runs, "median": median, "test_images_all_seeds": pooled}
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
