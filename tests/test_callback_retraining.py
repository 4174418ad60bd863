"""Retraining mechanisms of PruneRetrainCallback in real ``Trainer.fit`` runs: dropout, L1/L2, learning
rate and schedulers, freeze/thaw, and rounds inside one fit."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import nn
from toy_models import ToyConvNet, ToyMLP, image_loader, make_trainer, toy_loader

from lightning_prune import DropoutAdjustment, PruneRetrainCallback, Regularization, Retraining, Std
from lightning_prune.core.dropout import DropoutAdjuster

# The dropout links' name in errors (core/dropout.py still says `dropout_map`, the argument is `dropout.links`).
LINKS = r"`dropout(_map|\.links)`?"


class AtEpochStart(Callback):
    """Calls ``fn(trainer, module)`` at each epoch start (after the pruning callback if listed after it)."""

    def __init__(self, fn):
        self.fn = fn
        self.seen = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.seen.append(self.fn(trainer, pl_module))


def remaining(prune: PruneRetrainCallback, name: str) -> float:
    keep = prune.pruner.masks[name]
    return keep.sum().item() / keep.numel()


# ----------------------------------------------------------------------------------------------- dropout
def test_dropout_rate_follows_the_formula_each_round_without_compounding(tmp_path):
    torch.manual_seed(0)
    model = ToyMLP(dropout=0.5)
    prune = PruneRetrainCallback(prune_epochs=[1, 2], rounds=[{"level": 0.6}, {"level": 1.2}], verbose=False)
    record = AtEpochStart(lambda t, m: (m.net[2].p, remaining(prune, "net.3.weight") if prune.pruner.masks else 1))
    make_trainer(tmp_path, [prune, record], max_epochs=3).fit(model, toy_loader())
    (p0, _), (p1, r1), (p2, r2) = record.seen
    assert p0 == 0.5
    assert p1 == pytest.approx(0.5 * math.sqrt(r1), rel=1e-12)
    assert p2 == pytest.approx(0.5 * math.sqrt(r2), rel=1e-12)
    assert r2 < r1 < 1
    assert prune.dropout.adjuster.original == {"net.2": 0.5}
    assert prune.dropout.adjuster.links == {"net.2": ["net.3"]} and prune.dropout.adjuster.source == "traced"


def test_alexnet_classifier_dropout_links_and_rates(tmp_path):
    torchvision = pytest.importorskip("torchvision")

    class Alex(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torchvision.models.alexnet(num_classes=10)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,)))
    model = Alex()
    prune = PruneRetrainCallback(
        layers=["net.classifier.*"],
        criterion=Std(quality={"net.classifier.6": 0.5, "*": 1.5}),
        prune_epochs=[1],
        verbose=False,
    )
    make_trainer(tmp_path, [prune], max_epochs=2, limit_train_batches=1).fit(
        model, torch.utils.data.DataLoader(data, batch_size=2)
    )
    assert prune.dropout.adjuster.links == {
        "net.classifier.0": ["net.classifier.1"],
        "net.classifier.3": ["net.classifier.4"],
    }
    classifier = model.net.classifier
    assert classifier[0].p == pytest.approx(0.5 * math.sqrt(remaining(prune, "net.classifier.1.weight")))
    assert classifier[3].p == pytest.approx(0.5 * math.sqrt(remaining(prune, "net.classifier.4.weight")))
    assert 0.1 < classifier[0].p < 0.2  # quality 1.5 keeps ~13%: sqrt(0.13) * 0.5


def test_vgg_static_links_follow_sequential_order():
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        vgg = torchvision.models.vgg11()
    adjuster = DropoutAdjuster(vgg)
    assert adjuster.links == {"classifier.2": ["classifier.3"], "classifier.5": ["classifier.6"]}
    assert adjuster.source == "static"


class OddOrder(pl.LightningModule):
    """Registers its dropout before the layers; forward runs fc1 -> drop -> fc2 (or F.dropout if functional)."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.drop = nn.Dropout(0.4)
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = nn.functional.dropout(h, 0.3, self.training) if self.functional else self.drop(h)
        return self.fc2(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def test_traced_forward_order_beats_registration_order(tmp_path):
    model = OddOrder()
    prune = PruneRetrainCallback(criterion=Std(quality={"fc1": 0.3, "fc2": 1.2}), prune_epochs=[1], verbose=False)
    assert DropoutAdjuster(model).links == {"drop": ["fc1"]}  # registration order is misleading here
    make_trainer(tmp_path, [prune], max_epochs=2).fit(model, toy_loader())
    assert prune.dropout.adjuster.links == {"drop": ["fc2"]}
    assert model.drop.p == pytest.approx(0.4 * math.sqrt(remaining(prune, "fc2.weight")))


def test_functional_dropout_is_reported_once(tmp_path):
    prune = PruneRetrainCallback(prune_epochs=[1], verbose=False)
    with pytest.warns(UserWarning, match="calls dropout functionally") as record:
        make_trainer(tmp_path, [prune], max_epochs=2).fit(OddOrder(functional=True), toy_loader())
    assert sum("functionally" in str(w.message) for w in record) == 1


def test_dropout_map_overrides_links(tmp_path):
    model = OddOrder()
    prune = PruneRetrainCallback(
        criterion=Std(quality=1.0), prune_epochs=[1], dropout=DropoutAdjustment(links={"drop": "fc1"}), verbose=False
    )
    make_trainer(tmp_path, [prune], max_epochs=2).fit(model, toy_loader())
    assert prune.dropout.adjuster.links == {"drop": ["fc1"]}
    assert model.drop.p == pytest.approx(0.4 * math.sqrt(remaining(prune, "fc1.weight")))


def test_adjust_dropout_off_leaves_rates(tmp_path):
    model = ToyMLP(dropout=0.5)
    prune = PruneRetrainCallback(criterion=Std(quality=1.0), prune_epochs=[1], dropout=None, verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=2).fit(model, toy_loader())
    assert model.net[2].p == 0.5 and prune.dropout is None


def test_dropout_rates_survive_resume(tmp_path):
    torch.manual_seed(0)
    prune = PruneRetrainCallback(criterion=Std(quality=1.0), prune_epochs=[1], verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    make_trainer(tmp_path, [prune, saver], max_epochs=2, enable_checkpointing=True).fit(
        ToyMLP(dropout=0.5), toy_loader()
    )
    adjusted = prune.dropout.adjuster.current()["net.2"]
    assert adjusted < 0.5

    fresh = ToyMLP(dropout=0.5)
    resumed = PruneRetrainCallback(criterion=Std(quality=1.0), prune_epochs=[1], verbose=False)
    record = AtEpochStart(lambda t, m: m.net[2].p)
    make_trainer(tmp_path, [resumed, record], max_epochs=3).fit(fresh, toy_loader(), ckpt_path=tmp_path / "last.ckpt")
    assert record.seen == [adjusted]
    assert resumed.dropout.adjuster.original == {"net.2": 0.5}
    assert resumed.dropout.adjuster.source == "traced" and resumed.dropout.traced


@pytest.mark.parametrize(
    ("links", "match"),
    [
        ({"nope": "fc1"}, rf"{LINKS} key 'nope' is not a module of the model\. Dropout modules: \['drop'\]"),
        ({"fc1": "fc2"}, rf"{LINKS} key 'fc1' is a Linear, not a dropout module"),
        ({"drop": "drop"}, rf"{LINKS}\['drop'\]` = 'drop' is not a module with weights\. Accepted: \['fc1', 'fc2'\]"),
    ],
)
def test_bad_dropout_links(tmp_path, links, match):
    model = OddOrder()
    prune = PruneRetrainCallback(prune_epochs=[1], dropout=DropoutAdjustment(links=links))
    trainer = make_trainer(tmp_path, [prune], 2)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, toy_loader())
    assert trainer.global_step == 0 and model.drop.p == 0.4


# ----------------------------------------------------------------------------------------------- L2, L1, lr
def group_settings(trainer, pl_module):
    return [(g["lr"], g["weight_decay"]) for g in trainer.optimizers[0].param_groups]


def test_weight_decay_and_lr_during_retraining_survive_the_scheduler(tmp_path):
    model = ToyMLP(scheduler=True, split_decay=True)  # SGD lr 0.05, StepLR gamma 0.5; groups: weights 1e-3, biases 0
    prune = PruneRetrainCallback(
        criterion=Std(quality=0.8),
        prune_epochs=[2],
        dense=Regularization(weight_decay=0.0),
        retrain=Retraining(weight_decay=5e-4, lr_scale=0.1),
        verbose=False,
    )
    record = AtEpochStart(group_settings)
    make_trainer(tmp_path, [prune, record], max_epochs=5).fit(model, toy_loader())
    for epoch, groups in enumerate(record.seen):
        scale, decay = (0.1, 5e-4) if epoch >= 2 else (1.0, 0.0)
        lr = 0.05 * 0.5**epoch * scale
        assert groups[0] == (pytest.approx(lr, rel=1e-9), decay), epoch
        assert groups[1] == (pytest.approx(lr, rel=1e-9), 0.0), epoch  # the no-decay group keeps its own


def test_user_weight_decay_kept_when_not_configured(tmp_path):
    model = ToyMLP()
    prune = PruneRetrainCallback(criterion=Std(quality=0.8), prune_epochs=[1], verbose=False)
    record = AtEpochStart(group_settings)
    make_trainer(tmp_path, [prune, record], max_epochs=2).fit(model, toy_loader())
    assert [g[0][1] for g in record.seen] == [1e-3, 1e-3]


def test_lr_scale_is_not_compounded_across_rounds_and_resume(tmp_path):
    rounds = [{"level": 0.5, "lr_scale": 0.1}, {"level": 0.8, "lr_scale": 0.01}, {"level": 0.9}]
    prune = PruneRetrainCallback(prune_epochs=[1, 2, 3], rounds=rounds, retrain=Retraining(lr_scale=0.5), verbose=False)
    saver = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    record = AtEpochStart(lambda t, m: t.optimizers[0].param_groups[0]["lr"])
    make_trainer(tmp_path, [prune, saver, record], max_epochs=3, enable_checkpointing=True).fit(ToyMLP(), toy_loader())
    assert record.seen == pytest.approx([0.05, 0.005, 0.0005])
    resumed = PruneRetrainCallback(
        prune_epochs=[1, 2, 3], rounds=rounds, retrain=Retraining(lr_scale=0.5), verbose=False
    )
    record = AtEpochStart(lambda t, m: t.optimizers[0].param_groups[0]["lr"])
    make_trainer(tmp_path, [resumed, record], max_epochs=4).fit(
        ToyMLP(), toy_loader(), ckpt_path=tmp_path / "last.ckpt"
    )
    assert record.seen == pytest.approx([0.025])


def _first_step_grads(tmp_path, **kwargs):
    torch.manual_seed(0)
    model = ToyMLP()
    grads = {}

    class Grab(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not grads:
                grads.update({n: p.grad.clone() for n, p in pl_module.named_parameters()})
                grads["weights"] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    prune = PruneRetrainCallback(prune_epochs=[1], verbose=False, **kwargs)
    make_trainer(tmp_path, [prune, Grab()], max_epochs=1, limit_train_batches=1).fit(model, toy_loader())
    return grads


def test_l1_adds_l1_times_sign_to_selected_weights_only(tmp_path):
    plain = _first_step_grads(tmp_path)
    with_l1 = _first_step_grads(tmp_path, dense=Regularization(l1=0.01))
    for name in ("net.0.weight", "net.3.weight", "net.5.weight"):
        expected = plain[name] + 0.01 * plain["weights"][name].sign()
        torch.testing.assert_close(with_l1[name], expected)
    torch.testing.assert_close(with_l1["net.0.bias"], plain["net.0.bias"])


class HalfOptimized(ToyMLP):
    def configure_optimizers(self):
        return torch.optim.SGD(self.net[0].parameters(), lr=0.05)


def test_l1_with_weights_no_optimizer_holds(tmp_path):
    trainer = make_trainer(
        tmp_path, [PruneRetrainCallback(prune_epochs=[1], retrain=Retraining(l1=1e-4))], max_epochs=2
    )
    with pytest.raises(ValueError, match=r"no optimizer of the trainer holds 'net\.3\.weight'"):
        trainer.fit(HalfOptimized(), toy_loader())


# ----------------------------------------------------------------------------------------------- freeze / thaw
def test_train_only_freezes_the_rest_for_its_round_then_thaws(tmp_path):
    torch.manual_seed(0)
    model = ToyConvNet()
    prune = PruneRetrainCallback(
        layers=["classifier.*"],
        prune_epochs=[1, 2],
        rounds=[{"level": 0.7, "train_only": ["classifier"]}, {"level": 1.0}],
        verbose=False,
    )

    def snapshot(trainer, pl_module):
        bn = pl_module.features[1]
        return {
            "features": {k: v.clone() for k, v in pl_module.features.state_dict().items()},
            "classifier": pl_module.classifier[1].weight.detach().clone(),
            "grad": [p.requires_grad for p in pl_module.parameters()],
            "bn_training": bn.training,
        }

    record = AtEpochStart(snapshot)
    make_trainer(tmp_path, [prune, record], max_epochs=3).fit(model, image_loader())
    dense, frozen_round, free_round = record.seen
    assert dense["grad"] == [True] * 8 and dense["bn_training"]
    assert frozen_round["grad"] == [False] * 6 + [True, True]
    assert not frozen_round["bn_training"]
    for key, value in frozen_round["features"].items():  # weights and BN running stats, bit-identical
        if key.endswith("num_batches_tracked"):
            continue
        assert torch.equal(value, free_round["features"][key]), key
    assert not torch.equal(frozen_round["classifier"], free_round["classifier"])
    assert free_round["grad"] == [True] * 8 and free_round["bn_training"]
    assert not torch.equal(free_round["features"]["0.weight"], model.features[0].weight)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_prefix_gets_no_gradient(tmp_path):
    model = ToyConvNet()
    prune = PruneRetrainCallback(prune_epochs=[1], retrain=Retraining(train_only=["classifier"]), verbose=False)

    class Grads(Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.current_epoch == 1:
                assert all(p.grad is None for p in pl_module.features.parameters())
                assert pl_module.classifier[1].weight.grad is not None
                self.checked = True

    grads = Grads()
    make_trainer(tmp_path, [prune, grads], max_epochs=2).fit(model, image_loader())
    assert grads.checked


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"retrain": Retraining(train_only=["head"])}, r"rounds\[0\]: .*'head'"),
        ({"rounds": [{"level": 1.0, "train_only": ["fc9"]}]}, r"rounds\[0\]: .*'fc9'"),
    ],
)
def test_bad_train_only(tmp_path, kwargs, match):
    model = ToyMLP()
    trainer = make_trainer(tmp_path, [PruneRetrainCallback(prune_epochs=[1], **kwargs)], max_epochs=2)
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, toy_loader())
    assert trainer.global_step == 0 and all(p.requires_grad for p in model.parameters())


def test_train_only_that_freezes_everything(tmp_path):
    model = ToyMLP()
    for p in model.net[5].parameters():
        p.requires_grad_(False)
    trainer = make_trainer(
        tmp_path, [PruneRetrainCallback(prune_epochs=[1], retrain=Retraining(train_only=["net.5"]))], max_epochs=2
    )
    with pytest.raises(ValueError, match="no parameter trainable"):
        trainer.fit(model, toy_loader())


# ----------------------------------------------------------------------------------------------- rounds in one fit
def test_rounds_with_epochs_fill_the_end_of_training(tmp_path):
    prune = PruneRetrainCallback(rounds=[{"level": 0.5, "epochs": 2}, {"level": 1.0, "epochs": 3}], verbose=False)
    record = AtEpochStart(lambda t, m: len(prune.schedule.done))
    starts = AtEpochStart(lambda t, m: [prune.schedule.start_of(k) for k in range(2)])
    make_trainer(tmp_path, [prune, record, starts], max_epochs=8).fit(ToyMLP(), toy_loader())
    assert starts.seen == [[3, 5]] * 8
    assert record.seen == [0, 0, 0, 1, 1, 2, 2, 2]


def test_round_end_summary_is_printed(tmp_path, caplog):
    prune = PruneRetrainCallback(rounds=[{"level": 0.5, "epochs": 1}, {"level": 1.0, "epochs": 1}])
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, [prune], max_epochs=3).fit(ToyMLP(), toy_loader())
    assert "end of round 1/2" in caplog.text and "end of round 2/2" in caplog.text
    assert "train_loss=" in caplog.text


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rounds": []}, r"`rounds` must be a non-empty list of rounds, got \[\]"),
        ({"rounds": {"level": 1.0}}, r"`rounds` must be a non-empty list of rounds"),
        (
            {"rounds": [{"level": 1.0, "lr": 0.1}]},
            r"rounds\[0\]: Unknown key 'lr'\. Accepted keys: level, epochs, layers",
        ),
        ({"rounds": [0.5]}, r"`rounds\[0\]` must be a Round or a mapping of its fields, got 0\.5"),
        ({"rounds": [{"epochs": 0}]}, r"rounds\[0\]: `epochs` must be an integer >= 1 or None, got 0"),
        ({"rounds": [{"lr_scale": 0}]}, r"rounds\[0\]: `lr_scale` must be a finite number > 0 or None, got 0"),
        ({"rounds": [{"weight_decay": -1.0}]}, r"rounds\[0\]: `weight_decay` must be a finite number >= 0"),
        (
            {"rounds": [{"criterion": "fraction"}]},
            r"rounds\[0\]: `level` is missing: criterion Fraction\(amount=None\)",
        ),
        ({"rounds": [{"criterion": "l2"}]}, r"rounds\[0\]: `criterion` must be a registered name"),
        ({"rounds": [{}, {}], "prune_epochs": [1]}, r"`prune_epochs` has 1 entries but there are 2 rounds"),
        ({"rounds": [{"epochs": 2}], "prune_epochs": [1]}, r"either `prune_epochs` or per-round `epochs`"),
        ({"retrain": {"lr_scale": -0.1}}, r"`retrain\.lr_scale` must be a finite number > 0, got -0\.1"),
        ({"retrain": {"weight_decay": math.inf}}, r"`retrain\.weight_decay` must be a finite number >= 0 or None"),
        (
            {"retrain": {"train_only": "fc1"}},
            r"`retrain\.train_only` must be None or a non-empty list of glob patterns",
        ),
        ({"retrain": {"lr": 0.1}}, r"Unknown key 'lr' in `retrain`\. Accepted keys: lr_scale, weight_decay"),
        ({"retrain": 0.1}, r"`retrain` must be a Retraining or a mapping of its fields, got 0\.1"),
        ({"dense": {"l1": -1e-5}}, r"`dense\.l1` must be a finite number >= 0, got -1e-05"),
        ({"dense": {"weight_decay": -1.0}}, r"`dense\.weight_decay` must be a finite number >= 0 or None"),
        ({"dropout": {"links": ["drop"]}}, r"`dropout\.links` must be a dict of dropout module name -> layer name"),
        ({"dropout": {"map": {}}}, r"Unknown key 'map' in `dropout`\. Accepted keys: links"),
    ],
)
def test_bad_round_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PruneRetrainCallback(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "max_epochs", "match"),
    [
        ({"rounds": [{"epochs": 3}, {"epochs": 3}]}, 5, r"retrain for 6 epochs in all, more than max_epochs=5"),
        ({"rounds": [{"level": 0.5}, {"level": 0.9}]}, 4, r"rounds\[0\]` has no `epochs`"),
        ({"rounds": [{"layers": ["fc9"]}]}, 4, r"rounds\[0\]: Pattern 'fc9'"),
    ],
)
def test_rounds_that_do_not_fit(tmp_path, kwargs, max_epochs, match):
    trainer = make_trainer(tmp_path, [PruneRetrainCallback(**kwargs)], max_epochs=max_epochs)
    with pytest.raises(ValueError, match=match):
        trainer.fit(ToyMLP(), toy_loader())
    assert trainer.global_step == 0
