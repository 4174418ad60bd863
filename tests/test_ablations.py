"""benchmarks/ablations.py without training: which results files it reuses, and the arms it builds."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from scripts import load_script


@pytest.fixture(scope="module")
def ablations():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "reproduce", None)  # removed again at teardown; load_reproduce() sets it
        module = load_script("benchmarks/ablations.py", "ablations_under_test", mp)
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


def record_recipes(ablations, runner, monkeypatch) -> dict[str, Any]:
    """Replace ``runner.run`` by a stub that records each arm's recipe (by recipe name, "control" if unnamed)."""
    seen: dict[str, Any] = {}
    run = {"seed": 0, "dense_error_pct": 0.7, "pruned_error_pct": 0.7, "compression": 1.0, "weights_after": 1}

    def fake_run(net, recipe, label, name=None):
        seen[name or "control"] = recipe
        return [{**run, "remaining_pct": {}, "recipe_key": ablations.recipe_key(net, recipe)}]

    monkeypatch.setattr(runner, "run", fake_run)
    return seen


def test_nothing_pruned_runs_the_headline_rounds_at_quality_zero(ablations, monkeypatch) -> None:
    runner = ablations.Runner(sys.modules["reproduce"], "data", [0])
    headline = runner.reproduce.RECIPES["lenet5"]["full"]
    before = dataclasses.asdict(headline)
    seen = record_recipes(ablations, runner, monkeypatch)
    result = ablations.nothing_pruned(runner)
    control = seen["control"]
    assert [a["arm"] for a in result["arms"]] == ["headline (pruned)", "same rounds, nothing pruned"]
    assert seen["full"] is headline and dataclasses.asdict(headline) == before
    rounds = headline.callback["rounds"]
    assert [set(r["quality"].values()) for r in control.callback["rounds"]] == [{0.0}] * len(rounds)
    assert [r["epochs"] for r in control.callback["rounds"]] == [r["epochs"] for r in headline.callback["rounds"]]
    assert dataclasses.replace(control, callback=headline.callback) == headline


def test_recipe_key_ignores_notes_and_tells_recipes_and_nets_apart(ablations) -> None:
    full = sys.modules["reproduce"].RECIPES["lenet5"]["full"]
    key = ablations.recipe_key("lenet5", full)
    assert key == ablations.recipe_key("lenet5", dataclasses.replace(full, notes="other words"))
    assert key != ablations.recipe_key("lenet5", dataclasses.replace(full, dense_epochs=13))
    assert key != ablations.recipe_key("lenet300", full)


def fake_run_seed(trained: list[int]):
    def run_seed(net, recipe, seed, data_dir, checkpoint_dir, echo=True):
        trained.append(seed)
        return {
            "seed": seed,
            "dense_error_pct": 0.7,
            "pruned_error_pct": 0.6,
            "compression": 1.0,
            "weights_after": 10,
            "remaining_pct": {"total": 100.0},
            "wall_time_s": 1.0,
            "_pruned": object(),
        }

    return run_seed


def test_run_trains_only_the_seeds_no_earlier_run_of_the_same_recipe_has(ablations, monkeypatch) -> None:
    reproduce = sys.modules["reproduce"]
    control = dataclasses.replace(reproduce.RECIPES["lenet5"]["full"], dense_epochs=1)
    key = ablations.recipe_key("lenet5", control)
    earlier = {"seed": 1, "recipe_key": key, "dense_error_pct": 0.5, "pruned_error_pct": 0.4, "compression": 1.0}
    earlier |= {"weights_after": 10, "remaining_pct": {"total": 100.0}, "change": -0.1}
    other = {**earlier, "seed": 2, "recipe_key": "another recipe"}
    previous = {"nothing_pruned": {"command": "python benchmarks/ablations.py", "arms": [{"runs": [earlier, other]}]}}
    trained: list[int] = []
    monkeypatch.setattr(reproduce, "run_seed", fake_run_seed(trained))
    runs = ablations.Runner(reproduce, "data", [0, 1, 2], previous=previous).run("lenet5", control, "control")
    assert trained == [0, 2]
    assert [r["seed"] for r in runs] == [0, 1, 2] and {r["recipe_key"] for r in runs} == {key}
    assert runs[1]["pruned_error_pct"] == 0.4 and "nothing_pruned" in runs[1]["source"]
    assert all(not k.startswith("_") for r in runs for k in r)
    per_seed = ablations.arm("control", runs)["runs"]
    assert [r["recipe_key"] for r in per_seed] == [key] * 3


def test_save_keeps_the_ablations_written_since_the_run_began(ablations, tmp_path) -> None:
    path = tmp_path / "ablations.json"
    path.write_text(json.dumps({"retrain_lr": {"arms": []}}))
    runner_started_with = ablations.read_report(path)
    path.write_text(json.dumps({"retrain_lr": {"arms": []}, "conv_unpruned": {"arms": [1]}}))
    ablations.save(path, "nothing_pruned", {"arms": [2]})
    report = json.loads(path.read_text())
    assert set(report) == {"retrain_lr", "conv_unpruned", "nothing_pruned"} and runner_started_with.keys() == {
        "retrain_lr"
    }
    assert report["nothing_pruned"] == {"arms": [2]}


def test_without_train_recipes_a_recipe_arm_keeps_only_the_seeds_of_its_results_file(
    ablations, tmp_path, monkeypatch
) -> None:
    reproduce = sys.modules["reproduce"]
    monkeypatch.setattr(reproduce, "RESULTS", tmp_path)
    write_results(tmp_path / "lenet5.json", dataclasses.asdict(reproduce.RECIPES["lenet5"]["full"]), [0])
    trained: list[int] = []
    monkeypatch.setattr(reproduce, "run_seed", fake_run_seed(trained))
    runner = ablations.Runner(reproduce, "data", [0, 1], train_recipes=False)
    assert [r["seed"] for r in runner.recipe("lenet5", "full", "headline")] == [0] and trained == []
    control = dataclasses.replace(reproduce.RECIPES["lenet5"]["full"], notes="not a named recipe")
    assert [r["seed"] for r in runner.run("lenet5", control, "control")] == [0, 1] and trained == [0, 1]


def test_last_round_pairs_each_length_with_its_nothing_pruned_schedule(ablations, monkeypatch) -> None:
    reproduce = sys.modules["reproduce"]
    runner = ablations.Runner(reproduce, "data", [0])
    seen = record_recipes(ablations, runner, monkeypatch)
    result = ablations.last_round(runner)
    assert [a["arm"].split(" (")[0] for a in result["arms"]] == [
        "12.6x, last round 6 epochs",
        "12.6x, last round 12 epochs",
        "nothing pruned, last round 6 epochs",
        "nothing pruned, last round 12 epochs",
    ]
    assert set(seen) == {"fc1room", "fc1room_long", "control_long", "control"}
    assert seen["control_long"] is reproduce.RECIPES["lenet5"]["control_long"]
    control_key = ablations.recipe_key("lenet5", seen["control"])
    assert control_key == ablations.recipe_key("lenet5", ablations.spared(reproduce))  # nothing_pruned's control
    long_rounds = [r["epochs"] for r in seen["control_long"].callback["rounds"]]
    assert long_rounds == [r["epochs"] for r in seen["control"].callback["rounds"][:-1]] + [12]
