import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from toy_models import ToyMLP, make_trainer, toy_loader

from lightning_prune import NM, Fraction, PruneRetrainCallback
from lightning_prune.core.criteria import PruneContext, get_criterion, nm_counts, nm_groups, nm_mask
from lightning_prune.core.pruner import Pruner
from lightning_prune.core.schedule import Round
from lightning_prune.core.sensitivity import sweep
from lightning_prune.core.settings import Retraining

FAST = settings(max_examples=80, deadline=None)


def context(weights):
    return PruneContext(dense_std=dict.fromkeys(weights, 1.0), layer_of={n: n.rpartition(".")[0] for n in weights})


def assert_nm(mask: torch.Tensor, n: int, m: int, keep: torch.Tensor | None = None) -> None:
    """The invariant: every group keeps min(n, alive) of its alive connections (exactly n where n are alive)."""
    alive = torch.full((nm_groups(mask, m).shape[0],), m) if keep is None else nm_counts(keep, m)
    assert torch.equal(nm_counts(mask, m), alive.clamp(max=n))
    if keep is not None:
        assert not (mask & ~keep).any()


def weights_follow(model: nn.Module, masks: dict[str, torch.Tensor], n: int, m: int) -> None:
    """Pruned weights are zero and at most ``n`` of every ``m`` weights are non-zero."""
    for name, keep in masks.items():
        weight = model.get_parameter(name).detach()
        assert not weight[~keep].any(), name
        assert int(nm_counts(weight != 0, m).max()) <= n, name


# ---------------------------------------------------------------------------------------------------------------------
# the mask and its groups
# ---------------------------------------------------------------------------------------------------------------------


def test_groups_run_along_the_inputs_of_a_linear_and_the_channels_of_a_conv():
    linear = torch.arange(16.0).view(2, 8)
    assert torch.equal(nm_groups(linear, 4)[1], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    conv = torch.arange(16.0).view(1, 8, 2, 1)  # (out, in, kh, kw): channel c at position p is 2c + p
    assert torch.equal(nm_groups(conv, 4)[0], torch.tensor([0.0, 2.0, 4.0, 6.0]))  # channels 0..3 at p = 0
    assert torch.equal(nm_groups(conv, 4)[1], torch.tensor([8.0, 10.0, 12.0, 14.0]))  # channels 4..7 at p = 0
    assert torch.equal(nm_groups(conv, 4)[2], torch.tensor([1.0, 3.0, 5.0, 7.0]))  # channels 0..3 at p = 1


def test_two_of_four_keeps_the_two_largest_of_every_group():
    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, -0.2, 0.3, -5.0], [1.0, 2.0, 3.0, 4.0, -4.0, -3.0, -2.0, -1.0]])
    expected = torch.tensor(
        [[False, True, True, False, True, False, False, True], [False, False, True, True, True, True, False, False]]
    )
    assert torch.equal(nm_mask(w, 2, 4), expected)


def test_a_conv_keeps_n_of_m_channels_at_every_kernel_position():
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3)
    mask = nm_mask(w, 2, 4)
    assert mask.shape == w.shape and mask.is_contiguous()
    assert torch.equal(mask.view(6, 2, 4, 3, 3).sum(2), torch.full((6, 2, 3, 3), 2))
    assert_nm(mask, 2, 4)


def test_among_the_survivors_groups_keep_at_most_n_and_exactly_n_where_n_survive():
    w = torch.tensor([[5.0, 4.0, 3.0, 2.0, 9.0, 8.0, 7.0, 6.0]])
    keep = torch.tensor([[False, False, False, True, True, False, True, True]])  # 1 and 3 alive
    mask = nm_mask(w, 2, 4, keep)
    assert torch.equal(mask, torch.tensor([[False, False, False, True, True, False, True, False]]))
    assert_nm(mask, 2, 4, keep)


@FAST
@given(
    m=st.integers(2, 8),
    data=st.data(),
    units=st.integers(1, 5),
    groups=st.integers(1, 4),
    kernel=st.sampled_from([(), (1,), (2, 2)]),
    seed=st.integers(0, 2**16),
    prior=st.booleans(),
)
def test_nm_invariant(m, data, units, groups, kernel, seed, prior):
    n = data.draw(st.integers(1, m))
    gen = torch.Generator().manual_seed(seed)
    shape = (units, groups * m, *kernel)
    w = torch.randn(shape, generator=gen).round(decimals=1)  # ties on purpose
    keep = torch.rand(shape, generator=gen) > 0.4 if prior else None
    mask = nm_mask(w, n, m, keep)
    assert_nm(mask, n, m, keep)
    scores = nm_groups(w.abs().masked_fill(~keep, -1.0) if keep is not None else w.abs(), m)
    chosen = nm_groups(mask, m)
    dropped = scores.masked_fill(chosen, -2.0).amax(1)  # the largest alive magnitude not kept, per group
    smallest_kept = scores.masked_fill(~chosen, float("inf")).amin(1)
    assert bool((smallest_kept >= dropped).all())  # the kept ones are the largest of their group


# ---------------------------------------------------------------------------------------------------------------------
# through the pruner
# ---------------------------------------------------------------------------------------------------------------------


def test_dense_then_two_of_four_is_exact_and_biases_keep_their_mask():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 4))
    pruner = Pruner(net, include_bias=True)
    pruner.prune(NM())
    for name in ("0.weight", "2.weight"):
        assert_nm(pruner.masks[name], 2, 4)
    assert pruner.masks["0.bias"].all() and pruner.rules["0.bias"] == "not grouped (kept)"
    assert pruner.rules["0.weight"] == "2:4" and pruner.sparsity() == pytest.approx(1 - (48 + 24 + 16) / (96 + 48 + 16))
    weights_follow(net, {n: k for n, k in pruner.masks.items() if n.endswith("weight")}, 2, 4)
    before = {n: k.clone() for n, k in pruner.masks.items()}
    pruner.prune(NM())  # 2:4 again: nothing changes
    assert all(torch.equal(before[n], k) for n, k in pruner.masks.items())


def test_an_unstructured_round_then_two_of_four_keeps_the_invariant():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    pruner = Pruner(net)
    pruner.prune(Fraction(amount=0.5))
    before = {n: k.clone() for n, k in pruner.masks.items()}
    pruner.prune(NM())
    for name, keep in before.items():
        assert_nm(pruner.masks[name], 2, 4, keep)
    assert any(int(nm_counts(k, 4).min()) < 2 for k in pruner.masks.values())  # some groups had fewer than 2 left
    pruner.prune(NM(n=1))  # then 1:4, among the 2:4 survivors
    assert all(int(nm_counts(k, 4).max()) <= 1 for k in pruner.masks.values())


def test_layers_whose_inputs_are_not_a_multiple_of_m_are_refused_naming_them():
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    pruner = Pruner(net)
    refused = (
        r"Criterion NM\(n=2, m=4\) keeps n of every 4 consecutive input features, but layer '0' \('0\.weight', "
        r"shape \[8, 6\]\) has 6 input features, not a multiple of 4\. Leave it out of the prune \(`layers`\)\."
    )
    with pytest.raises(ValueError, match=refused):
        pruner.prune(NM())
    assert pruner.masks == {}  # nothing changed
    pruner.prune(NM(), layers=["2"])
    assert_nm(pruner.masks["2.weight"], 2, 4)
    conv = {"c.weight": torch.randn(4, 3, 3, 3)}
    with pytest.raises(ValueError, match=r"layer 'c' \('c\.weight', shape \[4, 3, 3, 3\]\) has 3 input channels"):
        NM().select(conv, {"c.weight": None}, {"c.weight": 2}, context(conv))


def test_pruner_check_refuses_such_layers_before_training():
    with pytest.raises(ValueError, match=r"layer '0' \('0\.weight', shape \[8, 6\]\) has 6 input features"):
        Pruner(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))).check(NM())


def test_floor_is_kept_or_refused_never_widened():
    weights = {"fc.weight": torch.randn(4, 8)}
    keeps = {"fc.weight": None}
    decided = {"fc.weight": nm_mask(weights["fc.weight"], 2, 4)}
    assert NM().floor(weights, keeps, decided, 0.5, context(weights)) == decided
    refused = (
        r"Criterion NM\(n=2, m=4\) keeps 16 of the 32 connections of 'fc\.weight' \(layer 'fc'\), fewer than the floor "
        r"min_remaining=0\.6 asks \(20\); keeping more would break the N:M pattern"
    )
    with pytest.raises(ValueError, match=refused):
        NM().floor(weights, keeps, decided, 0.6, context(weights))
    thinned = {"fc.weight": torch.zeros(4, 8, dtype=torch.bool)}
    thinned["fc.weight"][0, :2] = True  # two alive: the floor asks for no more than those
    small = {"fc.weight": nm_mask(weights["fc.weight"], 2, 4, thinned["fc.weight"])}
    assert NM().floor(weights, thinned, small, 0.9, context(weights)) == small


def test_pruner_refuses_a_floor_the_pattern_cannot_meet():
    net = nn.Linear(8, 4)
    pruner = Pruner(net)
    with pytest.raises(ValueError, match=r"fewer than the floor min_remaining=0\.75 asks \(24\)"):
        pruner.prune(NM(min_remaining=0.75))
    assert pruner.masks == {}
    pruner.prune(NM(), min_remaining=0.5)
    assert_nm(pruner.masks["weight"], 2, 4)


# ---------------------------------------------------------------------------------------------------------------------
# the level, gentler, the registry
# ---------------------------------------------------------------------------------------------------------------------


def test_level_is_n_one_for_all_layers():
    assert NM().level == 2 and NM(n=3, m=8).level == 3 and NM(n=2.0).level == 2
    assert NM.per_layer is False and NM.level_name == "n" and NM.sweep_levels == ()
    assert get_criterion("nm") == NM()
    assert get_criterion({"class_path": "lightning_prune.NM", "init_args": {"n": 1, "m": 8}}) == NM(n=1, m=8)
    assert repr(NM(n=1, m=8, min_remaining=0.05)) == "NM(n=1, m=8, min_remaining=0.05)"


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (
            lambda: NM(n=0),
            r"`n` must be an integer in \[1, 4\] \(the weights criterion 'nm' keeps in every group of "
            r"m=4\), got 0",
        ),
        (lambda: NM(n=5), r"`n` must be an integer in \[1, 4\].*got 5"),
        (lambda: NM(n=2.5), r"`n` must be an integer in \[1, 4\].*got 2\.5"),
        (lambda: NM(n=True), r"`n` must be an integer in \[1, 4\].*got True"),
        (lambda: NM(n=float("nan")), r"`n` must be an integer in \[1, 4\].*got nan"),
        (lambda: NM(n=3, m=2), r"`n` must be an integer in \[1, 2\].*got 3"),
        (lambda: NM(m=1), r"`m` must be an integer >= 2, got 1"),
        (lambda: NM(m=4.0), r"`m` must be an integer >= 2, got 4\.0"),
        (lambda: NM(n={"*": 2}), r"Criterion 'nm' takes one `n` for all layers, not a mapping"),
        (lambda: NM(min_remaining=-0.1), r"`min_remaining` must be a number in \[0, 1\]"),
        (lambda: Round(criterion="nm", level=7), r"`level` must be an integer in \[1, 4\].*got 7"),
    ],
)
def test_settings_are_validated(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize(
    ("n", "m", "scale", "expected"),
    [(2, 4, 0.8, 3), (2, 4, 0.5, 3), (2, 4, 0.1, 4), (1, 4, 0.8, 2), (4, 4, 0.5, 4), (2, 8, 0.8, 4), (2, 4, 1.0, 2)],
)
def test_gentler_keeps_more_per_group(n, m, scale, expected):
    assert NM(n=n, m=m).gentler(n, scale) == expected


def test_a_retried_round_is_pruned_gentler():
    resolved = Round(criterion=NM(), epochs=1).resolve(NM(), Retraining(), None)
    assert resolved.gentler(0.8).level == 3 and resolved.gentler(0.8).prune_kwargs()["criterion"] == NM()


def test_sensitivity_sweeps_are_refused():
    with pytest.raises(ValueError, match=r"criterion NM\(n=2, m=4\) has one level for all layers"):
        sweep(nn.Linear(4, 2), [(torch.randn(2, 4), torch.tensor([0, 1]))], criterion="nm")


# ---------------------------------------------------------------------------------------------------------------------
# training: rounds, Trainer.fit, resume
# ---------------------------------------------------------------------------------------------------------------------


def test_dense_then_two_of_four_in_one_round_of_a_fit(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    prune = PruneRetrainCallback(rounds=[{"criterion": NM(), "epochs": 1}], verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=2, limit_train_batches=3).fit(model, toy_loader())
    assert prune.schedule.done == [0] and set(prune.pruner.masks) == {"net.0.weight", "net.3.weight", "net.5.weight"}
    for keep in prune.pruner.masks.values():
        assert_nm(keep, 2, 4)
    weights_follow(model, prune.pruner.masks, 2, 4)


def test_an_unstructured_round_then_two_of_four_in_a_fit(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    rounds = [{"criterion": Fraction(amount=0.3), "epochs": 1}, {"criterion": NM(), "epochs": 1}]
    prune = PruneRetrainCallback(rounds=rounds, verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=3, limit_train_batches=3).fit(model, toy_loader())
    for keep in prune.pruner.masks.values():
        assert int(nm_counts(keep, 4).max()) == 2 and int(nm_counts(keep, 4).min()) < 2
    weights_follow(model, prune.pruner.masks, 2, 4)


def test_resume_from_a_checkpoint_keeps_the_pattern(tmp_path):
    def fit(max_epochs, ckpt_path=None):
        torch.manual_seed(0)
        model = ToyMLP()
        prune = PruneRetrainCallback(prune_epochs=[1], rounds=[{"criterion": NM()}], verbose=False)
        saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
        trainer = make_trainer(tmp_path, [prune, saver], max_epochs=max_epochs, enable_checkpointing=True)
        trainer.fit(model, toy_loader(), ckpt_path=ckpt_path)
        return model, prune

    _, first = fit(2)
    saved = {n: k.clone() for n, k in first.pruner.masks.items()}
    model, resumed = fit(4, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.schedule.done == [0]  # the round is not pruned again
    assert saved.keys() == resumed.pruner.masks.keys()
    assert all(torch.equal(saved[n], resumed.pruner.masks[n]) for n in saved)
    for keep in resumed.pruner.masks.values():
        assert_nm(keep, 2, 4)
    weights_follow(model, resumed.pruner.masks, 2, 4)
