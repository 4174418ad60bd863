"""GPU speed of 2:4 semi-structured ``Linear`` layers (``torch.sparse.to_sparse_semi_structured``) against dense fp16.

Two measurements, each a median over ``--reps`` timed calls (CUDA events, after ``--warmup`` calls):

1. single layers: for each ``--shapes`` entry ``OUTxIN``, an fp16 ``nn.Linear`` pruned 2:4 with
   :func:`~lightning_prune.core.criteria.nm_mask`, dense against the same layer converted by
   :func:`~lightning_prune.core.export.to_semi_structured`, at each ``--batches`` size;
2. a whole model: an MLP (``--mlp``: widths, default 4096-11008-4096, ReLU) pruned with
   ``Pruner(...).prune(NM())``, converted with ``to_semi_structured(model, pruner.masks)``, checked
   against the dense model's outputs (``allclose``, fp16 tolerances), timed the same way.

It needs a CUDA GPU of compute capability 8.0 or later (sparse tensor cores: A100, H100, RTX 30/40);
anywhere else it says so and exits with status 2, measuring nothing.

Usage::

    python benchmarks/semi_structured.py
    python benchmarks/semi_structured.py --shapes 4096x4096 11008x4096 --batches 1 64 4096 --out results.json
    python benchmarks/semi_structured.py --backend cutlass     # force the CUTLASS kernels instead of cuSPARSELt
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import json
import platform
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_prune import NM, Pruner
from lightning_prune.core.criteria import nm_mask
from lightning_prune.core.export import semi_structured_problems, to_semi_structured


def gpu_or_exit() -> str:
    """The GPU's name, or exit with status 2 and the reason when there is none fit for 2:4 sparse kernels."""
    if not torch.cuda.is_available():
        print(
            "benchmarks/semi_structured.py needs a CUDA GPU (compute capability 8.0 or later, for its sparse tensor "
            "cores); torch.cuda.is_available() is False on this machine. Nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    major, minor = torch.cuda.get_device_capability()
    name = torch.cuda.get_device_name()
    if (major, minor) < (8, 0):
        print(
            f"benchmarks/semi_structured.py needs compute capability 8.0 or later for 2:4 sparse tensor cores; "
            f"{name} has {major}.{minor}. Nothing was measured.",
            file=sys.stderr,
        )
        sys.exit(2)
    return name


def timed(fn: Any, x: torch.Tensor, warmup: int, reps: int) -> float:
    """Median microseconds of ``fn(x)`` over ``reps`` calls, each timed with CUDA events."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn(x)
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000.0)
    return statistics.median(times)


def pruned_layer(out: int, inp: int) -> tuple[nn.Sequential, nn.Sequential]:
    """A 2:4-pruned fp16 Linear on the GPU, dense and semi-structured (in ``nn.Sequential`` for the export)."""
    dense = nn.Sequential(nn.Linear(inp, out)).cuda().half().eval()
    with torch.no_grad():
        keep = nm_mask(dense[0].weight, 2, 4)
        dense[0].weight.mul_(keep)
    sparse = nn.Sequential(nn.Linear(inp, out)).cuda().half().eval()
    sparse.load_state_dict(dense.state_dict())
    to_semi_structured(sparse, {"0.weight": keep})
    return dense, sparse


def layers(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for shape in args.shapes:
        out, inp = (int(v) for v in shape.lower().split("x"))
        dense, sparse = pruned_layer(out, inp)
        for batch in args.batches:
            x = torch.randn(batch, inp, device="cuda", dtype=torch.float16)
            with torch.inference_mode():
                err = float((dense(x) - sparse(x)).abs().max())
            t_dense, t_sparse = timed(dense, x, args.warmup, args.reps), timed(sparse, x, args.warmup, args.reps)
            row = {"shape": [out, inp], "batch": batch, "dense_us": round(t_dense, 2), "sparse_us": round(t_sparse, 2)}
            row |= {"speedup": round(t_dense / t_sparse, 3), "max_abs_diff": float(f"{err:.3g}")}
            rows.append(row)
            print(
                f"| {out}x{inp} | {batch} | {t_dense:.1f} | {t_sparse:.1f} | {t_dense / t_sparse:.2f}x | {err:.2g} |",
                flush=True,
            )
    return rows


def mlp(args: argparse.Namespace) -> list[dict[str, Any]]:
    widths = [int(w) for w in args.mlp]
    blocks: list[nn.Module] = []
    for a, b in itertools.pairwise(widths):
        blocks += [nn.Linear(a, b), nn.ReLU()]
    torch.manual_seed(0)
    model = nn.Sequential(*blocks[:-1]).cuda().half().eval()
    pruner = Pruner(model)
    pruner.prune(NM())
    problems = semi_structured_problems(model, pruner.masks)
    assert not any(problems.values()), problems
    sparse = copy.deepcopy(model)
    report = to_semi_structured(sparse, pruner.masks)
    rows = []
    for batch in args.batches:
        x = torch.randn(batch, widths[0], device="cuda", dtype=torch.float16)
        with torch.inference_mode():
            close = bool(torch.allclose(model(x), sparse(x), atol=5e-2, rtol=5e-2))
        t_dense, t_sparse = timed(model, x, args.warmup, args.reps), timed(sparse, x, args.warmup, args.reps)
        speedup = round(t_dense / t_sparse, 3)
        rows.append({"batch": batch, "dense_us": round(t_dense, 2), "sparse_us": round(t_sparse, 2),
                     "speedup": speedup, "allclose": close, "converted": report.converted})  # fmt: skip
        print(
            f"| {'-'.join(args.mlp)} | {batch} | {t_dense:.1f} | {t_sparse:.1f} | {t_dense / t_sparse:.2f}x | {close} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1024x1024", "4096x4096", "11008x4096", "4096x11008"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16, 256, 4096])
    parser.add_argument("--mlp", nargs="+", default=["4096", "11008", "4096"])
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--backend", choices=("cusparselt", "cutlass"), default="cusparselt")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args()
    name = gpu_or_exit()
    torch.sparse.SparseSemiStructuredTensor._FORCE_CUTLASS = args.backend == "cutlass"
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": name,
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "backend": args.backend,
        "command": "python " + shlex.join(sys.argv),
    }
    print(f"# 2:4 semi-structured vs dense fp16 Linear, {env}\n")
    print(
        "| layer (out x in) | batch | dense (us) | 2:4 (us) | speed-up | max abs diff |\n|---|---:|---:|---:|---:|---:|"
    )
    layer_rows = layers(args)
    print("\n| MLP widths | batch | dense (us) | 2:4 (us) | speed-up | allclose |\n|---|---:|---:|---:|---:|---|")
    mlp_rows = mlp(args)
    if args.out is not None:
        args.out.write_text(json.dumps({**env, "layers": layer_rows, "mlp": mlp_rows}, indent=1) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
