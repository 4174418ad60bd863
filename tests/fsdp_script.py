"""Run by tests/test_fsdp.py as ``python tests/fsdp_script.py MODE OUT [CKPT]``: pruning FSDP2-sharded models on CPU.

- ``core``: no Lightning. Two processes (gloo) shard a model with ``fully_shard`` (uneven row blocks, an
  attention block whose q/k/v rows straddle the shards), prune it with each shardable criterion, and
  compare the gathered masks with those one process computes on the same whole weights; then train.
- ``fit`` / ``full``: a 2-process ``ModelParallelStrategy`` fit with the callback (two rounds), saving a
  sharded (``fit``) or a full (``full``) checkpoint; ``resume``: a fit resumed from ``CKPT``.

Each rank writes ``OUT/<mode>-rank<r>.json``.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from dist_exit import leave
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import Fraction, Global, Guard, PruneRetrainCallback, Retraining, Std, fit_rounds
from lightning_prune.core import Pruner
from lightning_prune.core.sharding import full_mask, is_sharded, local


class Attention(nn.Module):
    """An MLP with an attention block: in_proj_weight's 18 rows are q 0-5, k 6-11, v 12-17 (9 per shard)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(12, 7)  # 7 rows: 4 + 3
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.fc2 = nn.Linear(7 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x)).unsqueeze(-1).expand(-1, -1, 6)
        h, _ = self.attn(h, h, h, need_weights=False)
        return self.fc2(h.flatten(1))


def shard(model: nn.Module, mesh) -> None:
    for module in model.children():
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def core(rank: int, out: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    torch.distributed.init_process_group("gloo", init_method=f"file://{out / 'rendezvous'}", rank=rank, world_size=2)
    torch.manual_seed(0)
    dense = Attention()
    with torch.no_grad():
        dense.fc1.weight[0, :3] = 0.25  # ties across a shard's rows
        dense.attn.in_proj_weight[7, :] = 0.25
    mesh = init_device_mesh("cpu", (2,))
    report: dict = {"rank": rank, "cases": {}}
    cases = {
        "std": (Std(), {"fc1": 0.8, "attn*": 1.1, "fc2": 0.5}, None),
        "fraction": (Fraction(), {"fc1": 0.6, "attn*": 0.7, "fc2": 0.3}, None),
        "global": (Global(), 0.55, None),
        "fraction_floor": (Fraction(), 0.99, 0.2),
        "std_surviving": (Std(std_of="surviving"), 0.7, None),
    }
    for case, (criterion, level, floor) in cases.items():
        reference, model = copy.deepcopy(dense), copy.deepcopy(dense)
        shard(model, mesh)
        pruner, single = Pruner(model, include_bias=False), Pruner(reference)
        for _ in range(2):  # twice: the second prune starts from masks, and the dense std is reused
            pruner.prune(criterion, level, min_remaining=floor)
            single.prune(criterion, level, min_remaining=floor)
        gathered = {name: full_mask(keep, pruner.parameter(name)) for name, keep in pruner.masks.items()}
        same = {name: bool(torch.equal(gathered[name], single.masks[name])) for name in single.masks}
        stats_same = [(s.name, s.remaining) for s in pruner.stats()] == [(s.name, s.remaining) for s in single.stats()]
        local_bytes = sum(keep.numel() for keep in pruner.masks.values())
        report["cases"][case] = {
            "same": same,
            "stats_same": stats_same,
            "thresholds_same": all(
                abs(pruner.thresholds[n] - t) <= 1e-6 * max(1.0, abs(t)) for n, t in single.thresholds.items()
            ),
            "local_mask_bytes": local_bytes,
            "full_mask_bytes": sum(keep.numel() for keep in single.masks.values()),
        }
    # Training keeps the pruned weights at zero through SGD momentum, gradients of pruned entries poisoned.
    model = copy.deepcopy(dense)
    shard(model, mesh)
    pruner = Pruner(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    pruner.attach(optimizer)
    pruner.prune(Fraction(), 0.7)
    x, y = torch.randn(16, 12), torch.randint(0, 3, (16,))
    for _ in range(4):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        for name, keep in pruner.masks.items():
            local(pruner.parameter(name).grad)[~keep] = float("nan")
        optimizer.step()
    violations = 0
    for name, keep in pruner.masks.items():
        weight = local(pruner.parameter(name)).detach()
        violations += int((weight[~keep] != 0).sum())
        for value in optimizer.state[pruner.parameter(name)].values():
            if isinstance(value, torch.Tensor) and value.dim():
                violations += int((local(value)[~keep] != 0).sum())
    report["train_violations"] = violations
    report["finite"] = all(bool(torch.isfinite(local(p.detach())).all()) for p in model.parameters())
    report["sharded"] = pruner.sharded and all(is_sharded(p) for p in model.parameters())
    (out / f"core-rank{rank}.json").write_text(json.dumps(report))
    leave()


class ShardedMLP(pl.LightningModule):
    """12 -> 33 -> 17 -> 3 with dropout; every Linear sharded over the data-parallel mesh (uneven rows)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(12, 33), nn.ReLU(), nn.Dropout(0.4), nn.Linear(33, 17), nn.ReLU(), nn.Linear(17, 3)
        )

    def configure_model(self) -> None:
        if is_sharded(self.net[0].weight):  # each fit calls it again
            return
        shard(self.net, self.device_mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2, weight_decay=1e-4)

    def train_dataloader(self) -> DataLoader:
        return loader(0)

    def val_dataloader(self) -> DataLoader:
        return loader(1)


class Watch(Callback):
    """Counts batches after which a pruned weight or its Adam state is non-zero on this rank."""

    def __init__(self, prune: PruneRetrainCallback):
        self.prune, self.violations, self.batches = prune, 0, 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.batches += 1
        optimizer = trainer.optimizers[0]
        for name, keep in self.prune.pruner.masks.items():
            param = pl_module.get_parameter(name)
            self.violations += int((local(param.detach())[~keep] != 0).any())
            for value in optimizer.state.get(param, {}).values():
                if isinstance(value, torch.Tensor) and value.dim():
                    self.violations += int((local(value)[~keep] != 0).any())


def loader(seed: int) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(128, 12, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return DataLoader(TensorDataset(x, y), batch_size=16)


def fit(mode: str, out: Path, ckpt: str | None) -> None:
    pl.seed_everything(0, verbose=False)
    model = ShardedMLP()
    prune = PruneRetrainCallback(
        prune_epochs=[1, 2],
        rounds=[{"level": 0.7}, {"level": 1.1}],
        retrain=Retraining(lr_scale=0.5),
        verbose=True,
    )
    watch = Watch(prune)
    strategy = ModelParallelStrategy(
        data_parallel_size=2, tensor_parallel_size=1, save_distributed_checkpoint=mode != "full"
    )
    saver = ModelCheckpoint(dirpath=out / mode, save_last=True, save_top_k=0)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_epochs=5 if mode == "resume" else 3,
        logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[prune, watch, saver],
        limit_val_batches=2,
    )  # fmt: skip
    trainer.fit(model, loader(0), loader(1), ckpt_path=ckpt)
    pruner = prune.pruner
    masks = {name: full_mask(keep, pruner.parameter(name)) for name, keep in pruner.masks.items()}
    report = {
        "rank": trainer.global_rank,
        "masks": {n: [int(k.flatten().nonzero().sum()), int(k.sum()), list(k.shape)] for n, k in masks.items()},
        "local_shapes": {name: list(keep.shape) for name, keep in pruner.masks.items()},
        "local_mask_bytes": sum(keep.numel() for keep in pruner.masks.values()),
        "full_mask_bytes": sum(keep.numel() for keep in masks.values()),
        "violations": watch.violations,
        "batches": watch.batches,
        "done": list(prune.schedule.done),
        "sparsity": pruner.sparsity(),
        "dropout": float(model.net[2].p),
        "zeros_match": all(
            bool((full_mask(local(pruner.parameter(n).detach()) != 0, pruner.parameter(n)) <= k).all())
            for n, k in masks.items()
        ),
        "last": str(saver.last_model_path),
    }
    (out / f"{mode}-rank{trainer.global_rank}.json").write_text(json.dumps(report))


def rounds(out: Path) -> None:
    """fit_rounds: dense, then two rounds (the first retrains only net.3 and net.5), judged by a guard."""
    pl.seed_everything(0, verbose=False)
    model = ShardedMLP()
    prune = PruneRetrainCallback(
        retrain=Retraining(lr_scale=0.5),
        guard=Guard(monitor="val_loss", mode="min", tolerance=0.0, action="retry", retries=1, retry_scale=0.5),
        rounds=[{"level": 0.7, "epochs": 1, "train_only": ["net.3", "net.5"]}, {"level": 1.6, "epochs": 1}],
        verbose=False,
    )
    watch = Watch(prune)

    def make_trainer(max_epochs: int, extra: list) -> pl.Trainer:  # a strategy object serves one trainer only
        return pl.Trainer(
            accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            max_epochs=max_epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
            limit_val_batches=2, callbacks=[prune, watch, *extra],
        )  # fmt: skip

    results = fit_rounds(
        model, prune, trainer_factory=make_trainer, train_dataloaders=loader(0), val_dataloaders=loader(1),
        dense_epochs=1, checkpoint_dir=out / "rounds",
    )  # fmt: skip
    pruner = prune.pruner
    masks = {name: full_mask(keep, pruner.parameter(name)) for name, keep in pruner.masks.items()}
    report = {
        "rank": torch.distributed.get_rank(),
        "phases": [r.name for r in results],
        "masks": {name: [int(keep.flatten().nonzero().sum()), int(keep.sum())] for name, keep in masks.items()},
        "violations": watch.violations,
        "done": list(prune.schedule.done),
        "scales": {str(k): v for k, v in prune.schedule.scales.items()},
        "zeros_match": all(
            bool((full_mask(local(pruner.parameter(n).detach()) != 0, pruner.parameter(n)) <= k).all())
            for n, k in masks.items()
        ),
    }
    (out / f"rounds-rank{report['rank']}.json").write_text(json.dumps(report))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    torch.set_num_threads(1)
    if mode == "core":
        torch.multiprocessing.spawn(core, args=(out,), nprocs=2)
    elif mode == "rounds":
        rounds(out)
    else:
        fit(mode, out, ckpt)
    leave()  # Lightning leaves its gloo group alive


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
