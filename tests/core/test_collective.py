"""Statistics over shards (core/collective.py): the sharded algorithms give exactly what one process gives.

The sharded path runs here in threads, one per simulated process, summing through a shared board:
the same code a process group runs, without processes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from lightning_prune.core.collective import LOCAL, Collective, count, count_true, kth_smallest, lowest_mask, std, total
from lightning_prune.core.criteria.magnitude import floor_mask, fraction_mask, global_masks, surviving_std


class Board:
    def __init__(self, world: int):
        self.slots: list[Any] = [None] * world
        self.barrier = threading.Barrier(world)


class Threads(Collective):
    """Rank ``rank`` of ``world`` threads sharing ``board``."""

    def __init__(self, rank: int, world: int, board: Board):
        self.rank, self.world_size, self.board = rank, world, board

    def _gather(self, value: Any) -> list[Any]:
        self.board.slots[self.rank] = value
        self.board.barrier.wait()
        out = list(self.board.slots)
        self.board.barrier.wait()
        return out

    def all_sum(self, tensor: Tensor) -> Tensor:
        return torch.stack(self._gather(tensor.clone())).sum(0)

    def all_max(self, value: float) -> float:
        return max(self._gather(value))

    def counts(self, values: Sequence[int]) -> Tensor:
        return torch.tensor(self._gather(list(values)), dtype=torch.int64).reshape(self.world_size, len(values))

    def before(self, value: int) -> int:
        return int(self.counts([value])[: self.rank, 0].sum())


def sharded(fn: Callable[[list[Tensor], Collective], Any], tensors: list[Tensor], cuts: list[int]) -> list[Any]:
    """``fn(shards, collective)`` on each simulated process; process r holds rows ``cuts[r]:cuts[r+1]`` of each."""
    world = len(cuts) - 1
    board, results, errors = Board(world), [None] * world, []

    def run(rank: int) -> None:
        try:
            pieces = [t[min(cuts[rank], len(t)) : min(cuts[rank + 1], len(t))] for t in tensors]
            results[rank] = fn(pieces, Threads(rank, world, board))
        except Exception as err:  # pragma: no cover - reported below
            errors.append(err)
            board.barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


values = st.lists(st.sampled_from([-2.0, -0.5, 0.0, 0.25, 0.25, 1.0, 3.0, -0.0]), min_size=2, max_size=40)


@settings(max_examples=60, deadline=None)
@given(values, values, st.data())
def test_lowest_mask_over_shards_is_the_whole_tensors_mask_ties_by_position(a, b, data):
    tensors = [torch.tensor(a), torch.tensor(b)]
    n = len(a) + len(b)
    k = data.draw(st.integers(0, n))
    world = data.draw(st.integers(1, 3))
    longest = max(len(a), len(b))
    cuts = sorted(data.draw(st.lists(st.integers(0, longest), min_size=world - 1, max_size=world - 1)))
    cuts = [0, *cuts, longest]
    whole = lowest_mask(tensors, k)
    assert sum(int(m.sum()) for m in whole) == k
    parts = sharded(lambda shards, c: lowest_mask(shards, k, c), tensors, cuts)
    for i, mask in enumerate(whole):
        assert torch.equal(torch.cat([p[i] for p in parts]), mask)
    if k:
        assert all(r == kth_smallest(tensors, k) for r in sharded(lambda s, c: kth_smallest(s, k, c), tensors, cuts))


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 60), st.integers(1, 4), st.floats(0.0, 1.0), st.data())
def test_fraction_global_and_floor_masks_over_row_shards_equal_one_process(rows, world, amount, data):
    torch.manual_seed(rows)
    a = (torch.randn(rows, 3) * 4).round() / 4  # many ties
    b = (torch.randn(rows + 1, 2) * 4).round() / 4
    keep = torch.rand(rows, 3) > 0.3
    cuts = [0, *sorted(data.draw(st.lists(st.integers(0, rows + 1), min_size=world - 1, max_size=world - 1))), rows + 1]

    whole, threshold = fraction_mask(a, amount, keep)
    parts = sharded(lambda s, c: fraction_mask(s[0], amount, s[1], c), [a, keep], cuts)
    assert torch.equal(torch.cat([p[0] for p in parts]), whole)
    assert all(p[1] == threshold for p in parts)
    masks, common = global_masks({"a": a, "b": b}, amount, {"a": keep})
    parts = sharded(lambda s, c: global_masks({"a": s[0], "b": s[1]}, amount, {"a": s[2]}, c), [a, b, keep], cuts)
    assert torch.equal(torch.cat([p[0]["a"] for p in parts]), masks["a"])
    assert torch.equal(torch.cat([p[0]["b"] for p in parts]), masks["b"])
    assert all(p[1] == common for p in parts)
    floor = floor_mask(a, torch.zeros_like(keep), keep, 0.3)
    parts = sharded(lambda s, c: floor_mask(s[0], torch.zeros_like(s[1]), s[1], 0.3, c), [a, keep], cuts)
    assert torch.equal(torch.cat(parts), floor)


def test_std_and_counts_over_shards_match_one_process():
    torch.manual_seed(0)
    w = torch.randn(37, 5)
    keep = torch.rand(37, 5) > 0.5
    for cuts in ([0, 37], [0, 20, 37], [0, 0, 10, 37]):
        stds = sharded(lambda s, c: surviving_std(s[0], s[1], c), [w, keep], cuts)
        assert all(v == pytest.approx(surviving_std(w, keep), rel=1e-12) for v in stds)
        assert sharded(lambda s, c: (total(s, c), count(s[:1], 0.0, c), count_true(s[1:], c)), [w, keep], cuts) == [
            (2 * 185, int((w <= 0).sum()), int(keep.sum()))
        ] * (len(cuts) - 1)
    assert std([torch.tensor([1.0])]) == 0.0


def test_kth_smallest_refuses_k_out_of_range_and_nan():
    with pytest.raises(ValueError, match=r"`k` must be in \[1, 3\] \(the number of values\), got 4"):
        kth_smallest([torch.tensor([1.0, 2.0, 3.0])], 4)
    with pytest.raises(ValueError, match="kth_smallest got NaN values"):
        kth_smallest([torch.tensor([1.0, float("nan")])], 1)
    assert kth_smallest([torch.tensor([-0.0, 0.0])], 1) == 0.0
    assert lowest_mask([torch.tensor([1.0])], 0)[0].tolist() == [False]
    assert LOCAL.all_max(2.5) == 2.5 and LOCAL.counts([1, 2]).tolist() == [[1, 2]]
