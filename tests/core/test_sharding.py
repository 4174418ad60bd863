"""core/sharding.py on plain tensors: every function passes them through (the sharded paths: tests/test_fsdp.py)."""

from __future__ import annotations

import torch

from lightning_prune.core.collective import LOCAL
from lightning_prune.core.sharding import (
    any_true,
    collective_of,
    full_mask,
    is_sharded,
    local,
    local_mask,
    local_rows,
    shard_rows,
    sharded_like,
)


def test_plain_tensors_are_whole_on_one_process():
    w = torch.zeros(6, 3)
    keep = torch.ones(6, 3, dtype=torch.bool)
    assert not is_sharded(w) and local(w) is w
    assert shard_rows(w) == (0, 6) and local_rows(w, None) is None and local_rows(w, (2, 4)) == (2, 4)
    assert collective_of([w, torch.zeros(2)]) is LOCAL and collective_of([]) is LOCAL
    assert sharded_like(keep, w) is keep and local_mask(keep, w) is keep
    copy = full_mask(keep, w)
    assert torch.equal(copy, keep) and copy is not keep
    assert any_true(True, LOCAL) and not any_true(False, LOCAL)
