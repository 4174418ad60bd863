"""Scaling the learning rate for retraining, in a way a running LR scheduler keeps.

Han et al. (2015) retrain a pruned network at a lower learning rate than it was trained with. Setting
``group["lr"]`` alone is not enough while a scheduler runs: schedulers that compute the rate in closed
form from their ``base_lrs`` (``LambdaLR``, ``CosineAnnealingWarmRestarts``, ``OneCycleLR``'s group keys,
...) would undo it at their next step. :func:`scale_learning_rate` scales the optimizer's rates and
every scheduler's base rates together.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["LR_KEYS", "SCHEDULER_LISTS", "scale_learning_rate"]

LR_KEYS: tuple[str, ...] = ("lr", "initial_lr", "max_lr", "min_lr")
"""Parameter-group keys holding a learning rate: the rate, the base that torch schedulers store
(``initial_lr``) and ``OneCycleLR``'s cycle bounds (``max_lr``, ``min_lr``)."""

SCHEDULER_LISTS: tuple[str, ...] = ("base_lrs", "max_lrs", "_last_lr")
"""Scheduler attributes holding one learning rate per group: the base rates every torch scheduler
keeps, ``CyclicLR``'s upper bounds and the rates ``get_last_lr()`` reports."""


def _scale(value: Any, factor: float, seen: set[int]) -> Any:
    """``value * factor``; a tensor is scaled in place, once however many places hold it."""
    if isinstance(value, Tensor):
        if id(value) not in seen:
            seen.add(id(value))
            with torch.no_grad():
                value.mul_(factor)
        return value
    return value * factor


def _flatten(schedulers: Iterable[object]) -> list[object]:
    """The schedulers and, recursively, those that ``SequentialLR``/``ChainedScheduler`` hold, once each."""
    found: dict[int, object] = {}
    stack = list(schedulers)[::-1]
    while stack:
        scheduler = stack.pop()
        if id(scheduler) not in found:
            found[id(scheduler)] = scheduler
            stack.extend(list(getattr(scheduler, "_schedulers", []))[::-1])
    return list(found.values())


def scale_learning_rate(optimizer: torch.optim.Optimizer, factor: float, schedulers: Iterable[object] = ()) -> None:
    """Multiply the optimizer's learning rates, and the given schedulers' base rates, by ``factor``.

    In every parameter group, each of ``lr``, ``initial_lr``, ``max_lr`` and ``min_lr`` present is
    scaled (tensor rates in place, so anything holding them sees the change). In every scheduler, and
    every scheduler held by a ``SequentialLR`` or ``ChainedScheduler``, each of ``base_lrs``,
    ``max_lrs`` (``CyclicLR``) and ``_last_lr`` (what ``get_last_lr()`` returns) present is scaled.
    Absolute floors are left alone: ``ReduceLROnPlateau.min_lrs`` and the ``eta_min`` of the cosine
    schedulers.

    After scaling by ``f`` mid-schedule, the rate at every later step is ``f`` times what the unscaled
    schedule gives at that step (up to float rounding) for ``StepLR``, ``MultiStepLR``, ``ExponentialLR``,
    ``MultiplicativeLR``, ``ConstantLR``, ``LinearLR``, ``PolynomialLR``, ``LambdaLR``, ``CyclicLR``,
    ``OneCycleLR``, ``CosineAnnealingLR`` and ``CosineAnnealingWarmRestarts`` with ``eta_min=0``, and
    ``SequentialLR``/``ChainedScheduler`` of these. It is not for the cosine schedulers with
    ``eta_min > 0``, whose rate heads to the unscaled ``eta_min``, nor for ``ReduceLROnPlateau``
    once a reduction would cross its ``min_lrs`` floor or change the rate by less than its ``eps``;
    otherwise ``ReduceLROnPlateau`` reduces the scaled rate and keeps ``f`` times the unscaled one too.
    Scaling by ``f`` then by ``1 / f`` restores the rates, up to float rounding.

    Args:
        optimizer: The optimizer.
        factor: The multiplier, a finite number > 0.
        schedulers: The LR schedulers driving ``optimizer`` (unwrap framework configs to the scheduler).

    Raises:
        ValueError: If ``factor`` is not a finite number > 0, or a scheduler drives another optimizer.
        TypeError: If a scheduler has no ``optimizer`` attribute (it is not an LR scheduler).

    Example::

        >>> w = torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([w], lr=1.0)
        >>> sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5**step)
        >>> scale_learning_rate(opt, 0.1, [sched])
        >>> opt.step(); sched.step()
        >>> round(opt.param_groups[0]["lr"], 6), [round(lr, 6) for lr in sched.base_lrs]
        (0.05, [0.1])
    """
    # Over 60 lines only by its docstring: the body is short.
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
        raise ValueError(f"`factor` must be a finite number > 0, got {factor!r}.")
    flat = _flatten(schedulers)
    # A wrapper exposing the optimizer it wraps as `.optimizer` (Lightning's LightningOptimizer) is accepted too.
    targets = {id(optimizer), id(getattr(optimizer, "optimizer", optimizer))}
    for scheduler in flat:
        if not hasattr(scheduler, "optimizer"):
            raise TypeError(
                f"{type(scheduler).__name__} object in `schedulers` has no `optimizer` attribute; pass LR scheduler "
                f"objects (for a framework's scheduler config, its `.scheduler`)."
            )
        if id(scheduler.optimizer) not in targets:
            raise ValueError(
                f"{type(scheduler).__name__} in `schedulers` drives a different optimizer "
                f"({type(scheduler.optimizer).__name__}) than the one scaled ({type(optimizer).__name__}); pass only "
                f"the schedulers of this optimizer."
            )
    seen: set[int] = set()  # tensors and lists scaled already: several places may hold the same one
    for group in optimizer.param_groups:
        for key in LR_KEYS:
            if key in group:
                group[key] = _scale(group[key], factor, seen)
    for scheduler in flat:
        for attr in SCHEDULER_LISTS:
            values = getattr(scheduler, attr, None)
            if isinstance(values, list) and id(values) not in seen:  # SequentialLR shares its child's `_last_lr`
                seen.add(id(values))
                values[:] = [_scale(v, factor, seen) for v in values]
