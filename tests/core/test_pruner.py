import inspect
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_names import REGISTERED
from torch import nn
from toy_models import DriftSGD

from lightning_prune.core.criteria import Fraction, Global, Std, surviving_std
from lightning_prune.core.pruner import Pruner, PruningError
from lightning_prune.core.report import LayerStats

WEIGHTS = ["0.weight", "2.weight", "4.weight"]


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def pruner_state(pruner: Pruner) -> dict:
    return {
        "masks": {k: v.clone() for k, v in pruner.masks.items()},
        "dense_std": dict(pruner.dense_std),
        "thresholds": dict(pruner.thresholds),
        "rules": dict(pruner.rules),
    }


def assert_same_pruner_state(a: dict, b: dict) -> None:
    assert_same_tensors(a["masks"], b["masks"])
    assert a["dense_std"] == b["dense_std"]
    assert a["thresholds"] == b["thresholds"]
    assert a["rules"] == b["rules"]


def assert_pruned_are_zero(pruner: Pruner) -> None:
    for name, keep in pruner.masks.items():
        assert (pruner.parameter(name).detach()[~keep] == 0).all(), name


def train_steps(net: nn.Module, optimizer: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(32, 8, generator=g)
        y = torch.randn(32, 4, generator=g)
        optimizer.zero_grad()
        nn.functional.mse_loss(net(x), y).backward()
        optimizer.step()


# ---------------------------------------------------------------------------------------------------------------------
# construction, stats, sparsity
# ---------------------------------------------------------------------------------------------------------------------


def test_construction_selects_weights_and_starts_dense():
    net = make_net()
    pruner = Pruner(net)
    assert pruner.layer_of == {"0.weight": "0", "2.weight": "2", "4.weight": "4"}
    assert pruner.layers == ["0", "2", "4"]
    assert pruner.masks == {} and pruner.thresholds == {} and pruner.dense_std == {}
    assert pruner.parameter("2.weight") is net[2].weight
    assert pruner.sparsity() == 0.0
    assert [(s.name, s.weights, s.remaining, s.threshold, s.rule) for s in pruner.stats()] == [
        ("0.weight", 128, 128, None, ""),
        ("2.weight", 192, 192, None, ""),
        ("4.weight", 48, 48, None, ""),
    ]


def test_construction_with_layers_and_bias():
    pruner = Pruner(make_net(), ["2", "4"], include_bias=True)
    assert list(pruner.layer_of) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    assert pruner.layers == ["2", "4"]


def test_construction_rejects_unknown_pattern():
    with pytest.raises(ValueError, match="Pattern 'fc' in `layers` matches no module"):
        Pruner(make_net(), ["fc"])


def test_stats_and_sparsity_after_prune():
    pruner = Pruner(make_net(), include_bias=True)
    returned = pruner.prune("fraction", 0.5)
    stats = pruner.stats()
    assert returned == stats
    assert all(isinstance(s, LayerStats) for s in stats)
    assert [s.name for s in stats] == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert [s.shape for s in stats] == [(16, 8), (16,), (12, 16), (12,), (4, 12), (4,)]
    for s in stats:
        assert s.remaining == int(pruner.masks[s.name].sum())
        assert s.weights - s.remaining == round(0.5 * s.weights)
        assert s.rule == "50.0% of layer"
        assert s.threshold == pruner.thresholds[s.name]
    total = sum(s.weights for s in stats)
    pruned = sum(int((~m).sum()) for m in pruner.masks.values())
    assert pruner.sparsity() == pytest.approx(pruned / total)


# ---------------------------------------------------------------------------------------------------------------------
# the three criteria
# ---------------------------------------------------------------------------------------------------------------------


def test_prune_std_dense():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    stats = pruner.prune("std", 0.8)
    for name in WEIGHTS:
        w0 = before[name]
        std = float(w0.std())
        assert pruner.dense_std[name] == pytest.approx(std)
        assert pruner.thresholds[name] == pytest.approx(0.8 * std)
        assert torch.equal(pruner.masks[name], w0.abs() > pruner.thresholds[name])
        assert pruner.masks[name].dtype == torch.bool
        assert pruner.rules[name] == "0.80 x std"
        w = pruner.parameter(name).detach()
        keep = pruner.masks[name]
        assert (w[~keep] == 0).all()
        assert torch.equal(w[keep], w0[keep])
        assert 0 < int(keep.sum()) < keep.numel()
    assert torch.equal(net[0].bias, before["0.bias"])  # biases not selected
    assert [s.remaining for s in stats] == [int(pruner.masks[n].sum()) for n in WEIGHTS]


def test_prune_std_quality_mapping():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    pruner.prune("std", {"4": 0.0, "0": 1.5, "*": 0.5})
    assert pruner.rules == {"0.weight": "1.50 x std", "2.weight": "0.50 x std", "4.weight": "0.00 x std"}
    for name, q in zip(WEIGHTS, (1.5, 0.5, 0.0), strict=True):
        assert pruner.thresholds[name] == pytest.approx(q * float(before[name].std()))
    assert pruner.masks["4.weight"].all()  # quality 0 keeps every non-zero weight


def test_prune_fraction():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    pruner.prune("fraction", 0.3)
    for name in WEIGHTS:
        keep, w0 = pruner.masks[name], before[name]
        assert keep.numel() - int(keep.sum()) == round(0.3 * keep.numel())
        assert float(w0.abs()[keep].min()) >= float(w0.abs()[~keep].max())
        assert pruner.thresholds[name] == pytest.approx(float(w0.abs()[~keep].max()))
        assert pruner.rules[name] == "30.0% of layer"
    assert_pruned_are_zero(pruner)


def test_prune_fraction_amount_mapping():
    pruner = Pruner(make_net())
    pruner.prune("fraction", {"0": 0.25, "*": 0.75})
    assert [int((~pruner.masks[n]).sum()) for n in WEIGHTS] == [32, 144, 36]


def test_prune_global():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    pruner.prune("global", 0.6)
    total = sum(before[n].numel() for n in WEIGHTS)
    pruned = sum(int((~pruner.masks[n]).sum()) for n in WEIGHTS)
    assert pruned == round(0.6 * total)
    threshold = pruner.thresholds["0.weight"]
    assert all(pruner.thresholds[n] == threshold for n in WEIGHTS)
    assert all(pruner.rules[n] == "60.0% global" for n in WEIGHTS)
    kept = torch.cat([before[n].abs()[pruner.masks[n]] for n in WEIGHTS])
    gone = torch.cat([before[n].abs()[~pruner.masks[n]] for n in WEIGHTS])
    assert float(kept.min()) >= threshold == pytest.approx(float(gone.max()))
    assert_pruned_are_zero(pruner)


def test_global_masks_are_independent_tensors():
    pruner = Pruner(make_net())
    pruner.prune("global", 0.5)
    m0, m2 = pruner.masks["0.weight"], pruner.masks["2.weight"]
    before = m2.clone()
    m0.fill_(False)
    assert torch.equal(m2, before)


def test_prune_layers_subset():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net, include_bias=True)
    stats = pruner.prune("fraction", 0.5, layers=["2"])
    assert set(pruner.masks) == {"2.weight", "2.bias"}
    for name in ("0.weight", "0.bias", "4.weight", "4.bias"):
        assert torch.equal(pruner.parameter(name).detach(), before[name])
    by_name = {s.name: s for s in stats}
    assert by_name["0.weight"].remaining == 128 and by_name["0.weight"].threshold is None
    assert by_name["2.weight"].remaining == 96
    # a later prune of another subset leaves the first alone
    pruner.prune("std", 0.5, layers=["4", "0"])
    assert set(pruner.masks) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    assert pruner.rules["2.weight"] == "50.0% of layer"
    assert pruner.rules["4.weight"] == "0.50 x std"


def test_prune_layers_subset_with_global():
    pruner = Pruner(make_net())
    pruner.prune("global", 0.5, layers=["0", "4"])
    assert set(pruner.masks) == {"0.weight", "4.weight"}
    assert sum(int((~pruner.masks[n]).sum()) for n in ("0.weight", "4.weight")) == round(0.5 * (128 + 48))


def test_check_returns_values_without_pruning():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    assert pruner.check("std", {"0": 0.5, "*": 1.0}) == {"0.weight": 0.5, "2.weight": 1.0, "4.weight": 1.0}
    assert pruner.check("fraction", 0.2, layers=["4"]) == {"4.weight": 0.2}
    assert pruner.masks == {}
    assert_same_tensors(snapshot(net), before)


# ---------------------------------------------------------------------------------------------------------------------
# repeated prunes: std_of, masks only shrink
# ---------------------------------------------------------------------------------------------------------------------


def test_std_of_dense_caches_first_std():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    pruner.prune("std", 0.7)
    first = pruner_state(pruner)
    pruner.prune("std", 0.7)
    assert_same_pruner_state(pruner_state(pruner), first)  # same threshold, same masks
    pruner.prune("std", 1.0)
    for name in WEIGHTS:
        dense = float(before[name].std())
        assert pruner.dense_std[name] == pytest.approx(dense)
        assert pruner.thresholds[name] == pytest.approx(1.0 * dense)
        assert pruner.thresholds[name] != pytest.approx(surviving_std(pruner.parameter(name), first["masks"][name]))


def test_std_of_surviving_threshold_climbs():
    net = make_net()
    pruner = Pruner(net)
    pruner.prune(Std(quality=0.7, std_of="surviving"))
    first = pruner_state(pruner)
    assert pruner.rules["0.weight"] == "0.70 x std (surviving)"
    expected = {name: 0.7 * surviving_std(pruner.parameter(name), first["masks"][name]) for name in WEIGHTS}
    pruner.prune(Std(quality=0.7, std_of="surviving"))
    for name in WEIGHTS:
        assert pruner.thresholds[name] == pytest.approx(expected[name])
        assert pruner.thresholds[name] > first["thresholds"][name]
        assert int(pruner.masks[name].sum()) < int(first["masks"][name].sum())
        assert pruner.dense_std[name] == first["dense_std"][name]  # the dense std is kept from the first prune


def test_dense_std_cached_by_a_fraction_prune():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    pruner.prune("std", 1.0)
    for name in WEIGHTS:
        assert pruner.thresholds[name] == pytest.approx(float(before[name].std()))


def test_masks_never_revive_after_weights_regrow():
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    first = pruner_state(pruner)
    with torch.no_grad():
        for name in WEIGHTS:
            pruner.parameter(name).fill_(10.0)  # pruned entries now have the largest magnitudes
    pruner.prune("fraction", 0.5)
    pruner.prune("std", 0.0)
    pruner.prune("global", 0.1)
    assert_same_tensors(pruner.masks, first["masks"])
    assert_pruned_are_zero(pruner)


prune_op = st.one_of(
    st.builds(Std, st.floats(0.0, 2.5), st.sampled_from(["dense", "surviving"])),
    st.builds(Fraction, st.floats(0.0, 1.0)),
    st.builds(Global, st.floats(0.0, 1.0)),
)


@given(
    ops=st.lists(st.tuples(prune_op, st.sampled_from([None, 0.0, 0.2]), st.integers(0, 2**16)), min_size=1, max_size=5)
)
@settings(max_examples=30, deadline=None)
def test_masks_only_shrink_property(ops):
    net = make_net()
    pruner = Pruner(net, include_bias=True)
    for criterion, min_remaining, seed in ops:
        with torch.no_grad():  # "training": every weight moves, pruned ones included
            g = torch.Generator().manual_seed(seed)
            for p in net.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        previous = pruner_state(pruner)
        try:
            pruner.prune(criterion, min_remaining=min_remaining)
        except PruningError:
            assert min_remaining is None
            assert_same_pruner_state(pruner_state(pruner), previous)
            pruner.apply()
            continue
        assert set(previous["masks"]) <= set(pruner.masks)
        for name, keep in pruner.masks.items():
            old = previous["masks"].get(name)
            if old is not None:
                assert not (keep & ~old).any(), name
            assert keep.any(), name
            if min_remaining is not None:
                floor = min(
                    int(old.sum()) if old is not None else keep.numel(), max(1, math.ceil(min_remaining * keep.numel()))
                )
                assert int(keep.sum()) >= floor
        assert_pruned_are_zero(pruner)


# ---------------------------------------------------------------------------------------------------------------------
# argument validation
# ---------------------------------------------------------------------------------------------------------------------


CRITERION_ERROR = (
    rf"`criterion` must be a registered name {REGISTERED} or the dotted path of a Criterion subclass, "
    r"got 'l1'"
)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("std", -0.1), {}, r"`quality` must be a finite number >= 0, got -0\.1"),
        (("std", float("nan")), {}, r"`quality` must be a finite number >= 0, got nan"),
        (("std", float("inf")), {}, r"`quality` must be a finite number >= 0, got inf"),
        (("std", True), {}, r"`quality` must be a finite number >= 0, got True"),
        (("std", "1.0"), {}, r"Cannot read a quality file '1\.0': suffix must be one of"),  # a string is a file
        (("std", {"0": -1.0, "*": 1.0}), {}, r"`quality\['0'\]` must be a finite number >= 0, got -1\.0"),
        (("std", {"*": False}), {}, r"`quality\['\*'\]` must be a finite number"),
        (("std", {}), {}, r"`quality` is an empty mapping"),
        (("std", {"0": 1.0}), {}, r"Layer '2' matches no pattern in `quality`"),
        (("std", {"fc*": 1.0, "*": 1.0}), {}, r"Pattern 'fc\*' in `quality` matches none of the pruned layers"),
        (("l1",), {}, CRITERION_ERROR),
        ((), {"criterion": "l1"}, CRITERION_ERROR),
        ((42,), {}, r"`criterion` must be a registered name .*, or a Criterion object, got 42"),
        (("fraction",), {}, r"Fraction\(amount=None\) has no `amount`: give it one, e\.g\. Fraction\(amount=0\.5\)"),
        (("global",), {}, r"Criterion Global\(amount=None\) has no `amount`"),
        ((Fraction(),), {}, r"Criterion Fraction\(amount=None\) has no `amount`"),
        (("fraction", -0.01), {}, r"`amount` must be a number in \[0, 1\]"),
        (("fraction", 1.5), {}, r"`amount` must be a number in \[0, 1\], got 1\.5"),
        (("fraction", float("nan")), {}, r"must be a number in \[0, 1\], got nan"),
        (("global", 2.0), {}, r"`amount` must be a number in \[0, 1\]"),
        (("fraction", {"4": 1.1, "*": 0.5}), {}, r"`amount\['4'\]` must be a number"),
        (("global", {"*": 0.5}), {}, r"Criterion 'global' takes one `amount` for all layers, not a mapping"),
        ((), {"min_remaining": -0.1}, r"`min_remaining` must be a number in \[0, 1\] or None, got -0\.1"),
        ((), {"min_remaining": 1.01}, r"`min_remaining` must be a number in \[0, 1\] or None, got 1\.01"),
        ((), {"min_remaining": float("nan")}, r"`min_remaining` must be a number in \[0, 1\]"),
        ((), {"min_remaining": True}, r"`min_remaining` must be a number in \[0, 1\] or None, got True"),
        ((), {"layers": ["nope"]}, r"Pattern 'nope' in `layers` matches no module"),
        (
            (),
            {"layers": "0"},
            r"`layers` must be None or a non-empty list of glob patterns, got '0' \(a string: wrap it in a list\)\.",
        ),
    ],
)
def test_prune_validation_errors_change_nothing(args, kwargs, match):
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.2)
    model_before, state_before = snapshot(net), pruner_state(pruner)
    with pytest.raises(ValueError, match=match):
        pruner.prune(*args, **kwargs)
    with pytest.raises(ValueError, match=match):
        pruner.check(*args, **kwargs)
    assert_same_tensors(snapshot(net), model_before)
    assert_same_pruner_state(pruner_state(pruner), state_before)


def test_std_of_is_validated_by_the_criterion():
    with pytest.raises(ValueError, match=r"`std_of` must be one of \('dense', 'surviving'\), got 'mean'"):
        Std(quality=1.0, std_of="mean")  # type: ignore[arg-type]


def test_prune_layers_outside_pruned_layers():
    net = make_net()
    pruner = Pruner(net, ["0", "2"])
    with pytest.raises(ValueError, match=r"Layer '4' is not among the pruned layers: \['0', '2'\]"):
        pruner.prune("fraction", 0.5, layers=["4"])
    with pytest.raises(ValueError, match=r"Layer '4' is not among the pruned layers"):
        pruner.prune("fraction", 0.5, layers=["*"])
    assert pruner.masks == {}


@pytest.mark.parametrize(
    ("amount", "match"),
    [(True, r"`amount` must be a number in \[0, 1\], got True"), (False, r"`amount` .* got False"),
     ("0.5", r"Cannot read a quality file '0\.5'")],
)  # fmt: skip
def test_amount_must_be_a_number_not_bool_or_str(amount, match):
    # check_fraction rejects bools and strings, but resolve_per_layer converts with float() before it runs;
    # a string is the path of a levels file.
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    with pytest.raises(ValueError, match=match):
        pruner.prune("fraction", amount)
    assert pruner.masks == {}
    assert_same_tensors(snapshot(net), before)


def test_empty_layers_subset_is_rejected_or_a_noop():
    # `layers=[]` selects nothing: a ValueError, never a StopIteration escaping.
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    for criterion in ("global", "fraction", "std"):
        with pytest.raises(ValueError, match=r"`layers` must be None or a non-empty list of glob patterns, got \[\]"):
            pruner.prune(criterion, 0.5, layers=[])
    assert pruner.masks == {}
    assert_same_tensors(snapshot(net), before)


# ---------------------------------------------------------------------------------------------------------------------
# PruningError: non-finite weights, emptied layers; min_remaining
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_raise_and_change_nothing(bad):
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("std", 0.3)
    with torch.no_grad():
        net[2].weight[0, 0] = bad
    model_before, state_before = snapshot(net), pruner_state(pruner)
    with pytest.raises(PruningError, match=r"Parameter '2.weight' holds NaN or inf values"):
        pruner.prune("std", 0.5)
    state_after = snapshot(net)
    assert state_after.keys() == model_before.keys()
    for k in model_before:
        assert torch.equal(state_after[k].nan_to_num(), model_before[k].nan_to_num()), k
    assert_same_pruner_state(pruner_state(pruner), state_before)


def test_pruning_error_is_runtime_error():
    assert issubclass(PruningError, RuntimeError)


@pytest.mark.parametrize(
    ("criterion", "level", "layer"),
    [
        ("std", 1e6, "0.weight"),
        ("std", {"4": 1e6, "*": 0.5}, "4.weight"),  # earlier layers fine, the last one emptied
        ("fraction", 1.0, "0.weight"),
        ("fraction", {"2": 1.0, "*": 0.9}, "2.weight"),
        ("global", 1.0, "0.weight"),
        (Std(quality=1e6), None, "0.weight"),
    ],
)
def test_emptying_a_layer_raises_and_changes_nothing(criterion, level, layer):
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("std", 0.2)
    model_before, state_before = snapshot(net), pruner_state(pruner)
    with pytest.raises(PruningError, match=rf"would remove every connection of '{layer}'.*min_remaining"):
        pruner.prune(criterion, level)
    assert_same_tensors(snapshot(net), model_before)
    assert_same_pruner_state(pruner_state(pruner), state_before)


def test_emptying_first_prune_leaves_model_dense():
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    with pytest.raises(PruningError):
        pruner.prune("std", {"4": 1e6, "*": 0.5})
    assert pruner.masks == {} and pruner.dense_std == {} and pruner.thresholds == {} and pruner.rules == {}
    assert_same_tensors(snapshot(net), before)


@pytest.mark.parametrize(("min_remaining", "expected"), [(0.0, [1, 1, 1]), (0.1, [13, 20, 5]), (0.5, [64, 96, 24])])
def test_min_remaining_floor_avoids_error(min_remaining, expected):
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    stats = pruner.prune("std", 1e6, min_remaining=min_remaining)
    assert [s.remaining for s in stats] == expected
    for name, n in zip(WEIGHTS, expected, strict=True):
        keep, w0 = pruner.masks[name], before[name]
        assert int(keep.sum()) == max(1, math.ceil(min_remaining * keep.numel())) == n
        assert float(w0.abs()[keep].min()) >= float(w0.abs()[~keep].max())  # the largest survive
    assert_pruned_are_zero(pruner)


def test_min_remaining_floor_with_fraction_and_global():
    pruner = Pruner(make_net())
    pruner.prune("fraction", 1.0, min_remaining=0.0)
    assert [int(pruner.masks[n].sum()) for n in WEIGHTS] == [1, 1, 1]
    pruner = Pruner(make_net())
    pruner.prune("global", 1.0, min_remaining=0.25)
    assert [int(pruner.masks[n].sum()) for n in WEIGHTS] == [32, 48, 12]


def test_min_remaining_does_not_widen_a_prune_that_keeps_enough():
    a, b = Pruner(make_net()), Pruner(make_net())
    a.prune("fraction", 0.5)
    b.prune("fraction", 0.5, min_remaining=0.3)
    assert_same_tensors(a.masks, b.masks)


# ---------------------------------------------------------------------------------------------------------------------
# enforcement during training: attach / detach
# ---------------------------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2), ("momentum_buffer",)),
    "sgd_nesterov": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
        ("momentum_buffer",),
    ),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=1e-2), ("exp_avg", "exp_avg_sq")),
    "adam_wd": (lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=1e-2), ("exp_avg", "exp_avg_sq")),
    "adamw": (lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1), ("exp_avg", "exp_avg_sq")),
    "adamw_amsgrad": (
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, amsgrad=True),
        ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"),
    ),
    "adagrad": (lambda ps: torch.optim.Adagrad(ps, lr=1e-2, weight_decay=1e-2), ("sum",)),
    "adadelta": (lambda ps: torch.optim.Adadelta(ps, weight_decay=1e-2), ("square_avg", "acc_delta")),
    "adamax": (lambda ps: torch.optim.Adamax(ps, lr=1e-2, weight_decay=1e-2), ("exp_avg",)),  # exp_inf >= eps
    "nadam": (lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=1e-2), ("exp_avg", "exp_avg_sq")),
    "radam": (lambda ps: torch.optim.RAdam(ps, lr=1e-2, weight_decay=1e-2), ("exp_avg", "exp_avg_sq")),
    "rmsprop": (
        lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2),
        ("square_avg", "momentum_buffer", "grad_avg"),
    ),
}


def assert_state_zero_at_pruned(pruner, optimizer, keys):
    for name, keep in pruner.masks.items():
        state = optimizer.state[pruner.parameter(name)]
        for key in keys:
            assert (state[key][~keep] == 0).all(), (name, key)
            assert (state[key][keep] != 0).any(), (name, key)


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_attach_keeps_pruned_weights_and_state_at_zero_during_training(opt_name):
    make, keys = OPTIMIZERS[opt_name]
    net = make_net()
    optimizer = make(net.parameters())
    pruner = Pruner(net, include_bias=True)
    pruner.attach(optimizer)
    train_steps(net, optimizer, 2, seed=1)  # optimizer state exists before the prune
    pruner.prune("fraction", 0.6)
    assert_state_zero_at_pruned(pruner, optimizer, keys)  # zeroed by the prune itself
    after_prune = snapshot(net)
    train_steps(net, optimizer, 5, seed=2)
    assert_pruned_are_zero(pruner)
    assert_state_zero_at_pruned(pruner, optimizer, keys)
    for name, keep in pruner.masks.items():
        assert not torch.equal(pruner.parameter(name).detach()[keep], after_prune[name][keep])  # survivors train
    pruner.prune("fraction", 0.8)  # a second round with attached state
    train_steps(net, optimizer, 3, seed=3)
    assert_pruned_are_zero(pruner)
    assert_state_zero_at_pruned(pruner, optimizer, keys)
    assert pruner.sparsity() == pytest.approx(sum(round(0.8 * n) for n in (128, 16, 192, 12, 48, 4)) / 400)


def test_attach_after_prune_zeroes_existing_state():
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    train_steps(net, optimizer, 2)
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    buf = optimizer.state[net[0].weight]["momentum_buffer"]
    keep = pruner.masks["0.weight"]
    assert (buf[~keep] != 0).any()  # not attached: the prune does not know this optimizer
    pruner.attach(optimizer)
    assert (buf[~keep] == 0).all()
    train_steps(net, optimizer, 3)
    assert_pruned_are_zero(pruner)
    assert_state_zero_at_pruned(pruner, optimizer, ("momentum_buffer",))


def test_attach_masks_gradients_before_the_step():
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    pruner.attach(optimizer)
    seen = {}

    def record(opt, args, kwargs):  # registered after the pruner's pre-hook: runs after it, before the update
        seen["grad"] = net[2].weight.grad.clone()

    optimizer.register_step_pre_hook(record)
    optimizer.zero_grad()
    net(torch.randn(16, 8)).pow(2).sum().backward()
    keep = pruner.masks["2.weight"]
    assert (net[2].weight.grad[~keep] != 0).any()  # backward fills every gradient
    optimizer.step()
    assert (seen["grad"][~keep] == 0).all()
    assert (seen["grad"][keep] != 0).any()
    assert (net[2].weight.grad[~keep] == 0).all()
    assert_pruned_are_zero(pruner)


def _half_pruned_sgd():
    """A net at 50% per layer, its SGD with momentum attached, and a seeded generator for batches."""
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(net)
    pruner.attach(optimizer)
    pruner.prune("fraction", 0.5)
    return net, optimizer, pruner, torch.Generator().manual_seed(0)


def test_driver_masking_gradients_itself():
    net, optimizer, pruner, g = _half_pruned_sgd()
    for driver_masks in (True, False, True, True, False, False):
        optimizer.zero_grad()
        net(torch.randn(16, 8, generator=g)).pow(2).sum().backward()
        if driver_masks:  # e.g. before gradient clipping
            pruner.mask_gradients(optimizer)
            for name, keep in pruner.masks.items():
                assert (pruner.parameter(name).grad[~keep] == 0).all()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.1)
        optimizer.step()
        for name, keep in pruner.masks.items():
            assert (pruner.parameter(name).grad[~keep] == 0).all()
        assert_pruned_are_zero(pruner)
        assert_state_zero_at_pruned(pruner, optimizer, ("momentum_buffer",))


def test_an_earlier_mask_gradients_call_does_not_disarm_the_step_hook():
    # Fresh gradients computed after a mask_gradients(optimizer) call (here: one made before attach, whose
    # step never came) must still be masked when the attached optimizer steps.
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    pruner.mask_gradients(optimizer)
    pruner.attach(optimizer)
    train_steps(net, optimizer, 1)
    assert_pruned_are_zero(pruner)


def test_mask_gradients_without_optimizer_masks_every_pruned_grad():
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    net(torch.randn(4, 8)).pow(2).sum().backward()
    biases = {n: p.grad.clone() for n, p in net.named_parameters() if n.endswith("bias")}
    pruner.mask_gradients()
    for name, keep in pruner.masks.items():
        assert (pruner.parameter(name).grad[~keep] == 0).all()
        assert (pruner.parameter(name).grad[keep] != 0).any()
    for name, grad in biases.items():
        assert torch.equal(net.get_parameter(name).grad, grad)


NON_FINITE_OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01, weight_decay=1e-3),
}


def _inject(grad: torch.Tensor, keep: torch.Tensor, where: str, value: float) -> None:
    """Put ``value`` at the first pruned and/or the first alive entry of ``grad``."""
    flat, k = grad.view(-1), keep.reshape(-1)
    if where in ("pruned", "both"):
        flat[(~k).nonzero()[0]] = value
    if where in ("alive", "both"):
        flat[k.nonzero()[0]] = value


def _twin_steps(opt_name, where, value, closure, clip):
    """Steps of a pruned net on injected gradients, and of an unpruned twin on a copy of the same raw gradients."""
    net, twin = make_net(), make_net()
    optimizer = NON_FINITE_OPTIMIZERS[opt_name](net.parameters())
    twin_optimizer = NON_FINITE_OPTIMIZERS[opt_name](twin.parameters())
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    pruner.attach(optimizer)
    with torch.no_grad():
        twin.load_state_dict(net.state_dict())
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
        raw = {}

        def backward(x=x, y=y, raw=raw):
            optimizer.zero_grad()
            nn.functional.mse_loss(net(x), y).backward()
            for name, keep in pruner.masks.items():
                _inject(net.get_parameter(name).grad, keep, where, value)
            if clip:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            raw.update({n: p.grad.clone() for n, p in net.named_parameters()})

        if closure:
            optimizer.step(backward)
        else:
            backward()
            optimizer.step()
        for name, param in twin.named_parameters():
            param.grad = raw[name]
        twin_optimizer.step()
    return twin, pruner, optimizer


@pytest.mark.parametrize("opt_name", list(NON_FINITE_OPTIMIZERS))
@pytest.mark.parametrize("where", ["pruned", "alive", "both"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(("closure", "clip"), [(False, False), (True, False), (True, True), (False, True)])
def test_non_finite_gradients_leave_pruned_weights_and_state_at_exactly_zero(opt_name, where, value, closure, clip):
    twin, pruner, optimizer = _twin_steps(opt_name, where, value, closure, clip)
    for name, keep in pruner.masks.items():
        weight = pruner.parameter(name).detach()
        assert (weight[~keep] == 0).all(), name  # NaN != 0: a NaN here fails
        for key, state in optimizer.state[pruner.parameter(name)].items():
            if state.shape == weight.shape:
                assert (state[~keep] == 0).all(), (name, key)
        alive_twin = twin.get_parameter(name).detach()[keep]  # the same values, NaN where the twin has NaN
        assert torch.equal(weight[keep].view(torch.int32), alive_twin.view(torch.int32)), name


def test_after_an_early_mask_the_step_masks_again_only_if_a_pruned_gradient_changed(monkeypatch):
    import lightning_prune.core.enforcement as enforcement_module

    calls = []
    real = enforcement_module.mask_gradients
    monkeypatch.setattr(enforcement_module, "mask_gradients", lambda pairs: (calls.append(1), real(pairs)))
    net, optimizer, pruner, g = _half_pruned_sgd()
    for noisy in (False, True, False, True):
        calls.clear()
        optimizer.zero_grad()
        net(torch.randn(16, 8, generator=g)).pow(2).sum().backward()
        pruner.mask_gradients(optimizer)  # before clipping, say
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.5)
        if noisy:  # e.g. DP-SGD noise added after clipping: pruned entries are no longer zero
            for p in net.parameters():
                p.grad.add_(torch.randn(p.shape, generator=g))
        optimizer.step()
        assert len(calls) == (2 if noisy else 1)  # clean: no second pass over the gradients
        assert_pruned_are_zero(pruner)
        assert_state_zero_at_pruned(pruner, optimizer, ("momentum_buffer",))


def test_attach_re_masks_weights_for_an_optimizer_that_moves_zero_gradient_weights():
    net = make_net()
    optimizer = DriftSGD(net.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(net)
    pruner.attach(optimizer)
    pruner.prune("global", 0.5)
    train_steps(net, optimizer, 3)
    assert_pruned_are_zero(pruner)
    assert_state_zero_at_pruned(pruner, optimizer, ("momentum_buffer",))
    pruner.detach()
    train_steps(net, optimizer, 1)
    assert all((pruner.parameter(n).detach()[~k] != 0).any() for n, k in pruner.masks.items())


HAS_REMASK = "remask" in inspect.signature(Pruner.attach).parameters


@pytest.mark.skipif(not HAS_REMASK, reason="attach() has no `remask` option")
def test_remask_always_re_masks_weights_written_outside_the_optimizer():
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    pruner.attach(optimizer, remask="always")
    with torch.no_grad():
        for name, keep in pruner.masks.items():
            pruner.parameter(name).masked_fill_(~keep, 1.0)  # e.g. an EMA or a weight copy from elsewhere
    train_steps(net, optimizer, 1)
    assert_pruned_are_zero(pruner)


@pytest.mark.skipif(not HAS_REMASK, reason="attach() has no `remask` option")
def test_remask_rejects_unknown_value():
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    pruner = Pruner(net)
    with pytest.raises(ValueError, match=r"`remask` must be 'auto' or 'always', got 'never'"):
        pruner.attach(optimizer, remask="never")
    pruner.prune("fraction", 0.5)
    pruner.detach()
    train_steps(net, optimizer, 1)  # the failed attach left no hook behind
    assert any((pruner.parameter(n).detach()[~k] != 0).any() for n, k in pruner.masks.items())


def test_detach_removes_hooks():
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    pruner = Pruner(net)
    pruner.attach(optimizer)
    pruner.attach(optimizer)  # idempotent: no second pair of hooks to leak past detach
    pruner.prune("fraction", 0.5)
    train_steps(net, optimizer, 1)
    assert_pruned_are_zero(pruner)
    pruner.detach()
    train_steps(net, optimizer, 1)
    revived = sum(int((pruner.parameter(n).detach()[~k] != 0).sum()) for n, k in pruner.masks.items())
    assert revived > 0
    pruner.apply()  # masks are still known and can be re-applied by hand
    assert_pruned_are_zero(pruner)


def test_detach_then_prune_does_not_touch_detached_optimizer_state():
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(net)
    pruner.attach(optimizer)
    train_steps(net, optimizer, 2)
    pruner.detach()
    pruner.prune("fraction", 0.5)
    keep = pruner.masks["0.weight"]
    assert (optimizer.state[net[0].weight]["momentum_buffer"][~keep] != 0).any()


def test_hooks_only_mask_parameters_of_their_optimizer():
    net = make_net()
    opt_a = torch.optim.SGD(net[0].parameters(), lr=0.1)
    opt_b = torch.optim.SGD([*net[2].parameters(), *net[4].parameters()], lr=0.1)
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    pruner.attach(opt_a)
    opt_a.zero_grad()
    net(torch.randn(4, 8)).pow(2).sum().backward()
    opt_a.step()  # opt_a's hooks: layer 0 only
    assert (net[0].weight.grad[~pruner.masks["0.weight"]] == 0).all()
    assert (net[0].weight.detach()[~pruner.masks["0.weight"]] == 0).all()
    assert (net[2].weight.grad[~pruner.masks["2.weight"]] != 0).any()  # opt_a's pre-hook left layer 2 alone
    pruner.attach(opt_b)
    train_steps(net, opt_b, 1)
    assert_pruned_are_zero(pruner)


# ---------------------------------------------------------------------------------------------------------------------
# state_dict / load_state_dict
# ---------------------------------------------------------------------------------------------------------------------


def test_state_dict_contents():
    pruner = Pruner(make_net())
    assert pruner.state_dict() == {"masks": {}, "dense_std": {}, "thresholds": {}, "rules": {}}
    pruner.prune("std", 0.5, layers=["0", "4"])
    state = pruner.state_dict()
    assert set(state["masks"]) == {"0.weight", "4.weight"}
    assert all(m.dtype == torch.bool and m.device.type == "cpu" for m in state["masks"].values())
    assert state["dense_std"] == pruner.dense_std and state["dense_std"] is not pruner.dense_std
    assert state["rules"] == {"0.weight": "0.50 x std", "4.weight": "0.50 x std"}


def test_state_dict_round_trip_through_torch_save_weights_only():
    net = make_net(0)
    pruner = Pruner(net)
    pruner.prune("std", {"0": 0.5, "*": 1.0})
    pruner.prune("fraction", 0.7, layers=["2"])
    buffer = io.BytesIO()
    torch.save(pruner.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)

    fresh = make_net(1)  # same architecture, other (dense) weights
    fresh_before = snapshot(fresh)
    other = Pruner(fresh)
    other.load_state_dict(loaded)
    assert_same_tensors(other.masks, pruner.masks)
    assert other.dense_std == pruner.dense_std
    assert other.thresholds == pruner.thresholds
    assert other.rules == pruner.rules
    assert [(s.remaining, s.threshold, s.rule) for s in other.stats()] == [
        (s.remaining, s.threshold, s.rule) for s in pruner.stats()
    ]
    assert other.sparsity() == pruner.sparsity()
    for name, keep in other.masks.items():
        w = other.parameter(name).detach()
        assert (w[~keep] == 0).all()
        assert torch.equal(w[keep], fresh_before[name][keep])
    # the loaded masks are the pruner's own copies
    loaded["masks"]["0.weight"].fill_(False)
    assert other.masks["0.weight"].any()
    # the cached dense std carries over: a later dense prune uses the saved std
    other.prune("std", 1.0, layers=["4"])
    assert other.thresholds["4.weight"] == pytest.approx(pruner.dense_std["4.weight"])


def test_load_state_dict_zeroes_attached_optimizer_state():
    net = make_net()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    other = Pruner(net)
    other.attach(optimizer)
    train_steps(net, optimizer, 2)
    source = Pruner(make_net(3))
    source.prune("fraction", 0.5)
    other.load_state_dict(source.state_dict())
    assert_state_zero_at_pruned(other, optimizer, ("exp_avg", "exp_avg_sq"))
    train_steps(net, optimizer, 2)
    assert_pruned_are_zero(other)


def test_load_state_dict_replaces_previous_masks():
    pruner = Pruner(make_net())
    pruner.prune("fraction", 0.9)
    source = Pruner(make_net())
    source.prune("fraction", 0.1, layers=["2"])
    pruner.load_state_dict(source.state_dict())
    assert set(pruner.masks) == {"2.weight"}
    assert int((~pruner.masks["2.weight"]).sum()) == round(0.1 * 192)


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        (
            {"6.weight": torch.ones(4, 12, dtype=torch.bool)},
            r"masks include '6.weight', which is not among",
        ),
        ({"0.bias": torch.ones(16, dtype=torch.bool)}, r"The masks include '0.bias'.*other `layers`"),
        ({"2.weight": torch.ones(16, 12, dtype=torch.bool)}, r"'2.weight' has shape \(16, 12\).*shape \(12, 16\)"),
        ({"2.weight": torch.ones(12, 16)}, r"dtype torch.float32.*a bool mask is expected"),
    ],
)
def test_load_state_dict_errors_change_nothing(masks, match):
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.4)
    model_before, state_before = snapshot(net), pruner_state(pruner)
    good = {"0.weight": torch.zeros(16, 8, dtype=torch.bool)}  # would empty layer 0 if it were applied
    with pytest.raises(ValueError, match=match):
        pruner.load_state_dict({"masks": {**good, **masks}, "dense_std": {}, "thresholds": {}, "rules": {}})
    assert_same_tensors(snapshot(net), model_before)
    assert_same_pruner_state(pruner_state(pruner), state_before)


# ---------------------------------------------------------------------------------------------------------------------
# apply / refresh
# ---------------------------------------------------------------------------------------------------------------------


def test_apply_rezeroes_pruned_weights():
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    kept = {n: pruner.parameter(n).detach()[k].clone() for n, k in pruner.masks.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.masked_fill_(p == 0, 3.0)
    pruner.apply()
    assert_pruned_are_zero(pruner)
    for name, keep in pruner.masks.items():
        assert torch.equal(pruner.parameter(name).detach()[keep], kept[name])


def test_refresh_rebuilds_caches_after_parameters_are_replaced():
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    pruner.apply()  # caches (parameter, multiplier) pairs
    net[2].weight = nn.Parameter(torch.ones(12, 16))
    pruner.refresh()
    pruner.apply()
    keep = pruner.masks["2.weight"]
    assert (net[2].weight.detach()[~keep] == 0).all()
    assert (net[2].weight.detach()[keep] == 1).all()


def test_refresh_keeps_masks_on_parameter_device():
    pruner = Pruner(make_net())
    pruner.prune("fraction", 0.5)
    before = pruner_state(pruner)
    pruner.refresh()
    assert_same_pruner_state(pruner_state(pruner), before)
    assert all(m.device == pruner.parameter(n).device for n, m in pruner.masks.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_refresh_moves_masks_with_the_model_to_gpu():
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    cpu_masks = {n: m.clone() for n, m in pruner.masks.items()}
    net.cuda()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pruner.refresh()
    assert all(m.device.type == "cuda" for m in pruner.masks.values())
    pruner.attach(optimizer)
    for _ in range(3):
        optimizer.zero_grad()
        net(torch.randn(8, 8, device="cuda")).pow(2).sum().backward()
        optimizer.step()
    assert_pruned_are_zero(pruner)
    state = pruner.state_dict()
    assert all(m.device.type == "cpu" for m in state["masks"].values())
    assert_same_tensors(state["masks"], cpu_masks)
    pruner.prune("global", 0.7)
    assert_pruned_are_zero(pruner)
    assert all(m.device.type == "cuda" for m in pruner.masks.values())


# ---------------------------------------------------------------------------------------------------------------------
# selected, counts, set_masks, the enforcer
# ---------------------------------------------------------------------------------------------------------------------


def test_selected_and_counts():
    net = make_net()
    pruner = Pruner(net, ["2", "4"], include_bias=True)
    assert list(pruner.selected()) == ["2.weight", "2.bias", "4.weight", "4.bias"]
    assert pruner.selected()["2.weight"] is net[2].weight
    assert pruner.counts() == (192 + 12 + 48 + 4, 192 + 12 + 48 + 4)
    pruner.prune("fraction", 0.5)
    assert pruner.counts() == (96 + 6 + 24 + 2, 256)
    assert pruner.sparsity() == pytest.approx(128 / 256)


def test_set_masks_applies_copies_and_zeroes_optimizer_state():
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    pruner = Pruner(net)
    pruner.attach(optimizer)
    train_steps(net, optimizer, 2)
    keep = torch.rand(12, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    pruner.set_masks({"2.weight": keep})
    assert set(pruner.masks) == {"2.weight"} and torch.equal(pruner.masks["2.weight"], keep)
    assert pruner.masks["2.weight"] is not keep
    keep.fill_(False)  # the pruner holds its own copy
    assert pruner.masks["2.weight"].any()
    assert (net[2].weight.detach()[~pruner.masks["2.weight"]] == 0).all()
    assert (optimizer.state[net[2].weight]["momentum_buffer"][~pruner.masks["2.weight"]] == 0).all()
    train_steps(net, optimizer, 2)
    assert_pruned_are_zero(pruner)


@pytest.mark.parametrize(
    ("masks", "match"),
    [
        ({"0.bias": torch.ones(16, dtype=torch.bool)}, r"The masks include '0.bias', which is not among the pruned"),
        ({"2.weight": torch.ones(16, 12, dtype=torch.bool)}, r"has shape \(16, 12\) and dtype torch.bool; the param"),
        ({"2.weight": torch.ones(12, 16, dtype=torch.uint8)}, r"dtype torch.uint8.*a bool mask is expected"),
    ],
)
def test_set_masks_refusals_change_nothing(masks, match):
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.3)
    model_before, state_before = snapshot(net), pruner_state(pruner)
    with pytest.raises(ValueError, match=match):
        pruner.set_masks({"0.weight": torch.zeros(16, 8, dtype=torch.bool), **masks})
    assert_same_tensors(snapshot(net), model_before)
    assert_same_pruner_state(pruner_state(pruner), state_before)


def test_pruner_shares_its_masks_with_its_enforcer():
    net = make_net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05)
    pruner = Pruner(net)
    pruner.attach(optimizer)
    assert pruner.enforcer.masks is pruner.masks
    assert pruner.enforcer.optimizers == [optimizer]
    assert pruner.enforcer.pairs(optimizer) == []  # nothing pruned yet
    pruner.prune("fraction", 0.5, layers=["0", "4"])
    pairs = pruner.enforcer.pairs(optimizer)
    assert [p for p, _ in pairs] == [net[0].weight, net[4].weight]  # the cache was invalidated by the prune
    pruner.detach()
    assert pruner.enforcer.optimizers == []


# ---------------------------------------------------------------------------------------------------------------------
# the criterion's hooks: floor and check_weights
# ---------------------------------------------------------------------------------------------------------------------


def test_floor_hook_widens_decisions_and_the_result_is_checked_and_intersected():
    seen = {}

    class RowFloor(Fraction):
        def floor(self, weights, keeps, decided, min_remaining, context):
            seen.update(min_remaining=min_remaining, names=sorted(decided))
            return {name: torch.ones_like(keep) for name, keep in decided.items()}  # keeps everything

    pruner = Pruner(make_net())
    pruner.prune("fraction", 0.5)
    before = {n: k.clone() for n, k in pruner.masks.items()}
    pruner.prune(RowFloor(amount=0.9, min_remaining=0.2))
    assert seen == {"min_remaining": 0.2, "names": sorted(WEIGHTS)}
    for name, keep in before.items():
        assert torch.equal(pruner.masks[name], keep), name  # widened to all, then cut back to the old masks


def test_floor_hook_that_misses_a_parameter_or_empties_one_is_refused():
    class Missing(Fraction):
        def floor(self, weights, keeps, decided, min_remaining, context):
            return {"0.weight": decided["0.weight"]}

    class Empty(Fraction):
        def floor(self, weights, keeps, decided, min_remaining, context):
            return {name: torch.zeros_like(keep) for name, keep in decided.items()}

    pruner = Pruner(make_net())
    state = pruner_state(pruner)
    with pytest.raises(
        ValueError, match=r"Missing\(.*\)\.floor must return a mask for each of \['0.weight', '2.weight'"
    ):
        pruner.prune(Missing(amount=0.5, min_remaining=0.1))
    with pytest.raises(PruningError, match=r"would remove every connection of '0\.weight'"):
        pruner.prune(Empty(amount=0.5, min_remaining=0.1))
    assert_same_pruner_state(pruner_state(pruner), state)


def test_check_weights_hook_sees_the_targets_and_can_refuse_before_anything_changes():
    class Picky(Fraction):
        def check_weights(self, weights, layer_of):
            if "2.weight" in weights:
                raise ValueError(f"no, not {layer_of['2.weight']!r}")

    pruner = Pruner(make_net())
    with pytest.raises(ValueError, match="no, not '2'"):
        pruner.prune(Picky(amount=0.5))
    assert pruner.masks == {}
    pruner.prune(Picky(amount=0.5), layers=["0", "4"])
    assert set(pruner.masks) == {"0.weight", "4.weight"}
