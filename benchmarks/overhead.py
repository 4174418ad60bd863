"""Step-time and memory overhead of ``PruneRetrainCallback`` vs. plain training and Lightning's ``ModelPruning``.

Three variants are trained, interleaved round-robin (one fit of each per round, the order rotated
every round, so drift and noise on a shared machine hit all of them alike):

* ``plain``: Lightning training without any pruning callback;
* ``PruneRetrainCallback``: ``criterion=Fraction(amount=0.9), prune_epochs=[0]``: 90% of every
  Linear/Conv weight pruned at the start of epoch 0;
* ``ModelPruning``: Lightning's built-in callback, ``"l1_unstructured"``, ``amount=0.9``, local
  (per layer) pruning of the weights, applied once at the end of epoch 0. It re-parametrizes each
  layer (``weight_orig`` parameter, ``weight_mask`` buffer, a forward pre-hook recomputing ``weight``).

Every fit runs two epochs of ``--steps + --skip`` steps on synthetic MNIST-shaped data held in
memory. Epoch 0 is warm-up (and the prune); only the steps of epoch 1 after the first ``--skip``
count, so both pruned variants are 90% sparse in every measured step. A step is timed from
``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward, optimizer step and the
pruning hooks inside it; data loading excluded). Each fit gives the median of its steps; the table
reports the median over rounds of those, and the median over rounds of the per-round ratio to plain.

Memory is read off the objects during epoch 1: for ``PruneRetrainCallback`` the storages of the
tensors its pruner holds (the ``bool`` masks; their ``uint8`` views share storage and count once);
for ``ModelPruning`` every storage of the pruned modules' ``weight_orig``, ``weight_mask`` and
recomputed ``weight`` beyond the one tensor plain training holds.

A micro-benchmark times ways of applying a 90%-sparse mask in place to a 300x784 fp32 tensor
(``--only-micro`` runs just that).

Usage::

    python benchmarks/overhead.py                      # both models, defaults (~2-3 min on 2 cores)
    python benchmarks/overhead.py --model lenet300 --rounds 9 --steps 100 --threads 2

Results are printed as markdown tables (with machine info) on stdout.
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import logging
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelPruning
from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import Fraction, PruneRetrainCallback
from lightning_prune.core.enforcement import ZERO_PRESERVING
from lightning_prune.core.masks import enforce

AMOUNT = 0.9
VARIANTS = ("plain", "PruneRetrainCallback", "ModelPruning")


class LeNet300(pl.LightningModule):
    """LeNet-300-100: a 784-300-100-10 MLP with ReLU."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(784, 300),
            nn.ReLU(),
            nn.Linear(300, 100),
            nn.ReLU(),
            nn.Linear(100, 10),
        )

    def forward(self, x: Tensor) -> Tensor:
        """Logits of a batch of 1x28x28 images."""
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Cross-entropy loss of one batch."""
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD with momentum 0.9."""
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LeNet5(LeNet300):
    """LeNet-5 as in Caffe: conv 20@5x5, maxpool 2, conv 50@5x5, maxpool 2, fc 800-500, fc 500-10."""

    def __init__(self, lr: float = 0.01) -> None:
        super().__init__(lr)
        self.net = nn.Sequential(
            nn.Conv2d(1, 20, 5),
            nn.MaxPool2d(2),
            nn.Conv2d(20, 50, 5),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(800, 500),
            nn.ReLU(),
            nn.Linear(500, 10),
        )


MODELS: dict[str, type[LeNet300]] = {"lenet300": LeNet300, "lenet5": LeNet5}
DEFAULT_STEPS = {"lenet300": 200, "lenet5": 40}  # ~2 ms and ~35 ms per step on one core


def storage_bytes(tensors: list[Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views of one storage count once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def median_us(fn: Callable[[], Any], reps: int = 200) -> float:
    """Median wall time of ``fn()`` in microseconds."""
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e6 * statistics.median(samples)


def probe_ours(cb: PruneRetrainCallback, trainer: pl.Trainer) -> dict[str, float]:
    """Extra bytes held by our callback (masks; their cached ``uint8`` views share storage) and its per-step work."""
    pruner = cb.pruner
    assert pruner is not None
    held = list(pruner.masks.values())
    for pairs in getattr(pruner.enforcer, "_pairs_cache", {}).values():
        held += [mult for _, mult in pairs]
    weights = sum(pruner.parameter(n).numel() for n in pruner.masks)
    zeros = sum(int((pruner.parameter(n) == 0).sum()) for n in pruner.masks)
    optimizer = trainer.optimizers[0]
    for name in pruner.masks:  # training is over: make sure every gradient exists, so none is skipped
        param = pruner.parameter(name)
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    # What runs each step: on_before_optimizer_step masks the gradients; the weights are re-masked after
    # the step only for optimizers outside ZERO_PRESERVING (SGD, used here, keeps zero weights zero).
    if type(optimizer) in ZERO_PRESERVING:
        work = median_us(lambda: pruner.mask_gradients(optimizer))
    else:
        work = median_us(lambda: (pruner.mask_gradients(optimizer), pruner.apply()))
    return {"extra": storage_bytes(held), "weights": weights, "zeros": zeros, "work_us": work}


def probe_modelpruning(cb: ModelPruning, trainer: pl.Trainer) -> dict[str, float]:
    """Extra bytes of ModelPruning's re-parametrization over plain training's one weight tensor, and its hooks."""
    extra = weights = zeros = 0
    hooks = []
    for module, name in cb._parameters_to_prune:
        orig = getattr(module, f"{name}_orig")
        held = [orig, getattr(module, f"{name}_mask"), getattr(module, name)]
        extra += storage_bytes(held) - orig.untyped_storage().nbytes()
        weights += orig.numel()
        zeros += int((getattr(module, name) == 0).sum())
        hooks += [(module, h) for h in module._forward_pre_hooks.values() if isinstance(h, BasePruningMethod)]

    def run_hooks() -> None:  # the forward pre-hooks only: weight = weight_orig * weight_mask (backward not included)
        with torch.enable_grad():
            for module, hook in hooks:
                hook(module, None)

    return {"extra": extra, "weights": weights, "zeros": zeros, "work_us": median_us(run_hooks)}


class StepTimer(Callback):
    """Time every training step of epoch ``epoch`` from ``batch_idx >= skip`` on; probe memory at its end."""

    def __init__(self, epoch: int, skip: int, probe: Callable[[pl.Trainer], dict[str, float]] | None = None) -> None:
        self.epoch, self.skip, self.probe = epoch, skip, probe
        self.times: list[float] = []
        self.memory: dict[str, float] | None = None
        self._start = 0.0

    def _measured(self, trainer: pl.Trainer, batch_idx: int) -> bool:
        return trainer.current_epoch == self.epoch and batch_idx >= self.skip

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int):
        """Start the clock."""
        if self._measured(trainer, batch_idx):
            self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Stop the clock."""
        if self._measured(trainer, batch_idx):
            self.times.append(time.perf_counter() - self._start)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read the memory while the pruning state is live (ModelPruning undoes it at train end)."""
        if trainer.current_epoch == self.epoch and self.probe is not None:
            self.memory = self.probe(trainer)


def make_pruning_callback(variant: str) -> Callback | None:
    """The pruning callback of ``variant`` (``None`` for plain training)."""
    if variant == "plain":
        return None
    if variant == "PruneRetrainCallback":
        return PruneRetrainCallback(criterion=Fraction(amount=AMOUNT), prune_epochs=[0], verbose=False)
    kwargs: dict[str, Any] = {
        "parameter_names": ["weight"],  # like PruneRetrainCallback's default (biases not pruned)
        "use_global_unstructured": False,  # per-layer amount, like criterion=Fraction(...)
        "amount": AMOUNT,
        "apply_pruning": lambda epoch: epoch == 0,  # once, at the end of epoch 0
        "use_lottery_ticket_hypothesis": False,  # True would also keep a deep copy of every layer
        "verbose": 0,
    }
    accepted = inspect.signature(ModelPruning.__init__).parameters
    if "make_pruning_permanent" in accepted:
        kwargs["make_pruning_permanent"] = False
    if "prune_on_train_epoch_end" in accepted:
        kwargs["prune_on_train_epoch_end"] = True
    return ModelPruning("l1_unstructured", **kwargs)


def fit_once(model_name: str, variant: str, loader: DataLoader, skip: int) -> StepTimer:
    """Train a fresh model for two epochs under ``variant``; return the timer of epoch 1."""
    model = MODELS[model_name]()
    cb = make_pruning_callback(variant)
    probe: Callable[[pl.Trainer], dict[str, float]] | None = None
    if isinstance(cb, PruneRetrainCallback):
        probe = partial(probe_ours, cb)
    elif isinstance(cb, ModelPruning):
        probe = partial(probe_modelpruning, cb)
    timer = StepTimer(epoch=1, skip=skip, probe=probe)
    trainer = pl.Trainer(
        max_epochs=2,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer] + ([cb] if cb is not None else []),
    )
    trainer.fit(model, train_dataloaders=loader)
    return timer


def steps_of(model_name: str, args: argparse.Namespace) -> int:
    """Measured steps per fit for ``model_name``."""
    return args.steps if args.steps is not None else DEFAULT_STEPS[model_name]


def bench_training(model_name: str, args: argparse.Namespace) -> tuple[dict[str, list[float]], dict, dict]:
    """Interleaved fits of every variant; per-round median step times, per-round ratios, memory."""
    gen = torch.Generator().manual_seed(0)
    n = (steps_of(model_name, args) + args.skip) * args.batch_size
    data = TensorDataset(torch.randn(n, 1, 28, 28, generator=gen), torch.randint(0, 10, (n,), generator=gen))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False, num_workers=0)
    medians: dict[str, list[float]] = {v: [] for v in VARIANTS}
    ratios: dict[str, list[float]] = {v: [] for v in VARIANTS}
    memory: dict[str, dict[str, Any]] = {}
    for r in range(args.rounds):
        order = VARIANTS[r % len(VARIANTS) :] + VARIANTS[: r % len(VARIANTS)]
        this_round = {}
        for variant in order:
            torch.manual_seed(r)
            timer = fit_once(model_name, variant, loader, args.skip)
            this_round[variant] = statistics.median(timer.times)
            if timer.memory is not None:
                memory.setdefault(variant, {"work_rounds": []})
                memory[variant].update(timer.memory)
                memory[variant]["work_rounds"].append(timer.memory["work_us"])
        for variant in VARIANTS:
            medians[variant].append(this_round[variant])
            ratios[variant].append(this_round[variant] / this_round["plain"])
        print(
            f"# {model_name} round {r + 1}/{args.rounds}: "
            + ", ".join(f"{v} {1e3 * this_round[v]:.3f} ms" for v in VARIANTS),
            flush=True,
        )
    return medians, ratios, memory


def training_table(model_name: str, medians: dict, ratios: dict, memory: dict, args: argparse.Namespace) -> str:
    """Markdown table of step times, ratios to plain and memory per weight."""
    model = MODELS[model_name]()
    n_params = sum(p.numel() for p in model.parameters())
    lines = [
        f"### {model_name} ({n_params:,} parameters), batch {args.batch_size}, "
        f"{args.rounds} rounds x {steps_of(model_name, args)} measured steps per variant",
        "",
        "| variant | median step (ms) | ratio to plain: median [min, max] over rounds | "
        "pruning work / step, isolated (us) | sparsity measured | extra bytes | bytes / prunable weight | "
        "bytes / pruned weight |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for v in VARIANTS:
        step = 1e3 * statistics.median(medians[v])
        work = f"{statistics.median(memory[v]['work_rounds']):.0f}" if v in memory else "-"
        rs = ratios[v]
        ratio = f"{statistics.median(rs):.3f}x [{min(rs):.3f}, {max(rs):.3f}]"
        if v in memory:
            m = memory[v]
            sparsity = f"{100 * m['zeros'] / m['weights']:.1f}%"
            extra = f"{int(m['extra']):,}"
            per_w = f"{m['extra'] / m['weights']:.2f}"
            per_p = f"{m['extra'] / m['zeros']:.2f}"
        else:
            sparsity, extra, per_w, per_p = "0%", "0", "0", "-"
        lines.append(f"| {v} | {step:.3f} | {ratio} | {work} | {sparsity} | {extra} | {per_w} | {per_p} |")
    return "\n".join(lines)


def bench_masking(args: argparse.Namespace) -> str:
    """Interleaved micro-benchmark of in-place masking of a 300x784 fp32 tensor at 90% sparsity."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(300, 784, generator=gen)
    keep = torch.rand(300, 784, generator=gen) >= AMOUNT  # bool, True = alive (~10%)
    pruned = ~keep
    as_float = keep.float()
    as_uint8 = keep.to(torch.uint8)
    view_uint8 = keep.view(torch.uint8)
    zero = torch.zeros(())
    cases: dict[str, Callable[[], Any]] = {
        "w.mul_(bool_mask)": lambda: w.mul_(keep),
        "w.mul_(float_mask)": lambda: w.mul_(as_float),
        "w.mul_(uint8_mask)": lambda: w.mul_(as_uint8),
        "w.mul_(bool_mask.view(torch.uint8))": lambda: w.mul_(view_uint8),
        "w.masked_fill_(~mask, 0)": lambda: w.masked_fill_(~keep, 0),
        "w.masked_fill_(pruned, 0), inverse precomputed": lambda: w.masked_fill_(pruned, 0),
        "torch.where(mask, w, 0) (not in place)": lambda: torch.where(keep, w, 0.0),
        "torch.where(mask, w, zero, out=w) (NaN-safe)": lambda: torch.where(keep, w, zero, out=w),
        "enforce(w, bool_mask.view(torch.uint8)) (NaN-safe, what runs)": lambda: enforce(w, view_uint8),
    }
    extra_bytes = {
        "w.mul_(bool_mask)": keep.nbytes,
        "w.mul_(float_mask)": as_float.nbytes,
        "w.mul_(uint8_mask)": as_uint8.nbytes,
        "w.mul_(bool_mask.view(torch.uint8))": keep.nbytes,
        "w.masked_fill_(~mask, 0)": keep.nbytes,
        "w.masked_fill_(pruned, 0), inverse precomputed": pruned.nbytes,
        "torch.where(mask, w, 0) (not in place)": keep.nbytes,
        "torch.where(mask, w, zero, out=w) (NaN-safe)": keep.nbytes,
        "enforce(w, bool_mask.view(torch.uint8)) (NaN-safe, what runs)": keep.nbytes,
    }
    for fn in cases.values():  # warm-up
        for _ in range(20):
            fn()
    samples: dict[str, list[float]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.micro_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = cases[name]
            start = time.perf_counter()
            for _ in range(args.micro_reps):
                fn()
            samples[name].append((time.perf_counter() - start) / args.micro_reps)
    base = statistics.median(samples["w.mul_(bool_mask.view(torch.uint8))"])
    lines = [
        f"### Applying a mask to a 300x784 fp32 tensor, {100 * AMOUNT:.0f}% pruned "
        f"({args.micro_rounds} interleaved samples x {args.micro_reps} calls)",
        "",
        "| operation | median (us) | vs. uint8 view | mask bytes / weight |",
        "|---|---:|---:|---:|",
    ]
    for name in names:
        med = statistics.median(samples[name])
        lines.append(f"| `{name}` | {1e6 * med:.1f} | {med / base:.2f}x | {extra_bytes[name] / w.numel():.0f} |")
    return "\n".join(lines)


def machine_info(args: argparse.Namespace) -> str:
    """Markdown list: CPU, cores, threads, versions, date."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            f"- CPU: {cpu}, {os.cpu_count()} logical cores; torch threads: {torch.get_num_threads()}",
            f"- Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"{platform.system()} {platform.release()}",
            f"- Date: {now}",
            f"- Settings: steps={args.steps or DEFAULT_STEPS}, skip={args.skip}, rounds={args.rounds}, "
            f"batch_size={args.batch_size}, micro_rounds={args.micro_rounds}, micro_reps={args.micro_reps}",
        ]
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=[*MODELS, "all"], default="all", help="network(s) to train (default: all)")
    p.add_argument(
        "--steps", type=int, default=None, help="measured steps per fit (default: 200 for lenet300, 40 for lenet5)"
    )
    p.add_argument("--skip", type=int, default=5, help="unmeasured steps at the start of epoch 1")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (one fit of each variant per round)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: least noisy)")
    p.add_argument("--micro-rounds", type=int, default=31, help="interleaved samples per masking operation")
    p.add_argument("--micro-reps", type=int, default=100, help="calls per masking sample")
    p.add_argument("--no-micro", action="store_true", help="skip the masking micro-benchmark")
    p.add_argument("--only-micro", action="store_true", help="run only the masking micro-benchmark")
    args = p.parse_args(argv)
    if (
        (args.steps is not None and args.steps < 1)
        or args.skip < 0
        or args.rounds < 1
        or args.batch_size < 1
        or args.threads < 1
    ):
        p.error("--steps, --rounds, --batch-size and --threads must be >= 1, --skip >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Run the benchmarks and print markdown tables."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*The number of training batches.*")
    warnings.filterwarnings("ignore", message=".*GPU available but not used.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    start = time.perf_counter()
    tables = []
    for model_name in [] if args.only_micro else MODELS if args.model == "all" else [args.model]:
        medians, ratios, memory = bench_training(model_name, args)
        tables.append(training_table(model_name, medians, ratios, memory, args))
    if not args.no_micro:
        tables.append(bench_masking(args))
    print()
    print(machine_info(args))
    print(f"- Total wall time: {time.perf_counter() - start:.0f} s")
    for table in tables:
        print()
        print(table)


if __name__ == "__main__":
    main()
