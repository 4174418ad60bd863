import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_prune.core.criteria import (
    STD_OF,
    Criterion,
    Decision,
    Fraction,
    Global,
    PruneContext,
    Std,
    floor_mask,
    fraction_mask,
    get_criterion,
    global_masks,
    std_mask,
    surviving_std,
)
from lightning_prune.core.pruner import Pruner, PruningError

FAST = settings(max_examples=60, deadline=None)

finite = st.floats(min_value=-100.0, max_value=100.0, allow_nan=False, allow_infinity=False, width=32)


@st.composite
def weight_and_keep(draw, min_size=1, max_size=40):
    """A 1-D float32 weight and, half the time, a prior bool mask of the same size."""
    values = draw(st.lists(finite, min_size=min_size, max_size=max_size))
    weight = torch.tensor(values, dtype=torch.float32)
    if draw(st.booleans()):
        keep = torch.tensor(draw(st.lists(st.booleans(), min_size=len(values), max_size=len(values))))
    else:
        keep = None
    return weight, keep


def _assert_kept_dominate(weight: torch.Tensor, new: torch.Tensor, prior: torch.Tensor | None) -> None:
    """Every kept magnitude is >= every magnitude this call pruned."""
    alive_before = torch.ones_like(new) if prior is None else prior
    newly_pruned = alive_before & ~new
    if new.any() and newly_pruned.any():
        assert weight.abs()[new].min() >= weight.abs()[newly_pruned].max()


# ---------------------------------------------------------------------------------------------------------------------
# surviving_std
# ---------------------------------------------------------------------------------------------------------------------


def test_surviving_std_of_all_weights_is_sample_std():
    w = torch.tensor([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0])  # sum of squared deviations: 32
    assert surviving_std(w) == pytest.approx(math.sqrt(32 / 7))


def test_surviving_std_of_alive_weights_only():
    w = torch.tensor([0.0, -1.0, 1.0, 100.0])
    keep = torch.tensor([False, True, True, False])
    assert surviving_std(w, keep) == pytest.approx(math.sqrt(2.0))


def test_surviving_std_of_2d_weight_and_mask():
    w = torch.tensor([[1.0, 3.0], [5.0, 1000.0]])
    keep = torch.tensor([[True, True], [True, False]])
    assert surviving_std(w, keep) == pytest.approx(2.0)  # std of 1, 3, 5


@pytest.mark.parametrize("keep", [[False, False, True], [False, False, False]])
def test_surviving_std_is_zero_for_fewer_than_two_alive(keep):
    assert surviving_std(torch.tensor([1.0, 2.0, 3.0]), torch.tensor(keep)) == 0.0


def test_surviving_std_single_weight_is_zero():
    assert surviving_std(torch.tensor([3.0])) == 0.0


def test_surviving_std_ignores_autograd_and_dtype():
    w = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64, requires_grad=True)
    result = surviving_std(w)
    assert isinstance(result, float)
    assert result == pytest.approx(float(torch.tensor([1.0, 2.0, 4.0]).std()))


# ---------------------------------------------------------------------------------------------------------------------
# std_mask
# ---------------------------------------------------------------------------------------------------------------------


def test_std_mask_docstring_example():
    keep, threshold = std_mask(torch.tensor([0.1, -0.5, 2.0, -3.0]), quality=0.5, std=2.0)
    assert torch.equal(keep, torch.tensor([False, False, True, True]))
    assert threshold == 1.0


def test_std_mask_with_hand_computed_std():
    w = torch.tensor([2.0, -4.0, 4.0, -4.0, 5.0, -5.0, 7.0, -9.0])
    std = surviving_std(w)
    # mean -0.5; squared deviations 6.25+12.25+20.25+12.25+30.25+20.25+56.25+72.25 = 230; std = sqrt(230/7)
    assert std == pytest.approx(math.sqrt(230 / 7))  # ~5.732
    keep, threshold = std_mask(w, quality=1.0, std=std)
    assert threshold == pytest.approx(5.732, abs=1e-3)
    assert keep.tolist() == [False, False, False, False, False, False, True, True]
    keep, threshold = std_mask(w, quality=0.75, std=std)  # threshold ~4.299
    assert keep.tolist() == [False, False, False, False, True, True, True, True]


def test_std_mask_is_strict():
    w = torch.tensor([-1.0, 1.0, 0.999, 1.001, -2.0, 0.0])
    keep, threshold = std_mask(w, quality=2.0, std=0.5)
    assert threshold == 1.0
    assert keep.tolist() == [False, False, False, True, True, False]


def test_std_mask_quality_zero_prunes_only_exact_zeros():
    w = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0])
    keep, threshold = std_mask(w, quality=0.0, std=5.0)
    assert threshold == 0.0
    assert keep.tolist() == [False, False, True, True, True]


def test_std_mask_respects_prior_mask_and_does_not_mutate_inputs():
    w = torch.tensor([[10.0, -10.0], [0.1, 5.0]])
    prior = torch.tensor([[False, True], [True, True]])
    w_before, prior_before = w.clone(), prior.clone()
    keep, _ = std_mask(w, quality=1.0, std=1.0, keep=prior)
    assert keep.tolist() == [[False, True], [False, True]]  # 10.0 stays pruned, 0.1 newly pruned
    assert keep.dtype == torch.bool and keep.shape == w.shape
    assert torch.equal(w, w_before) and torch.equal(prior, prior_before)
    assert keep.data_ptr() != prior.data_ptr()


def test_std_mask_threshold_is_quality_times_std():
    _, threshold = std_mask(torch.randn(10), quality=1.5, std=0.25)
    assert threshold == 0.375


@given(weight_and_keep(), st.floats(0.0, 3.0), st.floats(0.0, 2.0))
@FAST
def test_std_mask_property(wk, quality, std):
    weight, prior = wk
    keep, threshold = std_mask(weight, quality, std, prior)
    expected = weight.abs() > threshold
    if prior is not None:
        expected &= prior
    assert torch.equal(keep, expected)
    assert threshold == quality * std


# ---------------------------------------------------------------------------------------------------------------------
# fraction_mask
# ---------------------------------------------------------------------------------------------------------------------


def test_fraction_mask_docstring_example():
    keep, threshold = fraction_mask(torch.tensor([0.1, -0.5, 2.0, -3.0]), amount=0.5)
    assert keep.tolist() == [False, False, True, True]
    assert threshold == 0.5


def test_fraction_mask_amount_zero_keeps_everything():
    w = torch.randn(3, 4)
    keep, threshold = fraction_mask(w, 0.0)
    assert keep.all() and keep.shape == w.shape and keep.dtype == torch.bool
    assert threshold == 0.0


def test_fraction_mask_amount_one_prunes_everything():
    w = torch.tensor([[0.5, -7.0], [2.0, 1.0]])
    keep, threshold = fraction_mask(w, 1.0)
    assert not keep.any()
    assert threshold == 7.0


@pytest.mark.parametrize(("n", "amount"), [(10, 0.25), (10, 0.35), (7, 0.5), (3, 0.1), (100, 0.9), (1, 0.4)])
def test_fraction_mask_prunes_round_amount_times_n(n, amount):
    w = torch.randn(n)
    keep, _ = fraction_mask(w, amount)
    assert n - int(keep.sum()) == round(amount * n)


def test_fraction_mask_prunes_smallest_magnitudes_in_2d():
    w = torch.tensor([[1.0, -6.0, 3.0], [-2.0, 5.0, -4.0]])
    keep, threshold = fraction_mask(w, 0.5)
    assert keep.tolist() == [[False, True, False], [False, True, True]]
    assert threshold == 3.0


def test_fraction_mask_counts_prior_pruning():
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0])
    prior = torch.ones(10, dtype=torch.bool)
    prior[[8, 9]] = False  # the two largest were pruned before
    keep, threshold = fraction_mask(w, 0.5, prior)
    # 5 pruned in total: the two from before plus the three smallest
    assert keep.tolist() == [False, False, False, True, True, True, True, True, False, False]
    assert threshold == 3.0


def test_fraction_mask_already_sparser_than_target_is_unchanged():
    w = torch.arange(1.0, 11.0)
    prior = torch.tensor([True, False] * 5)
    keep, threshold = fraction_mask(w, 0.2, prior)
    assert torch.equal(keep, prior)
    assert threshold == 0.0  # nothing newly pruned; prior entries are below every real magnitude


@given(weight_and_keep(), st.floats(0.0, 1.0))
@FAST
def test_fraction_mask_property(wk, amount):
    weight, prior = wk
    n = weight.numel()
    keep, threshold = fraction_mask(weight, amount, prior)
    already = 0 if prior is None else int((~prior).sum())
    assert keep.dtype == torch.bool and keep.shape == weight.shape
    if prior is not None:
        assert not (keep & ~prior).any()  # subset of the prior mask
    assert n - int(keep.sum()) == max(round(amount * n), already)
    _assert_kept_dominate(weight, keep, prior)
    newly_pruned = (torch.ones_like(keep) if prior is None else prior) & ~keep
    expected = float(weight.abs()[newly_pruned].max()) if newly_pruned.any() else 0.0
    assert threshold == pytest.approx(expected)


# ---------------------------------------------------------------------------------------------------------------------
# global_masks
# ---------------------------------------------------------------------------------------------------------------------


def test_global_masks_docstring_example():
    masks, threshold = global_masks({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0, 3.0])}, 0.5)
    assert masks["a"].tolist() == [False, True]
    assert masks["b"].tolist() == [False, True]
    assert threshold == 2.0


def test_global_masks_one_threshold_across_layers_of_different_scale():
    small = torch.tensor([[0.1, -0.2], [0.3, -0.4]])
    large = torch.tensor([5.0, -0.25, 7.0, 8.0, -9.0, 10.0])
    masks, threshold = global_masks({"small": small, "large": large}, 0.5)
    assert list(masks) == ["small", "large"]
    assert masks["small"].shape == small.shape and masks["small"].dtype == torch.bool
    # 10 weights, 5 pruned: the four of `small` and -0.25 from `large`
    assert not masks["small"].any()
    assert masks["large"].tolist() == [True, False, True, True, True, True]
    assert threshold == pytest.approx(0.4)  # computed in float32


def test_global_masks_counts_priors_and_keeps_subset():
    weights = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    keeps = {"b": torch.tensor([True, True, True, False])}  # 8.0 pruned before; `a` never pruned
    masks, threshold = global_masks(weights, 0.5, keeps)
    assert masks["a"].tolist() == [False, False, False, True]
    assert masks["b"].tolist() == [True, True, True, False]
    assert threshold == 3.0


def test_global_masks_amount_zero_and_one():
    weights = {"a": torch.randn(3, 3), "b": torch.randn(5)}
    masks, threshold = global_masks(weights, 0.0)
    assert all(m.all() for m in masks.values()) and threshold == 0.0
    masks, threshold = global_masks(weights, 1.0)
    assert not any(m.any() for m in masks.values())
    assert threshold == pytest.approx(max(float(w.abs().max()) for w in weights.values()))


@given(st.lists(weight_and_keep(max_size=15), min_size=1, max_size=4), st.floats(0.0, 1.0))
@FAST
def test_global_masks_property(layers, amount):
    weights = {f"l{i}": w for i, (w, _) in enumerate(layers)}
    keeps = {f"l{i}": k for i, (_, k) in enumerate(layers) if k is not None}
    masks, threshold = global_masks(weights, amount, keeps)
    total = sum(w.numel() for w in weights.values())
    already = sum(int((~k).sum()) for k in keeps.values())
    assert set(masks) == set(weights)
    kept_count = 0
    kept_mags, pruned_mags = [], []
    for name, w in weights.items():
        keep, prior = masks[name], keeps.get(name)
        assert keep.shape == w.shape and keep.dtype == torch.bool
        if prior is not None:
            assert not (keep & ~prior).any()
        kept_count += int(keep.sum())
        kept_mags.append(w.abs()[keep])
        alive_before = torch.ones_like(keep) if prior is None else prior
        pruned_mags.append(w.abs()[alive_before & ~keep])
    assert total - kept_count == max(round(amount * total), already)
    kept_all, pruned_all = torch.cat(kept_mags), torch.cat(pruned_mags)
    if pruned_all.numel():
        assert threshold == pytest.approx(float(pruned_all.max()))
        if kept_all.numel():
            assert float(kept_all.min()) >= threshold  # one common threshold for every layer
    else:
        assert threshold == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# floor_mask
# ---------------------------------------------------------------------------------------------------------------------


def test_floor_mask_docstring_example():
    w = torch.tensor([0.1, -0.5, 2.0, -3.0])
    out = floor_mask(w, torch.zeros(4, dtype=torch.bool), None, 0.25)
    assert out.tolist() == [False, False, False, True]


def test_floor_mask_keeps_ceil_min_remaining_largest():
    w = torch.tensor([0.1, -0.9, 0.2, 0.8, -0.3, 0.7, 0.4, -0.6, 0.5, 1.0])
    out = floor_mask(w, torch.zeros(10, dtype=torch.bool), None, 0.25)  # ceil(2.5) = 3
    assert int(out.sum()) == 3
    assert out.tolist() == [False, True, False, True, False, False, False, False, False, True]


def test_floor_mask_keeps_at_least_one():
    w = torch.tensor([[0.1, -5.0], [0.3, 4.0]])
    out = floor_mask(w, torch.zeros(2, 2, dtype=torch.bool), None, 0.0)
    assert out.tolist() == [[False, True], [False, False]]


def test_floor_mask_returns_new_when_it_already_meets_the_floor():
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    new = torch.tensor([True, False, True, False])  # not the largest, but enough survive
    assert torch.equal(floor_mask(w, new, None, 0.5), new)


def test_floor_mask_chooses_largest_alive_and_never_revives():
    w = torch.tensor([9.0, 8.0, 1.0, 2.0, 3.0, 0.5])
    prior = torch.tensor([False, False, True, True, True, True])  # the two largest were pruned before
    out = floor_mask(w, torch.zeros(6, dtype=torch.bool), prior, 0.3)  # ceil(1.8) = 2
    assert out.tolist() == [False, False, False, True, True, False]


def test_floor_mask_cannot_exceed_alive():
    w = torch.arange(1.0, 11.0)
    prior = torch.zeros(10, dtype=torch.bool)
    prior[[0, 1]] = True
    out = floor_mask(w, torch.zeros(10, dtype=torch.bool), prior, 0.5)
    assert torch.equal(out, prior)


@given(weight_and_keep(), st.floats(0.0, 200.0), st.floats(0.0, 1.0))
@FAST
def test_floor_mask_property(wk, threshold, min_remaining):
    weight, prior = wk
    new, _ = std_mask(weight, 1.0, threshold, prior)
    out = floor_mask(weight, new, prior, min_remaining)
    alive = weight.numel() if prior is None else int(prior.sum())
    n_min = min(alive, max(1, math.ceil(min_remaining * weight.numel())))
    assert int(out.sum()) == max(int(new.sum()), n_min)
    assert not (new & ~out).any()  # only widens
    if prior is not None:
        assert not (out & ~prior).any()
    _assert_kept_dominate(weight, out, prior)


# ---------------------------------------------------------------------------------------------------------------------
# the criterion classes: settings, levels, select
# ---------------------------------------------------------------------------------------------------------------------


def _context(weights, dense_std=None):
    return PruneContext(dense_std=dense_std or {n: surviving_std(w) for n, w in weights.items()},
                        layer_of={n: n.rpartition(".")[0] for n in weights})  # fmt: skip


def test_class_attributes_of_the_built_ins():
    assert (Std.name, Std.level_name, Std.per_layer) == ("std", "quality", True)
    assert (Fraction.name, Fraction.level_name, Fraction.per_layer) == ("fraction", "amount", True)
    assert (Global.name, Global.level_name, Global.per_layer) == ("global", "amount", False)
    assert Std.sweep_levels[0] == 0.25 and Std.sweep_levels[-1] == 2.5
    assert all(0 <= x <= 1 for x in Fraction.sweep_levels)
    assert Global.sweep_levels == ()
    assert STD_OF == ("dense", "surviving")
    assert all(issubclass(cls, Criterion) for cls in (Std, Fraction, Global))


def test_defaults_and_describe():
    assert Std().level == 1.0 and Std().std_of == "dense" and Std().min_remaining is None
    assert Fraction().level is None and Global().level is None
    assert Std().describe() == "Std(quality=1.0, std_of='dense')"
    assert repr(Std(quality=0.5, std_of="surviving")) == "Std(quality=0.5, std_of='surviving')"
    assert Fraction(amount=0.9, min_remaining=0.1).describe() == "Fraction(amount=0.9, min_remaining=0.1)"
    assert repr(Global(0.5)) == "Global(amount=0.5)"


def test_levels_are_checked_and_stored_as_floats():
    assert Std(quality=1).level == 1.0 and isinstance(Std(quality=1).level, float)
    assert Std(quality={"conv*": 0.5, "*": 2}).level == {"conv*": 0.5, "*": 2.0}
    assert Fraction(amount={"fc1": 1, "*": 0}).level == {"fc1": 1.0, "*": 0.0}
    assert Global(amount=0).level == 0.0 and Global(amount=1).level == 1.0


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Std(quality=-1.0), r"`quality` must be a finite number >= 0, got -1\.0"),
        (lambda: Std(quality=float("inf")), r"`quality` must be a finite number >= 0, got inf"),
        (lambda: Std(quality={"fc1": float("nan")}), r"`quality\['fc1'\]` must be a finite number >= 0, got nan"),
        (lambda: Std(std_of="mean"), r"`std_of` must be one of \('dense', 'surviving'\), got 'mean'"),
        (lambda: Std(min_remaining=2.0), r"`min_remaining` must be a number in \[0, 1\] or None, got 2\.0"),
        (lambda: Fraction(amount=1.5), r"`amount` must be a number in \[0, 1\], got 1\.5"),
        (lambda: Fraction(amount=-0.1), r"`amount` must be a number in \[0, 1\], got -0\.1"),
        (lambda: Fraction(amount={"*": 1.01}), r"`amount\['\*'\]` must be a number in \[0, 1\], got 1\.01"),
        (lambda: Fraction(amount=True), r"`amount` must be a number in \[0, 1\], got True"),
        (lambda: Global(amount=1.5), r"`amount` must be a number in \[0, 1\], got 1\.5"),
        (lambda: Global(amount={"*": 0.5}), r"Criterion 'global' takes one `amount` for all layers, not a mapping"),
    ],
)
def test_bad_settings_are_refused(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_global_refuses_a_mapping_in_check_levels_too():
    with pytest.raises(ValueError, match=r"Criterion 'global' takes one `level` for all layers, not a mapping"):
        Global(0.5).check_levels({"fc1": 0.5}, "level")
    assert Global().check_levels(0.25, "level") == 0.25


def test_std_select_dense_uses_the_cached_std_of_the_context():
    w = torch.tensor([0.5, -1.0, 2.0, -4.0])
    keep = torch.tensor([True, True, True, False])
    decisions = Std(std_of="dense").select({"a.weight": w}, {"a.weight": keep}, {"a.weight": 1.5}, _context(
        {"a.weight": w}, {"a.weight": 1.0}))  # fmt: skip
    decision = decisions["a.weight"]
    assert isinstance(decision, Decision)
    assert decision.threshold == 1.5  # 1.5 x the cached 1.0, not the std of the weights
    assert decision.keep.tolist() == [False, False, True, False]  # -4.0 stays pruned
    assert decision.rule == "1.50 x std"


def test_std_select_surviving_uses_the_std_of_the_alive_weights():
    w = torch.tensor([0.5, -1.0, 2.0, -4.0])
    keep = torch.tensor([True, True, True, False])
    decision = Std(std_of="surviving").select(
        {"a.weight": w}, {"a.weight": keep}, {"a.weight": 1.0}, _context({"a.weight": w}, {"a.weight": 100.0})
    )["a.weight"]
    assert decision.threshold == pytest.approx(surviving_std(w, keep))  # std of 0.5, -1, 2: ~1.5275
    assert decision.keep.tolist() == [False, False, True, False]
    assert decision.rule == "1.00 x std (surviving)"


def test_std_select_of_a_layer_never_pruned_takes_its_mask_as_all_alive():
    w = torch.tensor([0.5, -1.0, 2.0, -4.0])
    decision = Std().select({"a.weight": w}, {"a.weight": None}, {"a.weight": 0.0}, _context({"a.weight": w}))
    assert decision["a.weight"].keep.all()


def test_fraction_select_per_layer_levels():
    weights = {"a.weight": torch.arange(1.0, 11.0), "b.weight": torch.arange(1.0, 5.0)}
    decisions = Fraction().select(weights, dict.fromkeys(weights), {"a.weight": 0.3, "b.weight": 0.5},
                                  _context(weights))  # fmt: skip
    assert decisions["a.weight"].keep.tolist() == [False] * 3 + [True] * 7
    assert decisions["a.weight"].threshold == 3.0 and decisions["a.weight"].rule == "30.0% of layer"
    assert decisions["b.weight"].keep.tolist() == [False, False, True, True]
    assert decisions["b.weight"].rule == "50.0% of layer"


def test_global_select_one_threshold_and_prior_masks():
    weights = {"a.weight": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b.weight": torch.tensor([5.0, 6.0, 7.0, 8.0])}
    keeps = {"a.weight": None, "b.weight": torch.tensor([True, True, True, False])}
    decisions = Global().select(weights, keeps, dict.fromkeys(weights, 0.5), _context(weights))
    assert decisions["a.weight"].keep.tolist() == [False, False, False, True]
    assert decisions["b.weight"].keep.tolist() == [True, True, True, False]
    assert {d.threshold for d in decisions.values()} == {3.0}
    assert {d.rule for d in decisions.values()} == {"50.0% global"}


def test_gentler_scales_the_level():
    assert Std().gentler(1.5, 0.8) == pytest.approx(1.2)
    assert Fraction().gentler(0.5, 0.5) == 0.25


# ---------------------------------------------------------------------------------------------------------------------
# the classes through the pruner
# ---------------------------------------------------------------------------------------------------------------------


def _net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


WEIGHTS = ["0.weight", "2.weight", "4.weight"]


@pytest.mark.parametrize(
    ("by_object", "by_name"),
    [
        (lambda: Std(quality=0.8), ("std", 0.8)),
        (lambda: Std(quality={"0": 0.5, "*": 1.0}), ("std", {"0": 0.5, "*": 1.0})),
        (lambda: Fraction(amount=0.3), ("fraction", 0.3)),
        (lambda: Global(amount=0.6), ("global", 0.6)),
        (lambda: get_criterion("lightning_prune.Global"), ("global", 0.5)),  # Global(None): level from prune
    ],
)
def test_a_criterion_object_prunes_like_its_name(by_object, by_name):
    a, b = Pruner(_net()), Pruner(_net())
    rule = by_object()
    a.prune(rule, None if rule.level is not None else by_name[1])
    b.prune(*by_name)
    for name in WEIGHTS:
        assert torch.equal(a.masks[name], b.masks[name]), name
        assert a.thresholds[name] == b.thresholds[name] and a.rules[name] == b.rules[name]


def test_the_level_of_prune_overrides_the_criterion_level():
    a, b = Pruner(_net()), Pruner(_net())
    a.prune(Fraction(amount=0.9), 0.2)
    b.prune("fraction", 0.2)
    assert all(torch.equal(a.masks[n], b.masks[n]) for n in WEIGHTS)
    assert a.check(Std(quality=2.0), 0.5) == dict.fromkeys(WEIGHTS, 0.5)
    assert a.check(Std(quality=2.0)) == dict.fromkeys(WEIGHTS, 2.0)


def test_std_through_the_pruner_dense_versus_surviving():
    dense, surviving = Pruner(_net()), Pruner(_net())
    first_std = {n: float(dense.parameter(n).detach().std()) for n in WEIGHTS}
    for pruner, rule in ((dense, Std(0.7)), (surviving, Std(0.7, std_of="surviving"))):
        pruner.prune(rule)
        pruner.prune(rule)
    for name in WEIGHTS:
        assert dense.dense_std[name] == pytest.approx(first_std[name]) == surviving.dense_std[name]
        assert dense.thresholds[name] == pytest.approx(0.7 * first_std[name])  # the cached dense std
        keep = surviving.masks[name]
        assert surviving.thresholds[name] > dense.thresholds[name]  # survivors' std is larger
        assert int(keep.sum()) < int(dense.masks[name].sum())
        assert surviving.rules[name] == "0.70 x std (surviving)" and dense.rules[name] == "0.70 x std"


def test_std_sees_the_dense_std_cached_in_the_context():
    seen = []

    class Spy(Std):
        def select(self, weights, keeps, levels, context):
            seen.append(dict(context.dense_std))
            return super().select(weights, keeps, levels, context)

    pruner = Pruner(_net())
    dense = {n: float(pruner.parameter(n).detach().std()) for n in WEIGHTS}
    pruner.prune(Spy(0.5))
    pruner.prune(Spy(0.5), layers=["2"])
    assert seen[0] == pytest.approx(dense)
    assert seen[1] == {"2.weight": pruner.dense_std["2.weight"]}  # the cached value, not the survivors' std
    assert seen[1]["2.weight"] != pytest.approx(surviving_std(pruner.parameter("2.weight"), pruner.masks["2.weight"]))


def test_criterion_min_remaining_floors_and_prune_overrides_it():
    pruner = Pruner(_net())
    pruner.prune(Std(quality=1e6, min_remaining=0.5))
    assert [int(pruner.masks[n].sum()) for n in WEIGHTS] == [64, 96, 24]
    pruner = Pruner(_net())
    pruner.prune(Std(quality=1e6, min_remaining=0.5), min_remaining=0.25)
    assert [int(pruner.masks[n].sum()) for n in WEIGHTS] == [32, 48, 12]
    with pytest.raises(PruningError, match=r"would remove every connection of '0.weight'"):
        Pruner(_net()).prune(Fraction(amount=1.0))


def test_fraction_bounds_through_the_pruner():
    pruner = Pruner(_net())
    pruner.prune(Fraction(amount=0.0))
    assert all(pruner.masks[n].all() for n in WEIGHTS)
    pruner.prune(Fraction(amount=1.0), min_remaining=0.0)
    assert [int(pruner.masks[n].sum()) for n in WEIGHTS] == [1, 1, 1]
    with pytest.raises(ValueError, match=r"`amount` must be a number in \[0, 1\], got 1\.2"):
        pruner.prune(Fraction(), 1.2)


def test_global_through_the_pruner_refuses_a_mapping_level():
    pruner = Pruner(_net())
    with pytest.raises(ValueError, match=r"Criterion 'global' takes one `amount` for all layers"):
        pruner.prune(Global(), {"*": 0.5})
    assert pruner.masks == {}
