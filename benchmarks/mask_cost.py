"""What keeping pruned weights at zero costs: per element, and in training-step time against plain training.

Two measurements, in one process, one torch thread unless ``--threads`` says otherwise:

* **per element**: in-place mask operations on fp32 tensors of 256K, 4M and 20M elements, 90% pruned,
  interleaved, median of per-call times, against ``g.mul_(1.0)`` (reads and writes the tensor once: the
  memory floor). ``enforce`` is what runs (an integer multiply of the tensor's bits by the mask's
  ``uint8`` view), once with the compiled kernel (``lightning_prune.core.native``, the default where a C
  compiler is found) and once with PyTorch's (1M elements at a time); the others are the alternatives
  and what ran before.
* **step time**: an SGD (momentum 0.9, weight decay 5e-4) training step (forward, cross-entropy,
  backward, step) of the same network in several variants, alternated step by step in a random order,
  each iteration giving the ratio of each variant's step time to the plain one's; the table gives the
  median of those ratios. Variants: ``plain``; ``lightning-prune`` (90% of every Linear pruned,
  ``Pruner.attach``: gradients masked at the step, compiled kernel); ``lightning-prune, PyTorch kernel``
  (the same with ``set_mask_kernel("torch")``); ``torch prune`` (``torch.nn.utils.prune.l1_unstructured``,
  what Lightning's ``ModelPruning`` applies: ``weight_orig`` and a float mask, recomputed in a forward
  pre-hook). The two lightning-prune variants start from the same weights and see the same batches;
  the script checks they end bit for bit equal.

Usage::

    python benchmarks/mask_cost.py                                # everything (~3 min on 2 cores)
    python benchmarks/mask_cost.py --only micro
    python benchmarks/mask_cost.py --only steps --models lenet300 --steps 200
    python benchmarks/mask_cost.py --threads 2                    # both cores

Prints markdown tables with machine info on stdout.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import itertools
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

from lightning_prune import Fraction, Pruner
from lightning_prune.core.masks import enforce, multiplier
from lightning_prune.core.native import MaskKernel, mask_kernel, native_status, set_mask_kernel

AMOUNT = 0.9
MODELS: dict[str, tuple[list[int], int]] = {
    "lenet300": ([784, 300, 100, 10], 128),
    "mlp4096": ([784, 4096, 4096, 10], 8),
    "vgg_classifier": ([512 * 7 * 7, 4096, 4096, 10], 2),
}
"""Layer widths and batch size: LeNet-300-100; an FC-heavy MLP at small batch; VGG's classifier head."""


def mlp(widths: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(widths)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def median_ns_per_element(cases: dict[str, Callable[[], object]], n: int, rounds: int, reps: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(reps):
                cases[name]()
            samples[name].append((time.perf_counter() - start) / reps / n * 1e9)
    return {k: statistics.median(v) for k, v in samples.items()}


def _mask_operations(n: int) -> list[Callable[[], object]]:
    """The operations of :func:`bench_micro`, in its order, on a fresh tensor of ``n`` elements."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(n, generator=gen)
    keep = torch.rand(n, generator=gen) >= AMOUNT
    u8, as_float, as_i32, zero = multiplier(keep), keep.float(), keep.to(torch.int32).neg(), torch.zeros(())
    return [
        lambda: g.mul_(1.0),
        lambda: (set_mask_kernel("auto"), enforce(g, u8)),
        lambda: (set_mask_kernel("torch"), enforce(g, u8)),
        lambda: g.view(torch.int32).mul_(u8),
        lambda: g.mul_(u8),
        lambda: g.mul_(as_float),
        lambda: g.view(torch.int32).bitwise_and_(as_i32),
        lambda: torch.where(keep, g, zero, out=g),
    ]


def bench_micro(args: argparse.Namespace) -> str:
    lines = [
        f"### Mask operations per element, fp32, {100 * AMOUNT:.0f}% pruned ({args.micro_rounds} interleaved samples)",
        "",
        "| operation | mask bytes / weight | NaN-safe | " + " | ".join(f"{n:,} elements" for n in args.sizes) + " |",
        "|---|---:|:---:|" + "---:|" * len(args.sizes),
    ]
    rows: dict[str, list[str]] = {}
    meta = {
        "g.mul_(1.0): the floor": ("-", "-"),
        "enforce(g, mask), compiled kernel: what runs": ("1", "yes"),
        "enforce(g, mask), PyTorch kernel (1M-element chunks)": ("1", "yes"),
        "g.view(int32).mul_(uint8 mask), one call: before chunking": ("1", "yes"),
        "g.mul_(uint8 mask): before 2026-12-03": ("1", "no"),
        "g.mul_(float mask)": ("4", "no"),
        "g.view(int32).bitwise_and_(int32 mask)": ("4", "yes"),
        "torch.where(mask, g, 0, out=g)": ("1", "yes"),
    }
    for n in args.sizes:
        cases = dict(zip(meta, _mask_operations(n), strict=True))
        reps = max(1, args.micro_elements // n)
        result = median_ns_per_element(cases, n, args.micro_rounds, reps)
        floor = result["g.mul_(1.0): the floor"]
        for name, ns in result.items():
            cell = f"{ns:.3f} ns" if name.startswith("g.mul_(1.0)") else f"{ns:.3f} ns ({ns / floor:.2f}x)"
            rows.setdefault(name, []).append(cell)
    for name, cells in rows.items():
        mask_bytes, safe = meta[name]
        lines.append(f"| `{name}` | {mask_bytes} | {safe} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _variants(widths: list[int]) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
    torch.manual_seed(0)
    base = mlp(widths)
    out: dict[str, tuple[nn.Module, torch.optim.Optimizer]] = {}
    for name in ("plain", "lightning-prune", "lightning-prune, PyTorch kernel", "torch prune"):
        model = copy.deepcopy(base)
        if name == "torch prune":
            for layer in model:
                if isinstance(layer, nn.Linear):
                    torch_prune.l1_unstructured(layer, "weight", amount=AMOUNT)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if name.startswith("lightning-prune"):
            pruner = Pruner(model)
            pruner.attach(optimizer)
            pruner.prune(Fraction(amount=AMOUNT))
        out[name] = (model, optimizer)
    return out


def _step(
    model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, kernel: MaskKernel
) -> float:
    set_mask_kernel(kernel)
    start = time.perf_counter()
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    return time.perf_counter() - start


def bench_steps(name: str, args: argparse.Namespace) -> str:
    widths, batch = MODELS[name]
    variants = _variants(widths)
    kernels: dict[str, MaskKernel] = {k: ("torch" if k.endswith("PyTorch kernel") else "auto") for k in variants}
    gen = torch.Generator().manual_seed(1)
    order, times = list(variants), {k: [] for k in variants}
    shuffle = random.Random(0)
    steps = args.steps or (200 if name == "lenet300" else 12)
    for i in range(steps + args.skip):
        x, y = torch.randn(batch, widths[0], generator=gen), torch.randint(0, widths[-1], (batch,), generator=gen)
        shuffle.shuffle(order)
        for k in order:
            elapsed = _step(*variants[k], x, y, kernels[k])
            if i >= args.skip:
                times[k].append(elapsed)
    set_mask_kernel("auto")
    a, b = variants["lightning-prune"][0], variants["lightning-prune, PyTorch kernel"][0]
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    weights = sum(m.weight.numel() for m in a if isinstance(m, nn.Linear))
    lines = [
        f"### {name}: widths {widths}, batch {batch}, {weights:,} prunable weights, {steps} measured steps",
        "",
        "| variant | median step (ms) | median of per-step ratios to plain |",
        "|---|---:|---:|",
    ]
    for k, values in times.items():
        ratios = [v / p for v, p in zip(values, times["plain"], strict=True)]
        lines.append(f"| {k} | {1e3 * statistics.median(values):.3f} | {statistics.median(ratios):.3f}x |")
    lines.append("")
    lines.append(f"The two lightning-prune variants end with bit-identical weights: {same}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--only", choices=["micro", "steps"], default=None, help="run one part only")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument(
        "--steps", type=int, default=None, help="measured steps per model (default: 200 lenet300, 12 others)"
    )
    p.add_argument("--skip", type=int, default=3, help="unmeasured warm-up steps")
    p.add_argument("--sizes", nargs="+", type=int, default=[262_144, 4_194_304, 20_000_000])
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--micro-rounds", type=int, default=15)
    p.add_argument("--micro-elements", type=int, default=20_000_000, help="elements touched per sample")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    tables = []
    if args.only in (None, "micro"):
        tables.append(bench_micro(args))
    if args.only in (None, "steps"):
        tables.extend(bench_steps(name, args) for name in args.models)
    set_mask_kernel("auto")
    cpu = platform.processor() or platform.machine()
    print(f"- CPU: {cpu}; torch threads: {torch.get_num_threads()}; torch {torch.__version__}")
    print(f"- Compiled mask kernel: {mask_kernel() == 'native'} ({native_status()})")
    print(f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; wall time "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    for table in tables:
        print()
        print(table)


if __name__ == "__main__":
    main()
