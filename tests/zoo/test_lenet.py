"""The paper's LeNets: sizes, layer names, dropout placement, Caffe's LeNet-5, training and schedules."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.utils.data import DataLoader, TensorDataset

from lightning_prune import Pruner
from lightning_prune.core.dropout import link
from lightning_prune.zoo import LeNet5, LeNet300100


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _call_order(model: nn.Module, x: torch.Tensor) -> list[str]:
    order: list[str] = []
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: order.append(n)) for n, m in model.named_children()]
    model(x)
    for h in handles:
        h.remove()
    return [n for n in order if not n.endswith("_acc")]


def test_parameter_counts_match_the_paper() -> None:
    assert _n_params(LeNet300100()) == 266_610
    assert _n_params(LeNet5()) == 431_080
    per_layer = {n: m.weight.numel() for n, m in LeNet5().named_children() if hasattr(m, "weight")}
    assert per_layer == {"conv1": 500, "conv2": 25_000, "fc1": 400_000, "fc2": 5_000}
    per_layer = {n: m.weight.numel() for n, m in LeNet300100().named_children() if hasattr(m, "weight")}
    assert per_layer == {"fc1": 235_200, "fc2": 30_000, "fc3": 1_000}


@pytest.mark.parametrize("cls", [LeNet300100, LeNet5])
def test_forward_shapes(cls: type[pl.LightningModule]) -> None:
    model = cls()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert model.example_input_array.shape == (1, 1, 28, 28)
    assert model(model.example_input_array).shape == (1, 10)


def test_module_names_and_types() -> None:
    names = {n: type(m) for n, m in LeNet300100().named_children() if not n.endswith("_acc")}
    assert names == {"fc1": nn.Linear, "drop1": nn.Dropout, "fc2": nn.Linear, "drop2": nn.Dropout, "fc3": nn.Linear}
    names = {n: type(m) for n, m in LeNet5().named_children() if not n.endswith("_acc")}
    assert names == {"conv1": nn.Conv2d, "conv2": nn.Conv2d, "fc1": nn.Linear, "drop1": nn.Dropout, "fc2": nn.Linear}
    assert [n for n, _ in LeNet5().named_parameters()] == [
        f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")
    ]


def test_pruning_patterns_select_layers_by_name() -> None:
    assert Pruner(LeNet5(), ["conv*"]).layers == ["conv1", "conv2"]
    assert Pruner(LeNet5(), ["fc*"]).layers == ["fc1", "fc2"]
    assert Pruner(LeNet300100()).layers == ["fc1", "fc2", "fc3"]


def test_dropout_placement() -> None:
    x = torch.zeros(2, 1, 28, 28)
    net = LeNet300100(dropout=0.5)
    order = _call_order(net, x)
    assert order == ["fc1", "drop1", "fc2", "drop2", "fc3"]
    assert link(order, ["drop1", "drop2"], ["fc1", "fc2", "fc3"]) == {"drop1": ["fc2"], "drop2": ["fc3"]}
    assert net.drop1.p == net.drop2.p == 0.5
    lenet5 = LeNet5(dropout=0.5)
    order = _call_order(lenet5, x)
    assert order == ["conv1", "conv2", "fc1", "drop1", "fc2"]
    assert link(order, ["drop1"], ["conv1", "conv2", "fc1", "fc2"]) == {"drop1": ["fc2"]}
    assert LeNet300100().drop1.p == 0.0  # present with rate 0 by default


def test_dropout_is_applied_after_the_relu_in_training_only() -> None:
    torch.manual_seed(0)
    net = LeNet300100(dropout=0.5)
    seen: list[torch.Tensor] = []
    net.drop1.register_forward_hook(lambda m, i, o: seen.append(i[0]))
    x = torch.randn(8, 1, 28, 28)
    net.eval()
    assert torch.equal(net(x), net(x))
    assert (seen[0] >= 0).all()  # the input of drop1 is fc1's ReLU output
    net.train()
    assert not torch.equal(net(x), net(x))


def test_lenet5_follows_caffe_no_relu_after_convs() -> None:
    torch.manual_seed(0)
    net = LeNet5().eval()
    x = torch.randn(4, 1, 28, 28)
    h = F.max_pool2d(net.conv2(F.max_pool2d(net.conv1(x), 2)), 2).flatten(1)
    assert h.shape == (4, 800) and (h < 0).any()
    expected = net.fc2(F.relu(net.fc1(h)))
    torch.testing.assert_close(net(x), expected)


def test_hyperparameters_are_saved() -> None:
    net = LeNet5(lr=0.02, dropout=0.3, optimizer="adam", lr_schedule="cosine", max_epochs_hint=7)
    assert dict(net.hparams) == {
        "lr": 0.02,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "optimizer": "adam",
        "lr_schedule": "cosine",
        "max_epochs_hint": 7,
        "dropout": 0.3,
    }


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr": 0}, "`lr` must be a finite number > 0, got 0"),
        ({"weight_decay": -1.0}, "`weight_decay` must be a finite number >= 0, got -1.0"),
        ({"optimizer": "rmsprop"}, r"`optimizer` must be one of \('sgd', 'adam'\), got 'rmsprop'"),
        ({"lr_schedule": "linear"}, r"`lr_schedule` must be one of \('none', 'cosine', 'step'\), got 'linear'"),
        ({"dropout": 1.0}, r"`dropout` must be a number in \[0, 1\), got 1.0"),
        ({"max_epochs_hint": 0}, "`max_epochs_hint` must be an integer >= 1 or None, got 0"),
    ],
)
def test_bad_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LeNet300100(**kwargs)


def test_optimizers_and_schedules_without_a_trainer() -> None:
    opt = LeNet300100().configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4 and opt.defaults["lr"] == 0.01
    assert isinstance(LeNet300100(optimizer="adam").configure_optimizers(), torch.optim.Adam)
    conf = LeNet300100(lr_schedule="cosine", max_epochs_hint=12).configure_optimizers()
    assert conf["lr_scheduler"]["scheduler"].T_max == 12 and conf["lr_scheduler"]["interval"] == "epoch"
    conf = LeNet5(lr_schedule="step", max_epochs_hint=20).configure_optimizers()
    assert sorted(conf["lr_scheduler"]["scheduler"].milestones) == [10, 15]
    with pytest.raises(ValueError, match=r"needs the run's length: set `Trainer\(max_epochs=...\)` or the model's"):
        LeNet5(lr_schedule="cosine").configure_optimizers()


def _trainer(**kwargs: object) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


@pytest.mark.parametrize("cls", [LeNet300100, LeNet5])
def test_trains_and_logs_metrics(cls: type[pl.LightningModule]) -> None:
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen))
    loader = DataLoader(data, batch_size=16)
    model = cls(dropout=0.5, lr_schedule="cosine")
    before = model.fc1.weight.detach().clone()
    trainer = _trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1)
    trainer.fit(model, loader, loader)
    assert not torch.equal(model.fc1.weight, before)
    assert trainer.lr_scheduler_configs[0].scheduler.T_max == 1  # the trainer's max_epochs wins over the hint
    for key in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert key in trainer.callback_metrics
    assert 0.0 <= float(trainer.callback_metrics["val_acc"]) <= 1.0
    (results,) = trainer.test(model, loader, verbose=False)
    assert set(results) == {"test_loss", "test_acc"}
