"""Tracing the dataflow: unsupported topologies and untraceable models are refused, with the reason."""

import pytest
import torch
from structure_cases import _assert_untouched, _randomize, _snapshot
from torch import nn

from lightning_prune.core.structure import (
    find_dead_units,
    remove_dead_units,
)


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
