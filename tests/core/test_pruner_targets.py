"""The pruner over targets that are not one module's ``weight``: attention rows, recurrent, parametrized, tied."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_prune.core.criteria import Fraction, Std
from lightning_prune.core.pruner import Pruner

QKV = ["attn.in_proj_weight:q", "attn.in_proj_weight:k", "attn.in_proj_weight:v"]


class Tiny(nn.Module):
    """Attention with q, k and v on different scales, an LSTM, a weight-normed and a spectral-normed head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        with torch.no_grad():
            self.attn.in_proj_weight[:8] *= 10.0  # q ten times larger than k and v
        self.rnn = nn.LSTM(8, 8, batch_first=True)
        self.wn = nn.utils.parametrizations.weight_norm(nn.Linear(8, 8))
        self.sn = nn.utils.parametrizations.spectral_norm(nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.attn(x, x, x)
        h, _ = self.rnn(h)
        return self.sn(torch.relu(self.wn(h))).mean(1)


def step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(4, 5, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()


def effective_zeros(model: Tiny, pruner: Pruner) -> None:
    """Every pruned entry is zero in what the forward pass uses, parametrized or not."""
    for name, target in pruner.targets.items():
        keep = pruner._keep(name)
        if keep is not None:
            assert (target.weight(model).detach()[~keep] == 0).all(), name


def test_targets_and_mask_keys():
    pruner = Pruner(Tiny())
    assert list(pruner.targets) == [
        *QKV,
        "attn.out_proj.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "wn.weight",
        "sn.weight",
    ]
    pruner.prune("fraction", 0.5)
    assert set(pruner.masks) == {
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "rnn.weight_ih_l0",
        "rnn.weight_hh_l0",
        "wn.parametrizations.weight.original1",
        "sn.parametrizations.weight.original",
    }
    assert pruner.masks["attn.in_proj_weight"].shape == (24, 8)


def test_q_k_and_v_are_judged_on_their_own_scale():
    pruner = Pruner(Tiny(), ["attn"])
    stats = {s.name: s for s in pruner.prune(Std(quality=1.0))}
    for name in QKV:  # one std of a uniform init prunes 1/sqrt(3) = 58%; one std of all three rows would empty k, v
        assert 0.45 < 1 - stats[name].remaining / stats[name].weights < 0.7, name
        assert pruner.thresholds[name] == pytest.approx(pruner.dense_std[name])
    assert pruner.dense_std[QKV[0]] == pytest.approx(10 * pruner.dense_std[QKV[1]], rel=0.3)


def test_levels_per_target_give_v_its_own():
    pruner = Pruner(Tiny(), ["attn*"])
    stats = {s.name: s for s in pruner.prune("fraction", {"attn.in_proj_weight:v": 0.75, "*": 0.25})}
    assert stats["attn.in_proj_weight:v"].remaining == 16
    assert stats["attn.in_proj_weight:q"].remaining == stats["attn.in_proj_weight:k"].remaining == 48
    assert stats["attn.out_proj.weight"].remaining == 48


def test_pruned_entries_stay_zero_through_training_and_parametrizations():
    model = Tiny()
    pruner = Pruner(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    pruner.attach(optimizer)
    pruner.prune(Fraction(amount=0.6))
    for seed in range(5):
        step(model, optimizer, seed)
        effective_zeros(model, pruner)
    pruner.prune(Fraction(amount=0.8))
    step(model, optimizer, 9)
    effective_zeros(model, pruner)
    assert 0.79 < pruner.sparsity() < 0.81


def test_state_dict_round_trip_restores_row_masks_and_statistics():
    source = Tiny()
    pruner = Pruner(source)
    pruner.prune("std", {"attn": 0.5, "*": 1.0})
    state = pruner.state_dict()
    assert "attn.in_proj_weight:q" in state["dense_std"]
    restored = Pruner(Tiny())
    restored.load_state_dict(state)
    for name, keep in pruner.masks.items():
        assert torch.equal(restored.masks[name], keep), name
    assert restored.dense_std == pruner.dense_std and restored.thresholds == pruner.thresholds
    assert [(s.name, s.remaining) for s in restored.stats()] == [(s.name, s.remaining) for s in pruner.stats()]


def test_second_prune_of_one_block_keeps_the_others():
    pruner = Pruner(Tiny(), ["attn"])
    pruner.prune("fraction", 0.5)
    before = pruner.masks["attn.in_proj_weight"].clone()
    pruner.prune("fraction", 0.75, layers=["attn.in_proj_weight:v"])
    after = pruner.masks["attn.in_proj_weight"]
    assert torch.equal(after[:16], before[:16])
    assert int(after[16:].sum()) == 16 and not (after[16:] & ~before[16:]).any()


def test_tied_weight_is_pruned_once_and_zero_under_both_names():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 8)
            self.head = nn.Linear(8, 20, bias=False)
            self.head.weight = self.emb.weight

    model = Tied()
    pruner = Pruner(model, ["emb", "head"])
    assert list(pruner.targets) == ["emb.weight"]
    pruner.prune("fraction", 0.5)
    assert pruner.counts() == (80, 160)
    assert int((model.head.weight == 0).sum()) == int((model.emb.weight == 0).sum()) == 80


@pytest.mark.parametrize(("layer", "dim"), [(nn.Linear(6, 4), 0), (nn.Conv2d(3, 4, 3), 0), (nn.Conv2d(3, 4, 3), 1)])
def test_a_weight_norm_unit_the_prune_would_empty_keeps_its_largest_entry(layer, dim):
    torch.manual_seed(0)
    with torch.no_grad():
        layer.weight.select(dim, 1).mul_(1e-3)  # unit 1 far below every threshold
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(layer, dim=dim))
    pruner = Pruner(model)
    weight = model[0].weight.detach().clone()
    (stats,) = pruner.prune(Std(), 1.0)
    keep = pruner.masks["0.parametrizations.weight.original1"]
    units = keep.movedim(dim, 0).flatten(1)
    assert bool(units.any(1).all())
    assert int(units[1].sum()) == 1 and bool(units[1][weight.abs().movedim(dim, 0).flatten(1)[1].argmax()])
    assert bool(torch.isfinite(model[0].weight).all())
    assert "1 kept in 1 weight-norm units" in stats.rule
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 3, 5, 5)
    assert bool(torch.isfinite(model(x)).all())
    (again,) = pruner.prune(Std(), 1.0)  # a later prune keeps the same survivor, never one already pruned
    assert again.remaining == stats.remaining
    assert torch.equal(pruner.masks["0.parametrizations.weight.original1"] & ~keep, torch.zeros_like(keep))
    assert int(pruner.masks["0.parametrizations.weight.original1"].movedim(dim, 0).flatten(1)[1].sum()) == 1


def test_a_weight_norm_over_the_whole_tensor_has_no_units_to_keep():
    model = nn.utils.parametrizations.weight_norm(nn.Linear(6, 4), dim=None)
    with torch.no_grad():
        model.parametrizations.weight.original1[1] *= 1e-3
    (stats,) = Pruner(model).prune(Std(), 1.0)
    assert "weight-norm" not in stats.rule and bool(torch.isfinite(model.weight).all())


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 6),
    cols=st.integers(1, 6),
    dim=st.sampled_from([0, 1]),
    levels=st.lists(st.floats(0.0, 3.0), min_size=1, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_a_weight_normed_layer_stays_finite_and_keeps_every_unit_through_any_prunes(rows, cols, dim, levels, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(cols, rows), dim=dim))
    pruner = Pruner(model)
    for level in levels:
        before = pruner.masks.get("0.parametrizations.weight.original1")
        pruner.prune(Std(), level)
        keep = pruner.masks["0.parametrizations.weight.original1"]
        assert bool(keep.movedim(dim, 0).flatten(1).any(1).all())
        assert before is None or not bool((keep & ~before).any())  # later prunes only remove
        assert bool(torch.isfinite(model[0].weight).all())
