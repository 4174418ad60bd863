"""The callback's checkpoint state: version 3, its upgrade from versions 1 and 2, and ``masks_from_checkpoint``."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from toy_models import ToyMLP, make_trainer, toy_loader

from lightning_prune import PruneRetrainCallback, Retraining, Std
from lightning_prune.checkpoint import STATE_VERSION, CheckpointError, read_checkpoint, upgrade_state

ROUNDS = [{"level": 0.6}, {"level": 1.0}]


def callback() -> PruneRetrainCallback:
    return PruneRetrainCallback(prune_epochs=[1, 3], rounds=ROUNDS, retrain=Retraining(lr_scale=0.5), verbose=False)


class Seen(Callback):
    """The learning rate and dropout rate at each epoch start (after the pruning callback)."""

    def __init__(self):
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append((trainer.optimizers[0].param_groups[0]["lr"], pl_module.net[2].p))


def fit(tmp_path, max_epochs, ckpt_path=None, save=False):
    torch.manual_seed(0)
    model, prune, seen = ToyMLP(dropout=0.5), callback(), Seen()
    callbacks = [prune, seen] + ([ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)] if save else [])
    make_trainer(tmp_path, callbacks, max_epochs=max_epochs, enable_checkpointing=save).fit(
        model, toy_loader(), ckpt_path=ckpt_path
    )
    return model, prune, seen.seen


def own_state(checkpoint):
    (key,) = [k for k in checkpoint["callbacks"] if k.startswith("PruneRetrainCallback")]
    return key, checkpoint["callbacks"][key]


def to_version_2(state):
    """The flat layout lightning-prune wrote as version 2, built from a version 3 state."""
    schedule, phase, dropout = state["schedule"], state["phase"], dict(state["dropout"])
    traced = dropout.pop("traced")
    return {
        "version": 2,
        "pruner": state["pruner"],
        "done_rounds": schedule["done"],
        "lr_scale_in_force": phase["lr_scale"],
        "original_weight_decay": phase["original_weight_decay"],
        "dropout": dropout,
        "traced": traced,
        "guard_baseline": None,
        "decisions": schedule["decisions"],
        "skipped_rounds": schedule["skipped"],
        "stopped": schedule["stopped"],
        "round_scales": schedule["scales"],
        "sensitivity": None,
        "defaults": {"criterion": "std", "quality": 1.0, "amount": None},
        "checksums": state["checksums"],
    }


def test_the_state_is_version_3_with_each_owners_part(tmp_path):
    fit(tmp_path, max_epochs=2, save=True)
    _, state = own_state(torch.load(tmp_path / "last.ckpt", weights_only=True))
    assert state["version"] == STATE_VERSION == 3
    assert set(state) == {"version", "pruner", "dropout", "schedule", "phase", "guard", "sensitivity", "checksums"}
    assert set(state["pruner"]) == {"masks", "dense_std", "thresholds", "rules"}
    assert state["schedule"] == {
        "done": [0],
        "skipped": [],
        "scales": {},
        "stopped": False,
        "decisions": [],
        "default_level": None,
    }
    assert state["phase"] == {"lr_scale": 0.5, "original_weight_decay": [[1e-3]]}
    assert state["dropout"]["traced"] is True and state["dropout"]["original"] == {"net.2": 0.5}
    assert state["guard"] is None and state["sensitivity"] is None
    assert set(state["checksums"]) == {"state_dict", "masks"}


def test_a_fit_resumes_from_a_version_2_state_as_from_its_own(tmp_path):
    _, _, before = fit(tmp_path, max_epochs=2, save=True)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    key, state = own_state(checkpoint)
    checkpoint["callbacks"][key] = to_version_2(state)
    torch.save(checkpoint, tmp_path / "v2.ckpt")
    own_model, own, own_seen = fit(tmp_path, max_epochs=5, ckpt_path=tmp_path / "last.ckpt")
    model, prune, seen = fit(tmp_path, max_epochs=5, ckpt_path=tmp_path / "v2.ckpt")
    assert prune.schedule.done == [0, 1] and prune.phase.lr_scale == 0.5 and prune.dropout.traced
    assert seen == own_seen and seen[0] == before[1]  # the learning and dropout rates in force continue
    assert seen[0][1] < 0.5 and seen[2][1] < seen[0][1]
    for name, keep in own.pruner.masks.items():
        assert torch.equal(keep, prune.pruner.masks[name]), name
    for name, value in own_model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], value, rtol=0, atol=0)


def test_version_2_upgrades_key_by_key():
    masks = {"net.0.weight": torch.ones(32, 12, dtype=torch.bool)}
    snapshot = {
        "model": {"net.0.weight": torch.zeros(32, 12)},
        "callback": {"pruner": {"masks": {}}, "done_rounds": [0], "dropout": {"current": {"d": 0.5}}, "traced": True},
    }
    v2 = {
        "version": 2,
        "pruner": {"masks": masks, "dense_std": {"net.0.weight": 0.1}, "thresholds": {}, "rules": {}},
        "done_rounds": [0, 1],
        "lr_scale_in_force": 0.1,
        "original_weight_decay": [[1e-3, 0.0]],
        "dropout": {"original": {"d": 0.5}, "current": {"d": 0.3}},
        "traced": True,
        "guard_baseline": 0.91,
        "decisions": [{"round": 0, "decision": "kept", "reason": "val_acc within tolerance"}],
        "skipped_rounds": [2],
        "stopped": True,
        "round_scales": {"1": 0.8},
        "sensitivity": {"rows": []},
        "defaults": {"criterion": "fraction", "quality": 1.0, "amount": {"*": 0.7}},
        "snapshot": snapshot,
        "checksums": {"state_dict": {}, "masks": {}},
    }
    state = upgrade_state(v2)
    assert state["version"] == 3 and state["pruner"] is v2["pruner"]
    assert state["schedule"] == {
        "done": [0, 1],
        "skipped": [2],
        "scales": {"1": 0.8},
        "stopped": True,
        "decisions": v2["decisions"],
        "default_level": {"*": 0.7},  # the sensitivity's choice, of the fraction criterion
    }
    assert state["phase"] == {"lr_scale": 0.1, "original_weight_decay": [[1e-3, 0.0]]}
    assert state["dropout"] == {"original": {"d": 0.5}, "current": {"d": 0.3}, "traced": True}
    assert state["guard"]["baseline"] == 0.91
    assert state["guard"]["snapshot"] == {
        "model": snapshot["model"],
        "state": {"pruner": {"masks": {}}, "done": [0], "dropout": {"current": {"d": 0.5}, "traced": True}},
    }
    assert state["sensitivity"] == {"rows": []} and state["checksums"] == v2["checksums"]
    without_sweep = upgrade_state({**v2, "sensitivity": None, "dropout": None, "snapshot": None})
    assert without_sweep["schedule"]["default_level"] is None  # the defaults were the callback's own
    assert without_sweep["dropout"] is None and without_sweep["guard"]["snapshot"] is None


def test_version_1_upgrades_done_epochs_to_rounds():
    state = upgrade_state({"version": 1, "pruner": {"masks": {}}, "done_epochs": [4, 8]})
    assert state["version"] == 3 and state["schedule"]["done"] == [0, 1]
    assert state["phase"] == {"lr_scale": 1.0, "original_weight_decay": []}
    assert upgrade_state({"pruner": {}})["schedule"]["done"] == []  # no version: the first layout


def test_a_version_3_state_is_taken_as_it_is():
    state = {"version": 3, "pruner": {"masks": {}}, "schedule": {"done": [0]}, "phase": {}}
    assert upgrade_state(state) == state and upgrade_state(state) is not state


@pytest.mark.parametrize(
    ("state", "match"),
    [
        ({"version": 99}, r"version 99; this lightning-prune reads versions 1 to 3 \(a newer lightning-prune wrote it"),
        ({"version": 4, "pruner": {}}, r"version 4; this lightning-prune reads versions 1 to 3 \(a newer"),
        ({"version": 0}, r"version 0; this lightning-prune reads versions 1 to 3\.$"),
        ({"version": "3"}, r"version '3'; this lightning-prune reads versions 1 to 3\.$"),
        ({"version": True}, r"version True; this lightning-prune reads versions 1 to 3\.$"),
        ([("version", 3)], r"state must be a mapping, got list"),
        ({"version": 3, "pruner": []}, r"holds no mapping of masks \(pruner: list\)"),
        ({"version": 2, "pruner": {"masks": [1]}}, r"holds no mapping of masks"),
    ],
    ids=["newer", "next", "zero", "string", "bool", "list", "pruner", "masks"],
)
def test_an_unknown_or_malformed_state_is_refused(state, match):
    with pytest.raises(ValueError, match=match):
        upgrade_state(state)


def test_a_newer_state_in_a_checkpoint_is_refused_on_resume(tmp_path):
    fit(tmp_path, max_epochs=2, save=True)
    checkpoint = torch.load(tmp_path / "last.ckpt", weights_only=True)
    own_state(checkpoint)[1]["version"] = 4
    torch.save(checkpoint, tmp_path / "last.ckpt")
    with pytest.raises(ValueError, match=r"version 4; this lightning-prune reads versions 1 to 3 \(a newer"):
        fit(tmp_path, max_epochs=4, ckpt_path=tmp_path / "last.ckpt")


# ----------------------------------------------------------------------------------------------- masks_from_checkpoint
def test_masks_from_checkpoint_restores_and_checks(tmp_path):
    _, trained, _ = fit(tmp_path, max_epochs=2, save=True)
    checkpoint = read_checkpoint(tmp_path / "last.ckpt")
    model = ToyMLP(dropout=0.5)
    model.load_state_dict(checkpoint["state_dict"])
    with torch.no_grad():
        model.net[0].weight.add_(1.0)  # not zero where pruned: the restore zeroes them
    prune = callback()
    masks = prune.masks_from_checkpoint(checkpoint, model, "last.ckpt")
    assert prune.is_bound_to(model) and masks.keys() == trained.pruner.masks.keys()
    for name, keep in masks.items():
        assert torch.equal(keep, trained.pruner.masks[name]) and torch.all(model.get_parameter(name)[~keep] == 0)
    assert prune.schedule.done == [0] and prune.phase.lr_scale == 1.0  # optimizers start afresh with the next fit
    assert model.net[2].p == pytest.approx(trained.dropout.adjuster.current()["net.2"])
    assert prune.progress() == trained.progress()

    other = PruneRetrainCallback(layers=["net.0"], criterion=Std(quality=0.5), prune_epochs=[1])
    assert other.state_key != prune.state_key
    assert other.masks_from_checkpoint(checkpoint, ToyMLP()) is None  # no state of that callback in it


@pytest.mark.parametrize("what", ["weights", "mask"])
def test_masks_from_a_changed_checkpoint_are_refused(tmp_path, what):
    fit(tmp_path, max_epochs=2, save=True)
    checkpoint = read_checkpoint(tmp_path / "last.ckpt")
    if what == "weights":
        checkpoint["state_dict"]["net.3.weight"][0, 0] += 1.0
    else:
        own_state(checkpoint)[1]["pruner"]["masks"]["net.3.weight"][0, 0] ^= True
    with pytest.raises(CheckpointError, match=rf"'x\.ckpt': the {what} of 'net\.3\.weight' changed since"):
        callback().masks_from_checkpoint(checkpoint, ToyMLP(dropout=0.5), "x.ckpt")


def test_restore_refuses_more_rounds_done_than_the_callback_has(tmp_path):
    fit(tmp_path, max_epochs=4, save=True)
    _, state = own_state(read_checkpoint(tmp_path / "last.ckpt"))
    one_round = PruneRetrainCallback(prune_epochs=[1], criterion=Std(quality=0.6), verbose=False)
    with pytest.raises(ValueError, match=r"The checkpoint has rounds \[0, 1\] done, but this callback has 1 rounds"):
        one_round.restore(ToyMLP(dropout=0.5), state)
