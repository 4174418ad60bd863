"""RetrainingPhase: the settings of the phase in force, put into a trainer's optimizers and the model."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from toy_models import ToyConvNet, ToyMLP

from lightning_prune import Regularization, Retraining, Round, Std
from lightning_prune.phase import RetrainingPhase

WEIGHTS = ["net.0.weight", "net.3.weight", "net.5.weight"]


def resolved(**fields) -> Round:
    return Round(**fields).resolve(Std(), Retraining(), None)


def selected(model, names=WEIGHTS):
    return {name: model.get_parameter(name) for name in names}


def trainer_of(*optimizers, schedulers=()):
    return SimpleNamespace(
        optimizers=list(optimizers), lr_scheduler_configs=[SimpleNamespace(scheduler=s) for s in schedulers]
    )


def split_sgd(model, lr=0.05):
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    return torch.optim.SGD([{"params": weights}, {"params": biases, "weight_decay": 0.0}], lr=lr, weight_decay=1e-3)


def settings(optimizer):
    return [(g["lr"], g["weight_decay"]) for g in optimizer.param_groups]


def test_learning_rate_scale_is_relative_to_the_one_in_force():
    model = ToyMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 1, gamma=0.5)
    trainer = trainer_of(optimizer, schedulers=[scheduler])
    phase = RetrainingPhase(Regularization(), freeze_bn_stats=True)
    phase.start(trainer, selected(model), [], resumed=False)
    lrs = []
    for round_ in (resolved(lr_scale=0.1), resolved(lr_scale=0.01), resolved(lr_scale=0.01), None):
        phase.enter(trainer, model, round_)
        lrs.extend([optimizer.param_groups[0]["lr"], scheduler.base_lrs[0], phase.lr_scale])
    assert lrs == pytest.approx([0.005, 0.005, 0.1, 0.0005, 0.0005, 0.01, 0.0005, 0.0005, 0.01, 0.05, 0.05, 1])


def test_weight_decay_is_set_in_the_selected_weights_groups_and_restored():
    model = ToyMLP()
    optimizer = split_sgd(model)
    trainer = trainer_of(optimizer)
    phase = RetrainingPhase(Regularization(), freeze_bn_stats=True)
    phase.start(trainer, selected(model), [resolved(weight_decay=5e-4)], resumed=False)
    assert phase.original_weight_decay == [[1e-3, 0.0]]
    phase.enter(trainer, model, resolved(weight_decay=5e-4))
    assert settings(optimizer) == [(0.05, 5e-4), (0.05, 0.0)]  # the no-decay group keeps its own
    phase.enter(trainer, model, resolved())
    assert settings(optimizer) == [(0.05, 1e-3), (0.05, 0.0)]  # a round without one: the optimizer's own
    phase.enter(trainer, model, None)
    assert settings(optimizer) == [(0.05, 1e-3), (0.05, 0.0)]

    dense = RetrainingPhase(Regularization(weight_decay=0.0), freeze_bn_stats=True)
    dense.start(trainer, selected(model), [], resumed=False)
    dense.enter(trainer, model, None)
    assert settings(optimizer) == [(0.05, 0.0), (0.05, 0.0)]


def test_l1_goes_to_the_selected_weights_the_optimizer_holds():
    torch.manual_seed(0)
    model = ToyMLP()
    first = torch.optim.SGD(model.net[0].parameters(), lr=0.1)
    rest = torch.optim.SGD([*model.net[3].parameters(), *model.net[5].parameters()], lr=0.1)
    trainer = trainer_of(first, rest)
    phase = RetrainingPhase(Regularization(l1=0.5), freeze_bn_stats=True)
    phase.start(trainer, selected(model, WEIGHTS[:2]), [resolved(l1=0.01)], resumed=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    phase.enter(trainer, model, None)
    phase.add_l1(first)
    assert torch.equal(model.net[0].weight.grad, 0.5 * model.net[0].weight.sign())
    assert not model.net[0].bias.grad.any() and not model.net[3].weight.grad.any()  # not selected / not its own
    phase.enter(trainer, model, resolved(l1=0.01))
    phase.add_l1(rest)
    assert torch.equal(model.net[3].weight.grad, 0.01 * model.net[3].weight.sign())
    assert not model.net[5].weight.grad.any()  # held by `rest` but not selected
    phase.enter(trainer, model, resolved())  # no L1 in this round: nothing is added
    before = model.net[3].weight.grad.clone()
    phase.add_l1(rest)
    assert torch.equal(model.net[3].weight.grad, before)


def test_l1_after_the_parameters_were_replaced_goes_to_the_new_ones():
    model = ToyMLP()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    phase = RetrainingPhase(Regularization(l1=1.0), freeze_bn_stats=True)
    phase.start(trainer_of(optimizer), selected(model, WEIGHTS[:1]), [], resumed=False)
    phase.enter(trainer_of(optimizer), model, None)
    phase.add_l1(optimizer)  # caches the parameters this optimizer holds
    replacement = torch.nn.Parameter(torch.ones(3, 3))
    optimizer.add_param_group({"params": [replacement]})
    replacement.grad = torch.zeros(3, 3)
    phase.forget_parameters({"net.0.weight": replacement})
    phase.add_l1(optimizer)
    assert torch.equal(replacement.grad, torch.ones(3, 3))


@pytest.mark.parametrize("missing", ["l1", "weight_decay"])
def test_regularization_needs_an_optimizer_holding_every_selected_weight(missing):
    model = ToyMLP()
    trainer = trainer_of(torch.optim.SGD(model.net[0].parameters(), lr=0.1))
    rounds = [resolved(**{missing: 1e-4})]
    phase = RetrainingPhase(Regularization(), freeze_bn_stats=True)
    with pytest.raises(
        ValueError, match=r"L1 or weight decay is configured, but no optimizer .* holds 'net\.3\.weight'"
    ):
        phase.start(trainer, selected(model), rounds, resumed=False)
    phase.start(trainer, selected(model), [resolved()], resumed=False)  # nothing to apply: no optimizer needed


def test_freeze_outside_train_only_then_thaw():
    model = ToyConvNet()
    trainer = trainer_of(torch.optim.SGD(model.parameters(), lr=0.1))
    phase = RetrainingPhase(Regularization(), freeze_bn_stats=True)
    phase.start(trainer, {}, [], resumed=False)
    local = resolved(train_only=["classifier"])
    phase.enter(trainer, model, local)
    assert [p.requires_grad for p in model.parameters()] == [False] * 6 + [True, True]
    assert not model.features[1].training and len(phase.freezer.frozen) == 6
    model.train()  # what Lightning does at each epoch start
    phase.enter(trainer, model, local)  # the same round again: stays frozen as it is
    phase.reapply()
    assert not model.features[1].training and not model.features[0].weight.requires_grad
    phase.enter(trainer, model, resolved())
    assert all(p.requires_grad for p in model.parameters()) and model.features[1].training
    phase.freeze(model, ["features.3", "classifier"])
    assert not model.features[0].weight.requires_grad and model.features[3].weight.requires_grad
    phase.thaw()
    assert all(p.requires_grad for p in model.parameters()) and not phase.freezer.frozen

    stats_train = RetrainingPhase(Regularization(), freeze_bn_stats=False)
    stats_train.freeze(model, ["classifier"])
    assert model.features[1].training and not model.features[1].weight.requires_grad
    stats_train.thaw()


def test_state_round_trip_and_resume():
    model = ToyMLP()
    optimizer = split_sgd(model)
    trainer = trainer_of(optimizer)
    phase = RetrainingPhase(Regularization(), freeze_bn_stats=True)
    phase.start(trainer, selected(model), [], resumed=False)
    phase.enter(trainer, model, resolved(lr_scale=0.1, weight_decay=0.0))
    state = phase.state_dict()
    assert state == {"lr_scale": 0.1, "original_weight_decay": [[1e-3, 0.0]]}

    resumed_optimizer = split_sgd(model, lr=0.005)  # its checkpointed settings: the round's
    resumed_optimizer.param_groups[0]["weight_decay"] = 0.0
    resumed = RetrainingPhase(Regularization(), freeze_bn_stats=True)
    resumed.load_state_dict(state)
    resumed.start(trainer_of(resumed_optimizer), selected(model), [], resumed=True)
    assert resumed.lr_scale == 0.1 and resumed.original_weight_decay == [[1e-3, 0.0]]  # kept, not re-read
    resumed.enter(trainer_of(resumed_optimizer), model, None)  # back to dense training
    assert [v for group in settings(resumed_optimizer) for v in group] == pytest.approx([0.05, 1e-3, 0.05, 0.0])

    fresh = RetrainingPhase(Regularization(), freeze_bn_stats=True)
    fresh.load_state_dict(state)
    fresh.start(trainer_of(split_sgd(model)), selected(model), [], resumed=False)  # new optimizers: start over
    assert fresh.lr_scale == 1.0 and fresh.original_weight_decay == [[1e-3, 0.0]]
