"""The helpers structure and sensitivity share: eval mode by module name, tracing, comparing outputs."""

import math
import re

import pytest
import torch
from torch import fx, nn

from lightning_prune.core.tracing import describe_error, eval_mode, outputs_match, trace


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules(remove_duplicate=False)}


def test_eval_mode_restores_every_flag_by_module_name():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Sequential(nn.Dropout(), nn.ReLU())).train()
    net[1].eval()
    net[2][0].eval()
    before = _modes(net)
    with eval_mode(net):
        assert not any(_modes(net).values())
    assert _modes(net) == before


def test_eval_mode_gives_swapped_in_modules_the_flags_of_those_they_replace():
    net = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout()).train()
    net[2].eval()
    with eval_mode(net):
        net[1] = nn.BatchNorm1d(2).eval()  # replaces a module in train mode
        net[2] = nn.Dropout().train()  # replaces a module in eval mode
        net.add_module("extra", nn.ReLU().eval())  # a new name: no flag to restore
    assert net.training and net[0].training and net[1].training
    assert not net[2].training
    assert not net.extra.training


def test_eval_mode_restores_on_errors_and_shared_modules_by_each_name():
    shared = nn.Linear(2, 2)
    net = nn.Sequential(shared, nn.ReLU(), shared).train()
    with pytest.raises(RuntimeError, match="inside"), eval_mode(net):
        assert not shared.training
        raise RuntimeError("inside")
    assert net.training and shared.training


def test_trace_returns_the_graph_or_the_reason():
    assert isinstance(trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU())), fx.GraphModule)

    class Branchy(nn.Module):
        def forward(self, x):
            if x.sum() > 0:
                return x
            return -x

    reason = trace(Branchy())
    assert isinstance(reason, str) and reason.startswith("TraceError: ") and "\n" not in reason
    assert describe_error(RuntimeError("a\nb")) == "RuntimeError: a b"


def test_outputs_match_on_nested_outputs():
    def output(scale=1.0, label=3, ids=(1, 2)):
        return {
            "logits": torch.tensor([[1.0, 2.0], [math.nan, 4.0]]) * scale,
            "aux": [torch.ones(3), (torch.tensor(ids), label, True)],
        }

    assert outputs_match(output(), output()) is None  # NaN equals NaN
    assert outputs_match(output(scale=1 + 1e-6), output()) is None  # within rtol 1e-4 and atol 1e-5
    assert outputs_match(output(scale=1.01), output()) == "output['logits'] differs by up to 0.04"  # the NaN is equal
    assert outputs_match(output(ids=(1, 3)), output()) == "output['aux'][1][0] differs"
    assert outputs_match(output(label=4), output()) == "output['aux'][1][1] is 4 instead of 3"
    assert outputs_match((torch.ones(2), torch.ones(2)), [torch.ones(2), torch.ones(2)]) is None


@pytest.mark.parametrize(
    ("got", "want", "message"),
    [
        (torch.ones(2, 3), torch.ones(3, 2), r"output is \[2, 3\] torch.float32 instead of \[3, 2\] torch.float32"),
        (torch.ones(2), torch.ones(2, dtype=torch.float64), "torch.float32 instead of .* torch.float64"),
        (torch.ones(2), 1.0, "output is a Tensor instead of a float"),
        ((torch.ones(2),), (torch.ones(2), torch.ones(2)), "output has 1 items instead of 2"),
        ({"a": torch.ones(1)}, {"b": torch.ones(1)}, r"output has the keys \['a'\] instead of \['b'\]"),
        (torch.tensor([1, 2]), torch.tensor([1, 2]).float(), "torch.int64 instead of"),
        (True, 1.5, "output is True instead of 1.5"),
    ],
)
def test_outputs_match_names_the_first_difference(got, want, message):
    assert outputs_match(got, want) is not None
    assert re.search(message, outputs_match(got, want))


def test_outputs_match_uses_the_given_tolerances():
    a, b = torch.tensor([100.0]), torch.tensor([100.02])
    assert outputs_match(a, b) is not None
    assert outputs_match(a, b, rtol=1e-3) is None
    assert outputs_match(torch.tensor([0.0]), torch.tensor([1e-6])) is None
    assert outputs_match(torch.tensor([0.0]), torch.tensor([1e-6]), atol=0.0) is not None
