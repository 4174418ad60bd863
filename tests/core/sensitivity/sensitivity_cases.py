"""Models, batches, metrics and snapshots shared by the sensitivity tests."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

from lightning_prune.core.sensitivity import (
    SensitivityResult,
    SensitivityRow,
)

LEVELS = [0.25, 0.75, 1.5, 2.5]


def images(n: int = 96, batch: int = 32, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def neg_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A continuous metric: equal values mean (all but) bit-equal outputs."""
    return -F.cross_entropy(outputs, targets)


def snapshot(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, bool], dict[str, bool]]:
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, modes, grads


def assert_untouched(model: nn.Module, before: tuple) -> None:
    state, modes, grads = before
    after = model.state_dict()
    assert after.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key
        # bit-identical, -0.0 included
        assert torch.equal(after[key].view(-1).view(torch.uint8), value.view(-1).view(torch.uint8)), key
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert all(p.grad is None for p in model.parameters())


class Skip(nn.Module):
    """A residual add from before ``fc1`` to after it, and an in-place write into a value from before it."""

    def __init__(self, in_place: str = ""):
        super().__init__()
        self.in_place = in_place
        self.fc0 = nn.Linear(12, 16)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc0(x))
        g = self.fc2(F.relu(self.fc1(h)))
        if self.in_place == "add_":
            h.add_(g)  # writes into a cut value of fc1 and fc2
            return self.head(h)
        if self.in_place == "view":
            h.view(-1, 4, 4).mul_(0.5)  # writes through a view of a cut value
            return self.head(g + h)
        return self.head(g + h)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 26 * 26, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(F.relu(self.bn(self.conv(x))).flatten(1)))


class Dynamic(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(12, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if h.sum() > 0:
            h = h * 2
        return self.fc2(h)


def vectors(n: int = 64, batch: int = 16, features: int = 12, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=gen)
    y = torch.randint(0, 3, (n,), generator=gen)
    return [(x[i : i + batch], y[i : i + batch]) for i in range(0, n, batch)]


def make_result(curves: dict[str, list[tuple[float, float, float]]], baseline: float = 0.9, **kw) -> SensitivityResult:
    rows = [SensitivityRow(layer, lv, share, m) for layer, pts in curves.items() for lv, share, m in pts]
    return SensitivityResult(baseline, rows, **kw)
