import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from lightning_prune.core.learning_rate import scale_learning_rate

SCALE_AT = 3
LAST_STEP = 11


def _sgd(lr: float = 0.1, groups: int = 2) -> torch.optim.SGD:
    params = [nn.Parameter(torch.ones(2)) for _ in range(groups)]
    return torch.optim.SGD([{"params": [p], "lr": lr * (i + 1)} for i, p in enumerate(params)], lr=lr, momentum=0.9)


def _lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def _step(opt: torch.optim.Optimizer, sched: object) -> None:
    opt.step()
    sched.step()


# Schedulers whose later rates stay exactly (up to float rounding) 0.1x those of an unscaled twin.
EXACT: dict[str, Callable[[torch.optim.Optimizer], object]] = {
    "StepLR": lambda o: lrs.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 5, 7], gamma=0.3),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.9),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.95),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=5),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.2, total_iters=6),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=9, power=2.0),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda e: 1.0 / (1 + e)),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=4),  # runs past T_max into the restart branch
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=2, T_mult=2),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=2),
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=[1.0, 2.0], total_steps=LAST_STEP + 1),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o, [lrs.LinearLR(o, start_factor=0.1, total_iters=4), lrs.CosineAnnealingLR(o, T_max=5)], milestones=[4]
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler(
        [lrs.ExponentialLR(o, gamma=0.9), lrs.ConstantLR(o, factor=0.5, total_iters=4)]
    ),
}


@pytest.mark.parametrize("scale_at", [0, SCALE_AT])
@pytest.mark.parametrize("name", list(EXACT))
def test_scaled_schedule_stays_a_tenth_of_the_unscaled_one(name, scale_at):
    make = EXACT[name]
    opt, twin_opt = _sgd(), _sgd()
    sched, twin = make(opt), make(twin_opt)
    for _ in range(scale_at):
        _step(opt, sched)
        _step(twin_opt, twin)
    scale_learning_rate(opt, 0.1, [sched])
    assert _lrs(opt) == pytest.approx([0.1 * lr for lr in _lrs(twin_opt)], rel=1e-9)
    assert sched.get_last_lr() == pytest.approx(_lrs(opt), rel=1e-12)
    for _ in range(scale_at, LAST_STEP):
        _step(opt, sched)
        _step(twin_opt, twin)
        assert _lrs(opt) == pytest.approx([0.1 * lr for lr in _lrs(twin_opt)], rel=1e-9, abs=1e-15)
        assert sched.get_last_lr() == pytest.approx(_lrs(opt), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("name", ["StepLR", "LambdaLR", "CyclicLR", "OneCycleLR", "SequentialLR"])
def test_scaling_down_then_up_returns_to_the_unscaled_schedule(name):
    make = EXACT[name]
    opt, twin_opt = _sgd(), _sgd()
    sched, twin = make(opt), make(twin_opt)
    for _ in range(SCALE_AT):
        _step(opt, sched)
        _step(twin_opt, twin)
    scale_learning_rate(opt, 0.1, [sched])
    _step(opt, sched)
    _step(twin_opt, twin)
    scale_learning_rate(opt, 10, [sched])
    for _ in range(SCALE_AT + 1, LAST_STEP):
        _step(opt, sched)
        _step(twin_opt, twin)
        assert _lrs(opt) == pytest.approx(_lrs(twin_opt), rel=1e-9, abs=1e-15)


def test_scaling_twice_compounds_once_each():
    opt = _sgd(lr=1.0, groups=1)
    scale_learning_rate(opt, 0.5)
    scale_learning_rate(opt, 0.5)
    assert _lrs(opt) == [0.25]


def test_without_schedulers_only_group_keys_are_scaled():
    opt = _sgd(lr=0.2)
    scale_learning_rate(opt, 0.5)
    assert _lrs(opt) == pytest.approx([0.1, 0.2])
    assert "initial_lr" not in opt.param_groups[0]


def test_group_keys_of_one_cycle_are_scaled():
    opt = _sgd(lr=0.1, groups=1)
    lrs.OneCycleLR(opt, max_lr=1.0, total_steps=10, div_factor=25.0, final_div_factor=1e4)
    scale_learning_rate(opt, 0.1)
    group = opt.param_groups[0]
    assert group["initial_lr"] == pytest.approx(0.004)
    assert group["max_lr"] == pytest.approx(0.1)
    assert group["min_lr"] == pytest.approx(0.004 / 1e4)
    assert group["lr"] == pytest.approx(0.004)


def test_base_and_max_lrs_of_cyclic_are_scaled():
    opt = _sgd(lr=0.1, groups=1)
    sched = lrs.CyclicLR(opt, base_lr=0.01, max_lr=0.1, step_size_up=2)
    scale_learning_rate(opt, 0.1, [sched])
    assert sched.base_lrs == pytest.approx([0.001])
    assert sched.max_lrs == pytest.approx([0.01])


def test_schedulers_inside_sequential_are_scaled_once():
    opt = _sgd(lr=1.0, groups=1)
    first = lrs.ConstantLR(opt, factor=0.5, total_iters=2)
    second = lrs.ExponentialLR(opt, gamma=0.9)
    sched = lrs.SequentialLR(opt, [first, second], milestones=[2])
    scale_learning_rate(opt, 0.1, [sched, second])  # `second` named twice: still scaled once
    assert first.base_lrs == pytest.approx([0.1])
    assert second.base_lrs == pytest.approx([0.1])


# ---------------------------------------------------------------------------------------------------------------------
# ReduceLROnPlateau and the floors (min_lrs, eta_min) that are left unscaled
# ---------------------------------------------------------------------------------------------------------------------


def test_reduce_on_plateau_keeps_a_tenth_until_its_floor():
    opt, twin_opt = _sgd(lr=1.0), _sgd(lr=1.0)
    sched = lrs.ReduceLROnPlateau(opt, factor=0.5, patience=1, min_lr=1e-3)
    twin = lrs.ReduceLROnPlateau(twin_opt, factor=0.5, patience=1, min_lr=1e-3)
    metrics = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    for m in metrics[:3]:
        sched.step(m)
        twin.step(m)
    scale_learning_rate(opt, 0.1, [sched])
    assert sched.min_lrs == [1e-3, 1e-3]
    for m in metrics[3:]:
        sched.step(m)
        twin.step(m)
        assert _lrs(opt) == pytest.approx([0.1 * lr for lr in _lrs(twin_opt)], rel=1e-12)
    assert _lrs(twin_opt) == pytest.approx([0.25, 0.5])  # it did reduce, twice, after scaling


def test_reduce_on_plateau_floor_is_not_scaled():
    opt = _sgd(lr=1.0, groups=1)
    sched = lrs.ReduceLROnPlateau(opt, factor=0.1, patience=0, min_lr=0.05)
    scale_learning_rate(opt, 0.1, [sched])
    sched.step(1.0)
    sched.step(1.0)
    assert _lrs(opt) == pytest.approx([0.05])  # clamped at the unscaled floor, not 0.1 * 0.1 = 0.01
    sched.step(1.0)
    assert _lrs(opt) == pytest.approx([0.05])


def test_cosine_eta_min_is_not_scaled_and_still_reached():
    opt = _sgd(lr=1.0, groups=1)
    sched = lrs.CosineAnnealingLR(opt, T_max=4, eta_min=0.05)
    _step(opt, sched)
    scale_learning_rate(opt, 0.1, [sched])
    assert sched.eta_min == 0.05
    for _ in range(3):
        _step(opt, sched)
    assert _lrs(opt) == pytest.approx([0.05])


# ---------------------------------------------------------------------------------------------------------------------
# Tensor learning rates
# ---------------------------------------------------------------------------------------------------------------------


def test_tensor_lr_is_scaled_in_place():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    lr = opt.param_groups[0]["lr"]
    sched = lrs.StepLR(opt, step_size=2, gamma=0.5)
    scale_learning_rate(opt, 0.1, [sched])
    assert opt.param_groups[0]["lr"] is lr
    assert lr.item() == pytest.approx(0.001)
    assert float(opt.param_groups[0]["initial_lr"]) == pytest.approx(0.001)
    assert float(sched.base_lrs[0]) == pytest.approx(0.001)
    for _ in range(2):
        p.grad = torch.zeros(2)
        _step(opt, sched)
    assert lr.item() == pytest.approx(0.0005)
    scale_learning_rate(opt, 10, [sched])
    assert lr.item() == pytest.approx(0.005)
    assert float(sched.base_lrs[0]) == pytest.approx(0.01)


def test_tensor_held_under_several_keys_is_scaled_once():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([p], lr=torch.tensor(0.01))
    group = opt.param_groups[0]
    group["initial_lr"] = group["lr"]  # aliased, as older torch schedulers could leave them

    class Holder:
        def __init__(self) -> None:
            self.optimizer = opt
            self.base_lrs = [group["lr"]]
            self._last_lr = [group["lr"]]

    scale_learning_rate(opt, 0.1, [Holder()])
    assert group["lr"].item() == pytest.approx(0.001)


# ---------------------------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -0.1, math.nan, math.inf, True, "0.1", None])
def test_factor_validation_changes_nothing(bad):
    opt = _sgd(lr=0.1, groups=1)
    with pytest.raises(ValueError, match=r"`factor` must be a finite number > 0, got "):
        scale_learning_rate(opt, bad)
    assert _lrs(opt) == [0.1]


def test_scheduler_of_another_optimizer_raises_and_changes_nothing():
    opt, other = _sgd(lr=0.1, groups=1), torch.optim.Adam([nn.Parameter(torch.ones(1))], lr=0.1)
    mine, theirs = lrs.StepLR(opt, step_size=1), lrs.StepLR(other, step_size=1)
    with pytest.raises(ValueError, match=r"StepLR in `schedulers` drives a different optimizer \(Adam\) .*\(SGD\)"):
        scale_learning_rate(opt, 0.1, [mine, theirs])
    assert _lrs(opt) == [0.1]
    assert mine.base_lrs == [0.1]


def test_non_scheduler_raises_type_error():
    opt = _sgd(lr=0.1, groups=1)
    with pytest.raises(TypeError, match=r"dict object in `schedulers` has no `optimizer` attribute.*`\.scheduler`"):
        scale_learning_rate(opt, 0.1, [{"scheduler": lrs.StepLR(opt, step_size=1)}])
    assert _lrs(opt) == [0.1]


def test_wrapper_exposing_the_optimizer_is_accepted():
    opt = _sgd(lr=0.1, groups=1)
    sched = lrs.StepLR(opt, step_size=1)

    class Wrapper:  # like Lightning's LightningOptimizer
        def __init__(self, optimizer: torch.optim.Optimizer) -> None:
            self.optimizer = optimizer
            self.param_groups = optimizer.param_groups

    scale_learning_rate(Wrapper(opt), 0.1, [sched])
    assert _lrs(opt) == pytest.approx([0.01])
    assert sched.base_lrs == pytest.approx([0.01])
