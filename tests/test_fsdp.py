"""Pruning under FSDP2 (``fully_shard``; Lightning's ``ModelParallelStrategy``), two CPU processes on gloo.

Each test runs ``tests/fsdp_script.py`` in a subprocess and reads what every rank wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from lightning_prune import NM, PruneRetrainCallback, PruneTrainer, Sensitivity
from lightning_prune.core.export import load_sparse
from lightning_prune.core.structure import remove_dead_units
from lightning_prune.fit_checks import check_strategy

HERE = Path(__file__).resolve().parent

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def run_script(mode: str, out: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(HERE / "fsdp_script.py"), mode, str(out), *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in (0, 1)]


def test_sharded_masks_are_bit_identical_to_one_process_for_every_shardable_criterion(tmp_path):
    ranks = run_script("core", tmp_path)
    for rank in ranks:
        assert set(rank["cases"]) == {"std", "fraction", "global", "fraction_floor", "std_surviving"}
        for case, result in rank["cases"].items():
            assert all(result["same"].values()), (case, result["same"])
            assert result["stats_same"] and result["thresholds_same"], case
        assert rank["train_violations"] == 0 and rank["finite"] and rank["sharded"]
    # Each rank holds only its rows of every mask: together exactly one full set.
    local = [rank["cases"]["std"]["local_mask_bytes"] for rank in ranks]
    assert sum(local) == ranks[0]["cases"]["std"]["full_mask_bytes"] and max(local) < sum(local)


def test_model_parallel_fit_prunes_shards_and_resumes_from_a_sharded_checkpoint(tmp_path):
    first = run_script("fit", tmp_path)
    assert first[0]["masks"] == first[1]["masks"] and first[0]["done"] == [0, 1]
    for rank in first:
        assert rank["violations"] == 0 and rank["zeros_match"] and rank["batches"] == 12
        assert 0.5 < rank["sparsity"] < 0.8 and rank["dropout"] < 0.4
    assert first[0]["dropout"] == first[1]["dropout"]
    # Uneven rows (33 -> 17 + 16): each rank's masks are its shards, and mask memory splits across ranks.
    assert first[0]["local_shapes"]["net.0.weight"] == [17, 12] and first[1]["local_shapes"]["net.0.weight"] == [16, 12]
    assert first[0]["local_mask_bytes"] + first[1]["local_mask_bytes"] == first[0]["full_mask_bytes"]
    checkpoint = Path(first[0]["last"])
    assert checkpoint.is_dir()  # sharded: DCP files, the masks among them
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    state = next(v for k, v in meta["callbacks"].items() if "PruneRetrainCallback" in k)
    assert state["pruner"]["masks"] == {} and set(state["pruner"]["sharded_masks"]) == set(first[0]["masks"])
    resumed = run_script("resume", tmp_path, str(checkpoint))
    for rank in resumed:
        assert rank["masks"] == first[0]["masks"] and rank["done"] == [0, 1]
        assert rank["violations"] == 0 and rank["zeros_match"] and rank["batches"] == 8


def test_a_full_checkpoint_holds_whole_masks_for_one_process_and_resumes_sharded(tmp_path):
    first = run_script("full", tmp_path)
    path = Path(first[0]["last"])
    assert path.is_file()
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    sys.path.insert(0, str(HERE))
    try:
        from fsdp_script import ShardedMLP
    finally:
        sys.path.remove(str(HERE))
    model = ShardedMLP()  # unsharded: configure_model is not called outside a strategy
    model.load_state_dict(checkpoint["state_dict"])
    prune = PruneRetrainCallback(prune_epochs=[1, 2], rounds=[{"level": 0.7}, {"level": 1.1}])  # as the script's
    masks = prune.masks_from_checkpoint(checkpoint, model, str(path))
    assert {name: [int(k.flatten().nonzero().sum()), int(k.sum()), list(k.shape)] for name, k in masks.items()} == (
        first[0]["masks"]
    )
    for name, keep in masks.items():
        assert bool((model.get_parameter(name)[~keep] == 0).all())
    report = remove_dead_units(model, torch.randn(4, 12), masks=masks)
    assert report.masks is not None
    # The export path (`lightning-prune export`) reads the full checkpoint on one process.
    trainer = PruneTrainer(
        callbacks=[PruneRetrainCallback(prune_epochs=[1, 2], rounds=[{"level": 0.7}, {"level": 1.1}])]
    )
    trainer.export(ShardedMLP(), str(path), str(tmp_path / "model.sparse.safetensors"))
    state, exported = load_sparse(tmp_path / "model.sparse.safetensors")
    assert {name: int(keep.sum()) for name, keep in exported.items()} == {n: v[1] for n, v in first[0]["masks"].items()}
    assert torch.equal(state["net.0.weight"], checkpoint["state_dict"]["net.0.weight"])
    resumed = run_script("resume", tmp_path, str(path))
    for rank in resumed:
        assert rank["masks"] == first[0]["masks"] and rank["violations"] == 0 and rank["zeros_match"]
    assert resumed[0]["local_shapes"]["net.5.weight"] == [2, 17] and resumed[1]["local_shapes"]["net.5.weight"] == [
        1,
        17,
    ]


def test_fit_rounds_with_train_only_and_a_guard_that_retries_under_model_parallel(tmp_path):
    ranks = run_script("rounds", tmp_path)
    assert ranks[0]["masks"] == ranks[1]["masks"]
    for rank in ranks:
        assert rank["phases"] == ["dense", "round-1", "round-2"] and rank["done"] == [0, 1]
        assert rank["violations"] == 0 and rank["zeros_match"]
        assert rank["scales"] == ranks[0]["scales"]


def _model_parallel() -> SimpleNamespace:
    return SimpleNamespace(strategy=ModelParallelStrategy.__new__(ModelParallelStrategy))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"criterion": NM()}, r"rounds\[0\]: criterion NM\(.*\) cannot prune sharded parameters"),
        ({"sensitivity": Sensitivity(tolerance=0.01)}, "`sensitivity` is not supported under ModelParallelStrategy"),
        ({"shrink_at_end": True}, r"`shrink_at_end=True` is not supported under ModelParallelStrategy"),
    ],
)
def test_what_model_parallel_cannot_do_yet_is_refused_before_training(kwargs, match):
    prune = PruneRetrainCallback(prune_epochs=[1], **kwargs)
    with pytest.raises(ValueError, match=match):
        check_strategy(
            _model_parallel(), prune.schedule, sensitivity=prune.sensitivity_settings is not None,
            shrink_at_end=prune.shrink_at_end,
        )  # fmt: skip
    plain = PruneRetrainCallback(prune_epochs=[1])
    check_strategy(_model_parallel(), plain.schedule)


CONFIG = """
model:
  class_path: fsdp_script.ShardedMLP
trainer:
  accelerator: cpu
  devices: 2
  max_epochs: 3
  logger: false
  enable_progress_bar: false
  limit_val_batches: 2
  default_root_dir: {root}
  strategy:
    class_path: lightning.pytorch.strategies.ModelParallelStrategy
    init_args: {{data_parallel_size: 2, tensor_parallel_size: 1}}
  callbacks:
    - class_path: lightning_prune.PruneRetrainCallback
      init_args:
        criterion: {{class_path: lightning_prune.Fraction}}
        prune_epochs: [1, 2]
        rounds: [{{level: 0.5}}, {{level: 0.8}}]
"""


def test_the_command_fits_under_model_parallel_from_yaml(tmp_path):
    config = tmp_path / "cfg.yaml"
    config.write_text(CONFIG.format(root=tmp_path / "run"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "lightning_prune.cli", "fit", "--config", str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "5.0x fewer" in done.stdout + done.stderr
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    meta = torch.load(checkpoint / "meta.pt", weights_only=True)
    state = next(v for k, v in meta["callbacks"].items() if "PruneRetrainCallback" in k)
    assert state["schedule"]["done"] == [0, 1] and len(state["pruner"]["sharded_masks"]) == 3
