"""Mask memory per rank and prune time under FSDP2 (``fully_shard``), against one process holding whole tensors.

Two CPU processes (gloo, 1 thread each) shard an MLP 784-4096-4096-10 (20.0M weights) by rows with
``fully_shard``, prune it with ``Std`` and with ``Fraction``, and report per rank: the bytes of masks it
holds, against the bytes every rank holds under DDP (whole masks), and the prune's wall time, against
one process pruning the same whole weights (``Pruner`` on the unsharded model, in rank 0, after the
sharded prunes). The masks are checked bit-identical to the single process's.

Usage::

    python benchmarks/fsdp_masks.py            # the table below in docs/benchmarks.md
    python benchmarks/fsdp_masks.py --widths 784 300 100 10
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lightning_prune import Fraction, Std
from lightning_prune.core import Pruner
from lightning_prune.core.sharding import full_mask


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def worker(rank: int, widths: list[int], folder: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=2)
    torch.manual_seed(0)
    dense = mlp(widths)
    mesh = init_device_mesh("cpu", (2,))
    rows = []
    for criterion, level in ((Std(), 1.0), (Fraction(), 0.9)):
        model = copy.deepcopy(dense)
        for module in model:
            if isinstance(module, nn.Linear):
                fully_shard(module, mesh=mesh)
        fully_shard(model, mesh=mesh)
        pruner = Pruner(model)
        torch.distributed.barrier()
        start = time.perf_counter()
        pruner.prune(criterion, level)
        sharded_s = time.perf_counter() - start
        local_bytes = sum(k.numel() * k.element_size() for k in pruner.masks.values())
        gathered = {n: full_mask(k, pruner.parameter(n)) for n, k in pruner.masks.items()}
        row = {"criterion": criterion.describe(), "level": level, "rank": rank, "local_mask_bytes": local_bytes}
        row["sharded_prune_s"] = round(sharded_s, 4)
        if rank == 0:
            single = Pruner(copy.deepcopy(dense))
            start = time.perf_counter()
            single.prune(criterion, level)
            row["single_prune_s"] = round(time.perf_counter() - start, 4)
            row["ddp_mask_bytes"] = sum(k.numel() * k.element_size() for k in single.masks.values())
            row["identical"] = all(torch.equal(gathered[n], single.masks[n]) for n in single.masks)
            row["remaining"] = single.counts()[0]
        rows.append(row)
        torch.distributed.barrier()
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(rows))
    torch.distributed.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", type=int, nargs="+", default=[784, 4096, 4096, 10])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        torch.multiprocessing.spawn(worker, args=(args.widths, folder), nprocs=2)
        ranks = [json.loads((Path(folder) / f"rank{r}.json").read_text()) for r in (0, 1)]
    weights = sum(a * b for a, b in itertools.pairwise(args.widths))
    print(f"# MLP {args.widths}: {weights:,} weights, 2 processes (gloo, 1 thread each), fp32, bool masks")
    print(
        "| criterion | level | masks per rank, DDP | rank 0 | rank 1 | share | prune: 1 process | sharded | identical |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for zero, one in zip(*ranks, strict=True):
        ddp = zero["ddp_mask_bytes"]
        share = max(zero["local_mask_bytes"], one["local_mask_bytes"]) / ddp
        print(
            f"| `{zero['criterion']}` | {zero['level']} | {ddp:,} B | {zero['local_mask_bytes']:,} B | "
            f"{one['local_mask_bytes']:,} B | {share:.3f} | {zero['single_prune_s']:.3f} s | "
            f"{max(zero['sharded_prune_s'], one['sharded_prune_s']):.3f} s | {zero['identical']} |"
        )


if __name__ == "__main__":
    main()
