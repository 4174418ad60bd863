"""Integration tests of PruneRetrainCallback in real ``Trainer.fit`` runs."""

from __future__ import annotations

import itertools
import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from registry_names import REGISTERED
from toy_models import ToyConvNet, ToyMLP, image_loader, make_trainer, toy_loader

from lightning_prune import (
    DropoutAdjustment,
    Fraction,
    Global,
    Guard,
    PruneRetrainCallback,
    PruningError,
    Regularization,
    Retraining,
    Round,
    Sensitivity,
    Std,
)
from lightning_prune.checkpoint import CheckpointError


class ZerosStayZeros(Callback):
    """After every batch, assert each masked weight is exactly zero where its mask is False."""

    def __init__(self, prune: PruneRetrainCallback):
        self.prune = prune
        self.checked = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        for name, keep in self.prune.pruner.masks.items():
            weight = pl_module.get_parameter(name)
            assert torch.all(weight[~keep] == 0), f"{name} has non-zero pruned weights at step {trainer.global_step}"
            self.checked += 1
        for optimizer in trainer.optimizers:
            for name, keep in self.prune.pruner.masks.items():
                for value in optimizer.state.get(pl_module.get_parameter(name), {}).values():
                    if torch.is_tensor(value) and value.shape == keep.shape:
                        assert torch.all(value[~keep] == 0), f"optimizer state of {name} not masked"


def weights_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("optimizer", "trainer_kwargs", "manual"),
    [
        ("sgd", {}, False),
        ("adam", {}, False),
        ("adamw", {}, False),
        ("sgd", {"accumulate_grad_batches": 2}, False),
        ("sgd", {"gradient_clip_val": 0.01}, False),
        ("adam", {"precision": "bf16-mixed"}, False),
        ("adam", {}, True),
    ],
    ids=["sgd-momentum", "adam", "adamw", "grad-accumulation", "grad-clipping", "bf16-mixed", "manual-optimization"],
)
def test_pruned_weights_stay_zero(tmp_path, optimizer, trainer_kwargs, manual):
    torch.manual_seed(0)
    model = ToyMLP(optimizer=optimizer, manual=manual)
    prune = PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1, 2], verbose=False)
    check = ZerosStayZeros(prune)
    trainer = make_trainer(tmp_path, [prune, check], max_epochs=4, **trainer_kwargs)
    trainer.fit(model, toy_loader())
    assert check.checked > 0
    assert set(prune.pruner.masks) == {"net.0.weight", "net.3.weight", "net.5.weight"}
    for name, keep in prune.pruner.masks.items():
        assert keep.dtype == torch.bool
        assert 0 < keep.sum() < keep.numel()
        assert torch.all(model.get_parameter(name)[~keep] == 0)
    assert prune.schedule.done == [0, 1]


class PoisonedGradients(Callback):
    """From the first prune on, writes NaN (or inf) into every masked weight's gradient after backward.

    ``where`` is ``"pruned"`` (the first pruned entry), ``"alive"`` (the first alive one) or ``"both"``.
    """

    def __init__(self, prune: PruneRetrainCallback, where: str, value: float):
        self.prune, self.where, self.value = prune, where, value

    def on_after_backward(self, trainer, pl_module):
        for name, keep in self.prune.pruner.masks.items():
            flat, k = pl_module.get_parameter(name).grad.view(-1), keep.reshape(-1)
            if self.where in ("pruned", "both"):
                flat[(~k).nonzero()[0]] = self.value
            if self.where in ("alive", "both"):
                flat[k.nonzero()[0]] = self.value


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("where", ["pruned", "alive", "both"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_non_finite_gradients_never_reach_pruned_weights_or_their_state(tmp_path, optimizer, where, value, clip):
    torch.manual_seed(0)
    prune = PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1], verbose=False)
    check = ZerosStayZeros(prune)
    trainer = make_trainer(
        tmp_path, [prune, PoisonedGradients(prune, where, value), check], max_epochs=3, gradient_clip_val=clip
    )
    trainer.fit(ToyMLP(optimizer=optimizer), toy_loader())
    assert check.checked > 0


class NoisyClipping(ToyMLP):
    """Clips by norm, then adds noise to every gradient (as DP-SGD does) in its own clipping hook."""

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
        for p in self.parameters():
            p.grad.add_(torch.randn_like(p.grad))


def test_gradients_rewritten_by_a_modules_own_clipping_hook_are_masked_again(tmp_path):
    torch.manual_seed(0)
    prune = PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1], verbose=False)
    check = ZerosStayZeros(prune)
    make_trainer(tmp_path, [prune, check], max_epochs=3).fit(NoisyClipping(), toy_loader())
    assert check.checked > 0


def test_surviving_weights_keep_training(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    prune = PruneRetrainCallback(criterion=Std(quality=0.5), prune_epochs=[1], verbose=False)

    class Snapshot(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                self.before = pl_module.net[0].weight.detach().clone()

    snap = Snapshot()
    make_trainer(tmp_path, [prune, snap], max_epochs=3).fit(model, toy_loader())
    keep = prune.pruner.masks["net.0.weight"]
    assert not torch.equal(snap.before[keep], model.net[0].weight[keep])


def test_masks_only_shrink_across_prunes(tmp_path):
    torch.manual_seed(0)
    seen = []

    class Record(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            seen.append({k: v.clone() for k, v in prune.pruner.masks.items()})

    prune = PruneRetrainCallback(criterion=Std(quality=0.7, std_of="surviving"), prune_epochs=[1, 2, 3], verbose=False)
    make_trainer(tmp_path, [prune, Record()], max_epochs=4).fit(ToyMLP(), toy_loader())
    for earlier, later in itertools.pairwise(seen[1:]):
        for name in earlier:
            assert not torch.any(later[name] & ~earlier[name])
            assert later[name].sum() < earlier[name].sum()


def test_han_threshold_matches_quality_times_dense_std(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()

    class Capture(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                self.dense = pl_module.net[0].weight.detach().clone()

    capture = Capture()
    # Capture runs before the pruning callback's hook, so it sees the dense weights.
    prune = PruneRetrainCallback(criterion=Std(quality={"net.0": 1.5, "*": 0.5}), prune_epochs=[1], verbose=False)
    make_trainer(tmp_path, [capture, prune], max_epochs=2).fit(model, toy_loader())
    threshold = 1.5 * capture.dense.std().item()
    assert prune.pruner.thresholds["net.0.weight"] == pytest.approx(threshold, rel=1e-6)
    assert torch.equal(prune.pruner.masks["net.0.weight"], capture.dense.abs() > threshold)
    assert prune.pruner.rules["net.3.weight"] == "0.50 x std"


def test_fraction_and_global_criteria(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    prune = PruneRetrainCallback(criterion=Fraction(amount={"net.5": 0.5, "*": 0.9}), prune_epochs=[0])
    make_trainer(tmp_path, [prune], max_epochs=1).fit(model, toy_loader())
    remaining = {s.name: s.remaining for s in prune.pruner.stats()}
    assert remaining == {"net.0.weight": 38, "net.3.weight": 51, "net.5.weight": 24}

    model = ToyMLP()
    prune = PruneRetrainCallback(criterion=Global(amount=0.8), prune_epochs=[0], verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=1).fit(model, toy_loader())
    total = sum(s.weights for s in prune.pruner.stats())
    assert sum(s.remaining for s in prune.pruner.stats()) == total - round(0.8 * total)


def test_layers_by_pattern_on_conv_net(tmp_path):
    torch.manual_seed(0)
    model = ToyConvNet()
    prune = PruneRetrainCallback(layers=["features.*"], criterion=Std(quality=0.6), prune_epochs=[0], verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=1).fit(model, image_loader())
    assert list(prune.pruner.masks) == ["features.0.weight", "features.3.weight"]
    assert torch.all(model.classifier[1].weight != 0)


def test_default_schedule_prunes_at_half_of_max_epochs(tmp_path):
    prune = PruneRetrainCallback(verbose=False)
    seen = []

    class Record(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.append((prune.schedule.start_of(0), len(prune.schedule.done)))

    make_trainer(tmp_path, [prune, Record()], max_epochs=5).fit(ToyMLP(), toy_loader())
    assert prune.schedule.done == [0]
    assert seen == [(2, 0), (2, 0), (2, 1), (2, 1), (2, 1)]


def test_logs_sparsity_and_prints_table(tmp_path, caplog):
    prune = PruneRetrainCallback(criterion=Std(quality=1.0), prune_epochs=[1])
    trainer = make_trainer(tmp_path, [prune], max_epochs=2)
    with caplog.at_level("INFO"):
        trainer.fit(ToyMLP(), toy_loader())
    metrics = trainer.callback_metrics
    assert metrics["prune/sparsity"].item() == pytest.approx(prune.pruner.sparsity())
    assert 0.5 < metrics["prune/sparsity"].item() < 0.9
    assert metrics["prune/remaining_pct/net.0.weight"].item() == pytest.approx(prune.pruner.stats()[0].remaining_pct)
    assert "pruned (round 1/1, start of epoch 1)" in caplog.text
    assert "net.0.weight" in caplog.text and "x fewer" in caplog.text


def test_logged_to_a_real_logger(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    prune = PruneRetrainCallback(criterion=Std(quality=1.0), prune_epochs=[1], verbose=False)
    trainer = make_trainer(tmp_path, [prune], max_epochs=2, logger=CSVLogger(tmp_path))
    trainer.fit(ToyMLP(), toy_loader())
    text = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text()
    assert "prune/sparsity" in text.splitlines()[0]


def _run(tmp_path, max_epochs, ckpt_path=None, save=False, seed=0):
    pl.seed_everything(seed, verbose=False)
    model = ToyMLP(optimizer="adam")
    prune = PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1, 3], verbose=False)
    callbacks = [prune]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0))
    trainer = make_trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=save)
    trainer.fit(model, toy_loader(), ckpt_path=ckpt_path)
    return model, prune


def test_resume_gives_same_masks_and_weights_as_uninterrupted(tmp_path):
    full_model, full_prune = _run(tmp_path / "full", max_epochs=5)
    _run(tmp_path / "part", max_epochs=2, save=True)
    ckpt = tmp_path / "part" / "last.ckpt"
    resumed_model, resumed_prune = _run(tmp_path / "part", max_epochs=5, ckpt_path=ckpt)
    assert resumed_prune.schedule.done == [0, 1]
    for name, keep in full_prune.pruner.masks.items():
        assert torch.equal(keep, resumed_prune.pruner.masks[name])
    assert full_prune.pruner.dense_std == resumed_prune.pruner.dense_std
    for key, value in weights_of(full_model).items():
        torch.testing.assert_close(resumed_model.state_dict()[key], value, rtol=0, atol=0)


def test_checkpoint_is_plain_and_weights_only_loadable(tmp_path):
    _run(tmp_path, max_epochs=2, save=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("PruneRetrainCallback")]
    assert state["schedule"]["done"] == [0]
    masks = state["pruner"]["masks"]
    assert all(m.dtype == torch.bool for m in masks.values())
    assert not any("mask" in key or "orig" in key for key in ckpt["state_dict"])
    for name, keep in masks.items():
        assert torch.all(ckpt["state_dict"][name][~keep] == 0)

    restored = ToyMLP.load_from_checkpoint(tmp_path / "last.ckpt")
    for name, keep in masks.items():
        weight = restored.get_parameter(name)
        assert torch.all(weight[~keep] == 0) and torch.all(weight[keep] != 0)


def _mangle_checkpoint(path, change, keep_checksums=False):
    """Rewrite the callback's state in the checkpoint at ``path`` with ``change(state)``.

    The CRCs the callback recorded are dropped unless ``keep_checksums``: the structural checks are under test.
    """
    ckpt = torch.load(path, weights_only=True)
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("PruneRetrainCallback")]
    if not keep_checksums:
        ckpt["callbacks"][key].pop("checksums")
    change(ckpt["callbacks"][key])
    torch.save(ckpt, path)


def _set_mask(name, value):
    return lambda state: state["pruner"]["masks"].__setitem__(name, value)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.__setitem__("version", 99), r"version 99; this lightning-prune reads versions 1 to 3 \(a newer"),
        (lambda s: s.__setitem__("version", "2"), r"version '2'; this lightning-prune reads versions 1 to 3\."),
        (lambda s: s["pruner"]["masks"].pop("net.3.weight"), r"records a prune of 'net\.3\.weight' but holds no mask"),
        (_set_mask("net.3.weight", torch.ones(16, 32)), r"mask of 'net\.3\.weight' has shape \(16, 32\) and dtype"),
        (_set_mask("net.3.weight", torch.ones(16, 31, dtype=torch.bool)), r"'net\.3\.weight' has shape \(16, 31\)"),
        (_set_mask("net.3.weight", [[True]]), r"mask of 'net\.3\.weight' is a list, not a bool tensor"),
        (_set_mask("net.9.weight", torch.ones(2, dtype=torch.bool)), r"masks include 'net\.9\.weight', which is not"),
        (lambda s: s["pruner"].__setitem__("masks", [1, 2]), r"holds no mapping of masks"),
    ],
    ids=["newer", "mangled-version", "missing-mask", "float-mask", "wrong-shape", "list-mask", "unknown-name", "list"],
)
def test_a_bad_checkpointed_state_is_refused_with_a_clear_error(tmp_path, change, match):
    _run(tmp_path, max_epochs=2, save=True)
    _mangle_checkpoint(tmp_path / "last.ckpt", change)
    with pytest.raises(ValueError, match=match):
        _run(tmp_path, max_epochs=4, ckpt_path=tmp_path / "last.ckpt")


@pytest.mark.parametrize("what", ["weight", "mask"])
def test_resuming_from_a_checkpoint_whose_weights_or_masks_changed_is_refused(tmp_path, what):
    _run(tmp_path, max_epochs=2, save=True)
    ckpt = torch.load(tmp_path / "last.ckpt", weights_only=True)
    (state,) = [v for k, v in ckpt["callbacks"].items() if k.startswith("PruneRetrainCallback")]
    assert set(state["checksums"]["state_dict"]) == set(ckpt["state_dict"])
    if what == "weight":
        ckpt["state_dict"]["net.0.bias"][3] += 1e-6
    else:
        state["pruner"]["masks"]["net.3.weight"][0, 0] ^= True
    torch.save(ckpt, tmp_path / "last.ckpt")
    name = "net.0.bias" if what == "weight" else "net.3.weight"
    with pytest.raises(CheckpointError, match=rf"the {what}s? of '{name}' changed since the checkpoint was written"):
        _run(tmp_path, max_epochs=4, ckpt_path=tmp_path / "last.ckpt")


def test_a_version_1_state_still_loads(tmp_path):
    _run(tmp_path, max_epochs=2, save=True)

    def to_version_1(state):  # the first layout: prune epochs done instead of rounds done
        masks = state["pruner"]["masks"]
        state.clear()
        state.update({"version": 1, "pruner": {"masks": masks}, "done_epochs": [1]})

    _mangle_checkpoint(tmp_path / "last.ckpt", to_version_1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*runs late.*")  # round 0 is done: it must not run again
        _, prune = _run(tmp_path, max_epochs=4, ckpt_path=tmp_path / "last.ckpt")
    assert prune.schedule.done == [0, 1]  # round 0 taken from the old state, round 1 pruned at epoch 3


def test_resume_from_a_dense_checkpoint_prunes_late(tmp_path):
    pl.seed_everything(0, verbose=False)
    trainer = make_trainer(
        tmp_path, [ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)], 3, enable_checkpointing=True
    )
    trainer.fit(ToyMLP(), toy_loader())
    prune = PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1], verbose=False)
    with pytest.warns(UserWarning, match="Round 0 was due at epoch 1; it runs late, at the start of epoch 3"):
        make_trainer(tmp_path, [prune], max_epochs=4).fit(ToyMLP(), toy_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert prune.schedule.done == [0] and prune.pruner.masks


def test_optimizer_hooks_removed_after_fit(tmp_path):
    model = ToyMLP()
    prune = PruneRetrainCallback(criterion=Std(quality=1.0), prune_epochs=[0], verbose=False)
    trainer = make_trainer(tmp_path, [prune], max_epochs=1)
    trainer.fit(model, toy_loader())
    optimizer = trainer.optimizers[0]
    assert not optimizer._optimizer_step_post_hooks
    keep = prune.pruner.masks["net.0.weight"]
    model.net[0].weight.grad = torch.ones_like(keep, dtype=torch.float32)
    model.net[3].weight.grad = model.net[5].weight.grad = None
    optimizer.step()
    assert torch.any(model.net[0].weight[~keep] != 0)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: {"layers": "fc1"}, "`layers` must be None or a non-empty list of glob patterns"),
        (lambda: {"layers": []}, "`layers` must be None or a non-empty list"),
        (lambda: {"criterion": Std(quality=-0.5)}, r"`quality` must be a finite number >= 0, got -0.5"),
        (lambda: {"criterion": Std(quality=math.nan)}, r"`quality` must be a finite number >= 0, got nan"),
        (lambda: {"criterion": Std(quality=math.inf)}, r"`quality` must be a finite number >= 0, got inf"),
        (lambda: {"criterion": Std(quality={"fc*": -1.0})}, r"`quality\['fc\*'\]` must be a finite number >= 0"),
        (lambda: {"rounds": [{"level": -1.0}]}, r"rounds\[0\]: `level` must be a finite number >= 0, got -1"),
        (lambda: {"prune_epochs": [5, 3]}, r"strictly increasing .* got \[5, 3\]"),
        (lambda: {"prune_epochs": [2, 2]}, r"strictly increasing \(sorted, no duplicates\), got \[2, 2\]"),
        (lambda: {"prune_epochs": [-1]}, r"`prune_epochs\[0\]` must be an integer >= 0, got -1"),
        (lambda: {"prune_epochs": [1.5]}, r"`prune_epochs\[0\]` must be an integer >= 0, got 1.5"),
        (lambda: {"prune_epochs": []}, r"`prune_epochs` must be a non-empty list of epoch indices or None, got \[\]"),
        (lambda: {"prune_epochs": 3}, "`prune_epochs` must be a non-empty list of epoch indices or None, got 3"),
        (lambda: {"criterion": "l1"}, r"`criterion` must be a registered name " + REGISTERED + r".*got 'l1'"),
        (lambda: {"criterion": 3}, r"`criterion` must be a registered name " + REGISTERED + r".*got 3"),
        (lambda: {"criterion": Std(std_of="all")}, r"`std_of` must be one of \('dense', 'surviving'\), got 'all'"),
        (lambda: {"criterion": "fraction"}, r"rounds\[0\]: `level` is missing: criterion Fraction\(amount=None\)"),
        (lambda: {"criterion": Fraction(amount=1.5)}, r"`amount` must be a number in \[0, 1\], got 1.5"),
        (lambda: {"criterion": Fraction(amount={"fc": -0.1})}, r"`amount\['fc'\]` must be a number in \[0, 1\]"),
        (
            lambda: {"criterion": "fraction", "rounds": [{"level": 1.5}]},
            r"rounds\[0\]: `level` must be a number in \[0, 1",
        ),
        (lambda: {"rounds": [{"amount": 0.5}]}, r"rounds\[0\]: Unknown key 'amount'\. Accepted keys: level, epochs"),
        (lambda: {"criterion": Global(amount={"*": 0.5})}, "Criterion 'global' takes one `amount` for all layers"),
        (lambda: {"criterion": Std(min_remaining=2)}, r"`min_remaining` must be a number in \[0, 1\] or None, got 2"),
        (lambda: {"rounds": [{"min_remaining": 2}]}, r"rounds\[0\]: `min_remaining` must be a number in \[0, 1\]"),
    ],
)
def test_bad_constructor_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        PruneRetrainCallback(**make())


@pytest.mark.parametrize(
    ("kwargs", "trainer_kwargs", "match"),
    [
        (
            {"layers": ["fc9"]},
            {},
            r"Pattern 'fc9' in `layers` matches no module .* 'net.0.weight', 'net.3.weight', 'net.5.weight'",
        ),
        (
            {"layers": ["net.1"]},
            {},
            "Pattern 'net.1' in `layers` matches no module with weights to prune and no parameter",
        ),
        ({"criterion": Std(quality={"net.0": 1.0})}, {}, r"rounds\[0\]: Layer 'net.3' matches no pattern in `quality`"),
        ({"criterion": Std(quality={"conv*": 1.0, "*": 1.0})}, {}, r"Pattern 'conv\*' in `quality` matches none of"),
        ({"rounds": [{"level": {"conv*": 1.0, "*": 1.0}}]}, {}, r"Pattern 'conv\*' in `quality` matches none of"),
        ({}, {"max_epochs": 1}, r"prunes once at max_epochs // 2, .*got 1"),
    ],
)
def test_bad_setup_fails_before_training_and_leaves_model_untouched(tmp_path, kwargs, trainer_kwargs, match):
    torch.manual_seed(0)
    model = ToyMLP()
    before = weights_of(model)
    trainer_kwargs.setdefault("max_epochs", 4)
    trainer = make_trainer(tmp_path, [PruneRetrainCallback(verbose=False, **kwargs)], **trainer_kwargs)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, toy_loader())
    assert trainer.global_step == 0
    for key, value in before.items():
        assert torch.equal(model.state_dict()[key], value)


def test_prune_epochs_beyond_max_epochs_warn(tmp_path):
    prune = PruneRetrainCallback(prune_epochs=[1, 4, 6], verbose=False)
    with pytest.warns(UserWarning, match=r"epochs \[4, 6\] are at or beyond max_epochs=4: they will not run"):
        make_trainer(tmp_path, [prune], max_epochs=4).fit(ToyMLP(), toy_loader())
    assert prune.schedule.done == [0]


def test_non_finite_weights_at_prune_time(tmp_path):
    class Poison(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                with torch.no_grad():
                    pl_module.net[3].weight[0, 0] = float("nan")

    trainer = make_trainer(tmp_path, [Poison(), PruneRetrainCallback(prune_epochs=[1], verbose=False)], 2)
    with pytest.raises(PruningError, match=r"Parameter 'net\.3\.weight' holds NaN or inf values"):
        trainer.fit(ToyMLP(), toy_loader())


def test_a_prune_that_empties_a_layer_fails_unless_floored(tmp_path):
    model = ToyMLP()
    prune = PruneRetrainCallback(criterion=Std(quality=50.0), prune_epochs=[1], verbose=False)
    trainer = make_trainer(tmp_path, [prune], max_epochs=2)
    with pytest.raises(PruningError, match=r"Pruning would remove every connection of 'net\.0\.weight'"):
        trainer.fit(model, toy_loader())
    assert not prune.pruner.masks
    assert torch.all(model.net[0].weight != 0)

    prune = PruneRetrainCallback(criterion=Std(quality=50.0, min_remaining=0.05), prune_epochs=[1], verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=2).fit(ToyMLP(), toy_loader())
    assert [s.remaining for s in prune.pruner.stats()] == [math.ceil(0.05 * n) for n in (384, 512, 48)]


def test_progress_and_is_bound_to(tmp_path):
    torch.manual_seed(0)
    model, other = ToyMLP(), ToyMLP()
    prune = PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1], verbose=False)
    assert prune.progress() == (0, 0) and not prune.is_bound_to(model)
    prune.bind(model)
    assert prune.is_bound_to(model) and not prune.is_bound_to(other)
    assert prune.progress() == (944, 944)  # 12*32 + 32*16 + 16*3 weights, none pruned yet
    make_trainer(tmp_path, [prune], max_epochs=2).fit(model, toy_loader())
    assert prune.is_bound_to(model)
    assert prune.progress() == (sum(int(k.sum()) for k in prune.pruner.masks.values()), 944)
    assert prune.progress()[0] < 944
    prune.bind(other)  # another model: a fresh selection, nothing pruned in it
    assert prune.is_bound_to(other) and not prune.is_bound_to(model) and prune.progress() == (944, 944)


def test_settings_as_dataclasses_or_dicts_are_the_same():
    as_objects = PruneRetrainCallback(
        rounds=[Round(level=0.5, epochs=1), Round(epochs=2, lr_scale=0.5)],
        retrain=Retraining(lr_scale=0.1, train_only=["net.5"]),
        dense=Regularization(weight_decay=0.0),
        dropout=DropoutAdjustment(links={"net.2": "net.3"}),
        guard=Guard("val_acc", tolerance=0.01),
        sensitivity=Sensitivity(tolerance=0.01),
    )
    as_dicts = PruneRetrainCallback(
        rounds=[{"level": 0.5, "epochs": 1}, {"epochs": 2, "lr_scale": 0.5}],
        retrain={"lr_scale": 0.1, "train_only": ["net.5"]},
        dense={"weight_decay": 0.0},
        dropout={"links": {"net.2": "net.3"}},
        guard={"monitor": "val_acc", "tolerance": 0.01},
        sensitivity={"tolerance": 0.01},
    )
    for a, b in ((as_objects, as_dicts), (as_dicts, as_objects)):
        assert a.retrain == b.retrain and a.phase.dense == b.phase.dense and a.dropout_settings == b.dropout_settings
        assert a.guard.settings == b.guard.settings and a.sensitivity_settings == b.sensitivity_settings
    fields = [(r.level, r.epochs, r.lr_scale, r.train_only, r.rule.describe()) for r in as_dicts.schedule.rounds]
    assert fields == [
        (0.5, 1, 0.1, ["net.5"], "Std(quality=1.0, std_of='dense')"),
        (1.0, 2, 0.5, ["net.5"], fields[0][4]),
    ]
    assert [(r.level, r.epochs, r.lr_scale) for r in as_objects.schedule.rounds] == [f[:3] for f in fields]
