"""Run by tests/test_ddp.py as ``python tests/ddp_script.py MODE OUT [CKPT]`` under Lightning's DDP launcher.

Lightning re-runs this script once per extra rank (strategy="ddp"), as it does for users' scripts.
Each rank writes ``OUT/<mode>-rank<r>.json`` with checksums of its masks and what it saw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from dist_exit import leave
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from toy_models import ToyMLP, ToySequence, token_loader, toy_loader

from lightning_prune import PruneRetrainCallback, fit_rounds


def checksums(prune: PruneRetrainCallback) -> dict[str, list[int]]:
    return {name: [int(keep.flatten().nonzero().sum()), int(keep.sum())] for name, keep in prune.pruner.masks.items()}


class SkewRankOne(Callback):
    """Before each prune, rank 1 scales its weights so that, left alone, it would pick other masks."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.global_rank == 1:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.mul_(torch.rand_like(p) + 0.5)


class Watch(Callback):
    """Counts batches after which some pruned weight is non-zero (must stay 0) and prune events."""

    def __init__(self, prune: PruneRetrainCallback):
        self.prune, self.violations, self.batches = prune, 0, 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.batches += 1
        for name, keep in self.prune.pruner.masks.items():
            self.violations += int(torch.any(pl_module.get_parameter(name)[~keep] != 0))


def main() -> None:
    mode, out = sys.argv[1], Path(sys.argv[2])
    ckpt = sys.argv[3] if len(sys.argv) > 3 else None
    devices = int(sys.argv[4]) if len(sys.argv) > 4 else 2
    pl.seed_everything(0, verbose=False)
    model = ToyMLP(dropout=0.5)
    common = {"accelerator": "cpu", "devices": devices, "logger": False, "enable_progress_bar": False}
    common["enable_model_summary"] = False
    if devices > 1:
        common["strategy"] = "ddp"
    if mode == "single":
        prune = PruneRetrainCallback(prune_epochs=[1, 2], rounds=[{"level": 0.6}, {"level": 1.0}], verbose=True)
        watch = Watch(prune)
        saver = ModelCheckpoint(dirpath=out, save_last=True, save_top_k=0)
        trainer = pl.Trainer(max_epochs=4 if ckpt else 3, callbacks=[SkewRankOne(), prune, watch, saver], **common)
        trainer.fit(model, toy_loader(n=128), ckpt_path=ckpt)
        result = {"violations": watch.violations, "batches": watch.batches, "dropout": model.net[2].p}
    elif mode == "sequence":
        model = ToySequence()
        prune = PruneRetrainCallback(prune_epochs=[1, 2], rounds=[{"level": 0.5}, {"level": 0.8}], verbose=False)
        watch = Watch(prune)
        trainer = pl.Trainer(max_epochs=3, callbacks=[SkewRankOne(), prune, watch], **common)
        trainer.fit(model, token_loader(n=128))
        result = {"violations": watch.violations, "batches": watch.batches}
    else:
        prune = PruneRetrainCallback(
            retrain={"lr_scale": 0.1},
            rounds=[{"level": 0.6, "epochs": 1, "train_only": ["net.3", "net.5"]}, {"level": 1.0, "epochs": 1}],
        )
        watch = Watch(prune)
        results = fit_rounds(
            model,
            prune,
            trainer_kwargs={**common, "callbacks": [watch]},
            train_dataloaders=toy_loader(n=128),
            dense_epochs=1,
            checkpoint_dir=out / "rounds",
        )
        trainer = None
        result = {"violations": watch.violations, "phases": [r.name for r in results], "dropout": model.net[2].p}
    rank = int(torch.distributed.get_rank()) if torch.distributed.is_initialized() else 0
    result.update(masks=checksums(prune), done_rounds=prune.schedule.done, rank=rank)
    (out / f"{mode}-rank{rank}.json").write_text(json.dumps(result))
    leave()  # Lightning leaves the gloo group alive


if __name__ == "__main__":
    main()
