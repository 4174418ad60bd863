"""Evaluating a model over kept batches: the default metric, and the batches on the evaluation device."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Batch", "EvalData", "accuracy", "nbytes"]

Batch = tuple[Any, Any]


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Share of rows whose largest output (over dimension 1) is at the target class (float64 where supported).

    Example::

        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor(0.5000, dtype=torch.float64)
    """
    dtype = torch.float32 if outputs.device.type == "mps" else torch.float64
    return (outputs.argmax(dim=1) == targets).to(dtype).mean()


def nbytes(obj: Any) -> int:
    """Bytes of the tensors in ``obj`` (a tensor, or lists, tuples and dicts of them).

    Example::

        >>> nbytes((torch.zeros(4), {"mask": torch.ones(8, dtype=torch.bool)}, "label"))
        24
    """
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    return 0


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _weight_of(targets: Any) -> int:
    if isinstance(targets, Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    try:
        return len(targets)
    except TypeError:
        return 1


class EvalData:
    """The batches, on the evaluation device, and the metric over all of them.

    Targets are moved to ``device`` once; inputs batch by batch (:meth:`input`).

    Args:
        batches: ``(inputs, targets)`` pairs.
        device: Where the model runs.
        metric: ``metric(outputs, targets)``, the mean over a batch.

    Example::

        >>> data = EvalData([(torch.eye(2), torch.tensor([0, 1]))], torch.device("cpu"), accuracy)
        >>> data.evaluate(lambda i: data.input(i))
        1.0
    """

    def __init__(self, batches: list[Batch], device: torch.device, metric: Callable[[Any, Any], Any]):
        self.inputs = [b[0] for b in batches]
        self.targets = [_to(b[1], device) for b in batches]
        self.weights = [_weight_of(t) for t in self.targets]
        self.device = device
        self.metric = metric
        self.total = sum(self.weights)

    def input(self, i: int) -> Any:
        """The inputs of batch ``i``, on the evaluation device."""
        return _to(self.inputs[i], self.device)

    def evaluate(self, forward: Callable[[int], Any]) -> float:
        """Weighted mean of ``metric(forward(i), targets[i])`` over the batches (weights: batch sizes)."""
        values = []
        for i, target in enumerate(self.targets):
            value = self.metric(forward(i), target)
            values.append(value.detach() if isinstance(value, Tensor) else value)
        return math.fsum(float(v) * w for v, w in zip(values, self.weights, strict=True)) / self.total
