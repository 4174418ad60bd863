"""Regularization during retraining: an L1 term added to gradients, and weight decay per parameter group.

Han et al. (2015) retrain with L1 or L2 regularization. L1 is added straight to the gradients
(:func:`add_l1_gradient`), so no loss term, and no extra graph, is needed; L2 is the optimizer's own
``weight_decay``, set on the parameter groups that hold the pruned parameters (:func:`set_weight_decay`)
and restored afterwards (:func:`restore_weight_decay`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

__all__ = ["add_l1_gradient", "groups_holding", "params_without_optimizer", "restore_weight_decay", "set_weight_decay"]


def _check_non_negative(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}.")
    return float(value)


@torch.no_grad()
def add_l1_gradient(params: Iterable[Tensor], l1: float) -> None:
    """Add the gradient of ``l1 * sum(|w|)`` to each parameter's ``.grad`` in place.

    That gradient is ``l1 * sign(w)``; ``sign(0) = 0``, so pruned (zero) weights get nothing and stay
    zero. Parameters without a gradient are skipped. Call it between ``backward()`` and the optimizer
    step (and before gradients are masked, if they are).

    Args:
        params: The regularized parameters.
        l1: The L1 strength, a finite number >= 0.

    Raises:
        ValueError: If ``l1`` is negative or not finite.

    Example::

        >>> w = torch.tensor([2.0, 0.0, -3.0], requires_grad=True)
        >>> w.grad = torch.zeros(3)
        >>> add_l1_gradient([w], 0.1)
        >>> w.grad
        tensor([ 0.1000,  0.0000, -0.1000])
    """
    l1 = _check_non_negative(l1, "l1")
    if l1 == 0.0:
        return
    for param in params:
        if param.grad is not None:
            param.grad.add_(param.sign(), alpha=l1)


def groups_holding(optimizer: torch.optim.Optimizer, params: Iterable[Tensor]) -> list[int]:
    """Indices of the optimizer's parameter groups holding at least one of ``params`` (by identity).

    Example::

        >>> a, b = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
        >>> opt = torch.optim.SGD([{"params": [a]}, {"params": [b]}], lr=0.1)
        >>> groups_holding(opt, [b])
        [1]
    """
    wanted = {id(p) for p in params}
    return [i for i, group in enumerate(optimizer.param_groups) if any(id(p) in wanted for p in group["params"])]


def _weight_decays(optimizer: torch.optim.Optimizer) -> list[float]:
    for i, group in enumerate(optimizer.param_groups):
        if "weight_decay" not in group:
            raise ValueError(
                f"Parameter group {i} of {type(optimizer).__name__} has no 'weight_decay' setting; this optimizer "
                f"does not support weight decay. Use one that does (SGD, Adam, AdamW, ...), or L1 instead."
            )
    return [group["weight_decay"] for group in optimizer.param_groups]


def set_weight_decay(optimizer: torch.optim.Optimizer, params: Iterable[Tensor], value: float) -> list[float]:
    """Set ``weight_decay`` on every parameter group holding any of ``params``; leave the other groups alone.

    A group is changed as a whole, also for its parameters outside ``params``; groups holding none of
    them (a no-decay group for biases and norms, say) keep their setting. A ``params`` held by no group
    changes nothing (see :func:`params_without_optimizer`).

    Args:
        optimizer: Any optimizer whose groups have a ``weight_decay`` setting.
        params: The parameters to decay.
        value: The new weight decay, a finite number >= 0.

    Returns:
        The previous ``weight_decay`` of every group, in ``optimizer.param_groups`` order (changed or not),
        for :func:`restore_weight_decay`.

    Raises:
        ValueError: If ``value`` is negative or not finite, or a group has no ``weight_decay`` setting.
            Nothing is changed then.

    Example::

        >>> w, b = torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], lr=0.1, weight_decay=1e-4)
        >>> previous = set_weight_decay(opt, [w], 1e-3)
        >>> previous, [g["weight_decay"] for g in opt.param_groups]
        ([0.0001, 0.0], [0.001, 0.0])
        >>> restore_weight_decay(opt, previous)
        >>> [g["weight_decay"] for g in opt.param_groups]
        [0.0001, 0.0]
    """
    value = _check_non_negative(value, "value")
    previous = _weight_decays(optimizer)
    for i in groups_holding(optimizer, params):
        optimizer.param_groups[i]["weight_decay"] = value
    return previous


def restore_weight_decay(optimizer: torch.optim.Optimizer, previous: Iterable[float]) -> None:
    """Give every parameter group back the ``weight_decay`` that :func:`set_weight_decay` returned.

    Raises:
        ValueError: If ``previous`` does not hold one value per parameter group.

    Example::

        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1, weight_decay=1e-4)
        >>> restore_weight_decay(opt, set_weight_decay(opt, [w], 0.0))
        >>> opt.param_groups[0]["weight_decay"]
        0.0001
    """
    previous = list(previous)
    if len(previous) != len(optimizer.param_groups):
        raise ValueError(
            f"`previous` holds {len(previous)} weight decay value(s) but {type(optimizer).__name__} has "
            f"{len(optimizer.param_groups)} parameter group(s); pass the list `set_weight_decay` returned for "
            f"this optimizer, before any group was added."
        )
    _weight_decays(optimizer)
    for group, value in zip(optimizer.param_groups, previous, strict=True):
        group["weight_decay"] = value


def params_without_optimizer(
    optimizers: torch.optim.Optimizer | Iterable[torch.optim.Optimizer], named_params: Mapping[str, Tensor]
) -> list[str]:
    """Names of the parameters no optimizer holds (by identity), in ``named_params`` order.

    Such parameters are never updated, so weight decay set through an optimizer cannot reach them.

    Args:
        optimizers: One optimizer or several.
        named_params: ``{name: parameter}``.

    Returns:
        The names of the parameters held by none of the optimizers.

    Example::

        >>> net = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD([net.weight], lr=0.1)
        >>> params_without_optimizer(opt, dict(net.named_parameters()))
        ['bias']
    """
    if isinstance(optimizers, torch.optim.Optimizer) or hasattr(optimizers, "param_groups"):
        optimizers = [optimizers]  # type: ignore[list-item]
    held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
    return [name for name, param in named_params.items() if id(param) not in held]
