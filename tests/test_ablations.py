"""benchmarks/ablations.py without training: which results files it reuses, and the arms it builds."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ablations():
    spec = importlib.util.spec_from_file_location("ablations_under_test", ROOT / "benchmarks" / "ablations.py")
    module = importlib.util.module_from_spec(spec)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, spec.name, module)
        mp.setitem(sys.modules, "reproduce", None)  # removed again at teardown; load_reproduce() sets it
        spec.loader.exec_module(module)
        module.load_reproduce()
        yield module


def write_results(path: Path, recipe: dict[str, Any], seeds: list[int]) -> None:
    runs = [{"seed": s, "pruned_error_pct": 1.0 + s} for s in seeds]
    path.write_text(json.dumps({"command": "python examples/reproduce.py", "recipe": recipe, "runs": runs}))


def test_cached_reads_a_seed_made_with_the_current_recipe(ablations, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys.modules["reproduce"], "RESULTS", tmp_path)
    runner = ablations.Runner(sys.modules["reproduce"], "data", [0, 1])
    recipe = dataclasses.asdict(runner.reproduce.RECIPES["lenet300"]["full"])
    write_results(tmp_path / "lenet300.json", {**recipe, "notes": "older wording"}, [0])
    assert runner.cached("lenet300", "full", 0)["pruned_error_pct"] == 1.0
    assert runner.cached("lenet300", "full", 1) is None


def test_cached_accepts_a_file_written_before_a_recipe_field_existed(ablations, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys.modules["reproduce"], "RESULTS", tmp_path)
    runner = ablations.Runner(sys.modules["reproduce"], "data", [0])
    recipe = dataclasses.asdict(runner.reproduce.RECIPES["lenet300"]["push"])
    del recipe["gradient_clip_val"]  # the field's default, as in files from before it was added
    write_results(tmp_path / "lenet300_push.json", recipe, [0])
    assert runner.cached("lenet300", "push", 0) is not None


def test_cached_ignores_a_file_made_with_another_recipe(ablations, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(sys.modules["reproduce"], "RESULTS", tmp_path)
    runner = ablations.Runner(sys.modules["reproduce"], "data", [0])
    recipe = dataclasses.asdict(runner.reproduce.RECIPES["lenet5"]["full"])
    recipe["gradient_clip_val"] = None
    write_results(tmp_path / "lenet5.json", recipe, [0])
    assert runner.cached("lenet5", "full", 0) is None


def test_nothing_pruned_runs_the_headline_rounds_at_quality_zero(ablations, monkeypatch) -> None:
    runner = ablations.Runner(sys.modules["reproduce"], "data", [0])
    headline = runner.reproduce.RECIPES["lenet5"]["full"]
    before = dataclasses.asdict(headline)
    seen = {}
    run = {"seed": 0, "dense_error_pct": 0.7, "pruned_error_pct": 0.7, "compression": 1.0, "weights_after": 1}

    def fake_run(net, recipe, label, name=None):
        seen[name or "control"] = recipe
        return [{**run, "remaining_pct": {}}]

    monkeypatch.setattr(runner, "run", fake_run)
    result = ablations.nothing_pruned(runner)
    control = seen["control"]
    assert [a["arm"] for a in result["arms"]] == ["headline (pruned)", "same rounds, nothing pruned"]
    assert seen["full"] is headline and dataclasses.asdict(headline) == before
    rounds = headline.callback["rounds"]
    assert [set(r["quality"].values()) for r in control.callback["rounds"]] == [{0.0}] * len(rounds)
    assert [r["epochs"] for r in control.callback["rounds"]] == [r["epochs"] for r in headline.callback["rounds"]]
    assert dataclasses.replace(control, callback=headline.callback) == headline
