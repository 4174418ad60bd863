"""Structured and N:M criteria from a LightningCLI YAML file, by ``class_path`` and by registered name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from lightning_prune import NM, PruneRetrainCallback, StructuredFraction, StructuredStd
from lightning_prune.cli import PruneCLI, main
from lightning_prune.core.criteria import nm_counts

QUIET = [
    "--trainer.accelerator=cpu",
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def config(tmp_path: Path, **callback_args) -> Path:
    data = {
        "model": {"class_path": "toy_models.ToyMLP"},
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


def fit(path: Path) -> PruneRetrainCallback:
    cli = PruneCLI(args=["fit", "--config", str(path), *QUIET])
    (found,) = [c for c in cli.trainer.callbacks if isinstance(c, PruneRetrainCallback)]
    return found


def test_structured_fraction_by_class_path_prunes_whole_units_and_their_biases(tmp_path):
    criterion = {
        "class_path": "lightning_prune.StructuredFraction",
        "init_args": {"amount": {"net.0": 0.5, "*": 0.25}, "norm": "l1"},
    }
    path = config(tmp_path, criterion=criterion, layers=["net.0", "net.3"], prune_bias=True, prune_epochs=[1])
    prune = fit(path)
    assert prune.criterion == StructuredFraction(amount={"net.0": 0.5, "*": 0.25}, norm="l1")
    masks = prune.pruner.masks
    for layer, kept in (("net.0", 16), ("net.3", 12)):
        units = masks[f"{layer}.weight"].all(1)
        assert int(units.sum()) == kept and not masks[f"{layer}.weight"][~units].any()
        assert torch.equal(masks[f"{layer}.bias"], units)


def test_nm_rounds_from_yaml_by_class_path_and_by_name(tmp_path):
    rounds = [
        {"criterion": {"class_path": "lightning_prune.NM", "init_args": {"n": 2, "m": 4}}, "epochs": 1},
        {"criterion": "nm", "level": 1, "epochs": 1},
    ]
    prune = fit(config(tmp_path, rounds=rounds))
    assert [r.rule for r in prune.schedule.rounds] == [NM(), NM()]
    assert [r.level for r in prune.schedule.rounds] == [2, 1] and prune.schedule.done == [0, 1]
    for keep in prune.pruner.masks.values():
        assert torch.equal(nm_counts(keep, 4), torch.ones(keep.numel() // 4, dtype=torch.long))  # 1:4 after 2:4


def test_a_bad_nm_setting_in_yaml_names_it_before_training(tmp_path, capsys):
    criterion = {"class_path": "lightning_prune.NM", "init_args": {"n": 5}}
    with pytest.raises(SystemExit):
        fit(config(tmp_path, criterion=criterion, prune_epochs=[1]))
    assert re.search(r"`n` must be an integer in \[1, 4\]", capsys.readouterr().err)


def test_print_config_round_trips_a_structured_criterion(tmp_path, capsys):
    criterion = {"class_path": "lightning_prune.StructuredStd", "init_args": {"quality": 0.6, "norm": "l1"}}
    path = config(tmp_path, criterion=criterion, layers=["net.0"], prune_epochs=[1])
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path), "--print_config", *QUIET])
    printed = capsys.readouterr().out
    shown = r"class_path: lightning_prune\.StructuredStd\n\s+init_args:\n\s+quality: 0\.6\n\s+norm: l1"
    assert re.search(shown, printed), printed
    dumped = tmp_path / "printed.yaml"
    dumped.write_text(printed)
    prune = fit(dumped)
    assert prune.criterion == StructuredStd(quality=0.6, norm="l1") and prune.schedule.done == [0]
    assert prune.pruner.rules["net.0.weight"] == "units, 0.60 x std"
