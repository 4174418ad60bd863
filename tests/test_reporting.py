"""What the callback tells the user: the prune table, the round summary, and the metrics it logs."""

from __future__ import annotations

import csv
import logging

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from toy_models import ToyData, ToyMLP, make_trainer

from lightning_prune import Fraction, LayerStats, PruneRetrainCallback, Retraining, Round, Std, format_table
from lightning_prune.core import native
from lightning_prune.dropout import DropoutControl
from lightning_prune.reporting import mask_kernel_notice, prune_report, round_summary

STATS = [
    LayerStats("net.0.weight", (32, 12), 384, 96, 0.25, "1.00 x std"),
    LayerStats("net.3.weight", (16, 32), 512, 128, 0.125, "1.00 x std"),
]


def resolved(**fields) -> Round:
    return Round(**fields).resolve(Std(), Retraining(), None)


def test_prune_report_is_the_table_and_the_retraining_settings():
    text = prune_report(1, 3, 4, resolved(lr_scale=0.1), STATS, frozen=0, dropout=None)
    lines = text.splitlines()
    assert lines[0] == "lightning-prune: pruned (round 2/3, start of epoch 4)"
    assert "\n".join(lines[1:-1]) == format_table(STATS)
    assert lines[-1] == "retraining: lr x0.1"
    assert "total" in text and "4.0x fewer" in text

    full = resolved(lr_scale=0.5, weight_decay=1e-4, l1=1e-5, train_only=["net.5"])
    assert prune_report(0, 1, 2, full, STATS, frozen=4, dropout=None).splitlines()[-1] == (
        "retraining: lr x0.5, weight decay 0.0001, L1 1e-05, training only ['net.5'] (4 parameters frozen)"
    )


def test_prune_report_shows_the_dropout_rates_that_changed():
    model = ToyMLP(dropout=0.5)
    control = DropoutControl(model, None)
    control.apply({"net.3": (128, 512)})
    text = prune_report(0, 1, 2, resolved(), STATS, frozen=0, dropout=control)
    assert text.splitlines()[-1] == "dropout (static links): net.2 0.5->0.25"
    without = DropoutControl(ToyMLP(dropout=0.0), None)  # rates of 0 are not shown, nor a line without any
    assert "dropout" not in prune_report(0, 1, 2, resolved(), STATS, frozen=0, dropout=without)


def test_round_summary_is_one_line_of_the_scalar_metrics():
    metrics = {
        "val_loss": torch.tensor(0.25),
        "train_loss": torch.tensor(0.51234),
        "prune/sparsity": torch.tensor(0.7),
        "confusion": torch.ones(2, 2),
    }
    assert round_summary(1, 2, 42.0, metrics) == (
        "lightning-prune: end of round 1/2: 42.00% of the selected weights remain; train_loss=0.5123, val_loss=0.25"
    )
    assert round_summary(2, 2, 7.5, {}).endswith("7.50% of the selected weights remain; no metrics logged")


def test_logged_keys_in_a_real_logger(tmp_path):
    torch.manual_seed(0)
    prune = PruneRetrainCallback(
        rounds=[{"level": 0.5, "epochs": 1}, {"level": 1.0, "epochs": 1}], criterion=Std(), verbose=False
    )
    trainer = make_trainer(tmp_path, [prune], max_epochs=3, logger=CSVLogger(tmp_path, name="logs"))
    trainer.fit(ToyMLP(), datamodule=ToyData())
    with open(tmp_path / "logs" / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    names = [f"prune/remaining_pct/{n}.weight" for n in ("net.0", "net.3", "net.5")]
    assert {"prune/sparsity", "prune/round", *names} <= set(rows[0])
    by_epoch = {}
    for row in rows:
        if row["prune/sparsity"]:
            by_epoch[int(row["epoch"])] = row
    assert sorted(by_epoch) == [1, 2]  # logged from the first prune on; nothing in the dense epoch
    assert [float(by_epoch[e]["prune/round"]) for e in (1, 2)] == [1.0, 2.0]
    assert float(by_epoch[2]["prune/sparsity"]) == pytest.approx(prune.pruner.sparsity(), rel=1e-6)
    for stat in prune.pruner.stats():
        assert float(by_epoch[2][f"prune/remaining_pct/{stat.name}"]) == pytest.approx(stat.remaining_pct, rel=1e-6)
    assert float(by_epoch[1]["prune/sparsity"]) < float(by_epoch[2]["prune/sparsity"])


@pytest.mark.parametrize("loaded", [True, False])
def test_a_fit_says_once_when_cpu_masks_fall_back_to_pytorchs_multiply(tmp_path, caplog, monkeypatch, loaded):
    if loaded and native.mask_kernel() != "native":
        pytest.skip(f"the compiled mask kernel is {native.native_status()}")
    if not loaded:
        monkeypatch.setattr(native, "_function", None)
        monkeypatch.setattr(native, "_status", "unavailable: no C compiler was found (set CC, or install cc)")
    prune = PruneRetrainCallback(criterion=Fraction(), prune_epochs=[0, 1], rounds=[{"level": 0.5}, {"level": 0.7}])
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [prune], max_epochs=2).fit(ToyMLP(), datamodule=ToyData())
    notice = "masks on the CPU use PyTorch's multiply, about 2-3x slower than the compiled kernel, which is unavailable"
    assert caplog.text.count(notice) == (0 if loaded else 1)


def test_no_mask_kernel_notice_off_the_cpu_or_by_choice(monkeypatch):
    monkeypatch.setattr(native, "_function", None)
    monkeypatch.setattr(native, "_status", "unavailable: no C compiler was found")
    assert mask_kernel_notice(on_cpu=False) is None
    assert "which is unavailable: no C compiler was found" in mask_kernel_notice(on_cpu=True)
    monkeypatch.setattr(native, "_choice", "torch")
    assert mask_kernel_notice(on_cpu=True) is None
