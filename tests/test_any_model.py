"""Real fits of a model with attention, an LSTM, a parametrized head and an embedding left dense."""

from __future__ import annotations

import logging

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from toy_models import ToySequence, make_trainer, token_loader

from lightning_prune import Fraction, PruneRetrainCallback
from lightning_prune.core.export import export_sparse, load_sparse_into
from lightning_prune.core.sensitivity import sweep

QKV = [f"encoder.self_attn.in_proj_weight:{part}" for part in "qkv"]


class Watch(Callback):
    """Counts batches after which a pruned entry of an effective weight is not zero."""

    def __init__(self, prune: PruneRetrainCallback):
        self.prune, self.violations, self.batches = prune, 0, 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.batches += 1
        pruner = self.prune.pruner
        for name, target in pruner.targets.items():
            keep = pruner._keep(name)
            if keep is not None:
                self.violations += int(torch.any(target.weight(pl_module).detach()[~keep] != 0))


def callback(levels=(0.5, 0.75)) -> PruneRetrainCallback:
    rounds = [{"level": level} for level in levels]
    return PruneRetrainCallback(criterion=Fraction(), prune_epochs=list(range(1, len(levels) + 1)), rounds=rounds)


def test_fit_prunes_attention_rows_recurrent_and_parametrized_weights(tmp_path, caplog):
    torch.manual_seed(0)
    model, prune = ToySequence(), callback()
    watch = Watch(prune)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [prune, watch], max_epochs=3).fit(model, token_loader())
    stats = {s.name: s for s in prune.pruner.stats()}
    for name in [*QKV, "encoder.linear1.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"]:
        assert stats[name].remaining == round(0.25 * stats[name].weights), name
    assert "head.parametrizations.weight.original1" in prune.pruner.masks
    assert watch.violations == 0 and watch.batches == 12
    assert "left dense (name them in `layers` to prune them): emb.weight (320 weights" in caplog.text
    assert caplog.text.count("left dense") == 1  # at the first prune only


def test_resume_restores_row_masks_and_continues(tmp_path):
    torch.manual_seed(0)
    first = callback((0.5, 0.75, 0.875))
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    make_trainer(tmp_path, [first, saver], max_epochs=2, enable_checkpointing=True).fit(ToySequence(), token_loader())
    saved = {name: keep.clone() for name, keep in first.pruner.masks.items()}

    resumed = callback((0.5, 0.75, 0.875))
    seen = {}

    class AtStart(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            seen.setdefault("masks", {n: k.clone() for n, k in resumed.pruner.masks.items()})

    model = ToySequence()
    trainer = make_trainer(tmp_path / "resumed", [AtStart(), resumed], max_epochs=4)
    trainer.fit(model, token_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert seen["masks"].keys() == saved.keys()
    for name, keep in saved.items():
        assert torch.equal(seen["masks"][name], keep), name
        assert not (resumed.pruner.masks[name] & ~keep).any(), name  # later rounds only remove
    assert resumed.schedule.done == [0, 1, 2]
    q = {s.name: s for s in resumed.pruner.stats()}[QKV[0]]
    assert q.remaining == round(0.125 * q.weights)


def test_sparse_export_of_the_fitted_model_loads_back_identically(tmp_path):
    torch.manual_seed(0)
    model, prune = ToySequence(), callback()
    make_trainer(tmp_path, [prune], max_epochs=3).fit(model, token_loader())
    model.eval()
    export_sparse(model, prune.pruner.masks, tmp_path / "model.sparse")
    fresh = ToySequence().eval()
    load_sparse_into(fresh, tmp_path / "model.sparse")
    x = next(iter(token_loader()))[0]
    assert torch.equal(fresh(x), model(x))


def test_sensitivity_sweeps_each_layer_with_all_its_targets_and_restores_the_model():
    torch.manual_seed(0)
    model = ToySequence().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = list(token_loader())
    split = sweep(model, data, [0.5, 0.9], criterion="fraction")
    whole = sweep(model, data, [0.5, 0.9], criterion="fraction", cache_bytes=0)
    assert [r.layer for r in split.rows[::2]] == [
        "encoder.self_attn",
        "encoder.self_attn.out_proj",
        "encoder.linear1",
        "encoder.linear2",
        "rnn",
        "head",
    ]
    assert split.shapes["encoder.self_attn"] == [48, 16] and split.shapes["rnn"] == [2048]
    assert [r.metric for r in split.rows] == [r.metric for r in whole.rows]
    assert all(
        r.pruned_share == pytest.approx(level, abs=0.01) for r, level in zip(split.rows, [0.5, 0.9] * 6, strict=True)
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class StackedSequence(ToySequence):
    """ToySequence with a 2-layer LSTM: PyTorch's dropout between its layers is adjusted like a module's."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = torch.nn.LSTM(16, 16, num_layers=2, dropout=0.4, batch_first=True)


def test_the_dropout_between_an_lstms_layers_shrinks_with_their_inputs_and_survives_resume(tmp_path, caplog):
    torch.manual_seed(0)
    model, prune = StackedSequence(), callback((0.75,))
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    trainer = make_trainer(tmp_path, [prune, saver], max_epochs=2, enable_checkpointing=True)
    with caplog.at_level(logging.INFO):
        trainer.fit(model, token_loader())
    inner = {s.name: s for s in prune.pruner.stats()}["rnn.weight_ih_l1"]
    assert inner.remaining == round(0.25 * inner.weights)
    assert model.rnn.dropout == pytest.approx(0.4 * 0.5)
    assert model.encoder.dropout.p == pytest.approx(0.25 * 0.5)  # a module's, from its linear2's counts
    assert "rnn.dropout 0.4->0.2" in caplog.text
    assert prune.dropout.adjuster.sources["rnn.dropout"] == "inner"
    fresh, resumed = StackedSequence(), callback((0.75,))
    make_trainer(tmp_path / "resumed", [resumed], max_epochs=3).fit(
        fresh, token_loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert fresh.rnn.dropout == pytest.approx(0.2)
