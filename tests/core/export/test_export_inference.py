"""Sparse inference: CSR Linear layers."""

import torch
from torch import nn

from lightning_prune.core.export import SparseLinear, to_sparse_linear


def test_csr_linear_matches_dense():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10, bias=False))
    masks = {
        "0.weight": torch.rand(300, 784) < 0.08,
        "2.weight": torch.rand(100, 300) < 0.09,
        "4.weight": torch.rand(10, 100) < 0.26,
    }
    with torch.no_grad():
        for name, keep in masks.items():
            net.get_parameter(name).mul_(keep)
    x = torch.randn(32, 784)
    expected = net(x)
    assert to_sparse_linear(net, masks) == ["0", "2", "4"]
    assert isinstance(net[0], SparseLinear) and net[0].weight.layout == torch.sparse_csr
    assert net[0].weight.values().numel() == int(masks["0.weight"].sum())
    assert torch.allclose(net(x), expected, atol=1e-5)
    assert net(x[None, :3]).shape == (1, 3, 10)  # leading dims kept


def test_to_sparse_linear_by_density():
    net = nn.Sequential(nn.Linear(20, 20), nn.Linear(20, 5))
    with torch.no_grad():
        net[0].weight[:, 5:] = 0
    assert to_sparse_linear(net) == ["0"]
    assert isinstance(net[1], nn.Linear)
