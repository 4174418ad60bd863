import json

import pytest
import torch
from registry_names import REGISTERED
from torch import nn

import lightning_prune.core.criteria.base as base
from lightning_prune.core.criteria import (
    Criterion,
    Decision,
    Fraction,
    Global,
    PruneContext,
    Std,
    get_criterion,
    register_criterion,
    registered_criteria,
)
from lightning_prune.core.pruner import Pruner, PruningError
from lightning_prune.core.sensitivity import SensitivityResult, SensitivityRow

WEIGHTS = ["0.weight", "2.weight", "4.weight"]
BUILT_INS = ["fraction", "global", "nm", "std", "structured_fraction", "structured_global", "structured_std"]


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))


def snapshot(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def pruner_state(pruner: Pruner) -> dict:
    return {
        "masks": {k: v.clone() for k, v in pruner.masks.items()},
        "dense_std": dict(pruner.dense_std),
        "thresholds": dict(pruner.thresholds),
        "rules": dict(pruner.rules),
    }


def assert_same_state(net, pruner, model_before, state_before) -> None:
    after, state = snapshot(net), pruner_state(pruner)
    assert after.keys() == model_before.keys()
    assert all(torch.equal(after[k], model_before[k]) for k in after)
    assert state["masks"].keys() == state_before["masks"].keys()
    assert all(torch.equal(state["masks"][k], state_before["masks"][k]) for k in state["masks"])
    assert {k: v for k, v in state.items() if k != "masks"} == {k: v for k, v in state_before.items() if k != "masks"}


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry: what a test registers is gone after it."""
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))


@pytest.fixture
def largest(registry):
    """A user-defined criterion, registered: keep the ``count`` largest magnitudes of each layer."""

    @register_criterion
    class Largest(Criterion):
        name = "test_largest"
        level_name = "count"

        def __init__(self, count=None, min_remaining=None):
            super().__init__(count, min_remaining)

        def select(self, weights, keeps, levels, context):
            out = {}
            for name, weight in weights.items():
                k = min(int(levels[name]), weight.numel())
                keep = torch.zeros(weight.numel(), dtype=torch.bool)
                keep[weight.detach().abs().flatten().topk(k).indices] = True
                out[name] = Decision(keep.view_as(weight), None, f"top {k}")
            return out

    return Largest


@pytest.fixture
def random_keep(registry):
    """A user-defined criterion that ignores the current mask: a seeded random share of each layer survives."""

    @register_criterion
    class RandomKeep(Criterion):
        name = "test_random"
        level_name = "share"

        def __init__(self, share=0.5, seed=0, min_remaining=None):
            super().__init__(share, min_remaining)
            self.seed = seed

        def check_level(self, value, name):
            from lightning_prune.core.validation import check_fraction

            return check_fraction(value, name)

        def select(self, weights, keeps, levels, context):
            g = torch.Generator().manual_seed(self.seed)
            return {
                name: Decision(torch.rand(w.shape, generator=g) < levels[name], None, "random")
                for name, w in weights.items()
            }

    return RandomKeep


def scripted(decide):
    """A criterion whose ``select`` returns ``decide(weights)`` (to feed the pruner bad decisions)."""

    class Scripted(Criterion):
        name = "scripted"

        def select(self, weights, keeps, levels, context):
            return decide(weights)

    return Scripted(1.0)


# ---------------------------------------------------------------------------------------------------------------------
# the registry
# ---------------------------------------------------------------------------------------------------------------------


def test_built_ins_are_registered():
    known = registered_criteria()
    assert known["std"] is Std and known["fraction"] is Fraction and known["global"] is Global
    known["std"] = Fraction  # a copy: the registry is not changed through it
    assert registered_criteria()["std"] is Std


def test_registering_adds_the_class_and_is_idempotent(largest):
    assert registered_criteria()["test_largest"] is largest
    assert register_criterion(largest) is largest  # the same class again: fine
    assert register_criterion(Std) is Std


def test_registry_fixture_leaves_no_trace():
    assert "test_largest" not in registered_criteria() and "test_random" not in registered_criteria()


def test_registering_a_taken_name_for_another_class_is_refused(registry):
    class Impostor(Criterion):
        name = "std"

        def select(self, weights, keeps, levels, context):
            return {}

    taken = r"Criterion name 'std' is taken by lightning_prune\.core\.criteria\.magnitude\.Std"
    with pytest.raises(ValueError, match=taken):
        register_criterion(Impostor)
    assert registered_criteria()["std"] is Std


def test_registering_a_class_without_a_name_is_refused(registry):
    class Nameless(Criterion):
        def select(self, weights, keeps, levels, context):
            return {}

    refused = r"register_criterion takes a Criterion subclass with a `name`, got "
    with pytest.raises(ValueError, match=refused + ".*Nameless"):
        register_criterion(Nameless)
    with pytest.raises(ValueError, match=refused + ".*Linear"):
        register_criterion(nn.Linear)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"register_criterion takes a Criterion subclass"):
        register_criterion(Std())  # type: ignore[arg-type]
    assert sorted(registered_criteria()) == sorted(BUILT_INS)


def test_criterion_is_abstract():
    with pytest.raises(TypeError, match="abstract"):
        Criterion()  # type: ignore[abstract]


# ---------------------------------------------------------------------------------------------------------------------
# get_criterion
# ---------------------------------------------------------------------------------------------------------------------


def test_get_criterion_by_name_gives_default_settings():
    rule = get_criterion("std")
    assert type(rule) is Std and rule.level == 1.0 and rule.std_of == "dense"
    assert get_criterion("fraction").level is None
    assert type(get_criterion("global")) is Global


def test_get_criterion_returns_an_object_as_it_is():
    rule = Fraction(amount=0.3)
    assert get_criterion(rule) is rule


@pytest.mark.parametrize("path", ["lightning_prune.core.criteria.magnitude.Fraction", "lightning_prune.Fraction"])
def test_get_criterion_by_dotted_path(path):
    rule = get_criterion(path)
    assert type(rule) is Fraction and rule.level is None


def test_get_criterion_by_class_path_mapping():
    init_args = {"quality": 0.8, "std_of": "surviving"}
    rule = get_criterion({"class_path": "lightning_prune.core.criteria.Std", "init_args": init_args})
    assert type(rule) is Std and rule.level == 0.8 and rule.std_of == "surviving"
    assert get_criterion({"class_path": "fraction", "init_args": {"amount": 0.25}}).level == 0.25  # a name works too
    assert get_criterion({"class_path": "lightning_prune.Global"}).level is None  # no init_args: defaults
    assert get_criterion({"class_path": "global", "init_args": None}).level is None


def test_get_criterion_of_a_registered_user_class(largest):
    assert type(get_criterion("test_largest")) is largest
    rule = get_criterion({"class_path": "test_largest", "init_args": {"count": 3, "min_remaining": 0.1}})
    assert rule.level == 3.0 and rule.min_remaining == 0.1
    assert rule.describe() == "Largest(count=3.0, min_remaining=0.1)"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("l1", r"`criterion` must be a registered name " + REGISTERED + r" or the dotted path of a Criterion "
               r"subclass, got 'l1'"),
        ("no.such.module.Std", r"`criterion` 'no\.such\.module\.Std' cannot be imported \(No module named 'no'\)"),
        ("lightning_prune.NoSuch", r"`criterion` 'lightning_prune\.NoSuch' cannot be imported"),
        ("torch.nn.Linear", r"or the dotted path of a Criterion subclass, got 'torch\.nn\.Linear'"),
        ("lightning_prune.core.criteria.base.LevelSpec", r"dotted path of a Criterion subclass"),
        (42, r"`criterion` must be a registered name " + REGISTERED + r", the dotted path of a Criterion "
             r"subclass, or a Criterion object, got 42"),
        (None, r"or a Criterion object, got None"),
        ({"init_args": {"quality": 1.0}}, r"or a Criterion object, got \{'init_args'"),
        ({"class_path": "std", "extra": 1}, r"or a Criterion object, got \{'class_path': 'std', 'extra': 1\}"),
        ({"class_path": "std", "init_args": {"amount": 0.5}},
         r"Criterion Std cannot be built from init_args \{'amount': 0\.5\}: .*unexpected keyword argument 'amount'"),
        ({"class_path": "std", "init_args": [0.5]}, r"`init_args` of criterion 'std' must be a mapping, got \[0\.5\]"),
        ({"class_path": "std", "init_args": {"quality": -1}}, r"`quality` must be a finite number >= 0, got -1"),
        ("lightning_prune.core.criteria.base.Criterion", r"Criterion Criterion cannot be built .*abstract"),
    ],
)  # fmt: skip
def test_get_criterion_refusals(spec, match):
    with pytest.raises(ValueError, match=match):
        get_criterion(spec)


# ---------------------------------------------------------------------------------------------------------------------
# levels: check_levels, load_levels, gentler, describe, min_remaining
# ---------------------------------------------------------------------------------------------------------------------


def test_check_levels_number_and_mapping():
    assert Std().check_levels(2, "level") == 2.0
    assert Std().check_levels({"fc*": 1, "*": 0.5}, "level") == {"fc*": 1.0, "*": 0.5}
    assert Fraction().check_levels({"*": 1}, "amount") == {"*": 1.0}


@pytest.mark.parametrize(
    ("rule", "value", "match"),
    [
        (Global(), {"*": 0.5}, r"Criterion 'global' takes one `level` for all layers, not a mapping: \{'\*': 0\.5\}"),
        (Fraction(), 1.0001, r"`level` must be a number in \[0, 1\], got 1\.0001"),
        (Fraction(), -0.0001, r"`level` must be a number in \[0, 1\], got -0\.0001"),
        (Fraction(), {"fc1": 2, "*": 0.5}, r"`level\['fc1'\]` must be a number in \[0, 1\], got 2"),
        (Global(), float("nan"), r"`level` must be a number in \[0, 1\], got nan"),
        (Std(), -1, r"`level` must be a finite number >= 0, got -1"),
        (Std(), {}, r"`level` is an empty mapping"),
        (Std(), {3: 1.0}, r"`level` keys must be glob patterns over layer names, got 3"),
        (Std(), None, r"`level` must be a finite number >= 0, got None"),
        (Std(), "levels.txt", r"Cannot read a quality file 'levels\.txt': suffix must be one of"),
    ],
)
def test_check_levels_refusals(rule, value, match):
    with pytest.raises(ValueError, match=match):
        rule.check_levels(value, "level")


def _write(tmp_path, criterion: str, name: str) -> str:
    rows = [SensitivityRow("0", 0.5, 0.4, 0.99), SensitivityRow("0", 1.0, 0.7, 0.9)]
    rows += [SensitivityRow("2", 0.5, 0.4, 0.99), SensitivityRow("2", 1.0, 0.7, 0.985)]
    if criterion == "fraction":
        rows = [row._replace(level=row.level / 2) for row in rows]
    path = tmp_path / name
    SensitivityResult(0.99, rows, criterion=criterion).write_quality(path, 0.01)
    return str(path)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_levels_of_a_std_file_into_std(tmp_path, suffix):
    path = _write(tmp_path, "std", "quality" + suffix)
    assert Std().load_levels(path) == {"0": 0.5, "2": 1.0}
    rule = Std(quality=path)
    assert rule.level == {"0": 0.5, "2": 1.0}
    pruner = Pruner(make_net(), ["0", "2"])
    assert pruner.check(rule) == {"0.weight": 0.5, "2.weight": 1.0}
    assert pruner.check("std", path) == {"0.weight": 0.5, "2.weight": 1.0}  # a path as the level of a prune


def test_load_levels_of_a_fraction_file_into_fraction(tmp_path):
    path = _write(tmp_path, "fraction", "amount.yml")
    assert Fraction(amount=path).level == {"0": 0.25, "2": 0.5}


def test_a_file_written_for_another_criterion_is_refused_naming_both(tmp_path):
    fraction_file, std_file = _write(tmp_path, "fraction", "a.yaml"), _write(tmp_path, "std", "q.json")
    with pytest.raises(ValueError, match=r"a\.yaml' holds levels for criterion 'fraction', not 'std'"):
        Std(quality=fraction_file)
    with pytest.raises(ValueError, match=r"q\.json' holds levels for criterion 'std', not 'fraction'"):
        Fraction(amount=std_file)
    with pytest.raises(ValueError, match=r"holds levels for criterion 'fraction', not 'global'"):
        Global(amount=fraction_file)


def test_a_file_without_levels_of_the_criterion_is_refused(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps({"criterion": "fraction", "quality": {"0": 0.5}}))  # levels under another name
    with pytest.raises(ValueError, match=r"empty\.json' holds no `amount` for criterion 'fraction'"):
        Fraction(amount=str(path))


def test_gentler_default_is_level_times_scale(largest):
    assert largest().gentler(10.0, 0.8) == 8.0
    assert Std().gentler(2.0, 0.5) == 1.0


def test_describe_and_repr(largest):
    assert largest(5).describe() == "Largest(count=5.0)"
    assert repr(largest(5, min_remaining=0.25)) == "Largest(count=5.0, min_remaining=0.25)"
    assert largest().describe() == "Largest(count=None)"
    described = Std(quality={"*": 1}, min_remaining=0.0).describe()
    assert described == "Std(quality={'*': 1.0}, min_remaining=0.0, std_of='dense')"


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_min_remaining_is_validated(value):
    with pytest.raises(ValueError, match=r"`min_remaining` must be a number in \[0, 1\] or None, got"):
        Fraction(0.5, min_remaining=value)


def test_min_remaining_accepted_values():
    assert Fraction(0.5, min_remaining=0).min_remaining == 0.0
    assert Fraction(0.5, min_remaining=1).min_remaining == 1.0
    assert Fraction(0.5).min_remaining is None


def test_prune_context_is_frozen():
    context = PruneContext(dense_std={"a": 1.0}, layer_of={"a": "x"})
    with pytest.raises(AttributeError):
        context.dense_std = {}  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------------
# a user-defined criterion through the pruner
# ---------------------------------------------------------------------------------------------------------------------


def test_user_criterion_by_object_and_by_name(largest):
    a, b = Pruner(make_net()), Pruner(make_net())
    before = snapshot(a.model)
    a.prune(largest(count=10))
    b.prune("test_largest", 10)
    for name in WEIGHTS:
        assert torch.equal(a.masks[name], b.masks[name])
        keep, w0 = a.masks[name], before[name]
        assert int(keep.sum()) == 10
        assert float(w0.abs()[keep].min()) >= float(w0.abs()[~keep].max())
        assert (a.parameter(name).detach()[~keep] == 0).all()
    assert a.rules == dict.fromkeys(WEIGHTS, "top 10")
    assert a.thresholds == {}  # a decision without a threshold leaves none
    assert a.counts() == (30, 128 + 192 + 48)


def test_user_criterion_levels_per_layer_and_layers_subset(largest):
    pruner = Pruner(make_net())
    assert pruner.check("test_largest", {"2": 5, "*": 7}) == {"0.weight": 7.0, "2.weight": 5.0, "4.weight": 7.0}
    pruner.prune(largest({"2": 5, "*": 7}), layers=["2", "4"])
    assert set(pruner.masks) == {"2.weight", "4.weight"}
    assert int(pruner.masks["2.weight"].sum()) == 5 and int(pruner.masks["4.weight"].sum()) == 7


def test_user_criterion_receives_weights_keeps_levels_and_context(largest):
    seen = []

    class Recording(largest):
        def select(self, weights, keeps, levels, context):
            seen.append((dict(weights), dict(keeps), dict(levels), context))
            return super().select(weights, keeps, levels, context)

    pruner = Pruner(make_net(), include_bias=True)
    dense_std = float(pruner.parameter("2.weight").detach().std())
    pruner.prune(Recording(100), layers=["2"])
    weights, keeps, levels, context = seen[-1]
    assert list(weights) == ["2.weight", "2.bias"]
    param = pruner.parameter("2.weight")
    assert weights["2.weight"].data_ptr() == param.data_ptr() and not weights["2.weight"].requires_grad
    assert keeps == {"2.weight": None, "2.bias": None}
    assert levels == {"2.weight": 100.0, "2.bias": 100.0}
    assert context.layer_of == {"2.weight": "2", "2.bias": "2"}
    assert context.dense_std["2.weight"] == pytest.approx(dense_std)
    after_first = pruner.masks["2.weight"].clone()
    pruner.prune(Recording(50), layers=["2"])
    _, keeps, _, context = seen[-1]
    assert torch.equal(keeps["2.weight"], after_first)  # the current mask
    assert context.dense_std["2.weight"] == pytest.approx(dense_std)  # cached, not the survivors' std
    assert int(pruner.masks["2.weight"].sum()) == 50


def test_user_decisions_are_intersected_with_the_current_mask(random_keep):
    pruner = Pruner(make_net())
    pruner.prune("fraction", 0.5)
    first = {n: k.clone() for n, k in pruner.masks.items()}
    rule = random_keep(share=0.7, seed=3)
    proposed = rule.select({n: pruner.parameter(n) for n in WEIGHTS}, {}, dict.fromkeys(WEIGHTS, 0.7), None)
    assert any((proposed[n].keep & ~first[n]).any() for n in WEIGHTS)  # it would revive pruned connections
    pruner.prune(rule)
    for name in WEIGHTS:
        assert torch.equal(pruner.masks[name], first[name] & proposed[name].keep)  # masks only shrink
        assert (pruner.parameter(name).detach()[~pruner.masks[name]] == 0).all()
    pruner.prune("test_random", 1.0)  # keeps everything it is given: nothing revives
    assert all(torch.equal(pruner.masks[n], first[n] & proposed[n].keep) for n in WEIGHTS)


def test_min_remaining_floors_a_user_criterion(largest):
    net = make_net()
    before = snapshot(net)
    pruner = Pruner(net)
    pruner.prune(largest(0), min_remaining=0.25)
    assert [int(pruner.masks[n].sum()) for n in WEIGHTS] == [32, 48, 12]
    for name in WEIGHTS:
        keep, w0 = pruner.masks[name], before[name]
        assert float(w0.abs()[keep].min()) >= float(w0.abs()[~keep].max())  # the floor keeps the largest
    pruner = Pruner(make_net())
    pruner.prune(largest(1, min_remaining=0.5))  # the criterion's own floor
    assert [int(pruner.masks[n].sum()) for n in WEIGHTS] == [64, 96, 24]
    pruner.prune(largest(20, min_remaining=0.5), min_remaining=0.0)  # prune's floor wins: no widening to 64
    assert [int(pruner.masks[n].sum()) for n in WEIGHTS] == [20, 20, 20]


def test_a_user_decision_emptying_a_layer_raises_and_changes_nothing(largest):
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    model_before, state_before = snapshot(net), pruner_state(pruner)
    emptied = r"would remove every connection of '0\.weight' \(threshold none, .*rule top 0\)"
    with pytest.raises(PruningError, match=emptied):
        pruner.prune(largest(0))
    assert_same_state(net, pruner, model_before, state_before)


def _shaped(weights, bad_name, make):
    return {n: Decision(make(w) if n == bad_name else torch.ones_like(w, dtype=torch.bool), None, "x")
            for n, w in weights.items()}  # fmt: skip


@pytest.mark.parametrize(
    ("decide", "match"),
    [
        (lambda ws: _shaped(ws, "2.weight", lambda w: torch.ones(w.shape[::-1], dtype=torch.bool)),
         r"The mask of '2\.weight' has shape \(16, 12\) and dtype torch\.bool; the parameter \(criterion "
         r"Scripted\(level=1\.0\)\) has shape \(12, 16\)"),
        (lambda ws: _shaped(ws, "4.weight", lambda w: torch.ones(w.shape)),
         r"The mask of '4\.weight' has shape \(4, 12\) and dtype torch\.float32.*a bool mask is expected"),
        (lambda ws: _shaped(ws, "0.weight", lambda w: torch.ones(w.numel(), dtype=torch.bool)),
         r"The mask of '0\.weight' has shape \(128,\)"),
        (lambda ws: _shaped(ws, "0.weight", lambda w: [[True] * w.shape[1]] * w.shape[0]),
         r"The mask of '0\.weight' is a list, not a bool tensor"),
        (lambda ws: {n: d for n, d in _shaped(ws, "", None).items() if n != "2.weight"},
         r"Criterion Scripted\(level=1\.0\) gave no decision for '2\.weight'"),
        (lambda ws: {}, r"gave no decision for '0\.weight'"),
    ],
)  # fmt: skip
def test_bad_user_decisions_are_refused_and_change_nothing(decide, match):
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    model_before, state_before = snapshot(net), pruner_state(pruner)
    with pytest.raises(ValueError, match=match):
        pruner.prune(scripted(decide))
    assert_same_state(net, pruner, model_before, state_before)


def test_a_criterion_editing_the_masks_it_is_given_changes_nothing():
    def select(weights, keeps, levels, context):
        for keep in keeps.values():
            keep.fill_(False)  # in place, on what it was given
        return {}  # and then a bad decision

    rule = scripted(None)
    rule.select = select
    net = make_net()
    pruner = Pruner(net)
    pruner.prune("fraction", 0.5)
    model_before, state_before = snapshot(net), pruner_state(pruner)
    with pytest.raises(ValueError, match=r"gave no decision for '0\.weight'"):
        pruner.prune(rule)
    assert_same_state(net, pruner, model_before, state_before)


def test_decisions_for_parameters_not_pruned_now_are_ignored():
    net = make_net()
    pruner = Pruner(net)

    def decide(weights):
        out = {n: Decision(w.detach().abs() > 0.1, 0.1, "> 0.1") for n, w in weights.items()}
        out["0.weight"] = Decision(torch.zeros(16, 8, dtype=torch.bool), 0.0, "empty")  # not being pruned now
        return out

    pruner.prune(scripted(decide), layers=["2"])
    assert set(pruner.masks) == {"2.weight"} and pruner.rules == {"2.weight": "> 0.1"}
    assert pruner.thresholds == {"2.weight": 0.1}


def test_user_criterion_in_a_round(largest):
    from lightning_prune.core.schedule import Round
    from lightning_prune.core.settings import Retraining

    resolved = Round(criterion="test_largest", level=4).resolve(Std(), Retraining(), None)
    assert type(resolved.rule) is largest and resolved.level == 4.0
    assert resolved.gentler(0.5).level == 2.0
    with pytest.raises(ValueError, match=r"`level` is missing: criterion Largest\(count=None\) has no count"):
        Round(criterion="test_largest").resolve(Std(), Retraining(), None)


def test_a_criterion_returning_something_else_than_decisions_is_refused_by_name():
    class Bare(Criterion):
        name = ""

        def select(self, weights, keeps, levels, context):
            return {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}

    net = nn.Linear(4, 3)
    before = net.weight.detach().clone()
    with pytest.raises(ValueError, match=r"gave a Tensor for 'weight'; select\(\) must return a Decision"):
        Pruner(net).prune(Bare(1.0))
    assert torch.equal(net.weight, before)


def test_criteria_compare_by_value():
    assert Std(quality=0.8) == Std(quality=0.8) and Std(quality=0.8) != Std(quality=0.9)
    assert Std(quality={"fc1": 1.0}) == Std(quality={"fc1": 1.0}) and Fraction(0.5) != Std(0.5)
    assert Std(quality=1.0, std_of="surviving") != Std(quality=1.0)
