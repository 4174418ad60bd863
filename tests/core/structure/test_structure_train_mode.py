"""Dead-unit removal on models in train mode (``nn.Module``'s default), BatchNorm included."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_prune.core import remove_dead_units


def _issue_case() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3), nn.BatchNorm1d(3), nn.Tanh(), nn.Linear(3, 2))
    with torch.no_grad():
        net[2].weight[1] = 0  # unit 1 of the second Linear: no inputs, bias 0.8
        net[2].bias[1] = 0.8
        net[3].running_mean.uniform_(-1, 1)
        net[3].running_var.uniform_(0.5, 2)
    return net


def _conv_bn() -> nn.Sequential:
    torch.manual_seed(1)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Flatten(), nn.Linear(6 * 4 * 4, 3),
    )  # fmt: skip
    with torch.no_grad():
        net[0].weight[2] = 0  # channel 2 of the first conv: a constant map through BatchNorm and ReLU
        net[3].weight[1] = 0
        for bn in (net[1], net[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    return net


def _modes(net: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in net.named_modules()}


@pytest.mark.parametrize("make", [_issue_case, _conv_bn], ids=["linear-bn", "conv-bn"])
@pytest.mark.parametrize("mode", ["train", "eval", "mixed"])
def test_removal_works_in_any_mode_and_restores_every_module_mode(make, mode):
    net = make()
    net.train(mode != "eval")
    if mode == "mixed":
        net[1].eval()
    x = torch.randn(8, 4) if make is _issue_case else torch.randn(8, 1, 8, 8)
    before_modes = _modes(net)
    with torch.no_grad():
        reference = net.eval()(x)
    for name, module in net.named_modules():
        module.training = before_modes[name]
    report = remove_dead_units(net, x)
    assert report.removed_units
    assert _modes(net) == before_modes  # the modules swapped in carry their predecessors' modes
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference, atol=1e-5, rtol=1e-5)


def test_removal_on_resnet18_in_train_mode():
    from toy_models import ToyResNet

    net = ToyResNet(dead=16).model
    torch.manual_seed(2)
    with torch.no_grad():
        for bn in (net.layer1[0].bn1, net.layer2[0].bn1):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.bias[:16] = -0.1  # the dead channels' constant relu(bias - ...) is zero there: they fold exactly
    net.train()
    x = torch.randn(2, 3, 32, 32)
    reference = net.eval()(x).detach()
    net.train()
    report = remove_dead_units(net, x)
    assert report.removed_units.get("layer1.0.conv1", 0) >= 1
    assert net.training and all(m.training for m in net.modules())
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference, atol=1e-4, rtol=1e-4)
