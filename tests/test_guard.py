"""The accuracy guard on iterative pruning, inside one fit and under fit_rounds."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from toy_models import ToyData, ToyMLP, make_trainer

from lightning_prune import PruneRetrainCallback, fit_rounds
from lightning_prune.core.guard import AccuracyGuard
from lightning_prune.core.schedule import Round

GENTLE, ABSURD = {"quality": 0.3}, {"quality": 10.0, "min_remaining": 0.0001}


class Snapshots(Callback):
    """Weights at each epoch start, taken before the pruning callback runs (list this one first)."""

    def __init__(self):
        self.weights = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def fit(tmp_path, rounds, epochs, max_epochs, **guard):
    torch.manual_seed(0)
    model = ToyMLP()
    guard = {"guard_monitor": "val_loss", "guard_mode": "min", "guard_tolerance": 0.05, **guard}
    prune = PruneRetrainCallback(prune_epochs=epochs, rounds=rounds, verbose=False, **guard)
    snaps = Snapshots()
    data = ToyData(n=128)
    make_trainer(tmp_path, [snaps, prune], max_epochs=max_epochs).fit(model, datamodule=data)
    return model, prune, snaps


def test_a_round_that_loses_accuracy_is_rolled_back_and_the_schedule_stops(tmp_path):
    model, prune, snaps = fit(tmp_path, [GENTLE, ABSURD, GENTLE], [2, 4, 6], max_epochs=8)
    assert [(d["round"], d["decision"]) for d in prune.decisions] == [(0, "kept"), (1, "rolled back")]
    assert "the schedule stops" in prune.decisions[-1]["reason"] and "val_loss" in prune.decisions[-1]["reason"]
    assert prune.stopped and prune.done_rounds == [0]
    assert prune.pruner.sparsity() < 0.5  # round 1's masks, not round 2's 99%
    # Round 1's masks are back (the non-zeros when round 2 started), and zeros stayed zeros afterwards.
    for name, keep in prune.pruner.masks.items():
        assert torch.equal(keep, snaps.weights[4][name] != 0)
        assert torch.all(model.get_parameter(name)[~keep] == 0)


def test_rollback_restores_exactly_the_previous_rounds_weights_and_masks(tmp_path):
    model, prune, snaps = fit(tmp_path, [GENTLE, ABSURD], [2, 4], max_epochs=5)
    # The last round fails at the end of training: the model is rolled back to the start of round 2.
    assert [(d["round"], d["decision"]) for d in prune.decisions] == [(0, "kept"), (1, "rolled back")]
    assert "no epochs left to retry" in prune.decisions[-1]["reason"]
    for key, value in snaps.weights[4].items():
        assert torch.equal(model.state_dict()[key], value), key
    for name, keep in prune.pruner.masks.items():
        assert torch.equal(keep, snaps.weights[4][name] != 0)


def test_a_round_within_tolerance_is_kept(tmp_path):
    _, prune, _ = fit(tmp_path, [GENTLE, {"quality": 0.5}], [2, 4], max_epochs=6, guard_tolerance=1.0)
    assert [d["decision"] for d in prune.decisions] == ["kept", "kept"]
    assert prune.done_rounds == [0, 1] and not prune.stopped


def test_retry_gentler_takes_the_next_rounds_epochs(tmp_path):
    _, prune, _ = fit(
        tmp_path,
        [GENTLE, {"quality": 30.0, "min_remaining": 0.0001}, GENTLE, GENTLE],
        [2, 4, 6, 8],
        max_epochs=10,
        guard_action="retry",
        guard_retries=3,
        guard_retry_scale=0.1,
    )
    decisions = [(d["round"], d["decision"]) for d in prune.decisions]
    assert decisions[:2] == [(0, "kept"), (1, "rolled back")]
    assert "retrying gentler in the epochs of round 3" in prune.decisions[1]["reason"]
    assert prune.round_scales[1] == pytest.approx(0.1)
    assert prune.round(1).quality == pytest.approx(3.0)
    assert 2 in prune.skipped_rounds and 1 in prune.done_rounds


def test_guard_state_survives_checkpoints(tmp_path):
    _, prune, _ = fit(tmp_path, [GENTLE, ABSURD, GENTLE], [2, 4, 6], max_epochs=8)
    state = prune.state_dict()
    fresh = PruneRetrainCallback(
        prune_epochs=[2, 4, 6], rounds=[GENTLE, ABSURD, GENTLE], guard_monitor="val_loss", guard_mode="min"
    )
    fresh.restore(ToyMLP(), state)
    assert fresh.stopped and fresh.decisions == prune.decisions and fresh.guard.baseline == prune.guard.baseline


def test_monitor_that_is_never_logged(tmp_path):
    prune = PruneRetrainCallback(prune_epochs=[1], guard_monitor="val_acc")
    trainer = make_trainer(tmp_path, [prune], max_epochs=2)
    with pytest.raises(
        ValueError, match=r"`guard_monitor` 'val_acc' is not among the logged metrics \['train_loss', 'val_loss'\]"
    ):
        trainer.fit(ToyMLP(), datamodule=ToyData())
    assert not prune.pruner.masks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"guard_tolerance": -0.1}, r"`guard_tolerance` must be a finite number >= 0, got -0.1"),
        ({"guard_mode": "up"}, r"`guard_mode` must be one of \('max', 'min'\), got 'up'"),
        ({"guard_action": "undo"}, r"`guard_action` must be one of \('stop', 'retry'\), got 'undo'"),
        ({"guard_retries": -1}, r"`guard_retries` must be an integer >= 0, got -1"),
        ({"guard_retry_scale": 1.0}, r"`guard_retry_scale` must be a number in \(0, 1\), got 1.0"),
        ({"guard_monitor": ""}, r"`guard_monitor` must be a metric name, got ''"),
    ],
)
def test_bad_guard_arguments(kwargs, match):
    kwargs.setdefault("guard_monitor", "val_acc")
    with pytest.raises(ValueError, match=match):
        PruneRetrainCallback(prune_epochs=[1], **kwargs)


def test_relative_tolerance_and_min_mode():
    guard = AccuracyGuard("val_loss", mode="min", tolerance=0.1, relative=True, baseline=0.5)
    assert guard.verdict({"val_loss": 0.55}) is None
    assert "more than the tolerance 0.05" in guard.verdict({"val_loss": 0.56})
    assert Round(criterion="fraction", amount=0.9).amount == 0.9


def rounds_run(tmp_path, rounds, **guard):
    torch.manual_seed(0)
    model = ToyMLP()
    guard = {"guard_monitor": "val_loss", "guard_mode": "min", "guard_tolerance": 0.05, **guard}
    prune = PruneRetrainCallback(rounds=rounds, verbose=False, **guard)
    quiet = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    results = fit_rounds(
        model, prune, trainer_kwargs=quiet, datamodule=ToyData(n=128), dense_epochs=2, checkpoint_dir=tmp_path
    )
    return model, prune, results


def test_fit_rounds_guard_rolls_back_stops_and_resumes_stopped(tmp_path):
    rounds = [{**GENTLE, "epochs": 2}, {**ABSURD, "epochs": 2}, {**GENTLE, "epochs": 2}]
    model, prune, results = rounds_run(tmp_path, rounds)
    assert [(r.name, r.rejected, r.skipped) for r in results] == [
        ("dense", False, False),
        ("round-1", False, False),
        ("round-2", True, False),
        ("round-3", False, True),
    ]
    assert [(d["round"], d["decision"]) for d in prune.decisions] == [(0, "kept"), (1, "rolled back")]
    assert (tmp_path / "stopped.txt").exists() and not (tmp_path / "round-2.ckpt").exists()
    round1 = torch.load(tmp_path / "round-1.ckpt", weights_only=True)["state_dict"]
    for key, value in round1.items():
        assert torch.equal(model.state_dict()[key], value), key
    _, again, results = rounds_run(tmp_path, rounds)
    assert all(r.skipped for r in results) and again.stopped


def test_fit_rounds_guard_retries_gentler(tmp_path):
    rounds = [{**GENTLE, "epochs": 2}, {"quality": 30.0, "min_remaining": 0.0001, "epochs": 2}]
    _, prune, results = rounds_run(tmp_path, rounds, guard_action="retry", guard_retries=2, guard_retry_scale=0.01)
    assert [(d["round"], d["decision"]) for d in prune.decisions][:3] == [
        (0, "kept"),
        (1, "rolled back"),
        (1, "kept"),
    ]
    assert prune.round_scales[1] == pytest.approx(0.01) and prune.round(1).quality == pytest.approx(0.3)
    assert [r.name for r in results] == ["dense", "round-1", "round-2"] and not results[-1].rejected
