import math

import pytest
import torch
from torch import nn

from lightning_prune.core.regularization import (
    add_l1_gradient,
    groups_holding,
    params_without_optimizer,
    restore_weight_decay,
    set_weight_decay,
)

BAD_VALUES = [-1e-4, math.nan, math.inf, -math.inf, True, "0.1", None]


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))


def _grouped_sgd(net: nn.Sequential) -> torch.optim.SGD:
    """A decay group for the weights, a no-decay group for biases and the norm."""
    decay = [net[0].weight, net[2].weight]
    no_decay = [net[0].bias, net[1].weight, net[1].bias, net[2].bias]
    return torch.optim.SGD(
        [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], lr=0.1, momentum=0.9, weight_decay=5e-4
    )


# ---------------------------------------------------------------------------------------------------------------------
# add_l1_gradient
# ---------------------------------------------------------------------------------------------------------------------


def test_l1_gradient_is_l1_times_sign():
    w = torch.tensor([[1.5, -0.2], [0.0, 3.0]], requires_grad=True)
    w.grad = torch.tensor([[0.1, 0.1], [0.1, 0.1]])
    add_l1_gradient([w], 0.01)
    assert torch.allclose(w.grad, torch.tensor([[0.11, 0.09], [0.1, 0.11]]))


def test_l1_gradient_matches_autograd_of_l1_term():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 5))
    (w**2).sum().backward()
    ours = w.grad.clone()
    add_l1_gradient([w], 0.3)
    w.grad = None
    ((w**2).sum() + 0.3 * w.abs().sum()).backward()
    assert torch.allclose(w.grad, ours + 0.3 * torch.sign(w.detach()))


def test_l1_gradient_leaves_pruned_zeros_at_zero():
    w = nn.Parameter(torch.tensor([0.0, 2.0, 0.0, -1.0]))
    opt = torch.optim.SGD([w], lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        w.grad = torch.zeros(4)  # a masked gradient: nothing flows to the pruned entries
        add_l1_gradient([w], 0.1)
        opt.step()
    assert w[0].item() == 0.0 and w[2].item() == 0.0
    assert w[1].item() == pytest.approx(2.0 - 3 * 0.05)
    assert w[3].item() == pytest.approx(-1.0 + 3 * 0.05)


def test_l1_gradient_skips_params_without_grad_and_records_no_graph():
    a = nn.Parameter(torch.ones(2))
    b = nn.Parameter(torch.ones(2))
    b.grad = torch.zeros(2)
    add_l1_gradient(iter([a, b]), 1.0)  # any iterable, consumed once
    assert a.grad is None
    assert b.grad.tolist() == [1.0, 1.0]
    assert not b.grad.requires_grad


def test_l1_zero_leaves_gradients_bit_identical():
    w = nn.Parameter(torch.tensor([1.0, -1.0]))
    w.grad = torch.tensor([0.25, -0.5])
    add_l1_gradient([w], 0.0)
    assert w.grad.tolist() == [0.25, -0.5]


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_l1_validation(bad):
    with pytest.raises(ValueError, match=r"`l1` must be a finite number >= 0, got "):
        add_l1_gradient([], bad)


# ---------------------------------------------------------------------------------------------------------------------
# groups_holding / set_weight_decay / restore_weight_decay
# ---------------------------------------------------------------------------------------------------------------------


def test_groups_holding_by_identity():
    net = _net()
    opt = _grouped_sgd(net)
    assert groups_holding(opt, [net[0].weight]) == [0]
    assert groups_holding(opt, [net[1].weight]) == [1]
    assert groups_holding(opt, net.parameters()) == [0, 1]
    assert groups_holding(opt, [nn.Parameter(net[0].weight.detach().clone())]) == []  # equal values, other tensor


def test_set_weight_decay_changes_only_groups_holding_params():
    net = _net()
    opt = _grouped_sgd(net)
    previous = set_weight_decay(opt, [net[2].weight], 1e-3)
    assert previous == [5e-4, 0.0]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]


def test_set_weight_decay_can_turn_decay_off():
    net = _net()
    opt = _grouped_sgd(net)
    assert set_weight_decay(opt, [net[0].weight], 0) == [5e-4, 0.0]
    assert opt.param_groups[0]["weight_decay"] == 0.0


def test_set_weight_decay_on_a_no_decay_param_changes_that_group():
    net = _net()
    opt = _grouped_sgd(net)
    set_weight_decay(opt, [net[0].bias], 1e-2)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 1e-2]


def test_set_weight_decay_with_unheld_params_changes_nothing():
    net = _net()
    opt = torch.optim.SGD(net[0].parameters(), lr=0.1, weight_decay=1e-4)
    assert set_weight_decay(opt, net[2].parameters(), 1.0) == [1e-4]
    assert opt.param_groups[0]["weight_decay"] == 1e-4


def test_restore_weight_decay_round_trip_and_the_decay_takes_effect():
    net = _net()
    opt = _grouped_sgd(net)
    previous = set_weight_decay(opt, [net[0].weight], 0.5)
    w0 = net[0].weight.detach().clone()
    net[0].weight.grad = torch.zeros_like(w0)
    opt.step()
    assert torch.allclose(net[0].weight, w0 * (1 - 0.1 * 0.5))
    restore_weight_decay(opt, previous)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]


def test_set_weight_decay_works_with_adamw():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    assert set_weight_decay(opt, [net[0].weight], 0.0) == [0.01]
    assert opt.param_groups[0]["weight_decay"] == 0.0


@pytest.mark.parametrize("bad", BAD_VALUES)
def test_set_weight_decay_validation_changes_nothing(bad):
    net = _net()
    opt = _grouped_sgd(net)
    with pytest.raises(ValueError, match=r"`value` must be a finite number >= 0, got "):
        set_weight_decay(opt, [net[0].weight], bad)
    assert [g["weight_decay"] for g in opt.param_groups] == [5e-4, 0.0]


def test_set_weight_decay_names_optimizer_without_weight_decay():
    opt = torch.optim.SparseAdam([nn.Parameter(torch.ones(2))], lr=0.1)
    with pytest.raises(ValueError, match=r"group 0 of SparseAdam has no 'weight_decay'.*does not support weight decay"):
        set_weight_decay(opt, opt.param_groups[0]["params"], 1e-4)


def test_restore_weight_decay_length_mismatch_raises():
    net = _net()
    opt = _grouped_sgd(net)
    with pytest.raises(ValueError, match=r"`previous` holds 1 weight decay value\(s\) but SGD has 2 parameter group"):
        restore_weight_decay(opt, [1e-4])


# ---------------------------------------------------------------------------------------------------------------------
# params_without_optimizer
# ---------------------------------------------------------------------------------------------------------------------


def test_params_without_optimizer_across_optimizers():
    net = _net()
    named = dict(net.named_parameters())
    first = torch.optim.SGD([net[0].weight, net[0].bias], lr=0.1)
    second = torch.optim.Adam([{"params": [net[2].weight]}, {"params": [net[1].bias]}], lr=0.1)
    assert params_without_optimizer([first, second], named) == ["1.weight", "2.bias"]
    assert params_without_optimizer(first, named) == ["1.weight", "1.bias", "2.weight", "2.bias"]
    assert params_without_optimizer([], named) == list(named)


def test_params_without_optimizer_all_held():
    net = _net()
    opt = _grouped_sgd(net)
    assert params_without_optimizer([opt], dict(net.named_parameters())) == []
