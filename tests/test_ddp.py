"""Distributed data parallel on CPU (gloo, 2 processes): identical masks on every rank, resume, fit_rounds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy
from toy_models import ToyMLP, make_trainer, toy_loader

from lightning_prune import PruneRetrainCallback, Retraining, Std
from lightning_prune.fit_checks import check_strategy

HERE = Path(__file__).parent


def run_script(mode: str, out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(HERE / "ddp_script.py"), mode, str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = sorted(out.glob(f"{mode}-rank*.json"))
    return [json.loads(p.read_text()) for p in ranks]


def test_ddp_masks_are_decided_once_and_identical_then_resume_on_one_and_two_devices(tmp_path):
    first = run_script("single", tmp_path)
    assert [r["rank"] for r in first] == [0, 1]
    # Rank 1 skews its weights before each prune; it still ends with rank zero's masks.
    assert first[0]["masks"] == first[1]["masks"] and first[0]["masks"]
    assert first[0]["dropout"] == first[1]["dropout"] < 0.5
    assert all(r["violations"] == 0 and r["batches"] > 0 and r["done_rounds"] == [0, 1] for r in first)

    checkpoint = tmp_path / "last.ckpt"
    prune = PruneRetrainCallback(prune_epochs=[1, 2], rounds=[{"level": 0.6}, {"level": 1.0}], verbose=False)
    make_trainer(tmp_path / "one", [prune], max_epochs=4).fit(
        ToyMLP(dropout=0.5), toy_loader(n=128), ckpt_path=checkpoint
    )
    resumed = {n: [int(k.flatten().nonzero().sum()), int(k.sum())] for n, k in prune.pruner.masks.items()}
    assert resumed == first[0]["masks"]

    again = tmp_path / "again"
    again.mkdir()
    second = run_script("single", again, str(checkpoint))
    assert second[0]["masks"] == second[1]["masks"] == first[0]["masks"]
    assert all(r["violations"] == 0 for r in second)


def test_fit_rounds_under_ddp_runs_each_round_once_on_every_rank(tmp_path):
    ranks = run_script("rounds", tmp_path)
    assert len(ranks) == 2
    assert ranks[0]["masks"] == ranks[1]["masks"] and ranks[0]["masks"]
    assert all(r["phases"] == ["dense", "round-1", "round-2"] and r["done_rounds"] == [0, 1] for r in ranks)
    assert all(r["violations"] == 0 for r in ranks)
    assert sorted(p.name for p in (tmp_path / "rounds").glob("*.ckpt")) == [
        "dense.ckpt",
        "round-1.ckpt",
        "round-2.ckpt",
    ]


def test_ddp_attention_rows_recurrent_and_parametrized_masks_are_identical_on_every_rank(tmp_path):
    ranks = run_script("sequence", tmp_path)
    assert len(ranks) == 2 and ranks[0]["masks"] == ranks[1]["masks"]
    assert {"encoder.self_attn.in_proj_weight", "rnn.weight_hh_l0", "head.parametrizations.weight.original1"} <= set(
        ranks[0]["masks"]
    )
    assert all(r["violations"] == 0 and r["batches"] > 0 and r["done_rounds"] == [0, 1] for r in ranks)


class DumpMasks(Callback):
    def __init__(self, out: Path):
        self.out = out

    def on_train_end(self, trainer, pl_module):
        prune = next(c for c in trainer.callbacks if isinstance(c, PruneRetrainCallback))
        sums = {n: [int(k.flatten().nonzero().sum()), int(k.sum())] for n, k in prune.pruner.masks.items()}
        (self.out / f"spawn-{trainer.global_rank}.json").write_text(json.dumps(sums))


def test_ddp_spawn_gives_identical_masks(tmp_path):
    prune = PruneRetrainCallback(prune_epochs=[1], criterion=Std(quality=0.8), verbose=False)
    trainer = make_trainer(tmp_path, [prune, DumpMasks(tmp_path)], max_epochs=2, strategy="ddp_spawn", devices=2)
    assert trainer.world_size == 2
    model = ToyMLP()
    trainer.fit(model, toy_loader(n=128))
    dumps = [json.loads((tmp_path / f"spawn-{r}.json").read_text()) for r in (0, 1)]
    assert dumps[0] == dumps[1] and dumps[0]
    # The weights come back to this process with their zeros.
    assert (model.net[0].weight == 0).float().mean() > 0.4


@pytest.mark.parametrize("strategy", [FSDPStrategy, DeepSpeedStrategy])
def test_sharded_strategies_are_refused(strategy):
    prune = PruneRetrainCallback(prune_epochs=[1])
    fake = SimpleNamespace(strategy=strategy.__new__(strategy))
    with pytest.raises(ValueError, match=rf"does not support {strategy.__name__}: it flattens parameters into shards"):
        check_strategy(fake, prune.schedule)


def test_train_only_in_one_ddp_fit_needs_find_unused_parameters():
    prune = PruneRetrainCallback(prune_epochs=[1], retrain=Retraining(train_only=["net.5"]))
    with pytest.raises(ValueError, match="strategy='ddp_find_unused_parameters_true'"):
        check_strategy(SimpleNamespace(strategy=DDPStrategy()), prune.schedule)
    check_strategy(SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True)), prune.schedule)
    prune.fit_round(0)
    check_strategy(SimpleNamespace(strategy=DDPStrategy()), prune.schedule)


def test_masks_live_on_the_parameters_device():
    model = ToyMLP()
    prune = PruneRetrainCallback(prune_epochs=[0], verbose=False)
    prune.bind(model)
    prune.pruner.prune("std", 0.5)
    for name, keep in prune.pruner.masks.items():
        assert keep.device == model.get_parameter(name).device
    if torch.cuda.is_available():
        model.cuda()
        prune.pruner.refresh()
        assert all(k.is_cuda for k in prune.pruner.masks.values())
