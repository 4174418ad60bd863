"""fit_rounds: each prune-retrain round as its own Trainer.fit, checkpoints, resume."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from toy_models import ToyMLP, toy_loader

from lightning_prune import PruneRetrainCallback, Retraining, fit_rounds

ROUNDS = [{"level": 0.5, "epochs": 2}, {"level": 0.9, "epochs": 2}, {"level": 1.2, "epochs": 2}]
QUIET = {"accelerator": "cpu", "logger": False, "enable_progress_bar": False, "enable_model_summary": False}


class Interrupt(Callback):
    """Raises at the start of ``epoch`` of the fit numbered ``fit`` (0-based count of fits)."""

    def __init__(self, fit: int, epoch: int):
        self.fit, self.epoch, self.fits = fit, epoch, -1

    def on_fit_start(self, trainer, pl_module):
        self.fits += 1

    def on_train_epoch_start(self, trainer, pl_module):
        if self.fits == self.fit and trainer.current_epoch == self.epoch:
            raise RuntimeError("interrupted")


class Record(Callback):
    """Per fit: the optimizer object, its first lr, and the dropout rate at train start (after the prune)."""

    def __init__(self):
        self.fits = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 0:
            optimizer = trainer.optimizers[0]
            self.fits.append((id(optimizer), optimizer.param_groups[0]["lr"], pl_module.net[2].p))


def run(tmp_path, *, callbacks=(), resume=True, dropout=0.0, scale=0.1):
    pl.seed_everything(0, verbose=False)
    model = ToyMLP(optimizer="adam", dropout=dropout)
    prune = PruneRetrainCallback(rounds=ROUNDS, retrain=Retraining(lr_scale=scale), verbose=False)
    results = fit_rounds(
        model,
        prune,
        trainer_kwargs={**QUIET, "callbacks": list(callbacks)},
        train_dataloaders=toy_loader(),
        dense_epochs=2,
        checkpoint_dir=tmp_path,
        resume=resume,
    )
    return model, prune, results


def test_one_fit_per_phase_with_fresh_optimizers_and_checkpoints(tmp_path):
    record = Record()
    model, prune, results = run(tmp_path, callbacks=[record], dropout=0.5)
    assert [r.name for r in results] == ["dense", "round-1", "round-2", "round-3"]
    assert all((tmp_path / f"{r.name}.ckpt").exists() for r in results)
    assert len({fit[0] for fit in record.fits}) == 4  # a new optimizer each fit
    assert [fit[1] for fit in record.fits] == pytest.approx([0.005, 0.0005, 0.0005, 0.0005])
    remaining = [r.remaining for r in results]
    assert remaining[0] == results[0].total and remaining[1] > remaining[2] > remaining[3]
    keep = prune.pruner.masks["net.3.weight"]
    assert record.fits[-1][2] == pytest.approx(0.5 * math.sqrt(keep.sum().item() / keep.numel()))
    assert prune.schedule.done == [0, 1, 2]
    assert results[-1].compression == pytest.approx(results[-1].total / results[-1].remaining)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize(("fit", "epoch"), [(2, 0), (2, 1), (3, 1)], ids=["between-rounds", "mid-round", "last"])
def test_interrupted_run_resumes_to_the_same_masks_and_weights(tmp_path, fit, epoch):
    reference, reference_prune, _ = run(tmp_path / "reference")
    with pytest.raises(RuntimeError, match="interrupted"):
        run(tmp_path / "run", callbacks=[Interrupt(fit, epoch)])
    model, prune, results = run(tmp_path / "run")
    assert [r.skipped for r in results] == [i < fit for i in range(4)]
    assert prune.schedule.done == [0, 1, 2]
    for name, keep in reference_prune.pruner.masks.items():
        assert torch.equal(keep, prune.pruner.masks[name]), name
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_resume_false_starts_over(tmp_path):
    run(tmp_path)
    record = Record()
    _, _, results = run(tmp_path, callbacks=[record], resume=False)
    assert not any(r.skipped for r in results) and len(record.fits) == 4


def test_callback_found_in_trainer_callbacks(tmp_path):
    prune = PruneRetrainCallback(rounds=[{"level": 0.5, "epochs": 1}], verbose=False)
    results = fit_rounds(
        ToyMLP(),
        trainer_kwargs={**QUIET, "callbacks": [prune]},
        train_dataloaders=toy_loader(),
        checkpoint_dir=tmp_path,
    )
    assert [r.name for r in results] == ["round-1"] and prune.schedule.done == [0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"trainer_kwargs": {"max_epochs": 3}}, r"fit_rounds sets the length of each phase .* drop `max_epochs`"),
        ({"dense_epochs": -1}, r"`dense_epochs` must be an integer >= 0, got -1"),
        ({"callback": None}, r"needs exactly one PruneRetrainCallback .* found 0"),
        ({"callback": PruneRetrainCallback(prune_epochs=[1])}, r"rounds\[0\] has no `epochs`"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, match):
    kwargs.setdefault("callback", PruneRetrainCallback(rounds=ROUNDS))
    with pytest.raises(ValueError, match=match):
        fit_rounds(ToyMLP(), train_dataloaders=toy_loader(), checkpoint_dir=tmp_path, **kwargs)
