import dataclasses
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_prune.core.guard import Guard, GuardController, Verdict

# ---------------------------------------------------------------------------------------------------------------------
# Guard: validation
# ---------------------------------------------------------------------------------------------------------------------


def test_guard_defaults():
    guard = Guard("val_acc")
    assert (guard.mode, guard.tolerance, guard.relative, guard.action, guard.retries, guard.retry_scale) == (
        "max", 0.0, False, "stop", 1, 0.8
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"monitor": ""}, r"^`guard\.monitor` must be a metric name, got ''\.$"),
        ({"monitor": None}, r"^`guard\.monitor` must be a metric name, got None\.$"),
        ({"monitor": 3}, r"^`guard\.monitor` must be a metric name, got 3\.$"),
        ({"mode": "up"}, r"^`guard\.mode` must be one of \('max', 'min'\), got 'up'\.$"),
        ({"action": "skip"}, r"^`guard\.action` must be one of \('stop', 'retry'\), got 'skip'\.$"),
        ({"tolerance": -0.01}, r"^`guard\.tolerance` must be a finite number >= 0, got -0\.01\.$"),
        ({"tolerance": float("nan")}, r"^`guard\.tolerance` must be a finite number >= 0, got nan\.$"),
        ({"tolerance": True}, r"^`guard\.tolerance` must be a finite number >= 0, got True\.$"),
        ({"relative": "no"}, r"^`guard\.relative` must be True or False, got 'no'\.$"),
        ({"relative": 1}, r"^`guard\.relative` must be True or False, got 1\.$"),
        ({"retries": -1}, r"^`guard\.retries` must be an integer >= 0, got -1\.$"),
        ({"retries": 1.5}, r"^`guard\.retries` must be an integer >= 0, got 1\.5\.$"),
        ({"retry_scale": 1.0}, r"^`guard\.retry_scale` must be a number in \(0, 1\), got 1\.0\.$"),
        ({"retry_scale": 1.5}, r"^`guard\.retry_scale` must be a number in \(0, 1\), got 1\.5\.$"),
        ({"retry_scale": 0}, r"^`guard\.retry_scale` must be a finite number > 0, got 0\.$"),
        ({"retry_scale": float("nan")}, r"^`guard\.retry_scale` must be a finite number > 0, got nan\.$"),
    ],
)
def test_guard_refuses_each_bad_field(kwargs, match):
    kwargs = {"monitor": "val_acc", **kwargs}
    with pytest.raises(ValueError, match=match):
        Guard(**kwargs)


def test_guard_accepts_edge_values():
    guard = Guard("val_loss", mode="min", tolerance=0, relative=True, action="retry", retries=0, retry_scale=0.01)
    assert guard.retries == 0 and guard.retry_scale == 0.01


def test_guard_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Guard("val_acc").tolerance = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------------
# Guard: value, worse_by
# ---------------------------------------------------------------------------------------------------------------------


def test_value_reads_numbers_and_tensors():
    guard = Guard("val_acc")
    assert guard.value({"val_acc": 0.5}) == 0.5
    value = guard.value({"val_acc": torch.tensor(0.25)})
    assert value == 0.25 and type(value) is float


def test_value_of_a_missing_metric_names_the_logged_ones():
    msg = (r"^`guard\.monitor` 'val_acc' is not among the logged metrics \['train_loss', 'val_loss'\]\. Log it "
           r"\(e\.g\. self\.log\('val_acc', \.\.\.\) in validation_step\) or pick one of those\.$")  # fmt: skip
    with pytest.raises(ValueError, match=msg):
        Guard("val_acc").value({"val_loss": 1.0, "prune/sparsity": 0.5, "train_loss": 2.0})


def test_worse_by_max_mode():
    guard = Guard("val_acc", tolerance=0.01)
    assert guard.worse_by({"val_acc": 0.99}, baseline=0.98) is None  # better
    assert guard.worse_by({"val_acc": 0.975}, baseline=0.98) is None
    reason = guard.worse_by({"val_acc": 0.95}, baseline=0.98)
    assert reason == "val_acc 0.95 is worse than the dense 0.98 by 0.03, more than the tolerance 0.01"


def test_worse_by_min_mode():
    guard = Guard("val_loss", mode="min", tolerance=0.1)
    assert guard.worse_by({"val_loss": 0.5}, baseline=1.0) is None  # lower is better
    assert guard.worse_by({"val_loss": 1.05}, baseline=1.0) is None
    assert guard.worse_by({"val_loss": 1.2}, baseline=1.0) == (
        "val_loss 1.2 is worse than the dense 1 by 0.2, more than the tolerance 0.1"
    )


def test_worse_by_relative_scales_by_the_baseline():
    guard = Guard("val_loss", mode="min", tolerance=0.1, relative=True)
    assert guard.worse_by({"val_loss": 2.19}, baseline=2.0) is None  # allowed 0.2
    assert "more than the tolerance 0.2" in guard.worse_by({"val_loss": 2.3}, baseline=2.0)
    negative = Guard("score", tolerance=0.5, relative=True)
    assert negative.worse_by({"score": -2.9}, baseline=-2.0) is None  # allowed 0.5 * |-2|
    assert negative.worse_by({"score": -3.1}, baseline=-2.0) is not None


@pytest.mark.parametrize(
    ("value", "baseline", "tolerance", "relative"),
    [(0.980, 0.985, 0.005, False), (0.98, 0.99, 0.01, False), (0.7, 0.8, 0.1, False), (0.891, 0.99, 0.1, True),
     (1.1, 1.0, 0.1, False)],
)  # fmt: skip
def test_worse_by_exactly_the_tolerance_is_within_it_despite_float_rounding(value, baseline, tolerance, relative):
    mode = "min" if value > baseline else "max"
    assert abs(baseline - value) != (tolerance * baseline if relative else tolerance)  # rounding makes it differ
    assert Guard("m", mode=mode, tolerance=tolerance, relative=relative).worse_by({"m": value}, baseline) is None


def test_worse_by_just_beyond_the_tolerance():
    guard = Guard("val_acc", tolerance=0.005)
    assert guard.worse_by({"val_acc": 0.97999}, baseline=0.985) is not None
    assert Guard("val_acc").worse_by({"val_acc": 0.985}, baseline=0.985) is None  # zero tolerance, equal value
    assert Guard("val_acc").worse_by({"val_acc": 0.9849}, baseline=0.985) is not None


def test_worse_by_nan_metric_is_worse():
    reason = Guard("val_acc", tolerance=1.0).worse_by({"val_acc": float("nan")}, baseline=0.9)
    assert reason is not None and "by nan" in reason


@given(st.floats(-10, 10), st.floats(-10, 10), st.floats(0, 5), st.sampled_from(["max", "min"]))
@settings(max_examples=80, deadline=None)
def test_worse_by_property(value, baseline, tolerance, mode):
    worse = baseline - value if mode == "max" else value - baseline
    reason = Guard("m", mode=mode, tolerance=tolerance).worse_by({"m": value}, baseline)
    if worse <= tolerance:
        assert reason is None
    elif worse > tolerance + 1e-9:
        assert reason is not None and reason.startswith("m ")


# ---------------------------------------------------------------------------------------------------------------------
# GuardController: judge
# ---------------------------------------------------------------------------------------------------------------------


def controller(**kwargs) -> GuardController:
    c = GuardController(Guard("val_acc", tolerance=0.01, **kwargs))
    c.set_baseline({"val_acc": torch.tensor(0.98)})
    return c


def test_set_baseline():
    c = GuardController(Guard("val_acc"))
    assert c.baseline is None and c.snapshot is None
    c.set_baseline({"val_acc": 0.9, "other": 1.0})
    assert c.baseline == 0.9
    with pytest.raises(ValueError, match=r"`guard\.monitor` 'val_acc' is not among the logged metrics"):
        c.set_baseline({"val_loss": 1.0})


def test_judge_keep():
    verdict = controller(action="retry").judge({"val_acc": 0.975}, tries=5, can_retry=False)
    assert verdict == Verdict("keep", "val_acc within tolerance")
    assert isinstance(verdict, tuple) and verdict.action == "keep"


def test_judge_stop_action_stops_at_once():
    verdict = controller(action="stop", retries=3).judge({"val_acc": 0.9}, tries=0, can_retry=True)
    assert verdict.action == "stop"
    assert verdict.reason.startswith("val_acc 0.9 is worse than the dense 0.98 by 0.08")


@pytest.mark.parametrize(
    ("retries", "tries", "can_retry", "action"),
    [(2, 0, True, "retry"), (2, 1, True, "retry"), (2, 2, True, "stop"), (2, 3, True, "stop"), (2, 0, False, "stop"),
     (0, 0, True, "stop"), (1, 0, True, "retry"), (1, 1, True, "stop")],
)  # fmt: skip
def test_judge_retry_until_the_retries_are_spent(retries, tries, can_retry, action):
    verdict = controller(action="retry", retries=retries).judge({"val_acc": 0.9}, tries=tries, can_retry=can_retry)
    assert verdict.action == action
    assert "worse than the dense" in verdict.reason


def test_judge_without_baseline_is_refused():
    with pytest.raises(RuntimeError, match=r"^The accuracy guard has no dense baseline yet\.$"):
        GuardController(Guard("val_acc")).judge({"val_acc": 1.0}, tries=0, can_retry=True)


def test_judge_with_a_missing_metric_is_refused():
    with pytest.raises(ValueError, match=r"`guard\.monitor` 'val_acc' is not among the logged metrics \['val_loss'\]"):
        controller().judge({"val_loss": 1.0}, tries=0, can_retry=True)


# ---------------------------------------------------------------------------------------------------------------------
# GuardController: snapshot, roll_back, state_dict
# ---------------------------------------------------------------------------------------------------------------------


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 2))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def disturb(model: nn.Module) -> None:
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).pow(2).sum().backward()  # also moves the BatchNorm buffers
        optimizer.step()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_snapshot_and_roll_back_restore_weights_and_buffers_exactly():
    model = make_model()
    disturb(model)
    before = weights(model)
    c = GuardController(Guard("val_acc"))
    pruning_state = {"masks": {"0.weight": torch.ones(6, 4, dtype=torch.bool)}, "done": [0]}
    c.take_snapshot(model, pruning_state)
    pruning_state["done"] = [0, 1]  # the snapshot holds its own mapping
    disturb(model)
    after = weights(model)
    assert not torch.equal(after["1.running_mean"], before["1.running_mean"])
    assert after["1.num_batches_tracked"] != before["1.num_batches_tracked"]
    state = c.roll_back(model)
    assert_same(weights(model), before)
    assert state["done"] == [0] and torch.equal(state["masks"]["0.weight"], pruning_state["masks"]["0.weight"])
    state["done"] = "changed"  # a copy is returned: a second roll back gives the state again
    disturb(model)
    assert c.roll_back(model)["done"] == [0]
    assert_same(weights(model), before)


def test_snapshot_is_a_cpu_copy_unaffected_by_later_training():
    model = make_model()
    c = GuardController(Guard("val_acc"))
    c.take_snapshot(model, {})
    snap = c.snapshot["model"]
    assert all(t.device.type == "cpu" for t in snap.values())
    assert all(snap[k].data_ptr() != v.data_ptr() for k, v in model.state_dict().items())
    before = {k: v.clone() for k, v in snap.items()}
    disturb(model)
    assert_same(snap, before)


def test_roll_back_without_snapshot_is_refused():
    with pytest.raises(RuntimeError, match=r"^The accuracy guard has no snapshot to roll back to\.$"):
        GuardController(Guard("val_acc")).roll_back(make_model())


def test_state_dict_round_trip_through_torch_save_weights_only():
    model = make_model()
    c = controller()
    c.take_snapshot(model, {"done": [0], "scales": {"0": 0.8}})
    buffer = io.BytesIO()
    torch.save(c.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    other = GuardController(c.settings)
    other.load_state_dict(loaded)
    assert other.baseline == pytest.approx(0.98) and type(other.baseline) is float
    assert other.snapshot["state"] == {"done": [0], "scales": {"0": 0.8}}
    before = weights(model)
    disturb(model)
    assert other.roll_back(model) == {"done": [0], "scales": {"0": 0.8}}
    assert_same(weights(model), before)


def test_state_dict_of_a_fresh_controller():
    c = GuardController(Guard("val_acc"))
    assert c.state_dict() == {"baseline": None, "snapshot": None}
    c.set_baseline({"val_acc": 0.5})
    c.load_state_dict({})
    assert c.baseline is None and c.snapshot is None


def _schedule_of(rounds: int):
    from lightning_prune.core.criteria import Std
    from lightning_prune.core.schedule import Schedule
    from lightning_prune.core.settings import Retraining

    return Schedule([{}] * rounds, list(range(1, rounds + 1)), Std(), Retraining())


def test_decide_keeps_retries_in_place_of_a_round_then_stops_and_records_each_decision():
    controller = GuardController(Guard("val_acc", tolerance=0.01, action="retry", retries=1, retry_scale=0.5))
    controller.set_baseline({"val_acc": 0.9})
    schedule = _schedule_of(3)
    verdict, text = controller.decide(schedule, 0, {"val_acc": 0.895}, can_retry=True, in_place_of=1)
    assert verdict.action == "keep" and text == "round 1 kept: val_acc within tolerance"
    verdict, text = controller.decide(schedule, 1, {"val_acc": 0.8}, can_retry=True, in_place_of=2)
    assert verdict.action == "retry" and schedule.scales[1] == 0.5 and schedule.skipped == [2]
    assert text.startswith("round 2 rolled back: val_acc 0.8 is worse") and text.endswith("in the epochs of round 3")
    verdict, text = controller.decide(schedule, 1, {"val_acc": 0.8}, can_retry=True, in_place_of=None)
    assert verdict.action == "stop" and schedule.stopped and text.endswith("; the schedule stops")
    assert [(d["round"], d["decision"]) for d in schedule.decisions] == [
        (0, "kept"), (1, "rolled back"), (1, "rolled back"),
    ]  # fmt: skip


def test_decide_at_the_end_of_training_stops_with_no_epochs_left():
    controller = GuardController(Guard("val_loss", mode="min", action="retry"))
    controller.set_baseline({"val_loss": 0.5})
    schedule = _schedule_of(1)
    verdict, text = controller.decide(schedule, 0, {"val_loss": 0.7}, can_retry=False, in_place_of=None)
    assert verdict.action == "stop" and schedule.stopped and text.endswith("; no epochs left to retry")
