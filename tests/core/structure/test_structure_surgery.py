"""Surgery: the smaller model computes the same function, masks follow, resizing validates first."""

import copy
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from structure_cases import (
    LeNet5,
    LeNet5Modules,
    _apply,
    _assert_untouched,
    _conv_bn,
    _gen,
    _mlp,
    _random_masks,
    _randomize,
    _snapshot,
)
from torch import nn

from lightning_prune.core.structure import (
    remove_dead_units,
    resize_to,
    shapes,
)


@pytest.mark.parametrize("act", [nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU])
def test_mlp_removal_is_exact_and_masks_follow(act):
    model = _randomize(_mlp(act)).eval()
    masks = _random_masks(model, 0.3)
    masks["4.weight"] = torch.rand(10, 100, generator=_gen(7)) < 0.8  # no accidental all-pruned columns
    masks["0.weight"][[3, 10, 200]] = False  # fc1 units with no input: constant act(bias)
    masks["2.weight"][:, [5, 17]] = False  # fc1 units with no output
    masks["2.weight"][[0, 50]] = False  # fc2 units with no input
    masks["4.weight"][:, [7, 8, 9]] = False  # fc2 units with no output
    _apply(model, masks)
    original = copy.deepcopy(model)
    x = torch.randn(64, 784, generator=_gen(1))
    expected = model(x)

    report = remove_dead_units(model, x, masks)

    plan = report.plan.layers
    assert set(plan["0"].remove) == {3, 10, 200, 5, 17}
    assert set(plan["0"].folded) == {3, 10, 200}
    assert set(plan["2"].remove) == {0, 50, 7, 8, 9}
    assert plan["4"].status == "output"
    assert shapes(model) == {"0": [295, 784], "2": [95, 295], "4": [10, 95]}
    assert torch.allclose(model(x), expected, atol=1e-5)
    # kept rows/columns are the original values, bit for bit; masks restricted the same way
    rows = [i for i in range(300) if i not in {3, 10, 200, 5, 17}]
    assert torch.equal(model[0].weight, original[0].weight[rows])
    assert torch.equal(model[0].bias, original[0].bias[rows])
    assert torch.equal(report.masks["0.weight"], masks["0.weight"][rows])
    assert report.masks["2.weight"].shape == model[2].weight.shape
    assert report.masks["4.weight"].shape == model[4].weight.shape
    assert report.parameters_after < report.parameters_before
    assert report.changes["0"].old_shape == (300, 784)
    assert report.changes["0"].new_shape == (295, 784)
    assert report.changes["2"].removed_inputs == 5


def test_batchnorm1d_between_linears():
    model = _randomize(nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 2))).eval()
    with torch.no_grad():
        model[0].weight[2] = 0
        model[3].weight[:, 4] = 0
    x = torch.randn(8, 6)
    expected = model(x)
    report = remove_dead_units(model, x)
    assert model[1].num_features == 3
    assert report.changes["1"].new_shape == (3,)
    assert torch.allclose(model(x), expected, atol=1e-5)


def test_conv_bn_relu_conv_padding_zero_is_exact():
    model = _randomize(_conv_bn(0)).eval()
    with torch.no_grad():
        model[0].weight[[1, 4]] = 0  # constant channels: BN(bias) -> relu -> folded into conv2's bias
        model[3].weight[:, 6] = 0  # channel 6 unused
    x = torch.randn(4, 3, 12, 12, generator=_gen(0))
    expected = model(x)
    report = remove_dead_units(model, x)
    assert set(report.plan.layers["0"].remove) == {1, 4, 6}
    assert set(report.plan.layers["0"].folded) == {1, 4}
    assert model[0].weight.shape == (5, 3, 3, 3)
    assert model[1].num_features == 5
    assert model[3].weight.shape == (6, 5, 3, 3)
    assert torch.allclose(model(x), expected, atol=1e-5)


@pytest.mark.parametrize("cls", [LeNet5, LeNet5Modules])
def test_lenet5_conv_pool_flatten_linear(cls):
    model = _randomize(cls()).eval()
    masks = _random_masks(model, 0.25, seed=5)
    names = list(masks)  # conv1, conv2, fc1, fc2 weights in module order
    masks[names[1]][[0, 7, 33]] = False  # conv2 channels with no input
    fc1_mask = masks[names[2]].view(500, 50, 16)
    fc1_mask[:, [2, 40]] = False  # conv2 channels whose 16 features are never read
    masks[names[0]][[3]] = False  # conv1 channel with no input (folded into conv2's bias, padding 0)
    masks[names[3]][:, [10, 11]] = False  # fc1 units with no output
    _apply(model, masks)
    x = torch.randn(8, 1, 28, 28, generator=_gen(3))
    expected = model(x)
    report = remove_dead_units(model, x, masks)
    layers = report.plan.layers
    conv1, conv2, fc1, fc2 = (n.rsplit(".", 1)[0] for n in names)
    assert layers[conv1].consumer == conv2 and layers[conv2].consumer == fc1 and layers[fc1].consumer == fc2
    assert set(layers[conv2].remove) >= {0, 7, 33, 2, 40}
    assert set(layers[fc1].remove) >= {10, 11}
    assert 3 in layers[conv1].remove
    kept_channels = 50 - len(layers[conv2].remove)
    assert model.get_submodule(fc1).in_features == kept_channels * 16
    assert torch.allclose(model(x), expected, atol=1e-5)
    for name, keep in report.masks.items():
        assert keep.shape == model.get_parameter(name).shape


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    density=st.floats(0.0, 0.6),
    sizes=st.lists(st.integers(1, 8), min_size=3, max_size=5),
    act=st.sampled_from([nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Identity]),
)
def test_random_mlps_stay_exact(seed, density, sizes, act):
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), act()]
    model = _randomize(nn.Sequential(*layers[:-1]), seed).eval()
    masks = _random_masks(model, density, seed)
    _apply(model, masks)
    x = torch.randn(7, sizes[0], generator=_gen(seed))
    expected = model(x)
    report = remove_dead_units(model, x, masks)
    assert torch.allclose(model(x), expected, atol=1e-5)
    for name, keep in report.masks.items():
        assert keep.shape == model.get_parameter(name).shape


def test_resize_to_validates_before_changing():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2))
    snap = _snapshot(net)
    with pytest.raises(ValueError, match=r"Conv2d '0' must be \[out, in, 3, 3\]"):
        resize_to(net, {"3": [2, 18], "0": [2, 1, 5, 5]})
    with pytest.raises(ValueError, match="'9'"):
        resize_to(net, {"9": [1]})
    _assert_untouched(net, snap)
    assert resize_to(net, {"0": [2, 1, 3, 3], "1": [2], "3": [2, 18]}) == ["0", "1", "3"]
    assert net(torch.randn(1, 1, 5, 5)).shape == (1, 2)


def test_pruner_masks_follow_the_shrunk_model():
    from lightning_prune.core.pruner import Pruner

    torch.manual_seed(0)
    model = _randomize(_mlp(nn.ReLU)).eval()
    pruner = Pruner(model, include_bias=True)
    pruner.prune("fraction", 0.9)
    with torch.no_grad():  # make some units dead both ways, through the pruner's masks
        pruner.masks["0.weight"][[4, 5]] = False
        pruner.masks["2.weight"][:, 9] = False
    pruner.apply()
    x = torch.randn(32, 784)
    expected = model(x)
    report = remove_dead_units(model, x, pruner.masks)
    assert report.plan.removable >= 3
    pruner.masks = report.masks
    pruner.refresh()
    pruner.apply()
    assert torch.allclose(model(x), expected, atol=1e-5)
    stats = {s.name: s for s in pruner.stats()}
    assert stats["0.weight"].shape == tuple(model[0].weight.shape)
