"""DropoutControl: dropout rates adjusted after each prune, with the links traced once in the first batch."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lightning_prune.dropout import DropoutControl

ONE_PROCESS = SimpleNamespace(world_size=1)


class OddOrder(nn.Module):
    """Registers its dropout first; forward runs fc1 -> drop -> fc2 (``F.dropout`` too if ``functional``)."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.drop = nn.Dropout(0.4)
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        h = self.drop(torch.relu(self.fc1(x)))
        if self.functional:
            h = nn.functional.dropout(h, 0.3, self.training)
        return self.fc2(h)


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_links_are_traced_once_from_the_forward_order():
    model = OddOrder()
    control = DropoutControl(model, None)
    assert control.adjuster.links == {"drop": ["fc1"]} and control.adjuster.source == "static" and not control.traced
    control.begin_trace()
    control.begin_trace()  # a second call in the same batch does nothing
    model(torch.randn(2, 12))
    assert control.end_trace(ONE_PROCESS)
    assert control.traced and hooks(model) == 0
    assert control.adjuster.links == {"drop": ["fc2"]} and control.adjuster.source == "traced"
    control.begin_trace()  # traced already: the next batches are not traced
    model(torch.randn(2, 12))
    assert not control.end_trace(ONE_PROCESS) and hooks(model) == 0


def test_explicit_links_win_over_traced_ones():
    model = OddOrder()
    control = DropoutControl(model, {"drop": "fc1"})
    control.begin_trace()
    model(torch.randn(2, 12))
    control.end_trace(ONE_PROCESS)
    assert control.adjuster.links == {"drop": ["fc1"]}


def test_functional_dropout_is_warned_about():
    model = OddOrder(functional=True)
    control = DropoutControl(model, None)
    control.begin_trace()
    model(torch.randn(2, 12))
    with pytest.warns(UserWarning, match=r"calls dropout functionally .*1 call\(s\) in one step"):
        control.end_trace(ONE_PROCESS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        control.begin_trace()
        model(torch.randn(2, 12))
        control.end_trace(ONE_PROCESS)  # once: no trace, no warning


def test_close_inside_the_traced_batch_removes_the_hooks():
    model = OddOrder()
    control = DropoutControl(model, None)
    control.begin_trace()
    assert hooks(model) > 0
    control.close()
    assert hooks(model) == 0 and not control.traced and not control.end_trace(ONE_PROCESS)
    control.close()  # idempotent


def test_rates_follow_the_formula_and_the_state_round_trips():
    model = OddOrder()
    control = DropoutControl(model, None)
    control.begin_trace()
    model(torch.randn(2, 12))
    control.end_trace(ONE_PROCESS)
    rates = control.apply({"fc1": (100, 384), "fc2": (24, 96)})
    assert rates == {"drop": pytest.approx(0.4 * math.sqrt(24 / 96))} and model.drop.p == rates["drop"]
    state = control.state_dict()
    assert state == {
        "original": {"drop": 0.4},
        "current": {"drop": rates["drop"]},
        "links": {"drop": ["fc2"]},
        "source": "traced",
        "traced": True,
    }
    fresh_model = OddOrder()
    fresh = DropoutControl(fresh_model, None)
    fresh.load_state_dict(state)
    assert fresh.traced and fresh_model.drop.p == rates["drop"]
    assert fresh.adjuster.links == {"drop": ["fc2"]} and fresh.adjuster.original == {"drop": 0.4}
    fresh.begin_trace()  # restored as traced: not traced again
    assert hooks(fresh_model) == 0
    assert fresh.apply({"fc2": (96, 96)}) == {"drop": 0.4}  # the original rate is the base, not the current one
