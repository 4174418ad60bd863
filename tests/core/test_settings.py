import dataclasses

import pytest

from lightning_prune.core.settings import DropoutAdjustment, Regularization, Retraining, Sensitivity
from lightning_prune.core.validation import coerce


def test_defaults():
    assert Retraining() == Retraining(lr_scale=1.0, weight_decay=None, l1=0.0, train_only=None, freeze_bn_stats=True)
    assert Regularization() == Regularization(weight_decay=None, l1=0.0)
    assert DropoutAdjustment().links is None
    assert Sensitivity(0.0) == Sensitivity(tolerance=0.0, levels=None, relative=False)


def test_accepted_values():
    retrain = Retraining(lr_scale=0.01, weight_decay=0, l1=1e-5, train_only=["classifier.*"], freeze_bn_stats=False)
    assert retrain.lr_scale == 0.01 and retrain.train_only == ["classifier.*"] and not retrain.freeze_bn_stats
    assert Regularization(weight_decay=5e-4, l1=0).weight_decay == 5e-4
    assert DropoutAdjustment(links={}).links == {}
    assert DropoutAdjustment(links={"drop1": "fc2"}).links == {"drop1": "fc2"}
    assert Sensitivity(tolerance=0.01, levels=[0.5, 1.0], relative=True).levels == [0.5, 1.0]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lr_scale": 0}, r"^`retrain\.lr_scale` must be a finite number > 0, got 0\.$"),
        ({"lr_scale": -0.1}, r"^`retrain\.lr_scale` must be a finite number > 0, got -0\.1\.$"),
        ({"lr_scale": float("nan")}, r"^`retrain\.lr_scale` must be a finite number > 0, got nan\.$"),
        ({"lr_scale": None}, r"^`retrain\.lr_scale` must be a finite number > 0, got None\.$"),
        ({"lr_scale": True}, r"^`retrain\.lr_scale` must be a finite number > 0, got True\.$"),
        ({"weight_decay": -1e-4}, r"^`retrain\.weight_decay` must be a finite number >= 0 or None, got -0\.0001\.$"),
        ({"weight_decay": float("inf")}, r"^`retrain\.weight_decay` must be a finite number >= 0 or None, got inf"),
        ({"l1": -1}, r"^`retrain\.l1` must be a finite number >= 0, got -1\.$"),
        ({"l1": None}, r"^`retrain\.l1` must be a finite number >= 0, got None\.$"),
        ({"train_only": "fc"}, r"^`retrain\.train_only` must be None or a non-empty list of glob patterns, got 'fc' "),
        ({"train_only": []}, r"^`retrain\.train_only` must be None or a non-empty list of glob patterns, got \[\]"),
        ({"freeze_bn_stats": "no"}, r"^`retrain\.freeze_bn_stats` must be True or False, got 'no'\.$"),
        ({"freeze_bn_stats": 0}, r"^`retrain\.freeze_bn_stats` must be True or False, got 0\.$"),
    ],
)
def test_retraining_refuses_each_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Retraining(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"weight_decay": -1}, r"^`dense\.weight_decay` must be a finite number >= 0 or None, got -1\.$"),
        ({"weight_decay": "5e-4"}, r"^`dense\.weight_decay` must be a finite number >= 0 or None, got '5e-4'\.$"),
        ({"l1": float("nan")}, r"^`dense\.l1` must be a finite number >= 0, got nan\.$"),
        ({"l1": -0.5}, r"^`dense\.l1` must be a finite number >= 0, got -0\.5\.$"),
    ],
)
def test_regularization_refuses_each_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Regularization(**kwargs)


@pytest.mark.parametrize(
    "links", [["drop1", "fc2"], {"drop1": 2}, {1: "fc2"}, {"drop1": ["fc2"]}, "drop1=fc2", (("drop1", "fc2"),)]
)
def test_dropout_adjustment_refuses_bad_links(links):
    with pytest.raises(ValueError, match=r"^`dropout\.links` must be a dict of dropout module name -> layer name, got"):
        DropoutAdjustment(links=links)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tolerance": -0.01}, r"^`sensitivity\.tolerance` must be a finite number >= 0, got -0\.01\.$"),
        ({"tolerance": float("inf")}, r"^`sensitivity\.tolerance` must be a finite number >= 0, got inf\.$"),
        ({"tolerance": None}, r"^`sensitivity\.tolerance` must be a finite number >= 0, got None\.$"),
        ({"tolerance": 0.01, "levels": "0.5, 1.0"}, r"^`sensitivity\.levels` must be a non-empty sequence of numbers"),
        (
            {"tolerance": 0.01, "levels": 1.0},
            r"^`sensitivity\.levels` must be a non-empty sequence of numbers, got 1\.0",
        ),
        ({"tolerance": 0.01, "levels": [0.5, -1.0]}, r"^`sensitivity\.levels\[1\]` must be a finite number >= 0"),
        ({"tolerance": 0.01, "relative": "yes"}, r"^`sensitivity\.relative` must be True or False, got 'yes'\.$"),
    ],
)
def test_sensitivity_refuses_each_bad_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sensitivity(**kwargs)


def test_sensitivity_needs_a_tolerance():
    with pytest.raises(TypeError, match="tolerance"):
        Sensitivity()  # type: ignore[call-arg]


@pytest.mark.parametrize("settings", [Retraining(), Regularization(), DropoutAdjustment(), Sensitivity(0.01)])
def test_settings_are_frozen(settings):
    field = dataclasses.fields(settings)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(settings, field, None)


@pytest.mark.parametrize(
    ("cls", "name", "value", "expected"),
    [
        (Retraining, "retrain", {"lr_scale": 0.1, "train_only": ["fc*"]}, Retraining(lr_scale=0.1, train_only=["fc*"])),
        (Regularization, "dense", {"l1": 1e-5}, Regularization(l1=1e-5)),
        (DropoutAdjustment, "dropout", {"links": {"d": "fc"}}, DropoutAdjustment(links={"d": "fc"})),
        (Sensitivity, "sensitivity", {"tolerance": 0.005}, Sensitivity(0.005)),
    ],
)
def test_settings_from_plain_dicts(cls, name, value, expected):
    assert coerce(cls, value, name) == expected


@pytest.mark.parametrize(
    ("cls", "name", "value", "match"),
    [
        (Retraining, "retrain", {"lr_scale": 0.0}, r"`retrain\.lr_scale` must be a finite number > 0"),
        (Retraining, "retrain", {"retrain_lr_scale": 0.1}, r"Unknown key 'retrain_lr_scale' in `retrain`"),
        (Regularization, "dense", {"weight_decay": -1}, r"`dense\.weight_decay` must be"),
        (Regularization, "dense", {"l2": 1}, r"Unknown key 'l2' in `dense`\. Accepted keys: weight_decay, l1\."),
        (DropoutAdjustment, "dropout", {"map": {}}, r"Unknown key 'map' in `dropout`\. Accepted keys: links\."),
        (Sensitivity, "sensitivity", {"tolerance": -1}, r"`sensitivity\.tolerance` must be a finite number >= 0"),
        (Sensitivity, "sensitivity", [0.01], r"`sensitivity` must be a Sensitivity or a mapping of its fields"),
    ],
)
def test_settings_from_bad_dicts(cls, name, value, match):
    with pytest.raises(ValueError, match=match):
        coerce(cls, value, name)
