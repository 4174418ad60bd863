"""Parameters sharded by FSDP2 (``fully_shard``): their local shards, the rows a shard holds, its process group.

FSDP2 turns each parameter into a ``DTensor`` split along dimension 0 (``Shard(0)``) over the processes
of its mesh: each process holds a contiguous block of whole rows, the blocks in rank order. The pruner
keeps each mask beside its shard, shaped like it, and decides it from the shard with the statistics of
the whole tensor all-reduced over the group (:mod:`lightning_prune.core.collective`). Plain tensors
pass through every function here unchanged, so one code path serves sharded and unsharded models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeGuard, cast

import torch
from torch import Tensor

from lightning_prune.core.collective import LOCAL, Collective, ProcessGroupCollective

try:  # torch built without distributed support has no DTensor
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

__all__ = [
    "any_true",
    "collective_of",
    "full_mask",
    "is_sharded",
    "local",
    "local_mask",
    "local_rows",
    "shard_rows",
    "sharded_like",
]


def is_sharded(tensor: Any) -> TypeGuard[DTensor]:
    """Whether ``tensor`` is a ``DTensor`` (a parameter under FSDP2).

    Example::

        >>> is_sharded(torch.zeros(2))
        False
    """
    return DTensor is not None and isinstance(tensor, DTensor)


def local(tensor: Tensor) -> Tensor:
    """This process's shard of ``tensor`` (a view of its storage), or ``tensor`` itself if it is not sharded.

    Example::

        >>> t = torch.zeros(2)
        >>> local(t) is t
        True
    """
    return tensor.to_local() if is_sharded(tensor) else tensor


def _shard_dim(tensor: DTensor) -> int:
    """The mesh dimension ``tensor`` is split over by rows; the others must replicate it."""
    shards = [i for i, p in enumerate(tensor.placements) if isinstance(p, Shard)]
    others = [p for i, p in enumerate(tensor.placements) if i not in shards and not isinstance(p, Replicate)]
    if len(shards) != 1 or tensor.placements[shards[0]] != Shard(0) or others:
        raise ValueError(
            f"A sharded parameter of shape {tuple(tensor.shape)} has placements {tensor.placements}; pruning "
            f"supports FSDP2's row sharding: Shard(0) over one mesh dimension, Replicate over the others."
        )
    return shards[0]


def shard_rows(tensor: Tensor) -> tuple[int, int]:
    """The rows ``[start, stop)`` of the whole tensor that this process's shard holds (all rows if unsharded).

    Example::

        >>> shard_rows(torch.zeros(5, 2))
        (0, 5)
    """
    if not is_sharded(tensor):
        return 0, tensor.shape[0]
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _shard_dim(tensor)
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return int(offset[0]), int(offset[0]) + int(shape[0])


def local_rows(tensor: Tensor, rows: tuple[int, int] | None) -> tuple[int, int] | None:
    """The rows ``[a, b)`` of the local shard that hold the whole tensor's ``rows`` (``None``: all of them).

    A process may hold none of them (``a == b``).

    Example::

        >>> local_rows(torch.zeros(6, 2), (2, 4))
        (2, 4)
    """
    if rows is None:
        return None
    start, stop = shard_rows(tensor)
    a, b = max(rows[0], start), min(rows[1], stop)
    return a - start, max(a, b) - start


def collective_of(params: Iterable[Tensor]) -> Collective:
    """The process group whose shards make up ``params``; :data:`LOCAL` if none is sharded.

    Raises:
        ValueError: If some are sharded and others not, or they are sharded over different groups.

    Example::

        >>> collective_of([torch.zeros(2)]) is LOCAL
        True
    """
    params = list(params)
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return LOCAL
    if len(sharded) != len(params):
        raise ValueError(
            f"{len(params) - len(sharded)} of the {len(params)} selected parameters are not sharded while the others "
            f"are: call fully_shard on every module whose weights are pruned (or on the root module), or leave the "
            f"unsharded ones out with `layers`."
        )
    groups = {(id(p.device_mesh), _shard_dim(p)) for p in sharded}
    if len(groups) != 1:
        raise ValueError("The selected parameters are sharded over different device meshes; prune them separately.")
    first = sharded[0]
    return ProcessGroupCollective(first.device_mesh.get_group(_shard_dim(first)), local(first).device)


def sharded_like(mask: Tensor, param: Tensor) -> Tensor:
    """``mask`` (this process's shard) as a ``DTensor`` laid out like ``param``; ``mask`` if ``param`` is plain.

    Example::

        >>> sharded_like(torch.ones(2, dtype=torch.bool), torch.zeros(2))
        tensor([True, True])
    """
    if not is_sharded(param):
        return mask
    return DTensor.from_local(mask, param.device_mesh, param.placements, shape=param.shape, stride=param.stride())


def full_mask(mask: Tensor, param: Tensor) -> Tensor:
    """The whole tensor's mask on the CPU, gathered from every process's shard (every process takes part).

    Example::

        >>> full_mask(torch.ones(2, dtype=torch.bool), torch.zeros(2))
        tensor([True, True])
    """
    if not is_sharded(param):
        return mask.to("cpu", copy=True)
    return cast(DTensor, sharded_like(mask, param)).full_tensor().cpu()


def local_mask(mask: Tensor, param: Tensor) -> Tensor:
    """This process's rows of a whole tensor's ``mask`` (as read from a full checkpoint), or ``mask`` as it is.

    A mask shaped like the local shard already is returned unchanged.

    Example::

        >>> local_mask(torch.ones(2, dtype=torch.bool), torch.zeros(2)).shape
        torch.Size([2])
    """
    if not is_sharded(param) or tuple(mask.shape) != tuple(param.shape):
        return mask
    start, stop = shard_rows(param)
    return mask[start:stop]


def any_true(flag: bool, collective: Collective) -> bool:
    """Whether ``flag`` holds on any process of ``collective``.

    Example::

        >>> any_true(False, LOCAL)
        False
    """
    return bool(collective.all_sum(torch.tensor([int(flag)], dtype=torch.int64))[0])
