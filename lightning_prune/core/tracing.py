"""What the modules that trace a model with torch.fx share: eval mode, tracing, comparing outputs.

:mod:`~lightning_prune.core.structure` and :mod:`~lightning_prune.core.sensitivity` both run a model
in eval mode and give every module its train/eval flag back, trace it with
:func:`torch.fx.symbolic_trace` (which fails in many ways on models it cannot trace), and check that
two runs of a model gave the same outputs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, fx, nn

__all__ = ["describe_error", "eval_mode", "outputs_match", "trace"]


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put ``model`` in eval mode inside the block; on exit every module name gets its flag back.

    Flags are restored by qualified module name (``named_modules(remove_duplicate=False)``), so a
    module swapped in during the block gets the flag of the one it replaced.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.Dropout()).train()
        >>> with eval_mode(net):
        ...     net[1] = nn.Dropout()  # swapped in while in eval mode
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, True)
    """
    flags = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    model.eval()
    try:
        yield
    finally:
        for name, m in model.named_modules(remove_duplicate=False):
            if name in flags:
                m.training = flags[name]


def describe_error(err: BaseException) -> str:
    r"""``"Type: message"`` on one line, for messages that quote an exception.

    Example::

        >>> describe_error(ValueError("two\nlines"))
        'ValueError: two lines'
    """
    return f"{type(err).__name__}: {err}".replace("\n", " ")


def trace(model: nn.Module) -> fx.GraphModule | str:
    """``model`` traced by :func:`torch.fx.symbolic_trace`, or why it could not be traced.

    Example::

        >>> isinstance(trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU())), fx.GraphModule)
        True
        >>> class Branchy(nn.Module):
        ...     def forward(self, x):
        ...         return x if x.sum() > 0 else -x
        >>> trace(Branchy()).split(":")[0]
        'TraceError'
    """
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # torch.fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        return describe_error(err)


def outputs_match(got: Any, want: Any, rtol: float = 1e-4, atol: float = 1e-5) -> str | None:
    """``None`` if two model outputs agree, else where and how they first differ.

    Tensors must have the same shape and dtype; floating-point ones must be ``allclose`` (``NaN``
    equal to ``NaN``), others equal. Tuples and lists are compared item by item, mappings key by
    key; anything else with ``==``.

    Example::

        >>> a = {"logits": torch.ones(2), "extra": (torch.tensor([1, 2]), 3)}
        >>> outputs_match(a, {"logits": torch.ones(2) + 1e-7, "extra": (torch.tensor([1, 2]), 3)}) is None
        True
        >>> outputs_match(a, {"logits": torch.ones(2), "extra": (torch.tensor([1, 3]), 3)})
        "output['extra'][0] differs"
        >>> outputs_match(torch.ones(2), torch.zeros(2))
        'output differs by up to 1'
    """
    return _difference(got, want, "output", rtol, atol)


def _difference(got: Any, want: Any, where: str, rtol: float, atol: float) -> str | None:
    if isinstance(got, Tensor) or isinstance(want, Tensor):
        return _tensor_difference(got, want, where, rtol, atol)
    if isinstance(got, (list, tuple)) and isinstance(want, (list, tuple)):
        if len(got) != len(want):
            return f"{where} has {len(got)} items instead of {len(want)}"
        pairs = [(f"{where}[{i}]", a, b) for i, (a, b) in enumerate(zip(got, want, strict=True))]
    elif isinstance(got, Mapping) and isinstance(want, Mapping):
        if got.keys() != want.keys():
            return f"{where} has the keys {sorted(got, key=str)} instead of {sorted(want, key=str)}"
        pairs = [(f"{where}[{key!r}]", got[key], want[key]) for key in want]
    else:
        return None if bool(got == want) else f"{where} is {got!r:.60} instead of {want!r:.60}"
    for place, a, b in pairs:
        found = _difference(a, b, place, rtol, atol)
        if found is not None:
            return found
    return None


def _tensor_difference(got: Any, want: Any, where: str, rtol: float, atol: float) -> str | None:
    if not (isinstance(got, Tensor) and isinstance(want, Tensor)):
        return f"{where} is a {type(got).__name__} instead of a {type(want).__name__}"
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"{where} is {list(got.shape)} {got.dtype} instead of {list(want.shape)} {want.dtype}"
    if not got.is_floating_point():
        return None if torch.equal(got, want) else f"{where} differs"
    if torch.allclose(got, want, rtol=rtol, atol=atol, equal_nan=True):
        return None
    gap = torch.where(got.isnan() & want.isnan(), 0, (got - want).abs())
    return f"{where} differs by up to {float(gap.max()):.3g}"
