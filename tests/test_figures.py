"""benchmarks/figures.py's figures that read results files (no training), on small hand-made files."""

from __future__ import annotations

import json

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def figures():
    with pytest.MonkeyPatch.context() as mp:
        yield load_script("benchmarks/figures.py", "figures_under_test", mp)


@pytest.fixture(scope="module")
def tables():
    with pytest.MonkeyPatch.context() as mp:
        yield load_script("benchmarks/reproduction_tables.py", "reproduction_tables_for_figures", mp)


def results(changes: dict[int, float], compression: float) -> dict:
    runs = [{"seed": s, "dense_error_pct": 0.6, "pruned_error_pct": 0.6 + c} for s, c in changes.items()]
    pooled = {"lost": 9, "fixed": 7, "mcnemar_p": 0.8}
    return {"runs": runs, "median": {"compression": compression}, "test_images_all_seeds": pooled}


def test_changes_figure_orders_the_recipes_by_compression_after_the_controls(
    figures, tables, tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(tables, "RESULTS", tmp_path)
    monkeypatch.setattr(figures, "FIGURES", tmp_path)
    (tmp_path / "lenet5.json").write_text(json.dumps(results({0: 0.05, 1: 0.3}, 26.9)))
    (tmp_path / "lenet5_fc1room.json").write_text(json.dumps(results({0: -0.05, 1: 0.01, 5: 0.0}, 12.6)))
    control = [{"seed": 0, "dense_error_pct": 0.6, "pruned_error_pct": 0.55}]
    arms = [{"arm": "headline (pruned)", "runs": []}, {"arm": "same rounds, nothing pruned", "runs": control}]
    (tmp_path / "ablations.json").write_text(json.dumps({"nothing_pruned": {"arms": arms}}))
    (tmp_path / "lenet5_control_long.json").write_text(json.dumps(results({s: -0.02 for s in range(10, 16)}, 1.0)))
    result = figures.changes_figure(tables)
    assert result["sources"] == [
        "results/ablations.json",
        "results/lenet5_control_long.json",
        "results/lenet5_fc1room.json",
        "results/lenet5.json",
    ]
    png = (tmp_path / "lenet5_changes.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
