"""The ``lightning-prune`` command and the callback in users' own LightningCLI scripts."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI
from registry_names import REGISTERED
from toy_models import ToyData, ToyMLP, make_trainer, toy_loader
from user_criteria import KeepTop, top_k_mask

from lightning_prune import Guard, PruneRetrainCallback, Retraining, Std
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


def std(**init_args) -> dict:
    return {"class_path": "lightning_prune.Std", "init_args": init_args}


def prune_callback(cli) -> PruneRetrainCallback:
    (found,) = [c for c in cli.trainer.callbacks if isinstance(c, PruneRetrainCallback)]
    return found


def test_fit_from_a_yaml_config(tmp_path):
    path = config(
        tmp_path, criterion=std(quality={"net.0": 1.2, "*": 0.8}), prune_epochs=[1], retrain={"lr_scale": 0.5}
    )
    cli = PruneCLI(args=["fit", "--config", str(path), *QUIET])
    prune = prune_callback(cli)
    assert isinstance(prune.criterion, Std) and prune.criterion.level == {"net.0": 1.2, "*": 0.8}
    assert prune.retrain == Retraining(lr_scale=0.5) and prune.schedule.rounds[0].lr_scale == 0.5
    assert prune.schedule.done == [0]
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
        "--trainer.callbacks.criterion=lightning_prune.Std",
        "--trainer.callbacks.criterion.quality=0.7",
        "--trainer.callbacks.prune_epochs=[1]",
        "--trainer.callbacks.dropout=null",
        "--model.dropout=0.3",
        *QUIET,
    ]
    cli = PruneCLI(args=args)
    prune = prune_callback(cli)
    assert prune.criterion.level == 0.7 and prune.schedule.done == [0]
    assert prune.dropout_settings is None and prune.dropout is None and cli.model.net[2].p == 0.3


def test_users_own_lightning_cli_takes_the_callback(tmp_path):
    args = [
        "fit",
        "--trainer.max_epochs=2",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.callbacks+=lightning_prune.PruneRetrainCallback",
        "--trainer.callbacks.rounds=[{level: 0.5, epochs: 1}]",
        *QUIET,
    ]
    cli = LightningCLI(ToyMLP, ToyData, args=args)
    prune = prune_callback(cli)
    assert prune.schedule.rounds[0].level == 0.5 and prune.schedule.done == [0]


ROUND_TRIP = {
    "criterion": std(quality={"net.0": 1.2, "*": 0.8}),
    "retrain": {"lr_scale": 0.5, "weight_decay": 1.0e-4},
    "guard": {"monitor": "val_loss", "mode": "min", "tolerance": 10.0},
    "rounds": [
        {"level": 0.6, "epochs": 1},
        {"level": 1.0, "epochs": 1, "lr_scale": 0.1, "criterion": std(std_of="surviving")},
    ],
}


def test_print_config_is_readable_and_round_trips(tmp_path, capsys):
    path = config(tmp_path, **ROUND_TRIP)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), "--print_config", *QUIET])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "lightning_prune.PruneRetrainCallback" in printed and "class_path: lightning_prune.Std" in printed
    assert re.search(r"retrain:\n\s+lr_scale: 0\.5\n\s+weight_decay: 0\.0001", printed), printed
    assert re.search(r"dense:\n\s+weight_decay: null\n\s+l1: 0\.0", printed), printed
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(dumped), "--print_config"])
    assert capsys.readouterr().out == printed  # printing the printed config gives it back unchanged
    cli = PruneCLI(args=["fit", "--config", str(dumped)])
    prune = prune_callback(cli)
    assert isinstance(prune.criterion, Std) and prune.criterion.level == {"net.0": 1.2, "*": 0.8}
    assert prune.retrain == Retraining(lr_scale=0.5, weight_decay=1e-4)
    assert prune.guard.settings == Guard("val_loss", mode="min", tolerance=10.0)
    rounds = prune.schedule.rounds
    assert [r.level for r in rounds] == [0.6, 1.0] and [r.lr_scale for r in rounds] == [0.5, 0.1]
    assert [r.rule.std_of for r in rounds] == ["dense", "surviving"]
    assert prune.schedule.done == [0, 1] and [d["decision"] for d in prune.schedule.decisions] == ["kept", "kept"]


def test_rounds_subcommand_runs_each_round_as_a_fit(tmp_path):
    path = config(tmp_path, rounds=[{"level": 0.6, "epochs": 1}, {"level": 1.0, "epochs": 2}])
    checkpoints = tmp_path / "phases"
    cli = PruneCLI(
        args=["rounds", "--config", str(path), "--dense_epochs=1", f"--checkpoint_dir={checkpoints}", *QUIET]
    )
    assert sorted(p.name for p in checkpoints.glob("*.ckpt")) == ["dense.ckpt", "round-1.ckpt", "round-2.ckpt"]
    state = torch.load(checkpoints / "round-2.ckpt", weights_only=True)
    (key,) = [k for k in state["callbacks"] if k.startswith("PruneRetrainCallback")]
    assert state["callbacks"][key]["version"] == 3 and state["callbacks"][key]["schedule"]["done"] == [0, 1]
    assert prune_callback(cli).schedule.done == [0, 1]


CALLBACK = r"trainer\.callbacks\[0\] \(lightning_prune\.PruneRetrainCallback\): "
TYPO = r"Option 'qualty' is not accepted|Key 'qualty' is not expected"  # the older jsonargparse's words


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--trainer.callbacks.init_args.qualty=0.7"], TYPO),
        (["--trainer.callbacks.init_args.retrain.lr_scael=0.5"], r"retrain\.lr_scael"),
        (["--trainer.callbacks.init_args.criterion.init_args.quality=-1"], CALLBACK + r"`quality` must be a finite"),
        (
            ["--trainer.callbacks.init_args.criterion.init_args.quality=high"],
            CALLBACK + r"Cannot read a quality file 'high'",
        ),
        (["--trainer.callbacks.init_args.rounds=[{level: -1}]"], CALLBACK + r"rounds\[0\]: `level` must be a finite"),
        (["--trainer.callbacks.init_args.retrain.lr_scale=-1"], r"`retrain\.lr_scale` must be a finite number > 0"),
        (["--trainer.callbacks.init_args.guard.mode=up"], r"Parser key \"mode\":\s+Expected a typing\.Literal"),
        (
            ["--trainer.callbacks.init_args.prune_epochs=[3, 1]"],
            CALLBACK + r"`prune_epochs` must be strictly increasing",
        ),
        (["--trainer.callbacks.init_args.criterion=l2"], CALLBACK + r"`criterion` must be a registered name .*'l2'"),
        (
            ["--trainer.callbacks.init_args.criterion=user_criteria.Nope"],
            CALLBACK + r"`criterion` 'user_criteria\.Nope' cannot be imp",
        ),
    ],
    ids=["typo", "nested-typo", "level", "level-file", "round-level", "nested", "guard", "order", "name", "path"],
)
def test_config_errors_name_the_key_before_training(tmp_path, capsys, extra, match):
    path = config(tmp_path, criterion=std(quality=0.8), prune_epochs=[1])
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), *extra, *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err[-2000:]
    assert not list(tmp_path.glob("**/*.ckpt"))


@pytest.mark.parametrize(
    ("init_args", "match"),
    [
        ({"qualty": 0.7}, TYPO),
        ({"retrain": {"lr_scael": 0.1}}, r"lr_scael"),
        ({"criterion": std(quality={"*": -1.0})}, CALLBACK + r"`quality\['\*'\]` must be a finite number >= 0"),
        ({"criterion": std(quality=0.8), "rounds": [{"level": {"*": -1.0}}]}, CALLBACK + r"rounds\[0\]: `level"),
        ({"retrain": {"lr_scale": -1.0}}, r"`retrain\.lr_scale` must be a finite number > 0, got -1\.0"),
        ({"dense": {"l1": -1.0}}, r"`dense\.l1` must be a finite number >= 0, got -1\.0"),
        ({"prune_epochs": [3, 1]}, CALLBACK + r"`prune_epochs` must be strictly increasing"),
        ({"criterion": "l2"}, CALLBACK + r"`criterion` must be a registered name " + REGISTERED),
        (
            {"criterion": {"class_path": "lightning_prune.Nope"}},
            r"class_path 'lightning_prune\.Nope':\s+module 'lightning_prune' has no attribute 'Nope'",
        ),
    ],
    ids=["typo", "nested-typo", "level", "round-level", "nested", "dense", "order", "name", "path"],
)
def test_config_file_errors_name_the_key_before_training(tmp_path, capsys, init_args, match):
    path = config(tmp_path, **{"prune_epochs": [1], **init_args})
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(path), *QUIET])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err), err[-2000:]
    assert not list(tmp_path.glob("**/*.ckpt"))


KEEP = {"net.5": 10, "*": 20}


def test_a_users_criterion_by_class_path_in_yaml_prunes_by_its_own_rule(tmp_path):
    criterion = {"class_path": "user_criteria.KeepTop", "init_args": {"count": KEEP}}
    path = config(tmp_path, criterion=criterion, rounds=[{"epochs": 1}, {"level": {"*": 8}, "epochs": 1}])
    prune = prune_callback(PruneCLI(args=["fit", "--config", str(path), *QUIET]))
    assert isinstance(prune.criterion, KeepTop) and prune.criterion.level == KEEP
    assert prune.schedule.done == [0, 1]
    assert {n: int(k.sum()) for n, k in prune.pruner.masks.items()} == {n: 8 for n in prune.pruner.masks}
    assert set(prune.pruner.rules.values()) == {"top 8"}


def test_a_users_criterion_from_python_prunes_by_its_own_rule(tmp_path):
    class Dense(Callback):  # listed before the pruning callback: it sees the weights the prune sees
        def on_train_epoch_start(self, trainer, pl_module):
            self.weights = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    torch.manual_seed(0)
    dense = Dense()
    prune = PruneRetrainCallback(criterion=KeepTop(count=KEEP), prune_epochs=[1], verbose=False)
    make_trainer(tmp_path, [dense, prune], max_epochs=2).fit(ToyMLP(), toy_loader())
    for name, keep in prune.pruner.masks.items():
        assert torch.equal(keep, top_k_mask(dense.weights[name], 10 if name == "net.5.weight" else 20)), name
    assert prune.pruner.rules == {"net.0.weight": "top 20", "net.3.weight": "top 20", "net.5.weight": "top 10"}


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
    path = config(tmp_path, prune_epochs=[1], criterion=std(quality=0.8))
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
    assert state["callbacks"][key]["schedule"]["done"] == [0]


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
    assert prune.schedule.done == list(range(len(prune.schedule.rounds)))
    assert prune.pruner.sparsity() > 0.5
