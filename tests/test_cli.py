"""The ``lightning-prune`` command and the callback in users' own LightningCLI scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.cli import LightningCLI
from toy_models import ToyData, ToyMLP

from lightning_prune import PruneRetrainCallback
from lightning_prune.cli import PruneCLI, main

HERE = Path(__file__).parent
QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def config(tmp_path: Path, **callback_args) -> Path:
    data = {
        "model": {"class_path": "toy_models.ToyMLP", "init_args": {"dropout": 0.3}},
        "data": {"class_path": "toy_models.ToyData"},
        "trainer": {
            "max_epochs": 3,
            "default_root_dir": str(tmp_path),
            "callbacks": [{"class_path": "lightning_prune.PruneRetrainCallback", "init_args": callback_args}],
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def prune_callback(cli) -> PruneRetrainCallback:
    (found,) = [c for c in cli.trainer.callbacks if isinstance(c, PruneRetrainCallback)]
    return found


def test_fit_from_a_yaml_config(tmp_path):
    path = config(tmp_path, quality={"net.0": 1.2, "*": 0.8}, prune_epochs=[1], retrain_lr_scale=0.5)
    cli = PruneCLI(args=["fit", "--config", str(path), *QUIET])
    prune = prune_callback(cli)
    assert prune.defaults["quality"] == {"net.0": 1.2, "*": 0.8}
    assert prune.done_rounds == [0]
    assert 0.4 < prune.pruner.sparsity() < 0.9
    assert cli.model.net[2].p < 0.3


def test_callback_added_on_the_command_line(tmp_path):
    args = [
        "fit",
        "--model=toy_models.ToyMLP",
        "--data=toy_models.ToyData",
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_prune.PruneRetrainCallback",
        "--trainer.callbacks.quality=0.7",
        "--trainer.callbacks.prune_epochs=[1]",
        *QUIET,
    ]
    prune = prune_callback(PruneCLI(args=args))
    assert prune.defaults["quality"] == 0.7 and prune.done_rounds == [0]


def test_users_own_lightning_cli_takes_the_callback(tmp_path):
    args = [
        "fit",
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_prune.PruneRetrainCallback",
        "--trainer.callbacks.rounds=[{quality: 0.5, epochs: 1}]",
        *QUIET,
    ]
    cli = LightningCLI(ToyMLP, ToyData, args=args)
    prune = prune_callback(cli)
    assert prune.rounds[0].quality == 0.5 and prune.done_rounds == [0]


def test_print_config_is_readable_and_round_trips(tmp_path, capsys):
    path = config(tmp_path, rounds=[{"quality": 0.6, "epochs": 1}, {"quality": 1.0, "epochs": 1, "lr_scale": 0.1}])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config", *QUIET])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "lightning_prune.PruneRetrainCallback" in printed and "retrain_lr_scale: 1.0" in printed
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(printed)
    cli = PruneCLI(args=["fit", "--config", str(dumped)])
    prune = prune_callback(cli)
    assert [r.quality for r in prune.rounds] == [0.6, 1.0] and prune.rounds[1].lr_scale == 0.1
    assert prune.done_rounds == [0, 1]


def test_rounds_subcommand_runs_each_round_as_a_fit(tmp_path):
    path = config(tmp_path, rounds=[{"quality": 0.6, "epochs": 1}, {"quality": 1.0, "epochs": 2}])
    checkpoints = tmp_path / "phases"
    cli = PruneCLI(
        args=["rounds", "--config", str(path), "--dense_epochs=1", f"--checkpoint_dir={checkpoints}", *QUIET]
    )
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["dense.ckpt", "round-1.ckpt", "round-2.ckpt"]
    state = torch.load(checkpoints / "round-2.ckpt", weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("PruneRetrainCallback")]
    assert state["callbacks"][key]["done_rounds"] == [0, 1]
    assert prune_callback(cli).done_rounds == [0, 1]


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--trainer.callbacks.init_args.qualty=0.7"], r"qualty"),
        (["--trainer.callbacks.init_args.quality=high"], r"quality"),
        (["--trainer.callbacks.init_args.quality=-1"], r"trainer\.callbacks\[0\] .*`quality` must be a finite number"),
        (["--trainer.callbacks.init_args.prune_epochs=[3, 1]"], r"trainer\.callbacks\[0\] .*strictly increasing"),
        (["--trainer.callbacks.init_args.criterion=l2"], r"criterion"),
    ],
)
def test_config_errors_name_the_key_before_training(tmp_path, capsys, extra, match):
    path = config(tmp_path, prune_epochs=[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), *extra, *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert pytest.importorskip("re").search(match, err), err[-2000:]
    assert not list(tmp_path.glob("**/*.ckpt"))


def test_console_script_help_lists_the_subcommands():
    done = subprocess.run(
        [sys.executable, "-m", "lightning_prune.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "rounds" in done.stdout and "fit" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "lightning_prune.cli", "rounds", "--help"], capture_output=True, text=True, timeout=120
    )
    assert "--dense_epochs" in done.stdout and "--checkpoint_dir" in done.stdout


def test_console_script_fit_under_ddp(tmp_path):
    path = config(tmp_path, prune_epochs=[1], quality=0.8)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    args = ["--trainer.devices=2", "--trainer.strategy=ddp", *QUIET, "--trainer.enable_checkpointing=true"]
    done = subprocess.run(
        [sys.executable, "-m", "lightning_prune.cli", "fit", "--config", str(path), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pruned (round 1/1, start of epoch 1)" in done.stderr + done.stdout
    (checkpoint,) = tmp_path.glob("**/*.ckpt")
    state = torch.load(checkpoint, weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("PruneRetrainCallback")]
    assert state["callbacks"][key]["done_rounds"] == [0]


CONFIGS = sorted((HERE.parent / "examples" / "configs").glob("*.yaml"))


def test_main_destroys_the_process_group_the_run_opened(tmp_path, monkeypatch):
    """A gloo group left open to interpreter exit can abort a finished ddp run (pytorch#190489)."""
    opened = []

    def open_group(args=None):
        store = f"file://{tmp_path}/store"
        torch.distributed.init_process_group("gloo", init_method=store, rank=0, world_size=1)
        opened.append(torch.distributed.is_initialized())
        if args == ["fail"]:
            raise RuntimeError("fit failed")

    monkeypatch.setattr("lightning_prune.cli.PruneCLI", open_group)
    main([])
    with pytest.raises(RuntimeError, match="fit failed"):
        main(["fail"])
    assert opened == [True, True] and not torch.distributed.is_initialized()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_example_configs_run(tmp_path, path):
    pytest.importorskip("zarr")
    (entry,) = [
        c for c in yaml.safe_load(path.read_text())["trainer"]["callbacks"] if "PruneRetrain" in c["class_path"]
    ]
    init = entry.get("init_args", {})
    # One dense epoch before the rounds: the schedule runs whole, on two batches per epoch.
    if init.get("prune_epochs"):
        epochs = init["prune_epochs"][-1] + 1
    else:
        epochs = 1 + sum(r.get("epochs", 0) for r in init.get("rounds") or [])
    overrides = [
        f"--trainer.max_epochs={epochs}",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--data.subset=512",
        "--data.val_batch_size=64",
        f"--data.data_dir={HERE.parent / 'data'}",
        f"--trainer.default_root_dir={tmp_path}",
        *QUIET,
    ]
    cli = PruneCLI(args=["fit", "--config", str(path), *overrides])
    prune = prune_callback(cli)
    assert cli.trainer.current_epoch == epochs
    assert prune.done_rounds == list(range(len(prune.rounds)))
    assert prune.pruner.sparsity() > 0.5
