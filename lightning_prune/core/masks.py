"""Enforcing masks: on weights, on gradients and on optimizer state.

A mask is a ``bool`` tensor shaped like its parameter, ``True`` where the connection is alive: one
byte per weight. It is enforced in place by multiplying the tensor's *bit pattern*, viewed as integers
of the same width, by the mask's zero-copy ``uint8`` view (:func:`multiplier`): ``bits * 1`` leaves an
alive entry bit for bit as it was, ``bits * 0`` writes an exact ``+0.0`` at a pruned one, whatever it
held. A floating-point multiply would not do: ``NaN * 0`` and ``inf * 0`` are ``NaN``, so one non-finite
gradient at a pruned entry would turn its weight and optimizer state into ``NaN``. The integer multiply
runs as fast as the float one, and much faster than ``torch.where`` or ``masked_fill_`` on CPU
(``docs/benchmarks.md``). On the CPU, a compiled loop does the same multiply near the memory floor when a
C compiler is at hand (:mod:`lightning_prune.core.native`), with the same bits.

A parameter sharded by FSDP2 (a ``DTensor``) is masked through its local shard: its mask, its gradient's
and its optimizer state's shards are all shaped alike, and nothing is gathered.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from lightning_prune.core.native import enforce_native
from lightning_prune.core.sharding import local

__all__ = [
    "CHUNK",
    "MaskPairs",
    "check_mask",
    "enforce",
    "mask_gradients",
    "mask_weights",
    "multiplier",
    "zero_optimizer_state",
]

MaskPairs = list[tuple[Tensor, Tensor]]
"""``(parameter, multiplier)`` pairs, the multiplier being :func:`multiplier` of the mask."""

_BITS: dict[torch.dtype, torch.dtype] = {
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
    torch.float32: torch.int32,
    torch.float64: torch.int64,
}


def multiplier(keep: Tensor) -> Tensor:
    """The zero-copy ``uint8`` view of a ``bool`` mask: the operand :func:`enforce` multiplies by.

    Example::

        >>> multiplier(torch.tensor([True, False]))
        tensor([1, 0], dtype=torch.uint8)
    """
    return keep.view(torch.uint8)


CHUNK = 1 << 20
"""Elements :func:`enforce` multiplies at a time on the CPU. PyTorch's CPU multiply of an integer tensor by a
``uint8`` one runs about 8x slower per element above about 8M elements than below; a loop over 1M-element
chunks keeps it near the memory floor (``docs/benchmarks.md``, "Mask cost")."""


def enforce(tensor: Tensor, mult: Tensor) -> None:
    """Write an exact zero into ``tensor`` wherever ``mult`` (a :func:`multiplier`) is 0, in place; NaN and inf too.

    Alive entries keep their bits exactly (NaN included). Floating-point tensors are multiplied as integers of
    their width; other dtypes by value. Contiguous CPU tensors go to the compiled kernel when it is the one
    chosen (:func:`lightning_prune.core.native.set_mask_kernel`); otherwise large ones go :data:`CHUNK`
    elements at a time.

    Example::

        >>> t = torch.tensor([float("nan"), 2.0, float("inf"), float("nan")])
        >>> enforce(t, multiplier(torch.tensor([False, True, False, True])))
        >>> t
        tensor([0., 2., 0., nan])
    """
    if enforce_native(tensor, mult):
        return
    bits = _BITS.get(tensor.dtype)
    target = tensor.view(bits) if bits is not None else tensor
    n = target.numel()
    if n <= CHUNK or target.device.type != "cpu" or not (target.is_contiguous() and mult.is_contiguous()):
        target.mul_(mult)
        return
    flat, flat_mult = target.view(-1), mult.view(-1)
    for start in range(0, n, CHUNK):
        flat[start : start + CHUNK].mul_(flat_mult[start : start + CHUNK])


def check_mask(name: str, keep: Tensor, shape: Sequence[int], what: str = "tensor") -> None:
    """Raise unless ``keep`` is a ``bool`` mask of ``shape``, naming ``name`` and both shapes.

    Example::

        >>> check_mask("fc.weight", torch.ones(2, 3, dtype=torch.bool), (2, 3))
    """
    if not isinstance(keep, Tensor):
        raise ValueError(f"The mask of {name!r} is a {type(keep).__name__}, not a bool tensor.")
    if keep.dtype != torch.bool or tuple(keep.shape) != tuple(shape):
        raise ValueError(
            f"The mask of {name!r} has shape {tuple(keep.shape)} and dtype {keep.dtype}; the {what} has shape "
            f"{tuple(shape)} (a bool mask is expected)."
        )


@torch.no_grad()
def mask_weights(pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Zero the pruned entries of each parameter in place.

    Example::

        >>> w = torch.ones(3)
        >>> mask_weights([(w, multiplier(torch.tensor([True, False, True])))])
        >>> w
        tensor([1., 0., 1.])
    """
    for param, mult in pairs:
        enforce(local(param), mult)


@torch.no_grad()
def mask_gradients(pairs: Iterable[tuple[Tensor, Tensor]]) -> None:
    """Zero the pruned entries of each parameter's ``.grad`` in place (parameters without one are skipped).

    Example::

        >>> w = torch.ones(2, requires_grad=True)
        >>> w.sum().backward()
        >>> mask_gradients([(w, multiplier(torch.tensor([False, True])))])
        >>> w.grad
        tensor([0., 1.])
    """
    for param, mult in pairs:
        if param.grad is not None:
            enforce(local(param.grad), mult)


@torch.no_grad()
def zero_optimizer_state(optimizer: torch.optim.Optimizer, masks: Mapping[Tensor, Tensor]) -> int:
    """Zero the optimizer state (momentum, Adam moments, ...) of the pruned entries of each parameter.

    Every state tensor shaped like its parameter is masked; scalars such as Adam's ``step`` are left.

    Args:
        optimizer: Any :class:`torch.optim.Optimizer`.
        masks: ``{parameter: keep_mask}``; parameters the optimizer does not hold are ignored.

    Returns:
        The number of state tensors masked.

    Example::

        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
        >>> w.grad = torch.ones(2); opt.step()
        >>> zero_optimizer_state(opt, {w: torch.tensor([False, True])})
        1
        >>> opt.state[w]["momentum_buffer"]
        tensor([0., 1.])
    """
    count = 0
    for param, keep in masks.items():
        for value in optimizer.state.get(param, {}).values():
            if isinstance(value, Tensor) and value.shape == param.shape:
                enforce(local(value), multiplier(keep.to(local(value).device)))
                count += 1
    return count
