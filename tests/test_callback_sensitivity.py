"""Sensitivity analysis wired into the callback (quality files, analysis before the first prune) and the CLI."""

from __future__ import annotations

import pytest
import torch
import yaml
from toy_models import ToyData, ToyMLP, make_trainer

from lightning_prune import Fraction, Global, PruneRetrainCallback, Sensitivity, Std
from lightning_prune.cli import PruneCLI
from lightning_prune.sensitivity import analyze


def test_quality_file_from_the_sweep_gives_the_predicted_sparsity(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    result = analyze(model, datamodule=ToyData(), levels=[0.25, 0.5, 1.0, 1.5], progress=False)
    config = result.write_quality(tmp_path / "quality.yaml", tolerance=0.5)
    prune = PruneRetrainCallback(criterion=Std(quality=str(tmp_path / "quality.yaml")), prune_epochs=[0], verbose=False)
    assert prune.criterion.level == config["quality"]
    make_trainer(tmp_path, [prune], max_epochs=1, limit_train_batches=1).fit(model, datamodule=ToyData())
    for layer, level in config["quality"].items():
        (row,) = [r for r in result.curve(layer) if r.level == level]
        keep = prune.pruner.masks[f"{layer}.weight"]
        assert 1 - keep.float().mean().item() == pytest.approx(row.pruned_share)


def test_sensitivity_before_the_first_prune_sets_the_default_quality(tmp_path, caplog):
    torch.manual_seed(0)
    rounds = [{"epochs": 1}, {"epochs": 1, "level": 0.2}]
    prune = PruneRetrainCallback(rounds=rounds, sensitivity=Sensitivity(tolerance=0.05, levels=[0.25, 0.5, 1.0]))
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, [prune], max_epochs=3).fit(ToyMLP(), datamodule=ToyData())
    assert prune.sensitivity is not None and prune.sensitivity.layers == ["net.0", "net.3", "net.5"]
    chosen = prune.sensitivity.choose(0.05)
    assert prune.schedule.rounds[0].level == chosen and prune.schedule.rounds[1].level == 0.2
    assert prune.schedule.default_level == chosen and prune.criterion.level == 1.0
    assert "sensitivity (accuracy without retraining" in caplog.text and "quality:" in caplog.text
    restored = PruneRetrainCallback(rounds=rounds, sensitivity={"tolerance": 0.05, "levels": [0.25, 0.5, 1.0]})
    restored.restore(ToyMLP(), prune.state_dict())
    assert restored.schedule.rounds[0].level == chosen and restored.sensitivity.rows == prune.sensitivity.rows


def test_a_fraction_file_is_for_fraction_only(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP()
    result = analyze(model, datamodule=ToyData(), levels=[0.2, 0.5, 0.8], criterion="fraction", progress=False)
    config = result.write_quality(tmp_path / "amount.yaml", tolerance=0.5)
    assert config["criterion"] == "fraction"
    with pytest.raises(ValueError, match=r"holds levels for criterion 'fraction', not 'std'"):
        Std(quality=str(tmp_path / "amount.yaml"))
    prune = PruneRetrainCallback(criterion=Fraction(amount=str(tmp_path / "amount.yaml")), prune_epochs=[0])
    assert prune.criterion.level == config["amount"] == prune.schedule.rounds[0].level


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sensitivity": {"tolerance": -0.1}}, r"`sensitivity\.tolerance` must be a finite number >= 0"),
        (
            {"sensitivity": {"tolerance": 0.01, "levels": [1.0, 0.5]}},
            r"`sensitivity\.levels` must be strictly increasing",
        ),
        (
            {"sensitivity": {"tolerance": 0.01, "levels": [0.5, 1.5]}, "criterion": Fraction(amount=0.5)},
            r"levels\[1\]` must be",
        ),
        (
            {"sensitivity": {"tolerance": 0.01, "levels": 0.5}},
            r"`sensitivity\.levels` must be a non-empty sequence of numbers, got 0\.5",
        ),
        (
            {"sensitivity": Sensitivity(tolerance=0.01), "criterion": Global(amount=0.5)},
            r"`sensitivity` picks per-layer levels; criterion Global\(amount=0\.5\) has one level",
        ),
        (
            {"criterion": {"class_path": "lightning_prune.Std", "init_args": {"quality": "missing.txt"}}},
            r"suffix must be one",
        ),
    ],
)
def test_bad_sensitivity_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneRetrainCallback(prune_epochs=[1], **kwargs)


def test_sensitivity_subcommand_writes_table_figure_and_quality_file(tmp_path):
    config = {
        "model": {"class_path": "toy_models.ToyMLP"},
        "data": {"class_path": "toy_models.ToyData"},
        "trainer": {"logger": False, "enable_progress_bar": False, "accelerator": "cpu"},
    }
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    PruneCLI(args=["sensitivity", "--config", str(path), "--levels=[0.5, 1.0]", f"--output_dir={out}"])
    assert sorted(p.name for p in out.iterdir()) == [
        "quality.yaml",
        "sensitivity.csv",
        "sensitivity.json",
        "sensitivity.png",
    ]
    prune = PruneRetrainCallback(criterion=Std(quality=str(out / "quality.yaml")), prune_epochs=[1])
    assert set(prune.criterion.level) == {"net.0", "net.3", "net.5"}
