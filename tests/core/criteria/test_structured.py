import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from toy_models import ToyMLP, make_trainer, toy_loader

from lightning_prune import PruneRetrainCallback
from lightning_prune.core.criteria import (
    NORMS,
    PruneContext,
    StructuredFraction,
    StructuredGlobal,
    StructuredStd,
    get_criterion,
    unit_sizes,
)
from lightning_prune.core.criteria.structured import (
    alive_units,
    structured_fraction_mask,
    structured_global_masks,
    structured_std_mask,
    unit_floor,
    unit_mask,
)
from lightning_prune.core.pruner import Pruner, PruningError
from lightning_prune.core.sensitivity import sweep
from lightning_prune.core.structure import remove_dead_units

FAST = settings(max_examples=60, deadline=None)


def context(weights, stds=None):
    return PruneContext(
        dense_std=stds or {n: float(w.float().std()) for n, w in weights.items()},
        layer_of={n: n.rpartition(".")[0] for n in weights},
    )


def rows_whole(new: torch.Tensor, keep: torch.Tensor | None) -> bool:
    """Every unit of ``new`` is pruned whole (all False) or keeps exactly its row of ``keep``."""
    before = torch.ones_like(new) if keep is None else keep
    flat_new, flat_before = new.flatten(1), before.flatten(1)
    return all((not row.any()) or torch.equal(row, prior) for row, prior in zip(flat_new, flat_before, strict=True))


class LeNetLike(nn.Module):
    """conv -> pool -> conv -> pool -> flatten -> fc -> relu -> fc, unpadded (dead filters fold exactly)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3)
        self.conv2 = nn.Conv2d(6, 8, 3)
        self.fc1 = nn.Linear(8 * 2 * 2, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        x = F.max_pool2d(self.conv1(x), 2)
        x = F.max_pool2d(self.conv2(x), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


# ---------------------------------------------------------------------------------------------------------------------
# unit sizes and masks
# ---------------------------------------------------------------------------------------------------------------------


def test_unit_sizes_are_rms_or_mean_magnitude_over_the_whole_fan_in():
    w = torch.tensor([[3.0, -4.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    assert torch.allclose(unit_sizes(w), torch.tensor([5.0 / 2.0, 1.0]))
    assert torch.allclose(unit_sizes(w, norm="l1"), torch.tensor([7.0 / 4.0, 1.0]))


def test_unit_sizes_measure_surviving_weights_and_mark_dead_units():
    w = torch.tensor([[3.0, 4.0], [100.0, 1.0], [7.0, 7.0]])
    keep = torch.tensor([[True, True], [False, True], [False, False]])
    sizes = unit_sizes(w, keep)
    assert sizes[0] == pytest.approx(5.0 / math.sqrt(2.0))
    assert sizes[1] == pytest.approx(1.0 / math.sqrt(2.0))  # the pruned 100 does not count
    assert sizes[2] == -1.0  # no connection alive: a dead unit


def test_unit_sizes_of_conv_filters_use_channels_and_kernel():
    w = torch.zeros(2, 3, 2, 2)
    w[0] = 2.0
    assert torch.allclose(unit_sizes(w), torch.tensor([2.0, 0.0]))
    assert torch.equal(alive_units(w, None), torch.tensor([True, True]))


def test_unit_mask_keeps_rows_of_the_current_mask():
    keep = torch.tensor([[True, False], [True, True]])
    expected = torch.tensor([[True, False], [False, False]])
    assert torch.equal(unit_mask(torch.tensor([True, False]), (2, 2), keep), expected)
    assert torch.equal(unit_mask(torch.tensor([False, True]), (2,), None), torch.tensor([False, True]))


# ---------------------------------------------------------------------------------------------------------------------
# the three rules
# ---------------------------------------------------------------------------------------------------------------------


def test_structured_std_keeps_units_above_quality_times_std():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-2.0, 2.0], [0.1, 0.1]])
    new, threshold = structured_std_mask(w, quality=0.5, std=3.0)  # threshold 1.5; sizes 3.54, 0.71, 2.0, 0.1
    assert threshold == 1.5
    assert torch.equal(new.all(1), torch.tensor([True, False, True, False]))
    assert not new[[1, 3]].any()


def test_structured_std_l1_measures_mean_magnitude():
    w = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # l1 sizes 1.5 and 1.0; l2 sizes 2.12 and 1.0
    assert torch.equal(structured_std_mask(w, 1.2, 1.0, norm="l1")[0].all(1), torch.tensor([True, False]))
    assert torch.equal(structured_std_mask(w, 1.6, 1.0, norm="l2")[0].all(1), torch.tensor([True, False]))
    assert not structured_std_mask(w, 1.6, 1.0, norm="l1")[0].any()


def test_structured_fraction_prunes_a_share_of_units_counting_dead_ones():
    w = torch.arange(1.0, 11.0).view(10, 1).expand(10, 3).clone()
    new, threshold = structured_fraction_mask(w, 0.3)
    assert torch.equal(new.all(1), torch.arange(10) >= 3) and threshold == pytest.approx(3.0)
    keep = torch.ones(10, 3, dtype=torch.bool)
    keep[9] = False  # the largest unit was pruned before: it counts toward the 30%
    new, _ = structured_fraction_mask(w, 0.3, keep)
    assert torch.equal(new.any(1), (torch.arange(10) >= 2) & (torch.arange(10) < 9))
    keep[5:] = False  # half pruned already: 30% asks for nothing more
    assert torch.equal(structured_fraction_mask(w, 0.3, keep)[0], keep)


def test_structured_global_ranks_units_over_their_layers_std():
    small = torch.tensor([[0.1, 0.1], [0.2, 0.2], [0.3, 0.3], [0.4, 0.4]])  # std about 0.12
    large = small * 10  # the same units, ten times the scale
    masks, quality = structured_global_masks({"a": small, "b": large}, 0.5, {"a": 0.1, "b": 1.0})
    assert torch.equal(masks["a"].all(1), masks["b"].all(1))  # scale-free: the same units go in both
    assert int(masks["a"].all(1).sum()) == 2 and quality == pytest.approx(2.0)
    raw, _ = structured_global_masks({"a": small, "b": large}, 0.5, {"a": 0.0, "b": 0.0})  # std 0: raw sizes
    assert not raw["a"].any() and raw["b"].all()


@pytest.mark.parametrize("norm", NORMS)
def test_criteria_prune_whole_filters_of_a_conv(norm):
    torch.manual_seed(0)
    weights = {"conv.weight": torch.randn(8, 3, 3, 3)}
    for rule in (StructuredStd(quality=1.0, norm=norm), StructuredFraction(amount=0.5, norm=norm)):
        level = rule.level
        decision = rule.select(weights, {"conv.weight": None}, {"conv.weight": level}, context(weights))["conv.weight"]
        assert rows_whole(decision.keep, None) and 0 < int(decision.keep.flatten(1).all(1).sum()) < 8


def test_structured_std_reads_the_dense_std_from_the_context():
    w = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    weights = {"fc.weight": w}
    rule = StructuredStd(quality=1.0)
    keep = rule.select(weights, {"fc.weight": None}, {"fc.weight": 1.0}, context(weights, {"fc.weight": 2.5}))
    assert torch.equal(keep["fc.weight"].keep.all(1), torch.tensor([False, False, True]))
    assert keep["fc.weight"].threshold == 2.5 and keep["fc.weight"].rule == "units, 1.00 x std"
    surviving = StructuredStd(quality=1.0, std_of="surviving")
    decision = surviving.select(weights, {"fc.weight": None}, {"fc.weight": 1.0}, context(weights))["fc.weight"]
    assert decision.threshold == pytest.approx(float(w.std())) and decision.rule.endswith("(surviving)")


@FAST
@given(
    units=st.integers(1, 12),
    fan_in=st.integers(1, 6),
    amount=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    prior=st.booleans(),
)
def test_structured_fraction_properties(units, fan_in, amount, seed, prior):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(units, fan_in, generator=gen)
    keep = torch.rand(units, fan_in, generator=gen) > 0.3 if prior else None
    new, _ = structured_fraction_mask(w, amount, keep)
    alive_before = alive_units(w, keep)
    kept = alive_units(w, new)
    assert rows_whole(new, keep)  # whole units, the survivors' rows as they were
    assert not (kept & ~alive_before).any()  # masks only shrink
    assert int(kept.sum()) == min(int(alive_before.sum()), units - round(amount * units))
    sizes = unit_sizes(w, keep)
    dropped = alive_before & ~kept
    if kept.any() and dropped.any():
        assert sizes[kept].min() >= sizes[dropped].max()  # the largest units survive


# ---------------------------------------------------------------------------------------------------------------------
# through the pruner: biases, rounds, the floor
# ---------------------------------------------------------------------------------------------------------------------


def test_pruner_prunes_whole_rows_and_the_bias_entries_of_pruned_units():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    pruner = Pruner(net, ["0"], include_bias=True)
    pruner.prune(StructuredFraction(amount=0.4))
    rows = pruner.masks["0.weight"].all(1)
    assert int(rows.sum()) == 6 and not pruner.masks["0.weight"][~rows].any()
    assert torch.equal(pruner.masks["0.bias"], rows)
    assert not net[0].bias[~rows].any() and net[0].bias[rows].ne(0).all()
    assert pruner.rules["0.bias"] == "with the units of 0.weight"


def test_a_bias_pruned_without_its_weight_is_refused():
    weights = {"fc.bias": torch.ones(3)}
    no_weight = r"prunes 'fc\.bias' with the units of its layer's weight, but that layer's weight is not pruned"
    with pytest.raises(ValueError, match=no_weight + r" in the same prune \(layer 'fc'\)"):
        StructuredFraction(amount=0.5).select(weights, {"fc.bias": None}, {"fc.bias": 0.5}, context(weights))
    weights = {"fc.w1": torch.ones(3, 2), "fc.w2": torch.ones(3, 2), "fc.b": torch.ones(3)}
    with pytest.raises(ValueError, match=r"prunes 'fc\.b' with the units of its layer's weight, but it has 2"):
        StructuredFraction(amount=0.5).select(
            weights, dict.fromkeys(weights), dict.fromkeys(weights, 0.5), context(weights)
        )
    weights = {"fc.weight": torch.ones(3, 2), "fc.bias": torch.ones(4)}
    levels = dict.fromkeys(weights, 0.5)
    with pytest.raises(ValueError, match=r"'fc\.bias' \(shape \[4\]\) with the units of 'fc\.weight', which has 3"):
        StructuredFraction(amount=0.5).select(weights, dict.fromkeys(weights), levels, context(weights))


def test_later_rounds_keep_pruned_units_pruned_and_count_them():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 10), nn.ReLU(), nn.Linear(10, 2))
    pruner = Pruner(net, ["0"])
    pruner.prune(StructuredFraction(amount=0.3))
    first = pruner.masks["0.weight"].clone()
    with torch.no_grad():
        net[0].weight.mul_(torch.rand(10, 1) * 5)  # retraining reorders the survivors
    pruner.prune(StructuredStd(quality=0.0))  # quality 0 keeps every unit still alive
    assert torch.equal(pruner.masks["0.weight"], first)
    pruner.prune(StructuredFraction(amount=0.6))
    assert int(pruner.masks["0.weight"].all(1).sum()) == 4 and not (pruner.masks["0.weight"] & ~first).any()


def test_structured_after_an_unstructured_round_measures_the_survivors():
    net = nn.Linear(4, 3)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([[9.0, 0.1, 0.1, 0.1], [1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]]))
    pruner = Pruner(net)
    pruner.set_masks({"weight": torch.tensor([[False, True, True, True], [True] * 4, [True] * 4])})
    pruner.prune(StructuredFraction(amount=1 / 3))  # unit 0 lost its 9.0: it is now the smallest
    assert torch.equal(pruner.masks["weight"].any(1), torch.tensor([False, True, True]))


def test_emptying_a_layer_is_refused_without_a_floor():
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(PruningError, match=r"Pruning would remove every connection of '0\.weight'.*units, 9\.00 x std"):
        Pruner(net, ["0"]).prune(StructuredStd(quality=9.0))


def test_floor_keeps_a_share_of_whole_units_and_their_biases():
    torch.manual_seed(0)
    weights = {"fc.weight": torch.randn(10, 4), "fc.bias": torch.randn(10)}
    keeps = {"fc.weight": None, "fc.bias": None}
    rule = StructuredStd(quality=9.0)  # would prune every unit
    decided = {n: d.keep for n, d in rule.select(weights, keeps, dict.fromkeys(weights, 9.0), context(weights)).items()}
    assert not decided["fc.weight"].any()
    floored = rule.floor(weights, keeps, decided, 0.25, context(weights))
    units = floored["fc.weight"].all(1)
    assert int(units.sum()) == 3 and rows_whole(floored["fc.weight"], None)  # ceil(0.25 * 10) whole units
    largest = torch.zeros(10, dtype=torch.bool)
    largest[unit_sizes(weights["fc.weight"]).topk(3).indices] = True
    assert torch.equal(units, largest)
    assert torch.equal(floored["fc.bias"], units)


def test_unit_floor_leaves_a_decision_that_meets_it_and_is_capped_by_the_living():
    w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-2.0, 2.0], [0.5, 0.5]])
    new = unit_mask(torch.tensor([True, False, True, False]), w.shape, None)
    assert unit_floor(w, new, None, 0.5) is new
    keep = unit_mask(torch.tensor([False, True, False, False]), w.shape, None)  # one unit alive
    assert torch.equal(unit_floor(w, torch.zeros_like(keep), keep, 1.0), keep)


def test_pruner_floor_of_a_structured_criterion_keeps_whole_units():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3))
    pruner = Pruner(net, ["0"], include_bias=True)
    pruner.prune(StructuredStd(quality=9.0), min_remaining=0.3)
    units = pruner.masks["0.weight"].all(1)
    assert int(units.sum()) == 3 and rows_whole(pruner.masks["0.weight"], None)
    assert torch.equal(pruner.masks["0.bias"], units)


# ---------------------------------------------------------------------------------------------------------------------
# dead units removed: a really smaller model
# ---------------------------------------------------------------------------------------------------------------------


def test_pruned_filters_and_neurons_are_removed_with_the_same_outputs():
    torch.manual_seed(0)
    net = LeNetLike().eval()
    pruner = Pruner(net, ["conv1", "conv2", "fc1"], include_bias=True)
    pruner.prune(StructuredFraction(amount={"conv1": 0.5, "conv2": 0.25, "fc1": 0.5}))
    x = torch.randn(5, 1, 14, 14)
    before = net(x)
    report = remove_dead_units(net, x, pruner.masks, strict=True)
    assert (net.conv1.out_channels, net.conv2.in_channels, net.conv2.out_channels) == (3, 3, 6)
    assert (net.fc1.in_features, net.fc1.out_features, net.fc2.in_features) == (6 * 2 * 2, 8, 8)
    assert torch.allclose(net(x), before, atol=1e-5)
    assert report.masks is not None and all(m.all() for m in report.masks.values())  # nothing dead is left


def test_without_pruned_biases_dead_filters_fold_their_constant_into_the_next_bias():
    torch.manual_seed(0)
    net = LeNetLike().eval()
    pruner = Pruner(net, ["conv1", "fc1"])  # biases alive: a dead unit outputs its bias
    pruner.prune(StructuredFraction(amount=0.5))
    x = torch.randn(5, 1, 14, 14)
    before = net(x)
    report = remove_dead_units(net, x, pruner.masks, strict=True)
    assert report.plan.layers["conv1"].folded == report.plan.layers["conv1"].remove
    assert net.conv1.out_channels == 3 and net.fc1.out_features == 8
    assert torch.allclose(net(x), before, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# sensitivity sweeps, the registry, settings and their validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["structured_std", "structured_fraction"])
def test_sensitivity_sweep_prunes_whole_units_of_one_layer_at_a_time(criterion):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 20), nn.ReLU(), nn.Linear(20, 3))
    x = torch.randn(64, 6)
    before = [p.detach().clone() for p in net.parameters()]
    result = sweep(net, [(x, net(x).argmax(1))], criterion=criterion, layers=["0"])
    assert result.criterion == criterion and len(result.rows) == 10
    assert all(round(r.pruned_share * 20, 6) == round(r.pruned_share * 20) for r in result.rows)  # whole units
    assert result.rows[-1].pruned_share > result.rows[0].pruned_share
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_structured_global_refuses_sweeps_and_mappings():
    with pytest.raises(ValueError, match=r"criterion StructuredGlobal\(amount=None, norm='l2'\) has one level"):
        sweep(nn.Linear(2, 2), [(torch.randn(2, 2), torch.tensor([0, 1]))], criterion="structured_global")
    with pytest.raises(ValueError, match=r"Criterion 'structured_global' takes one `amount` for all layers"):
        StructuredGlobal(amount={"*": 0.5})


def test_structured_global_through_the_pruner_prunes_a_share_of_all_units():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 2))
    pruner = Pruner(net, ["0", "2"])
    pruner.prune(StructuredGlobal(amount=0.5))
    units = [pruner.masks[n].all(1) for n in ("0.weight", "2.weight")]
    assert sum(int(u.sum()) for u in units) == 10
    assert all(rows_whole(pruner.masks[n], None) for n in ("0.weight", "2.weight"))
    assert pruner.rules["0.weight"].startswith("50.0% of all units (")


def test_registered_by_name_with_defaults():
    assert get_criterion("structured_std") == StructuredStd()
    assert get_criterion("structured_fraction").level is None
    assert type(get_criterion("structured_global")) is StructuredGlobal
    spec = {"class_path": "lightning_prune.StructuredFraction", "init_args": {"amount": 0.5, "norm": "l1"}}
    assert get_criterion(spec) == StructuredFraction(amount=0.5, norm="l1")


def test_describe_and_gentler():
    assert StructuredStd(0.8, "l1", "surviving", 0.1).describe() == (
        "StructuredStd(quality=0.8, min_remaining=0.1, norm='l1', std_of='surviving')"
    )
    assert repr(StructuredGlobal(amount=0.7)) == "StructuredGlobal(amount=0.7, norm='l2')"
    assert StructuredFraction(amount=0.5).gentler(0.5, 0.8) == pytest.approx(0.4)
    assert StructuredStd().gentler(1.0, 0.5) == 0.5


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: StructuredStd(norm="l3"), r"`norm` must be one of \('l2', 'l1'\), got 'l3'"),
        (lambda: StructuredFraction(amount=0.5, norm="L2"), r"`norm` must be one of \('l2', 'l1'\), got 'L2'"),
        (lambda: StructuredStd(std_of="all"), r"`std_of` must be one of \('dense', 'surviving'\), got 'all'"),
        (lambda: StructuredStd(quality=-0.5), r"`quality` must be a finite number >= 0, got -0\.5"),
        (lambda: StructuredFraction(amount=1.5), r"`amount` must be a number in \[0, 1\], got 1\.5"),
        (lambda: StructuredFraction(amount={"*": -0.1}), r"`amount\['\*'\]` must be a number in \[0, 1\], got -0\.1"),
        (lambda: StructuredGlobal(amount=2), r"`amount` must be a number in \[0, 1\], got 2"),
        (lambda: StructuredFraction(amount=0.5, min_remaining=2), r"`min_remaining` must be a number in \[0, 1\]"),
    ],
)
def test_settings_are_validated(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_a_round_level_outside_the_range_is_refused_by_the_pruner():
    pruner = Pruner(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"`amount` must be a number in \[0, 1\], got 1\.2"):
        pruner.prune(StructuredFraction(), 1.2)
    with pytest.raises(ValueError, match=r"Criterion StructuredFraction\(amount=None, norm='l2'\) has no `amount`"):
        pruner.prune(StructuredFraction())


# ---------------------------------------------------------------------------------------------------------------------
# the callback: rounds and the shrink at the end of fit
# ---------------------------------------------------------------------------------------------------------------------


def test_structured_rounds_then_shrink_at_end_give_smaller_layers(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    model.example_input_array = torch.zeros(2, 12)
    rounds = [
        {"criterion": StructuredFraction(amount=0.25), "epochs": 1},
        {"criterion": StructuredStd(quality=0.0), "epochs": 1},  # quality 0: nothing more, every unit kept
        {"level": 0.5, "epochs": 1},
    ]
    prune = PruneRetrainCallback(
        criterion=StructuredFraction(),
        rounds=rounds,
        layers=["net.0", "net.3"],
        prune_bias=True,
        shrink_at_end=True,
        verbose=False,
    )
    x = toy_loader().dataset.tensors[0]
    make_trainer(tmp_path, [prune], max_epochs=4, limit_train_batches=3).fit(model, toy_loader())
    assert prune.schedule.done == [0, 1, 2]
    assert (model.net[0].out_features, model.net[3].in_features, model.net[3].out_features) == (16, 16, 8)
    assert model.net[5].in_features == 8
    assert prune.structure_report is not None and prune.structure_report.removed_units == {"net.0": 16, "net.3": 8}
    assert all(keep.all() for keep in prune.pruner.masks.values())  # only whole units were pruned: none is left
    assert model(x).shape == (64, 3)
