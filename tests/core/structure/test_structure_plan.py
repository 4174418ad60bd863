"""Planning: which units are dead, which fold, which stay and why; the fixed point; masks."""

import pytest
import torch
from structure_cases import _apply, _assert_untouched, _conv_bn, _gen, _mlp, _random_masks, _randomize, _snapshot
from torch import nn

from lightning_prune.core.structure import (
    find_dead_units,
    remove_dead_units,
    shapes,
)


def test_mlp_without_masks_uses_zeros():
    model = _randomize(_mlp(nn.Tanh)).eval()
    masks = _random_masks(model, 0.2, seed=3)
    masks["0.weight"][[1, 2]] = False
    masks["2.weight"][:, 4] = False
    _apply(model, masks)
    x = torch.randn(16, 784, generator=_gen(2))
    expected = model(x)
    with_masks = find_dead_units(model, x, masks)
    report = remove_dead_units(model, x)
    assert report.masks is None
    assert report.plan.layers["0"].remove == with_masks.layers["0"].remove == (1, 2, 4)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_alive_zero_weights_are_not_dead_when_masks_say_alive():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        model[0].weight[1] = 0
    masks = {"0.weight": torch.ones(3, 4, dtype=torch.bool)}  # zero, but alive: it may grow back
    assert find_dead_units(model, torch.randn(2, 4), masks).layers["0"].remove == ()
    assert find_dead_units(model, torch.randn(2, 4)).layers["0"].remove == (1,)


def test_find_dead_units_changes_nothing_and_restores_train_flags():
    model = _randomize(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2)))
    with torch.no_grad():
        model[0].weight[2] = 0
    model.train()
    snap = _snapshot(model)
    plan = find_dead_units(model, torch.randn(4, 6))
    assert plan.layers["0"].remove == (2,)
    assert plan.removable == 1
    assert model.training and model[1].training
    _assert_untouched(model, snap)
    assert "0" in str(plan) and "removable" in str(plan)


def test_conv_with_padding_keeps_nonzero_constants_and_folds_zero_ones():
    model = _randomize(_conv_bn(1)).eval()
    with torch.no_grad():
        model[0].weight[[1, 4]] = 0
        model[0].bias[1] = 0
        bn = model[1]
        bn.running_mean[1], bn.bias[1] = 0.0, -3.0  # relu(negative) = 0: folds exactly even with padding
        bn.running_mean[4], bn.bias[4] = 0.0, 2.0  # relu(2) = 2: border effects, must be kept
    x = torch.randn(2, 3, 10, 10, generator=_gen(1))
    expected = model(x)
    plan = find_dead_units(model, x)
    assert plan.layers["0"].remove == (1,)
    assert plan.layers["0"].kept == (4,)
    assert "padding" in plan.layers["0"].reason and "no bias" not in plan.layers["0"].reason
    with pytest.raises(ValueError, match=r"'0'.*padding"):
        remove_dead_units(model, x, strict=True)
    remove_dead_units(model, x)
    assert model[0].out_channels == 7
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_consumer_without_bias_keeps_nonzero_constants():
    model = _randomize(nn.Sequential(nn.Linear(5, 4), nn.Sigmoid(), nn.Linear(4, 3, bias=False))).eval()
    with torch.no_grad():
        model[0].weight[0] = 0  # sigmoid(b) != 0, nowhere to fold it
        model[2].weight[:, 1] = 0  # unused: removable without a bias
    plan = find_dead_units(model, torch.randn(2, 5))
    assert plan.layers["0"].remove == (1,)
    assert plan.layers["0"].kept == (0,)
    assert "no bias" in plan.layers["0"].reason


def test_fixed_point_propagates_forward_and_backward():
    model = _randomize(nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))).eval()
    with torch.no_grad():
        # forward: fc1 unit 2 has no input; fc2 unit 0 reads only fc1 unit 2 -> constant after the fold
        model[0].weight[2] = 0
        model[2].weight[0] = 0
        model[2].weight[0, 2] = 0.7
        # backward: fc3 never reads fc2 unit 1; fc1 unit 3 feeds only fc2 unit 1 -> unused once it goes
        model[4].weight[:, 1] = 0
        model[2].weight[:, 3] = 0
        model[2].weight[1, 3] = -0.4
    x = torch.randn(10, 6, generator=_gen(4))
    expected = model(x)
    report = remove_dead_units(model, x)
    assert set(report.plan.layers["0"].remove) == {2, 3}
    assert set(report.plan.layers["2"].remove) == {0, 1}
    assert shapes(model) == {"0": [3, 6], "2": [2, 3], "4": [3, 2]}
    assert torch.allclose(model(x), expected, atol=1e-5)
    # nothing left to do
    assert find_dead_units(model, x).removable == 0


def test_layer_never_becomes_empty():
    model = _randomize(nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))).eval()
    with torch.no_grad():
        model[0].weight.zero_()
    x = torch.randn(5, 4)
    expected = model(x)
    report = remove_dead_units(model, x)
    assert model[0].out_features == 1
    assert len(report.plan.layers["0"].kept) == 1
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_bad_masks_are_rejected():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'nope\.weight'"):
        find_dead_units(model, torch.randn(1, 4), {"nope.weight": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 3\)"):
        find_dead_units(model, torch.randn(1, 4), {"0.weight": torch.ones(4, 3, dtype=torch.bool)})
