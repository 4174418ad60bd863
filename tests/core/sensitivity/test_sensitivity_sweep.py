"""The sweep: exact restore, the torch.fx suffix path equals full forward passes, fallbacks, errors."""

from __future__ import annotations

import copy
import csv
import json
import math
import warnings

import pytest
import torch
import yaml
from sensitivity_cases import (
    LEVELS,
    BNNet,
    Dynamic,
    Skip,
    assert_untouched,
    images,
    make_result,
    neg_loss,
    snapshot,
    vectors,
)
from torch import nn
from torch.nn import functional as F  # noqa: N812

from lightning_prune.core import Criterion, Decision, Pruner, Std
from lightning_prune.core.sensitivity import (
    SensitivityResult,
    accuracy,
    load_quality,
    merge_results,
    plot,
    sweep,
)
from lightning_prune.core.sensitivity.split import GraphSplit
from lightning_prune.zoo import LeNet5, LeNet300100


@pytest.mark.parametrize(
    "make",
    [LeNet5, LeNet300100, Skip, lambda: Skip("add_"), lambda: Skip("view")],
    ids=["lenet5", "lenet300", "skip", "skip-add_", "skip-view-mul_"],
)
def test_suffix_path_equals_full_forward_and_restores_the_model(make):
    torch.manual_seed(0)
    model = make()
    data = images() if isinstance(model, (LeNet5, LeNet300100)) else vectors()
    before = snapshot(model)
    for metric in (accuracy, neg_loss):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning: these models trace
            cached = sweep(model, data, LEVELS, metric=metric)
        full = sweep(model, data, LEVELS, metric=metric, cache_bytes=0)
        assert cached.rows == full.rows and cached.baseline == full.baseline
        assert len(cached.rows) == len(LEVELS) * len(cached.shapes)
        assert_untouched(model, before)
    metrics = [r.metric for r in cached.rows]
    assert len(set(metrics)) > len(metrics) // 2  # the levels change the outputs


def test_only_the_suffix_runs_for_each_level():
    torch.manual_seed(0)
    model = LeNet5()
    calls = {name: 0 for name in ("conv1", "conv2", "fc1", "fc2")}
    for name in calls:
        getattr(model, name).register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    data = images(n=64, batch=32)
    sweep(model, data, [0.5, 1.0, 2.0], layers=["fc1"])
    # baseline (2 batches) + first-batch trace check (traced + eager) + the prefix once (2 batches)
    assert calls["conv1"] == 2 + 2 + 2
    assert calls["fc1"] == 2 + 2 + 3 * 2


def test_bn_and_dropout_model_in_train_mode_is_evaluated_in_eval_mode_and_untouched():
    torch.manual_seed(0)
    model = BNNet().train()
    model.bn.running_mean.uniform_(-0.1, 0.1)
    model.fc.eval()  # mixed modes are restored module by module
    data = images(n=32, batch=16)
    before = snapshot(model)
    result = sweep(model, data, [0.5, 1.0], metric=neg_loss)
    assert_untouched(model, before)
    model.eval()
    with torch.no_grad():
        expected = sum(float(neg_loss(model(x), y)) * len(y) for x, y in data) / 32
    assert result.baseline == pytest.approx(expected, rel=1e-6)
    assert result.rows == sweep(model, data, [0.5, 1.0], metric=neg_loss, cache_bytes=0).rows


def test_fx_failure_falls_back_to_full_forward_with_one_warning():
    torch.manual_seed(0)
    model = Dynamic()
    before = snapshot(model)
    with pytest.warns(UserWarning, match="torch.fx could not split Dynamic") as caught:
        result = sweep(model, vectors(), LEVELS, metric=neg_loss)
    assert len([w for w in caught if "torch.fx" in str(w.message)]) == 1
    assert result.rows == sweep(model, vectors(), LEVELS, metric=neg_loss, cache_bytes=0).rows
    assert_untouched(model, before)


def test_cache_budget_too_small_runs_full_forward_passes_with_the_same_numbers():
    torch.manual_seed(0)
    model = LeNet5()
    data = images(n=64)
    assert (
        sweep(model, data, LEVELS, cache_bytes=1, metric=neg_loss).rows
        == sweep(model, data, LEVELS, metric=neg_loss).rows
    )


class Ranked(nn.Module):
    """``small`` barely matters (its output is scaled by 1e-6); ``big`` carries the prediction."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(8, 8, bias=False)
        self.small = nn.Linear(8, 3, bias=False)
        self.head = nn.Linear(8, 3, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.big(x)) + 1e-6 * self.small(x)


def test_ranking_of_a_layer_that_matters_and_one_that_does_not():
    torch.manual_seed(0)
    model = Ranked()
    with torch.no_grad():
        model.big.weight.copy_(torch.eye(8) + 0.05 * torch.randn(8, 8))
        model.head.weight.copy_(torch.randn(3, 8))
    x = torch.randn(512, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    result = sweep(model, [(x[:256], y[:256]), (x[256:], y[256:])], [0.5, 1.0, 1.5, 2.0, 3.0], layers=["big", "small"])
    assert result.baseline == 1.0
    small = [r.metric for r in result.curve("small")]
    big = [r.metric for r in result.curve("big")]
    assert all(m == 1.0 for m in small)
    assert big[-1] < 0.9 and all(b <= s for b, s in zip(big, small, strict=True))
    chosen = result.choose(0.02)
    assert chosen["small"] > chosen["big"]
    # small's level 3.0 empties the layer (std of 24 weights, none above 3 std): never chosen
    assert result.curve("small")[-1].pruned_share < 1.0 or chosen["small"] < 3.0


def test_emitted_quality_gives_the_predicted_sparsity_with_the_pruner(tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    result = sweep(model, images(n=64), [0.3, 0.6, 0.9, 1.2, 1.5], metric=neg_loss)
    rows = {(r.layer, r.level): r for r in result.rows}
    for tolerance in (0.0, 0.01, 0.05, 10.0):
        text = result.quality_yaml(tolerance)
        quality = yaml.safe_load(text)["criterion"]["init_args"]["quality"]
        assert list(quality) == ["conv1", "conv2", "fc1", "fc2"]
        path = tmp_path / "q.yaml"
        result.write_quality(path, tolerance)
        assert load_quality(path) == {"criterion": "std", "quality": quality} == result.quality_config(tolerance)
        pruned = copy.deepcopy(model)
        stats = Pruner(pruned).prune(Std(quality=str(path)))  # the file itself, as a user passes it
        for s in stats:
            layer = s.name.removesuffix(".weight")
            expected = rows[(layer, quality[layer])].pruned_share if quality[layer] > 0 else 0.0
            assert 1 - s.remaining / s.weights == pytest.approx(expected, abs=1e-12), (layer, tolerance)
    assert result.choose(10.0) == dict.fromkeys(["conv1", "conv2", "fc1", "fc2"], 1.5)


def test_fraction_sweep_amounts_reproduce_with_the_pruner(tmp_path):
    torch.manual_seed(0)
    model = LeNet300100()
    result = sweep(model, images(n=64), [0.25, 0.5, 0.9], criterion="fraction")
    assert [r.pruned_share for r in result.curve("fc3")] == [0.25, 0.5, 0.9]
    config = result.write_quality(tmp_path / "amount.json", 1.0)
    assert config == {"criterion": "fraction", "amount": {"fc1": 0.9, "fc2": 0.9, "fc3": 0.9}}
    assert json.loads((tmp_path / "amount.json").read_text()) == config
    snippet = yaml.safe_load(result.quality_yaml(1.0))["criterion"]
    assert snippet == {
        "class_path": "lightning_prune.core.criteria.Fraction",
        "init_args": {"amount": config["amount"]},
    }
    stats = Pruner(model).prune("fraction", config["amount"])
    assert [round(1 - s.remaining / s.weights, 6) for s in stats] == [0.9, 0.9, 0.9]


@pytest.mark.parametrize(
    ("levels", "criterion", "match"),
    [
        ([], "std", r"non-empty sequence of numbers, got \[\]"),
        ("0.5", "std", "non-empty sequence of numbers, got '0.5'"),
        ([0.5, 0.25], "std", r"strictly increasing, got 0.25 after 0.5 in \[0.5, 0.25\]"),
        ([0.5, 0.5], "std", "strictly increasing, got 0.5 after 0.5"),
        ([0.5, math.nan], "std", r"`levels\[1\]` must be a finite number >= 0, got nan"),
        ([0.5, math.inf], "std", r"`levels\[1\]` must be a finite number >= 0, got inf"),
        ([-0.5, 1.0], "std", r"`levels\[0\]` must be a finite number >= 0, got -0.5"),
        ([0.5, 1.5], "fraction", r"`levels\[1\]` must be a number in \[0, 1\], got 1.5"),
        ([True], "std", r"`levels\[0\]` must be a finite number >= 0, got True"),
        ([0.5], "global", r"prunes one layer at a time; criterion Global\(amount=None\) has one level for all layers"),
    ],
)
def test_bad_levels_are_refused_before_any_evaluation(levels, criterion, match):
    calls = []

    def metric(outputs, targets):
        calls.append(1)
        return accuracy(outputs, targets)

    model = nn.Sequential(nn.Linear(12, 3))
    with pytest.raises(ValueError, match=match):
        sweep(model, vectors(), levels, criterion=criterion, metric=metric)
    assert calls == []


def test_other_bad_arguments():
    model = nn.Sequential(nn.Linear(12, 3))
    with pytest.raises(ValueError, match=r"`shard` must be \(index, count\).*got \(2, 2\)"):
        sweep(model, vectors(), [1.0], shard=(2, 2))
    with pytest.raises(ValueError, match="`cache_bytes` must be None or an integer >= 0, got -1"):
        sweep(model, vectors(), [1.0], cache_bytes=-1)
    with pytest.raises(ValueError, match="`batches` is empty"):
        sweep(model, [], [1.0])
    with pytest.raises(ValueError, match=r"Batch 0 must be an \(inputs, targets\) pair"):
        sweep(model, [torch.zeros(2, 12)], [1.0])
    with pytest.raises(ValueError, match="Pattern 'nope' in `layers` matches no module"):
        sweep(model, vectors(), [1.0], layers=["nope"])
    with torch.no_grad():
        model[0].weight[0, 0] = math.nan
    with pytest.raises(ValueError, match=r"Parameter '0\.weight' holds NaN or inf"):
        sweep(model, vectors(), [1.0])
    with pytest.raises(ValueError, match=r"suffix must be one of \('.yaml', '.yml', '.json'\)"):
        make_result({"fc": [(1.0, 0.5, 0.9)]}).write_quality("q.txt", 0.1)


def test_unused_layer_and_tied_weights():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc = nn.Linear(8, 8)
            self.mid = nn.Linear(8, 8)
            self.dec = nn.Linear(8, 8)
            self.dec.weight = self.enc.weight  # the same Parameter, used first by enc
            self.unused = nn.Linear(8, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.dec(F.relu(self.mid(self.enc(x)))))

    torch.manual_seed(0)
    model = Tied()
    data = vectors(features=8)
    cached = sweep(model, data, LEVELS, metric=neg_loss)
    assert cached.rows == sweep(model, data, LEVELS, metric=neg_loss, cache_bytes=0).rows
    assert all(r.metric == cached.baseline for r in cached.curve("unused"))


def test_shards_merge_to_the_whole_sweep():
    torch.manual_seed(0)
    model = LeNet5()
    data = images(n=32)
    whole = sweep(model, data, LEVELS)
    parts = [sweep(model, data, LEVELS, shard=(i, 3)) for i in range(3)]
    assert math.isnan(parts[1].baseline) and parts[1].layers == ["conv2"]
    assert merge_results(parts[::-1], order=list(whole.shapes)) == whole


def test_files_table_and_progress(tmp_path):
    torch.manual_seed(0)
    model = LeNet5()
    seen = []
    result = sweep(model, images(n=32), LEVELS, progress=lambda *a: seen.append(a))
    assert [(layer, level) for layer, level, _ in seen] == [(r.layer, r.level) for r in result.rows]
    result.to_json(tmp_path / "r.json")
    assert SensitivityResult.from_json(tmp_path / "r.json") == result
    result.to_csv(tmp_path / "r.csv")
    with (tmp_path / "r.csv").open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 16 and lines[0]["layer"] == "conv1" and lines[0]["weights"] == "500"
    assert [float(line["pruned_share"]) for line in lines] == [r.pruned_share for r in result.rows]
    table = result.table()
    assert "conv1" in table and "fc2" in table and "2.5" in table and "baseline accuracy" in table
    pytest.importorskip("matplotlib")
    result.plot(tmp_path / "fig.png")
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
    fc_only = sweep(nn.Sequential(nn.Linear(12, 3)), vectors(), [1.0])
    plot(fc_only, tmp_path / "fc.png")
    assert (tmp_path / "fc.png").stat().st_size > 0


def test_a_failing_split_or_suffix_falls_back_for_that_layer_with_one_warning(monkeypatch):
    torch.manual_seed(0)
    model = LeNet5()
    data = images(n=32)
    expected = sweep(model, data, LEVELS, metric=neg_loss, cache_bytes=0)
    original = GraphSplit.__init__

    def broken_split(self, traced, owners):
        if "conv2" in owners:
            raise RuntimeError("cannot split here")
        original(self, traced, owners)

    monkeypatch.setattr(GraphSplit, "__init__", broken_split)
    with pytest.warns(UserWarning, match=r"failed for 1 layer\(s\) \(first: conv2: RuntimeError: cannot split here"):
        assert sweep(model, data, LEVELS, metric=neg_loss).rows == expected.rows
    monkeypatch.setattr(GraphSplit, "__init__", original)

    def broken_run(self, values):
        raise RuntimeError("suffix broke")

    monkeypatch.setattr(GraphSplit, "run", broken_run)
    with pytest.warns(UserWarning, match=r"failed for 4 layer\(s\).*suffix broke") as caught:
        assert sweep(model, data, LEVELS, metric=neg_loss).rows == expected.rows
    assert len(caught) == 1


class KeepLargest(Criterion):
    """A criterion of one's own: keep the ``count`` largest weights of each layer."""

    name = "keep_largest_sweep_test"
    level_name = "count"
    sweep_levels = (10.0, 100.0)

    def __init__(self, count=None, min_remaining=None):
        super().__init__(count, min_remaining)

    def select(self, weights, keeps, levels, context):
        out = {}
        for name, weight in weights.items():
            keep = torch.zeros(weight.numel(), dtype=torch.bool)
            keep[weight.detach().abs().flatten().topk(int(levels[name])).indices] = True
            out[name] = Decision(keep.view_as(weight), None, f"top {int(levels[name])}")
        return out


def test_a_criterion_of_ones_own_is_swept_with_its_levels_and_names_its_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 4))
    x = torch.randn(32, 20)
    result = sweep(model, [(x, model(x).argmax(1))], criterion=KeepLargest())  # its sweep_levels
    assert [(r.layer, r.level) for r in result.rows] == [("0", 10.0), ("0", 100.0), ("2", 10.0), ("2", 100.0)]
    assert [r.pruned_share for r in result.curve("0")] == [1 - 10 / 600, 1 - 100 / 600]
    assert result.level_name == "count" and result.criterion == "keep_largest_sweep_test"
    assert result.quality_config(1.0) == {"criterion": "keep_largest_sweep_test", "count": {"0": 100.0, "2": 100.0}}


def test_a_criterion_mask_of_the_wrong_shape_is_refused_in_a_sweep():
    class Broken(KeepLargest):
        def select(self, weights, keeps, levels, context):
            return {name: Decision(torch.ones(3, dtype=torch.bool), None, "") for name in weights}

    model = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"The mask of '0.weight' has shape \(3,\).*criterion Broken"):
        sweep(model, [(x, model(x).argmax(1))], criterion=Broken())
