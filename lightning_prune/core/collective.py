"""Statistics over a tensor split into shards across processes, exact without gathering the shards.

A criterion judging a sharded parameter (FSDP) sees only this process's shard. What it needs of the
whole tensor, it gets from a :class:`Collective`: the std from all-reduced moments, the ``k``-th
smallest magnitude by bisecting on its bits with all-reduced counts, ties split by position. The same
functions run on one process with :data:`LOCAL`, so one code path decides masks for both, and a
sharded run keeps exactly the connections a single process keeps on the same weights.

Shards are taken to be contiguous pieces of the flattened tensor in rank order (FSDP's ``Shard(0)``
and its flat parameters both are); several local tensors (one per parameter) are pooled in order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "LOCAL",
    "Collective",
    "ProcessGroupCollective",
    "count",
    "count_true",
    "kth_smallest",
    "lowest_mask",
    "std",
    "total",
]


class Collective:
    """Sums over the processes holding the shards; this base is one process holding everything.

    Example::

        >>> LOCAL.all_sum(torch.tensor([1.0, 2.0]))
        tensor([1., 2.])
        >>> LOCAL.before(3)
        0
    """

    world_size: int = 1
    rank: int = 0

    def all_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` summed elementwise over the processes (here: itself)."""
        return tensor

    def before(self, value: int) -> int:
        """The sum of ``value`` over the processes of lower rank (here: 0)."""
        return 0

    def all_max(self, value: float) -> float:
        """The largest ``value`` over the processes (here: itself)."""
        return value

    def counts(self, values: Sequence[int]) -> Tensor:
        """Every process's ``values``: a ``(world_size, len(values))`` int64 tensor, row ``r`` from rank ``r``."""
        return torch.tensor([list(values)], dtype=torch.int64)


LOCAL = Collective()
"""One process, every tensor whole."""


@dataclass(frozen=True)
class ProcessGroupCollective(Collective):
    """The processes of a ``torch.distributed`` group (``None``: the default group).

    Sums run on ``device`` (``"cpu"`` for gloo, the process's GPU for NCCL).
    """

    group: Any = None
    device: torch.device | str = "cpu"

    @property
    def world_size(self) -> int:  # type: ignore[override]
        """The group's size."""
        return torch.distributed.get_world_size(self.group)

    @property
    def rank(self) -> int:  # type: ignore[override]
        """This process's rank in the group."""
        return torch.distributed.get_rank(self.group)

    def all_sum(self, tensor: Tensor) -> Tensor:
        """``tensor`` all-reduced (summed) over the group, on its own device."""
        out = tensor.to(self.device, copy=True)
        torch.distributed.all_reduce(out, group=self.group)
        return out.to(tensor.device)

    def before(self, value: int) -> int:
        """The sum of ``value`` over the group's lower ranks."""
        return int(self.counts([value])[: self.rank, 0].sum())

    def all_max(self, value: float) -> float:
        """The largest ``value`` over the group."""
        out = torch.tensor([value], dtype=torch.float64, device=self.device)
        torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX, group=self.group)
        return float(out[0])

    def counts(self, values: Sequence[int]) -> Tensor:
        """Every process's ``values``, by rank (one all-reduce)."""
        out = torch.zeros(self.world_size, len(values), dtype=torch.int64, device=self.device)
        out[self.rank] = torch.tensor(list(values), dtype=torch.int64)
        torch.distributed.all_reduce(out, group=self.group)
        return out.cpu()


def total(values: Sequence[Tensor], collective: Collective = LOCAL) -> int:
    """Number of entries of all ``values`` (every shard).

    Example::

        >>> total([torch.zeros(2, 3), torch.zeros(4)])
        10
    """
    return int(collective.all_sum(torch.tensor([sum(v.numel() for v in values)], dtype=torch.int64))[0])


def count(values: Sequence[Tensor], limit: float, collective: Collective = LOCAL) -> int:
    """Number of entries ``<= limit`` of all ``values`` (every shard).

    Example::

        >>> count([torch.tensor([0.5, 1.0, 2.0])], 1.0)
        2
    """
    local = sum(int((v <= limit).sum()) for v in values)
    return int(collective.all_sum(torch.tensor([local], dtype=torch.int64))[0])


def count_true(masks: Sequence[Tensor], collective: Collective = LOCAL) -> int:
    """Number of ``True`` entries of all ``masks`` (every shard).

    Example::

        >>> count_true([torch.tensor([True, False]), torch.tensor([True])])
        2
    """
    local = sum(int(m.sum()) for m in masks)
    return int(collective.all_sum(torch.tensor([local], dtype=torch.int64))[0])


def std(values: Sequence[Tensor], collective: Collective = LOCAL) -> float:
    """The sample standard deviation (``n - 1``) of all ``values``, in float64, over two all-reduced passes.

    0 for fewer than two entries.

    Example::

        >>> std([torch.tensor([-1.0, 1.0]), torch.tensor([1.0, -1.0])])
        1.1547...
    """
    sums = torch.tensor([sum(v.numel() for v in values), sum(float(v.double().sum()) for v in values)])
    n, s = collective.all_sum(sums.double()).tolist()
    if n < 2:
        return 0.0
    mean = s / n
    squares = sum(float((v.double() - mean).square().sum()) for v in values)
    return math.sqrt(float(collective.all_sum(torch.tensor([squares], dtype=torch.float64))[0]) / (n - 1))


def _key(value: float) -> int:
    """``value`` (a float32) as an int in the same order: its IEEE bits, negatives flipped."""
    bits = int(torch.tensor([value], dtype=torch.float32).view(torch.int32)[0])
    return bits if bits >= 0 else -(bits & 0x7FFFFFFF) - 1


def _value(key: int) -> float:
    """The float32 whose :func:`_key` is ``key``."""
    bits = key if key >= 0 else -(key + 1) | -0x80000000
    return float(torch.tensor([bits], dtype=torch.int64).to(torch.int32).view(torch.float32)[0])


def kth_smallest(values: Sequence[Tensor], k: int, collective: Collective = LOCAL) -> float:
    """The ``k``-th smallest (1-based) of all ``values`` (every shard), exactly, as a float32 value.

    With one process, :func:`torch.kthvalue`; with shards, a bisection on the float32 bit patterns,
    one all-reduced count per step (32 steps), never gathering the values.

    Raises:
        ValueError: If ``k`` is not in ``[1, number of values]``, or a value is NaN.

    Example::

        >>> kth_smallest([torch.tensor([3.0, -1.0]), torch.tensor([2.0, 0.5])], 2)
        0.5
    """
    flat = [v.detach().reshape(-1).float() for v in values]
    n = total(flat, collective)
    if not 1 <= k <= n:
        raise ValueError(f"`k` must be in [1, {n}] (the number of values), got {k}.")
    if any(bool(torch.isnan(v).any()) for v in flat):
        raise ValueError("kth_smallest got NaN values; they have no order.")
    if collective.world_size == 1:
        return float(torch.cat(flat).kthvalue(k).values) + 0.0  # -0.0 and 0.0 are one value
    low, high = _key(-math.inf), _key(math.inf)
    while low < high:  # the answer's key is in [low, high]
        mid = (low + high) // 2
        if count(flat, _value(mid), collective) >= k:
            high = mid
        else:
            low = mid + 1
    return _value(low) + 0.0


def lowest_mask(values: Sequence[Tensor], k: int, collective: Collective = LOCAL) -> list[Tensor]:
    """Bool masks, ``True`` on exactly the ``k`` smallest of all ``values``; ties go to the lower position.

    Positions run as on one process holding every tensor whole: the order of ``values``, then within
    each tensor its shards in rank order, then flat order. So shards give exactly the masks one process
    gives on the whole tensors.

    Example::

        >>> lowest_mask([torch.tensor([2.0, 1.0, 1.0, 3.0])], 2)
        [tensor([False,  True,  True, False])]
        >>> lowest_mask([torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], 2)
        [tensor([True, True]), tensor([False, False])]
    """
    if k <= 0:
        return [torch.zeros_like(v, dtype=torch.bool) for v in values]
    limit = kth_smallest(values, k, collective)
    below = [v < limit for v in values]
    ties = [v == limit for v in values]
    counts = collective.counts([int(b.sum()) for b in below] + [int(t.sum()) for t in ties])
    rank = collective.rank
    room = k - int(counts[:, : len(values)].sum())
    out = []
    for i, (low, tie) in enumerate(zip(below, ties, strict=True)):
        column = counts[:, len(values) + i]
        mine = room - int(column[:rank].sum())  # ties of this tensor that lower ranks take first
        order = tie.reshape(-1).cumsum(0).reshape(tie.shape)  # 1-based rank of each tie on this shard
        out.append(low | (tie & (order <= mine)))
        room -= int(column.sum())
    return out
