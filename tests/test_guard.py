"""The accuracy guard on iterative pruning, inside one fit and under fit_rounds."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from toy_models import ToyData, ToyMLP, make_trainer, toy_loader

from lightning_prune import Guard, PruneRetrainCallback, Round, fit_rounds
from lightning_prune.core.guard import GuardController

GENTLE, ABSURD = {"level": 0.3}, {"level": 10.0, "min_remaining": 0.0001}


class Snapshots(Callback):
    """Weights at each epoch start, taken before the pruning callback runs (list this one first)."""

    def __init__(self):
        self.weights = {}

    def on_train_epoch_start(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def fit(tmp_path, rounds, epochs, max_epochs, **guard):
    torch.manual_seed(0)
    model = ToyMLP()
    guard = Guard(**{"monitor": "val_loss", "mode": "min", "tolerance": 0.05, **guard})
    prune = PruneRetrainCallback(prune_epochs=epochs, rounds=rounds, verbose=False, guard=guard)
    snaps = Snapshots()
    data = ToyData(n=128)
    make_trainer(tmp_path, [snaps, prune], max_epochs=max_epochs).fit(model, datamodule=data)
    return model, prune, snaps


def test_a_round_that_loses_accuracy_is_rolled_back_and_the_schedule_stops(tmp_path):
    model, prune, snaps = fit(tmp_path, [GENTLE, ABSURD, GENTLE], [2, 4, 6], max_epochs=8)
    assert [(d["round"], d["decision"]) for d in prune.schedule.decisions] == [(0, "kept"), (1, "rolled back")]
    assert (
        "the schedule stops" in prune.schedule.decisions[-1]["reason"]
        and "val_loss" in prune.schedule.decisions[-1]["reason"]
    )
    assert prune.schedule.stopped and prune.schedule.done == [0]
    assert prune.pruner.sparsity() < 0.5  # round 1's masks, not round 2's 99%
    # Round 1's masks are back (the non-zeros when round 2 started), and zeros stayed zeros afterwards.
    for name, keep in prune.pruner.masks.items():
        assert torch.equal(keep, snaps.weights[4][name] != 0)
        assert torch.all(model.get_parameter(name)[~keep] == 0)


def test_rollback_restores_exactly_the_previous_rounds_weights_and_masks(tmp_path):
    model, prune, snaps = fit(tmp_path, [GENTLE, ABSURD], [2, 4], max_epochs=5)
    # The last round fails at the end of training: the model is rolled back to the start of round 2.
    assert [(d["round"], d["decision"]) for d in prune.schedule.decisions] == [(0, "kept"), (1, "rolled back")]
    assert "no epochs left to retry" in prune.schedule.decisions[-1]["reason"]
    for key, value in snaps.weights[4].items():
        assert torch.equal(model.state_dict()[key], value), key
    for name, keep in prune.pruner.masks.items():
        assert torch.equal(keep, snaps.weights[4][name] != 0)


def test_a_round_within_tolerance_is_kept(tmp_path):
    _, prune, _ = fit(tmp_path, [GENTLE, {"level": 0.5}], [2, 4], max_epochs=6, tolerance=1.0)
    assert [d["decision"] for d in prune.schedule.decisions] == ["kept", "kept"]
    assert prune.schedule.done == [0, 1] and not prune.schedule.stopped


def test_retry_gentler_takes_the_next_rounds_epochs(tmp_path):
    _, prune, _ = fit(
        tmp_path,
        [GENTLE, {"level": 30.0, "min_remaining": 0.0001}, GENTLE, GENTLE],
        [2, 4, 6, 8],
        max_epochs=10,
        action="retry",
        retries=3,
        retry_scale=0.1,
    )
    decisions = [(d["round"], d["decision"]) for d in prune.schedule.decisions]
    assert decisions[:2] == [(0, "kept"), (1, "rolled back")]
    assert "retrying it gentler in the epochs of round 3" in prune.schedule.decisions[1]["reason"]
    assert prune.schedule.scales[1] == pytest.approx(0.1)
    assert prune.schedule.round(1).level == pytest.approx(3.0)
    assert 2 in prune.schedule.skipped and 1 in prune.schedule.done


def test_guard_state_survives_checkpoints(tmp_path):
    _, prune, _ = fit(tmp_path, [GENTLE, ABSURD, GENTLE], [2, 4, 6], max_epochs=8)
    state = prune.state_dict()
    fresh = PruneRetrainCallback(
        prune_epochs=[2, 4, 6], rounds=[GENTLE, ABSURD, GENTLE], guard=Guard("val_loss", mode="min")
    )
    fresh.restore(ToyMLP(), state)
    assert fresh.schedule.stopped and fresh.schedule.decisions == prune.schedule.decisions
    assert fresh.guard.baseline == prune.guard.baseline and not fresh.needs_guard_baseline


def test_monitor_that_is_never_logged(tmp_path):
    prune = PruneRetrainCallback(prune_epochs=[1], guard=Guard("val_acc"))
    trainer = make_trainer(tmp_path, [prune], max_epochs=2)
    with pytest.raises(
        ValueError, match=r"`guard\.monitor` 'val_acc' is not among the logged metrics \['train_loss', 'val_loss'\]"
    ):
        trainer.fit(ToyMLP(), datamodule=ToyData())
    assert not prune.pruner.masks


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": -0.1}, r"`guard\.tolerance` must be a finite number >= 0, got -0.1"),
        ({"mode": "up"}, r"`guard\.mode` must be one of \('max', 'min'\), got 'up'"),
        ({"action": "undo"}, r"`guard\.action` must be one of \('stop', 'retry'\), got 'undo'"),
        ({"retries": -1}, r"`guard\.retries` must be an integer >= 0, got -1"),
        ({"retry_scale": 1.0}, r"`guard\.retry_scale` must be a number in \(0, 1\), got 1.0"),
        ({"retry_scale": 0.0}, r"`guard\.retry_scale` must be a finite number > 0, got 0.0"),
        ({"monitor": ""}, r"`guard\.monitor` must be a metric name, got ''"),
        ({"patience": 2}, r"Unknown key 'patience' in `guard`\. Accepted keys: monitor, mode"),
    ],
)
def test_bad_guard_arguments(kwargs, match):
    kwargs.setdefault("monitor", "val_acc")
    with pytest.raises(ValueError, match=match):
        PruneRetrainCallback(prune_epochs=[1], guard=kwargs)


def test_relative_tolerance_and_min_mode():
    guard = Guard("val_loss", mode="min", tolerance=0.1, relative=True)
    assert guard.worse_by({"val_loss": 0.55}, baseline=0.5) is None
    assert "more than the tolerance 0.05" in guard.worse_by({"val_loss": 0.56}, baseline=0.5)
    controller = GuardController(guard)
    controller.set_baseline({"val_loss": 0.5})
    assert controller.judge({"val_loss": 0.55}, tries=0, can_retry=True).action == "keep"
    assert controller.judge({"val_loss": 0.56}, tries=0, can_retry=True).action == "stop"
    assert Round(criterion="fraction", level=0.9).level == 0.9


def rounds_run(tmp_path, rounds, **guard):
    torch.manual_seed(0)
    model = ToyMLP()
    guard = {"monitor": "val_loss", "mode": "min", "tolerance": 0.05, **guard}
    prune = PruneRetrainCallback(rounds=rounds, verbose=False, guard=guard)
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
    assert [(d["round"], d["decision"]) for d in prune.schedule.decisions] == [(0, "kept"), (1, "rolled back")]
    assert (tmp_path / "stopped.txt").exists() and not (tmp_path / "round-2.ckpt").exists()
    round1 = torch.load(tmp_path / "round-1.ckpt", weights_only=True)["state_dict"]
    for key, value in round1.items():
        assert torch.equal(model.state_dict()[key], value), key
    _, again, results = rounds_run(tmp_path, rounds)
    assert all(r.skipped for r in results) and again.schedule.stopped


def test_fit_rounds_guard_retries_gentler(tmp_path):
    rounds = [{**GENTLE, "epochs": 2}, {"level": 30.0, "min_remaining": 0.0001, "epochs": 2}]
    _, prune, results = rounds_run(tmp_path, rounds, action="retry", retries=2, retry_scale=0.01)
    assert [(d["round"], d["decision"]) for d in prune.schedule.decisions][:3] == [
        (0, "kept"),
        (1, "rolled back"),
        (1, "kept"),
    ]
    assert prune.schedule.scales[1] == pytest.approx(0.01) and prune.schedule.round(1).level == pytest.approx(0.3)
    assert [r.name for r in results] == ["dense", "round-1", "round-2"] and not results[-1].rejected


# ----------------------------------------------------------------------------------------------- driver methods
def test_without_a_guard_the_driver_methods_do_nothing():
    model = ToyMLP()
    prune = PruneRetrainCallback(prune_epochs=[1])
    assert not prune.has_guard and not prune.needs_guard_baseline
    prune.set_guard_baseline({"val_acc": 0.9})
    prune.take_guard_snapshot(model)
    assert prune.guard is None and not prune.is_bound_to(model)


def test_set_guard_baseline_and_take_guard_snapshot():
    torch.manual_seed(0)
    model = ToyMLP()
    prune = PruneRetrainCallback(prune_epochs=[1], guard=Guard("val_acc"))
    assert prune.has_guard and prune.needs_guard_baseline
    with pytest.raises(ValueError, match=r"`guard\.monitor` 'val_acc' is not among the logged metrics \['val_loss'\]"):
        prune.set_guard_baseline({"val_loss": torch.tensor(0.5), "prune/sparsity": torch.tensor(0.0)})
    prune.set_guard_baseline({"val_acc": torch.tensor(0.875)})
    assert prune.guard.baseline == 0.875 and not prune.needs_guard_baseline
    prune.take_guard_snapshot(model)
    assert prune.is_bound_to(model)  # a snapshot binds the callback to the model
    snapshot = prune.guard.snapshot
    assert snapshot["state"]["done"] == [] and snapshot["state"]["pruner"]["masks"] == {}
    assert all(torch.equal(snapshot["model"][k], v) for k, v in model.state_dict().items())
    assert all(v.device.type == "cpu" and v is not model.state_dict()[k] for k, v in snapshot["model"].items())


def one_round_fit(tmp_path, prune, model, index):
    prune.fit_round(index)
    make_trainer(tmp_path, [prune], max_epochs=1).fit(model, toy_loader())


def test_judge_round_keeps_retries_and_stops_across_fits(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    rounds = [{"level": 0.5, "epochs": 1}, {"level": 1.0, "epochs": 1}]
    prune = PruneRetrainCallback(rounds=rounds, guard=Guard("val_acc", tolerance=0.01, action="retry"), verbose=False)
    prune.set_guard_baseline({"val_acc": 0.9})
    prune.take_guard_snapshot(model)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    one_round_fit(tmp_path, prune, model, 0)
    assert prune.schedule.done == [0] and prune.progress()[0] < prune.progress()[1]

    verdict = prune.judge_round(model, 0, {"val_acc": 0.5})  # too much lost: rolled back, retried gentler
    assert verdict.action == "retry" and "val_acc 0.5 is worse than the dense 0.9" in verdict.reason
    assert prune.schedule.done == [] and not prune.pruner.masks and prune.progress() == (944, 944)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dense.items())
    assert prune.schedule.scales == {0: 0.8} and prune.schedule.round(0).level == pytest.approx(0.4)
    assert prune.schedule.decisions[-1]["reason"].endswith("; retrying it gentler")
    one_round_fit(tmp_path, prune, model, 0)
    assert set(prune.pruner.rules.values()) == {"0.40 x std"}  # the retry ran gentler

    verdict = prune.judge_round(model, 0, {"val_acc": 0.895})
    assert verdict == ("keep", "val_acc within tolerance") and prune.schedule.done == [0]
    kept = {k: v.clone() for k, v in prune.pruner.masks.items()}

    prune.take_guard_snapshot(model)
    after_round_1 = {k: v.clone() for k, v in model.state_dict().items()}
    one_round_fit(tmp_path, prune, model, 1)
    assert prune.judge_round(model, 1, {"val_acc": 0.1}).action == "retry"
    one_round_fit(tmp_path, prune, model, 1)
    verdict = prune.judge_round(model, 1, {"val_acc": 0.1})  # its one retry failed too: the schedule stops
    assert verdict.action == "stop" and prune.schedule.stopped and prune.schedule.done == [0]
    assert prune.schedule.decisions[-1]["reason"].endswith("; the schedule stops")
    assert all(torch.equal(prune.pruner.masks[k], v) for k, v in kept.items())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in after_round_1.items())
    assert [(d["round"], d["decision"]) for d in prune.schedule.decisions] == [
        (0, "rolled back"),
        (0, "kept"),
        (1, "rolled back"),
        (1, "rolled back"),
    ]


def test_judge_round_without_epochs_left_stops(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    prune = PruneRetrainCallback(
        rounds=[{"level": 0.5, "epochs": 1}], guard=Guard("val_acc", action="retry", retries=5), verbose=False
    )
    prune.set_guard_baseline({"val_acc": 0.9})
    prune.take_guard_snapshot(model)
    one_round_fit(tmp_path, prune, model, 0)
    verdict = prune.judge_round(model, 0, {"val_acc": 0.5}, can_retry=False)
    assert verdict.action == "stop" and prune.schedule.stopped and not prune.pruner.masks
    assert prune.schedule.decisions[-1]["reason"].endswith("; no epochs left to retry")


def test_a_rollback_inside_one_fit_puts_back_the_previous_rounds_settings(tmp_path):
    torch.manual_seed(0)
    rounds = [{**GENTLE, "lr_scale": 0.5}, {**ABSURD, "lr_scale": 0.1}, GENTLE]
    guard = Guard("val_loss", mode="min", tolerance=0.05)
    prune = PruneRetrainCallback(prune_epochs=[2, 4, 6], rounds=rounds, guard=guard, verbose=False)

    class Rates(Callback):
        def __init__(self):
            self.seen = []

        def on_train_epoch_start(self, trainer, pl_module):
            self.seen.append((trainer.optimizers[0].param_groups[0]["lr"], pl_module.net[2].p))

    rates = Rates()
    make_trainer(tmp_path, [prune, rates], max_epochs=8).fit(ToyMLP(dropout=0.5), datamodule=ToyData(n=128))
    assert [(d["round"], d["decision"]) for d in prune.schedule.decisions] == [(0, "kept"), (1, "rolled back")]
    lrs, ps = zip(*rates.seen, strict=True)
    assert lrs == pytest.approx([0.05, 0.05, 0.025, 0.025, 0.005, 0.005, 0.025, 0.025])
    assert ps[0] == 0.5 and ps[2] == ps[3] == ps[6] == ps[7] < 0.5 and ps[4] < ps[2]  # round 1's dropout is back
