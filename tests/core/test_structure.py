import copy
import itertools
import json
import struct
import time

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from lightning_prune.core.export import SparseFormatError, _seal
from lightning_prune.core.structure import (
    find_dead_units,
    load_shrunk,
    remove_dead_units,
    resize_to,
    save_shrunk,
    shapes,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Nonzero biases everywhere, random BatchNorm statistics (so constants are not trivially zero)."""
    gen = _gen(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.5)
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                n = module.num_features
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(n, generator=gen))
                module.running_mean.copy_(torch.randn(n, generator=gen))
                module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model


def _random_masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = _gen(seed)
    return {
        f"{name}.weight": torch.rand(module.weight.shape, generator=gen) < density
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d))
    }


def _apply(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, keep in masks.items():
            model.get_parameter(name).mul_(keep)


def _snapshot(model: nn.Module):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [(n, type(m), id(m)) for n, m in model.named_modules()],
    )


def _assert_untouched(model: nn.Module, snapshot) -> None:
    state, modules = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert torch.equal(now[key], value), key
    assert [(n, type(m), id(m)) for n, m in model.named_modules()] == modules


def _mlp(act: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    return nn.Sequential(nn.Linear(784, 300), act(), nn.Linear(300, 100), act(), nn.Linear(100, 10))


class LeNet5(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(800, 500)
        self.fc2 = nn.Linear(500, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(x.size(0), -1)
        return self.fc2(F.relu(self.fc1(x)))


class LeNet5Modules(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 20, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(20, 50, 5), nn.ReLU(), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(800, 500), nn.ReLU(), nn.Dropout(0.5), nn.Linear(500, 10)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------------------------------------------------
# Linear -> Linear
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Conv2d
# ---------------------------------------------------------------------------------------------------------------------


def _conv_bn(padding: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3, padding=padding), nn.Flatten()
    )


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


# ---------------------------------------------------------------------------------------------------------------------
# Fixed point
# ---------------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------------------------------------------------


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        y = self.fc1(x)
        return self.head(torch.relu(self.fc2(torch.relu(y)) + y))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(14, 3)

    def forward(self, x):
        return self.fc2(torch.cat([torch.relu(self.fc1(x)), x], dim=1))


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc2(h))
        h = torch.relu(self.fc2(h))
        return self.head(h)


class ReturnsHidden(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(torch.tanh(h)), h


class Softmaxed(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), dim=1))


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc2.weight = self.fc1.weight

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _kill(layer: nn.Linear, rows=(1, 3), cols=(2,)) -> None:
    with torch.no_grad():
        layer.weight[list(rows)] = 0


@pytest.mark.parametrize(
    ("cls", "layer", "reason"),
    [
        (Residual, "fc1", "operator.add"),
        (Concat, "fc1", "torch.cat"),
        (Shared, "fc1", "called 2 times"),
        (Shared, "fc2", "called 2 times"),
        (ReturnsHidden, "fc1", "2 users"),
        (Softmaxed, "fc1", "softmax"),
        (Tied, "fc1", "shares its parameter"),
    ],
)
def test_unsupported_topologies_are_refused_and_untouched(cls, layer, reason):
    model = _randomize(cls()).eval()
    _kill(model.get_submodule(layer))
    x = torch.randn(4, 8)
    snap = _snapshot(model)
    expected = model(x)
    plan = find_dead_units(model, x)
    assert plan.layers[layer].status == "refused"
    assert reason in plan.layers[layer].reason
    assert plan.layers[layer].kept == (1, 3)
    assert layer in plan.blocking
    report = remove_dead_units(model, x)
    assert report.changes == {}
    _assert_untouched(model, snap)
    out = model(x)
    pairs = zip(out, expected, strict=True) if isinstance(out, tuple) else [(out, expected)]
    assert all(torch.equal(a, b) for a, b in pairs)
    with pytest.raises(ValueError, match=rf"Layer '{layer}'.*{reason}"):
        remove_dead_units(model, x, strict=True)
    _assert_untouched(model, snap)


def test_residual_block_supported_part_is_still_removed():
    model = _randomize(Residual()).eval()
    with torch.no_grad():
        model.fc2.weight[:, 5] = 0  # fc1 unit 5 unused by fc2, but still read by the residual add
        model.fc2.weight[2] = 0  # fc2 unit 2 constant, but its output goes into the add
    plan = find_dead_units(model, torch.randn(3, 8))
    assert plan.removable == 0
    assert plan.layers["fc2"].status == "refused" and plan.layers["fc2"].kept == (2,)


def test_untraceable_model_is_refused_with_reason():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc2(self.fc1(x))
            return self.fc2(torch.relu(self.fc1(x)))

    model = Branchy()
    _kill(model.fc1)
    plan = find_dead_units(model, torch.randn(2, 4))
    assert all(p.status == "refused" for p in plan.layers.values())
    assert "torch.fx could not trace" in plan.layers["fc1"].reason
    with pytest.raises(ValueError, match="fc1"):
        remove_dead_units(model, torch.randn(2, 4), strict=True)


def test_bad_masks_are_rejected():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'nope\.weight'"):
        find_dead_units(model, torch.randn(1, 4), {"nope.weight": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"'0.weight' has shape \(4, 3\)"):
        find_dead_units(model, torch.randn(1, 4), {"0.weight": torch.ones(4, 3, dtype=torch.bool)})


# ---------------------------------------------------------------------------------------------------------------------
# Shrunk checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def test_save_and_load_shrunk_into_a_fresh_model(tmp_path, monkeypatch):
    model = _randomize(LeNet5Modules()).eval()
    masks = _random_masks(model, 0.2, seed=9)
    masks["features.3.weight"][[1, 2, 3]] = False
    masks["classifier.4.weight"][:, [0, 1]] = False
    _apply(model, masks)
    x = torch.randn(4, 1, 28, 28)
    remove_dead_units(model, x, masks)
    expected = model(x)
    path = tmp_path / "shrunk.safetensors"

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    save_shrunk(model, path)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert meta["format"] == "lightning_prune.shrunk"
        assert set(handle.keys()) == set(model.state_dict())
    fresh = LeNet5Modules().eval()
    resized = load_shrunk(fresh, path)
    assert set(resized) == {n for n, s in shapes(model).items() if s != shapes(LeNet5Modules())[n]}
    assert shapes(fresh) == shapes(model)
    assert torch.equal(fresh(x), expected)


def test_load_shrunk_mismatch_leaves_model_untouched(tmp_path):
    small = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
    path = tmp_path / "m.safetensors"
    save_shrunk(small, path)
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"lacks '4\.weight'"):
        load_shrunk(other, path)
    _assert_untouched(other, snap)
    with pytest.raises(ValueError, match="not a shrunk checkpoint"):
        from safetensors.torch import save_file

        save_file({"a": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
        load_shrunk(small, tmp_path / "plain.safetensors")


def _shrunk_pair(tmp_path):
    """A small model saved shrunk, its file bytes, and a fresh full-size model with its snapshot."""
    small = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 3))
    path = tmp_path / "m.safetensors"
    save_shrunk(small, path)
    fresh = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    return path, path.read_bytes(), fresh, _snapshot(fresh)


def _resealed(data: bytes, edit) -> bytes:
    """Edit the parsed safetensors header, rebuild the file and re-compute its checksum."""
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return _seal(struct.pack("<Q", len(text)) + text + data[8 + size :])


def _record_edit(change):
    def edit(header):
        record = json.loads(header["__metadata__"]["shapes"])
        change(record)
        header["__metadata__"]["shapes"] = json.dumps(record)

    return edit


def test_load_shrunk_verifies_the_file_first(tmp_path):
    path, data, fresh, snap = _shrunk_pair(tmp_path)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 4  # in the header: a shape digit, a name or the JSON
    path.write_bytes(bytes(flipped))
    with pytest.raises(SparseFormatError, match=r"Shrunk checkpoint '.*m\.safetensors': checksum mismatch"):
        load_shrunk(fresh, path)
    path.write_bytes(data[: len(data) - 3])
    with pytest.raises(SparseFormatError, match="checksum mismatch"):
        load_shrunk(fresh, path)

    def to_v1(header):
        header["__metadata__"].update(version="1")
        del header["__metadata__"]["sha256"]

    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    to_v1(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])
    with pytest.raises(SparseFormatError, match=r"version '1'.*cannot be verified.*save_shrunk\(\)"):
        load_shrunk(fresh, path)
    _assert_untouched(fresh, snap)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update({"3": [2**20, 2**20]}), "larger than the file"),
        (lambda r: r.update({"3": [3, 200]}), r"gives '3' as \[3, 200\], but '3\.weight' is \[3, 2\]"),
        (lambda r: r.update({"0": [4, 2]}), r"gives '0' as \[4, 2\], but '0\.weight' is \[2, 4\]"),
        (lambda r: r.update({"1": [7]}), r"gives '1' as \[7\], but '1\.weight' is \[2\]"),
        (lambda r: r.update({"0": [2, 4.0]}), "not 1 to 4 positive ints"),
        (lambda r: r.update({"0": [True, 4]}), "not 1 to 4 positive ints"),
        (lambda r: r.update({"0": [-2, 4]}), "not 1 to 4 positive ints"),
        (lambda r: r.update({"0": "[2, 4]"}), "not 1 to 4 positive ints"),
    ],
)
def test_load_shrunk_checks_the_record_against_the_file_before_building(tmp_path, change, message):
    path, data, fresh, snap = _shrunk_pair(tmp_path)
    path.write_bytes(_resealed(data, _record_edit(change)))
    start = time.perf_counter()
    with pytest.raises(SparseFormatError, match=message) as info:
        load_shrunk(fresh, path)
    assert time.perf_counter() - start < 1.0 and "m.safetensors" in str(info.value)
    _assert_untouched(fresh, snap)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda h: h["__metadata__"].update(shapes="[" * 50_000 + "]" * 50_000), SparseFormatError, "RecursionError"),
        (lambda h: h["__metadata__"].update(shapes='{"0": Infinity}'), SparseFormatError, "non-finite number"),
        (lambda h: h["__metadata__"].update(shapes="[]"), SparseFormatError, "must be a JSON object"),
        (lambda h: h["__metadata__"].update(shapes='{"0": [2, 4], "0": [2, 4]}'), SparseFormatError, "duplicate"),
        (lambda h: h["__metadata__"].update(format="lightning_prune.sparse"), ValueError, "not a shrunk checkpoint"),
        (lambda h: h["__metadata__"].update(extra="1"), SparseFormatError, "the metadata holds"),
        (lambda h: h.update({"3.weight": {**h["3.weight"], "dtype": "I32"}}), ValueError, "does not fit.*int32"),
        (lambda h: h.update({"3.weight": {**h["3.weight"], "shape": [2, 3]}}), SparseFormatError, "is \\[2, 3\\]"),
        (_record_edit(lambda r: r.update({"9": [2]})), ValueError, "does not fit.*module '9'"),
        (_record_edit(lambda r: r.pop("0")), ValueError, "does not fit.*'0.weight' has shape"),
    ],
)
def test_load_shrunk_malformed_or_misfit_files_leave_the_model_untouched(tmp_path, edit, error, message):
    path, data, fresh, snap = _shrunk_pair(tmp_path)
    path.write_bytes(_resealed(data, edit))
    with pytest.raises(error, match=message) as info:
        load_shrunk(fresh, path)
    assert "m.safetensors" in str(info.value)
    _assert_untouched(fresh, snap)


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
    from lightning_prune.core.pruner import MagnitudePruner

    torch.manual_seed(0)
    model = _randomize(_mlp(nn.ReLU)).eval()
    pruner = MagnitudePruner(model, include_bias=True)
    pruner.prune("fraction", amount=0.9)
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
