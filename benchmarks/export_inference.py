"""Storage, neuron removal and CPU inference of a pruned LeNet-300-100 trained on real MNIST.

The pruned model comes from a Lightning checkpoint (``--checkpoint``) or, by default, is trained here
in about half a minute (one torch thread): 8 dense epochs of :class:`lightning_prune.zoo.LeNet300100`
on :class:`lightning_prune.data.MNISTDataModule`, then three prune-retrain rounds of
:class:`lightning_prune.PruneRetrainCallback` (2, 2 and 4 epochs) with rising quality, the last one
``{fc1: 1.7, fc2: 1.5, fc3: 1.0} x`` the dense std, retrained at 0.1x the learning rate: ~92% sparse.
(``{fc1: 2.0, fc2: 1.6, fc3: 1.0}`` gives ~95% here, and loses ~1 point of accuracy.)
Then it measures, and prints as markdown:

(a) storage: :func:`~lightning_prune.core.export.export_sparse` file bytes (values compressed, the
    default, and raw) against the dense fp32 bytes and the surviving fp32 values, per tensor;
(b) round trip: :func:`~lightning_prune.core.export.load_sparse` gives back the masked tensors
    (asserted ``torch.equal``, survivors bit for bit), and corrupt files are refused;
(c) neuron removal: :func:`~lightning_prune.core.structure.remove_dead_units` on a copy: units
    removed, shapes, parameters, max |logit difference| and accuracy on the 10,000 test images;
(d) CPU latency at batch 1 and 256, 1 and 2 threads: the masked dense model, CSR layers
    (:func:`~lightning_prune.core.export.to_sparse_linear`), the shrunk model and shrunk + CSR,
    timed interleaved (the order rotates each round), medians over rounds.

Usage::

    python benchmarks/export_inference.py                          # train (~30 s), then measure (~1 min)
    python benchmarks/export_inference.py --save-checkpoint pruned.ckpt
    python benchmarks/export_inference.py --checkpoint pruned.ckpt # measure a saved pruned model
    python benchmarks/export_inference.py --timing-rounds 31 --sample-ms 50 --threads 1 2

A checkpoint must hold a ``LeNet300100``; its masks are read from the ``PruneRetrainCallback``
state (``state["callbacks"][key]["pruner"]["masks"]``), or taken as ``weight != 0`` if it has none.
MNIST must be available offline (see :mod:`lightning_prune.data.mnist`).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn

from lightning_prune import PruneRetrainCallback, Retraining, Std
from lightning_prune.core.export import (
    SparseFormatError,
    SparseSizeReport,
    export_sparse,
    load_sparse,
    load_sparse_into,
    to_sparse_linear,
)
from lightning_prune.core.structure import load_shrunk, remove_dead_units, save_shrunk
from lightning_prune.data import MNISTDataModule
from lightning_prune.zoo import LeNet300100

LAYERS = ("fc1", "fc2", "fc3")
ROUNDS: list[dict[str, Any]] = [  # Han's rule: each round's level is its quality per layer
    {"level": {"fc1": 1.0, "fc2": 0.8, "fc3": 0.5}, "epochs": 2},
    {"level": {"fc1": 1.4, "fc2": 1.2, "fc3": 0.75}, "epochs": 2},
    {"level": {"fc1": 1.7, "fc2": 1.5, "fc3": 1.0}, "epochs": 4},
]


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@torch.inference_mode()
def logits_of(model: nn.Module, x: Tensor, batch: int = 1000) -> Tensor:
    model.eval()
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((logits_of(model, x).argmax(1) == y).float().mean())


def nonzero_weights(model: nn.Module) -> int:
    return sum(int(m.weight.count_nonzero()) for m in model.modules() if isinstance(m, nn.Linear))


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def clean_copy(model: nn.Module) -> LeNet300100:
    """A fresh ``LeNet300100`` (no trainer attached) holding ``model``'s weights, in eval mode."""
    net = LeNet300100()
    net.load_state_dict(model.state_dict())
    return net.eval()


class TestAccuracy(Callback):
    """Test accuracy at the end of the dense phase and of each round (the epoch before the next prune)."""

    def __init__(self, x: Tensor, y: Tensor, ends: Mapping[int, str]):
        self.x, self.y, self.ends, self.results = x, y, dict(ends), {}

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch in self.ends:
            training = pl_module.training
            acc = accuracy(pl_module, self.x, self.y)
            pl_module.train(training)
            self.results[self.ends[trainer.current_epoch]] = acc


# ---------------------------------------------------------------------------------------------------------------------
# The pruned model
# ---------------------------------------------------------------------------------------------------------------------


def train_pruned(
    args: argparse.Namespace, x: Tensor, y: Tensor, dm: MNISTDataModule
) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    pl.seed_everything(args.seed, verbose=False)
    model = LeNet300100()
    prune = PruneRetrainCallback(
        layers=list(LAYERS),
        criterion=Std(std_of="dense"),
        retrain=Retraining(lr_scale=0.1),
        rounds=copy.deepcopy(ROUNDS),
        verbose=False,
    )
    epochs = args.dense_epochs + sum(r["epochs"] for r in ROUNDS)
    ends, e = {args.dense_epochs - 1: "dense"}, args.dense_epochs - 1
    for k, r in enumerate(ROUNDS):
        e += r["epochs"]
        ends[e] = f"round {k + 1}"
    acc = TestAccuracy(x, y, ends)
    trainer = pl.Trainer(
        max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[prune, acc], limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - start
    if args.save_checkpoint:
        trainer.save_checkpoint(args.save_checkpoint)
    assert prune.pruner is not None
    masks = {n: k.detach().to("cpu").clone() for n, k in prune.pruner.masks.items()}
    info = {
        "source": f"trained here in {seconds:.0f} s ({args.dense_epochs} dense epochs + rounds of "
        f"{[r['epochs'] for r in ROUNDS]} epochs, seed {args.seed})",
        "accuracies": acc.results,
        "stats": prune.pruner.stats(),
    }
    return clean_copy(model), masks, info


def load_pruned(path: str) -> tuple[nn.Module, dict[str, Tensor], dict[str, Any]]:
    model = LeNet300100.load_from_checkpoint(path, map_location="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    masks: dict[str, Tensor] = {}
    for key, value in (state.get("callbacks") or {}).items():
        if isinstance(value, Mapping) and isinstance(value.get("pruner"), Mapping) and value["pruner"].get("masks"):
            masks = {n: k.to("cpu").bool() for n, k in value["pruner"]["masks"].items()}
            origin = f"masks from callback state {key!r}"
            break
    else:
        masks = {f"{n}.weight": getattr(model, n).weight.detach() != 0 for n in LAYERS}
        origin = "no pruner masks in the checkpoint: masks taken as weight != 0"
    sd = model.state_dict()
    for name, keep in masks.items():
        outside = int(sd[name][~keep].count_nonzero())
        if outside:
            raise SystemExit(f"{path}: {name} has {outside} nonzero weights outside its mask.")
    return clean_copy(model), masks, {"source": f"checkpoint {path} ({origin})"}


# ---------------------------------------------------------------------------------------------------------------------
# (a) storage, (b) round trip
# ---------------------------------------------------------------------------------------------------------------------


def storage(net: nn.Module, masks: dict[str, Tensor], out: Path) -> tuple[SparseSizeReport, SparseSizeReport]:
    comp = export_sparse(net, masks, out / "lenet300-sparse.safetensors")
    raw = export_sparse(net, masks, out / "lenet300-sparse-raw.safetensors", compress_values=False)
    print("\n## (a) Storage: `export_sparse` vs dense fp32\n")
    print(
        "| tensor | shape | alive | positions | values codec (default) | dense fp32 B | surviving fp32 B | "
        "index B | stored B, default | stored / surviving | stored B, `compress_values=False` | stored / surviving |"
    )
    print("|---|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for c, r in zip(comp.tensors, raw.tensors, strict=True):
        pos, _, codec = c.encoding.partition(" | ")
        print(
            f"| {c.name} | {' x '.join(map(str, c.shape))} | {100 * c.alive / c.numel:.2f}% | {pos} | "
            f"{codec or 'dense'} | {c.dense_bytes:,} | {c.values_bytes:,} | {c.index_bytes:,} | {c.stored_bytes:,} | "
            f"{c.stored_bytes / c.values_bytes:.3f}x | {r.stored_bytes:,} | {r.stored_bytes / r.values_bytes:.3f}x |"
        )
    data_c = sum(t.stored_bytes for t in comp.tensors)
    data_r = sum(t.stored_bytes for t in raw.tensors)
    print(
        f"| header (JSON metadata + safetensors index) | | | | | | | | {comp.file_bytes - data_c:,} | | "
        f"{raw.file_bytes - data_r:,} | |"
    )
    alive = sum(t.alive for t in comp.tensors)
    numel = sum(t.numel for t in comp.tensors)
    print(
        f"| **file total** | | {100 * alive / numel:.2f}% | | | {comp.dense_bytes:,} | {comp.values_bytes:,} | "
        f"{comp.index_bytes:,} | **{comp.file_bytes:,}** | **{comp.ratio:.3f}x** | **{raw.file_bytes:,}** | "
        f"**{raw.ratio:.3f}x** |"
    )
    print()
    for label, rep in (("default (`compress_values=True`)", comp), ("`compress_values=False`", raw)):
        verdict = "meets" if rep.ratio <= 1.16 else "misses"
        print(
            f"- {label}: file {rep.file_bytes:,} B = **{rep.ratio:.3f}x** the surviving fp32 values "
            f"({rep.values_bytes:,} B; target <= 1.16x: {verdict}), **{rep.compression:.1f}x** smaller than dense "
            f"fp32 ({rep.dense_bytes:,} B); position codes {rep.index_bytes:,} B = "
            f"{100 * rep.index_bytes / rep.values_bytes:.1f}% of the surviving values"
        )
    return comp, raw


def round_trip(net: nn.Module, masks: dict[str, Tensor], reports: tuple[SparseSizeReport, ...], x: Tensor) -> None:
    print("\n## (b) Round trip\n")
    sd = net.state_dict()
    for rep in reports:
        state, loaded = load_sparse(rep.path)
        assert set(state) == set(sd), (set(state), set(sd))
        assert set(loaded) == set(masks)
        for name, value in sd.items():
            expected = torch.where(masks[name], value, torch.zeros_like(value)) if name in masks else value
            assert torch.equal(state[name], expected), name
            if name in masks:
                assert torch.equal(loaded[name], masks[name]), name
                survivors = value[masks[name]].view(torch.int32)
                assert torch.equal(state[name][masks[name]].view(torch.int32), survivors), name  # bit for bit
        fresh = LeNet300100().eval()
        load_sparse_into(fresh, rep.path)
        assert torch.equal(logits_of(fresh, x), logits_of(net, x))
        print(
            f"- `{Path(rep.path).name}`: `load_sparse` gives all {len(sd)} tensors `torch.equal` to the masked dense "
            f"ones (survivors bit for bit, as int32), masks equal; `load_sparse_into` a fresh `LeNet300100`: logits "
            f"on the 10,000 test images `torch.equal`: **passed**"
        )
    data = bytearray(Path(reports[0].path).read_bytes())
    data[-100] ^= 0x01
    bad = Path(reports[0].path).with_name("corrupt.safetensors")
    bad.write_bytes(bytes(data))
    try:
        load_sparse(bad)
    except SparseFormatError as err:
        message = str(err).replace(str(bad.parent) + os.sep, "")
        print(f"- one bit flipped near the end of the file: `SparseFormatError: {message}`")
    else:
        raise AssertionError("a corrupt file loaded")
    bad.write_bytes(bytes(data[: len(data) // 2]))
    try:
        load_sparse(bad)
    except SparseFormatError as err:
        message = str(err).replace(str(bad.parent) + os.sep, "")
        print(f"- file truncated to half: `SparseFormatError: {message[:150]}...`")
    else:
        raise AssertionError("a truncated file loaded")


# ---------------------------------------------------------------------------------------------------------------------
# (c) neuron removal
# ---------------------------------------------------------------------------------------------------------------------


def shrink(net: nn.Module, masks: dict[str, Tensor], x: Tensor, y: Tensor, out: Path) -> tuple[nn.Module, Any]:
    shrunk = copy.deepcopy(net)
    start = time.perf_counter()
    report = remove_dead_units(shrunk, x[:256], masks=masks)
    seconds = time.perf_counter() - start
    shrunk.eval()
    print("\n## (c) Neuron removal: `remove_dead_units` (example input: 256 MNIST test images)\n")
    print("```text")
    print(report.plan)
    print("```\n")
    print("| layer | output units | removed (of which folded into the next bias) | weight shape before | after |")
    print("|---|---:|---:|---|---|")
    for name, plan in report.plan.layers.items():
        change = report.changes.get(name)
        old = list(change.old_shape) if change else list(getattr(net, name).weight.shape)
        new = list(change.new_shape) if change else old
        removed = f"{len(plan.remove)} ({len(plan.folded)})"
        print(f"| {name} | {plan.units} -> {plan.remaining} | {removed} | {old} | {new} |")
    ref, got = logits_of(net, x), logits_of(shrunk, x)
    diff = float((ref - got).abs().max())
    acc_ref, acc_new = accuracy(net, x, y), accuracy(shrunk, x, y)
    flips = int((ref.argmax(1) != got.argmax(1)).sum())
    nz_before, nz_after = nonzero_weights(net), nonzero_weights(shrunk)
    print()
    print(
        f"- parameters (weights + biases, zeros included): {report.parameters_before:,} -> "
        f"{report.parameters_after:,} ({report.parameters_before / report.parameters_after:.2f}x fewer); nonzero "
        f"weights: {nz_before:,} -> {nz_after:,}"
    )
    print(
        f"- max |logit difference| vs the masked model on the 10,000 test images: **{diff:.3g}**; test accuracy "
        f"{100 * acc_ref:.2f}% -> {100 * acc_new:.2f}% ({'equal' if acc_ref == acc_new else 'DIFFERENT'}); "
        f"predictions that changed: {flips}"
    )
    print(f"- `remove_dead_units` took {seconds * 1e3:.0f} ms")
    dead_inputs = int((~masks["fc1.weight"].any(0)).sum())
    print(
        f"- inputs of `fc1` with no surviving connection: {dead_inputs} of 784 pixels; they are the model's input, "
        f"so they stay (removing them would change the input shape)"
    )
    assert diff < 1e-4, diff
    path = out / "lenet300-shrunk.safetensors"
    save_shrunk(shrunk, path)
    fresh = LeNet300100()
    resized = load_shrunk(fresh, path)
    assert torch.equal(logits_of(fresh, x), got)
    sparse = export_sparse(shrunk, report.masks, out / "lenet300-shrunk-sparse.safetensors")
    print(
        f"- `save_shrunk` -> `load_shrunk` into a fresh `LeNet300100` (resized {resized}): logits `torch.equal`; "
        f"file {path.stat().st_size:,} B (dense fp32); the shrunk model through `export_sparse` with the restricted "
        f"masks: {sparse.file_bytes:,} B ({sparse.ratio:.3f}x its surviving values)"
    )
    try:
        load_sparse_into(LeNet300100(), sparse.path)
    except ValueError as err:
        message = str(err).replace(str(out) + os.sep, "")
        print(f"- that file into an unshrunk `LeNet300100`: `ValueError: {message}`")
    else:
        raise AssertionError("a shrunk file loaded into the full-size model")
    return shrunk, report


# ---------------------------------------------------------------------------------------------------------------------
# (d) latency
# ---------------------------------------------------------------------------------------------------------------------


def per_call(model: nn.Module, x: Tensor, n: int) -> tuple[float, float]:
    """Wall seconds per call, and the process CPU time over the wall time of the ``n`` calls."""
    start, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        model(x)
    wall = time.perf_counter() - start
    return wall / n, (time.process_time() - cpu) / wall


@torch.inference_mode()
def latency(variants: Mapping[str, nn.Module], x: Tensor, args: argparse.Namespace) -> None:
    print(f"\n## (d) CPU inference latency ({args.timing_rounds} interleaved rounds, ~{args.sample_ms:g} ms each)\n")
    for model in variants.values():
        model.eval()
    ref = logits_of(variants["dense (masked)"], x)
    print("| variant | weight layers | max abs logit diff vs dense (10k test images) |")
    print("|---|---|---:|")
    for name, model in variants.items():
        kinds = ", ".join(
            f"{n}: {type(m).__name__} {m.out_features}x{m.in_features}" for n, m in model.named_modules() if n in LAYERS
        )
        print(f"| {name} | {kinds} | {float((logits_of(model, x) - ref).abs().max()):.3g} |")
    print(
        f"\nWhole-model forward calls (`model(x)` under `torch.inference_mode()`, eval mode), `x` real test images; "
        f"load average (1 min) when timing starts: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores. "
        f"CPU time / wall time: process CPU seconds over wall seconds of the timed calls (median over rounds): "
        f"1.0 = one core busy throughout, 2.0 = two.\n"
    )
    print("| threads | batch | variant | median per call (us) | min-max over rounds (us) | per image (us) | "
          "vs dense: median [min, max] of per-round ratios | CPU time / wall time |")  # fmt: skip
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    names = list(variants)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            inp = x[:batch].clone()
            calls = {}
            for name in names:
                model = variants[name]
                per_call(model, inp, 20)  # warm-up
                t = per_call(model, inp, 20)[0]
                calls[name] = max(5, int(args.sample_ms * 1e-3 / t))
            times: dict[str, list[float]] = {n: [] for n in names}
            busy: dict[str, list[float]] = {n: [] for n in names}
            for r in range(args.timing_rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    seconds, cpu = per_call(variants[name], inp, calls[name])
                    times[name].append(seconds)
                    busy[name].append(cpu)
            dense = times[names[0]]
            for name in names:
                ratios = [a / b for a, b in zip(times[name], dense, strict=True)]
                med = statistics.median(times[name])
                print(
                    f"| {threads} | {batch} | {name} | {med * 1e6:.1f} | {min(times[name]) * 1e6:.1f}-"
                    f"{max(times[name]) * 1e6:.1f} | {med * 1e6 / batch:.2f} | {statistics.median(ratios):.2f}x "
                    f"[{min(ratios):.2f}, {max(ratios):.2f}] | {statistics.median(busy[name]):.2f} |"
                )


# ---------------------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="Lightning checkpoint of a pruned LeNet300100 (default: train one)")
    parser.add_argument("--save-checkpoint", help="write the checkpoint of the model trained here to this path")
    parser.add_argument("--data-dir", default="data", help="MNIST root (IDX files in <data-dir>/MNIST/raw)")
    parser.add_argument("--dense-epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", help="where the exported files go (default: a temporary folder)")
    parser.add_argument("--timing-rounds", type=int, default=31)
    parser.add_argument("--sample-ms", type=float, default=20.0, help="time of one timed sample per variant")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256])
    args = parser.parse_args()
    if args.checkpoint and args.save_checkpoint:
        parser.error("--save-checkpoint applies to a model trained here, not to --checkpoint")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # training and checks: 2 threads only pay off when nothing else runs
    wall = time.perf_counter()
    load = os.getloadavg()

    command = "python " + shlex.join([os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    print("# Export, neuron removal and CPU inference: pruned LeNet-300-100 on MNIST\n")
    print(f"- Command: `{command}`")
    print(f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"- CPU: {cpu_name()}, {os.cpu_count()} logical cores; torch threads as given per table")
    print(
        f"- Python {platform.python_version()}, torch {torch.__version__}, lightning {lightning.__version__}, "
        f"{platform.system()} {platform.release()}"
    )

    dm = MNISTDataModule(data_dir=args.data_dir, batch_size=128, download=False)
    dm.prepare_data()
    dm.setup("test")
    assert dm.test_set is not None
    x, y = dm.test_set.tensors
    if args.checkpoint:
        net, masks, info = load_pruned(args.checkpoint)
    else:
        net, masks, info = train_pruned(args, x, y, dm)
    print(f"- Pruned model: {info['source']}; training and checks with 1 torch thread")
    print(f"- MNIST source: {dm.source}\n")
    print("## The pruned model\n")
    if "accuracies" in info:
        phases = ", ".join(f"{k} {100 * v:.2f}%" for k, v in info["accuracies"].items())
        print(f"Test accuracy (10,000 official test images) at the end of each phase: {phases}.\n")
        print("Schedule: " + "; ".join(f"round {k + 1}: quality {r['level']}, {r['epochs']} epochs"
                                         for k, r in enumerate(ROUNDS)))  # fmt: skip
        print(
            "(`Std(std_of='dense')`, `Retraining(lr_scale=0.1)`, SGD lr 0.01 momentum 0.9, weight decay 5e-4, "
            "batch 128).\n"
        )
    print("| layer | shape | weights | alive | alive % |")
    print("|---|---|---:|---:|---:|")
    total = alive = 0
    for name, keep in masks.items():
        total, alive = total + keep.numel(), alive + int(keep.sum())
        shape = " x ".join(map(str, keep.shape))
        print(f"| {name} | {shape} | {keep.numel():,} | {int(keep.sum()):,} | {100 * keep.float().mean():.2f}% |")
    print(f"| total | | {total:,} | {alive:,} | {100 * alive / total:.2f}% ({100 - 100 * alive / total:.2f}% sparse) |")
    print(f"\nTest accuracy of the pruned model: **{100 * accuracy(net, x, y):.2f}%**")

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out_dir or tmp)
        out.mkdir(parents=True, exist_ok=True)
        reports = storage(net, masks, out)
        round_trip(net, masks, reports, x)
        shrunk, report = shrink(net, masks, x, y, out)

        csr = copy.deepcopy(net)
        to_sparse_linear(csr, masks)
        variants: dict[str, nn.Module] = {"dense (masked)": net, "CSR (to_sparse_linear)": csr, "shrunk": shrunk}
        if report.masks:
            shrunk_csr = copy.deepcopy(shrunk)
            to_sparse_linear(shrunk_csr, report.masks)
            variants["shrunk + CSR"] = shrunk_csr
        latency(variants, x, args)
    print(f"\nTotal wall time: {time.perf_counter() - wall:.0f} s; load average (1 min) at start {load[0]:.2f}, at end "
          f"{os.getloadavg()[0]:.2f} ({os.cpu_count()} cores)")  # fmt: skip


if __name__ == "__main__":
    main()
