import dataclasses
import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from registry_names import REGISTERED

from lightning_prune.core.criteria import Criterion, Fraction, Global, Std
from lightning_prune.core.schedule import Round, Schedule, check_prune_epochs, start_epochs
from lightning_prune.core.sensitivity import SensitivityResult, SensitivityRow
from lightning_prune.core.settings import Retraining

FAST = settings(max_examples=60, deadline=None)


def schedule(rounds=None, prune_epochs=None, criterion=None, retrain=None) -> Schedule:
    return Schedule(rounds, prune_epochs, criterion or Std(), retrain or Retraining())


# ---------------------------------------------------------------------------------------------------------------------
# Round: validation
# ---------------------------------------------------------------------------------------------------------------------


def test_round_defaults_are_all_none():
    assert all(getattr(Round(), f.name) is None for f in dataclasses.fields(Round))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, r"^`epochs` must be an integer >= 1 or None, got 0\.$"),
        ({"epochs": 2.0}, r"^`epochs` must be an integer >= 1 or None, got 2\.0\.$"),
        ({"epochs": True}, r"^`epochs` must be an integer >= 1 or None, got True\.$"),
        ({"layers": "fc1"}, r"^`layers` must be None or a non-empty list of glob patterns, got 'fc1' \(a string"),
        ({"layers": []}, r"^`layers` must be None or a non-empty list of glob patterns, got \[\]\.$"),
        ({"train_only": "fc*"}, r"^`train_only` must be None or a non-empty list of glob patterns, got 'fc\*'"),
        ({"train_only": [""]}, r"^`train_only` must be None or a non-empty list of glob patterns, got \[''\]\.$"),
        ({"min_remaining": 1.5}, r"^`min_remaining` must be a number in \[0, 1\] or None, got 1\.5\.$"),
        ({"min_remaining": True}, r"^`min_remaining` must be a number in \[0, 1\] or None, got True\.$"),
        ({"lr_scale": 0}, r"^`lr_scale` must be a finite number > 0 or None, got 0\.$"),
        ({"lr_scale": float("inf")}, r"^`lr_scale` must be a finite number > 0 or None, got inf\.$"),
        ({"weight_decay": -1e-4}, r"^`weight_decay` must be a finite number >= 0 or None, got -0\.0001\.$"),
        ({"l1": float("nan")}, r"^`l1` must be a finite number >= 0 or None, got nan\.$"),
        ({"criterion": "l1"}, r"^`criterion` must be a registered name " + REGISTERED + r" or the dotted path"),
        ({"criterion": 3}, r"^`criterion` must be a registered name .* or a Criterion object, got 3\.$"),
        ({"criterion": "fraction", "level": 1.5}, r"^`level` must be a number in \[0, 1\], got 1\.5\.$"),
        ({"criterion": "std", "level": -1}, r"^`level` must be a finite number >= 0, got -1\.$"),
        ({"criterion": "global", "level": {"*": 0.5}}, r"^Criterion 'global' takes one `level` for all layers"),
        ({"criterion": "std", "level": {"fc1": "x"}}, r"^`level\['fc1'\]` must be a finite number >= 0, got 'x'\.$"),
    ],
)
def test_round_refuses_each_bad_field_naming_it(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Round(**kwargs)


@pytest.mark.parametrize(
    ("spec", "cls"),
    [
        ("fraction", Fraction),
        ("lightning_prune.core.criteria.magnitude.Global", Global),
        ({"class_path": "lightning_prune.Std", "init_args": {"std_of": "surviving"}}, Std),
    ],
)
def test_round_criterion_is_resolved_to_an_object(spec, cls):
    r = Round(criterion=spec, level=0.5)
    assert type(r.criterion) is cls and r.rule is r.criterion
    assert r.level == 0.5 and isinstance(r.level, float)


def test_round_criterion_object_is_kept_and_level_checked_against_it():
    rule = Std(std_of="surviving")
    r = Round(criterion=rule, level={"fc*": 1})
    assert r.criterion is rule and r.level == {"fc*": 1.0}


def test_round_without_criterion_is_not_resolved():
    with pytest.raises(RuntimeError, match=r"The round is not resolved: call resolve\(\) first"):
        _ = Round(level=1.0).rule


def test_round_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Round().level = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------------------------------
# Round.resolve, gentler, prune_kwargs
# ---------------------------------------------------------------------------------------------------------------------


def test_resolve_takes_the_level_of_the_round_first():
    assert Round(level=0.5).resolve(Std(quality=1.2), Retraining(), 0.8).level == 0.5


def test_resolve_takes_the_default_level_next():
    assert Round().resolve(Std(quality=1.2), Retraining(), {"fc*": 0.8, "*": 1}).level == {"fc*": 0.8, "*": 1.0}


def test_resolve_takes_the_criterion_level_last():
    resolved = Round().resolve(Std(quality=1.2), Retraining(), None)
    assert resolved.level == 1.2 and type(resolved.rule) is Std


def test_resolve_without_any_level_is_refused():
    msg = (r"^`level` is missing: criterion Fraction\(amount=None\) has no amount of its own; give it one "
           r"\(Fraction\(amount=\.\.\.\)\) or give the round a `level`\.$")  # fmt: skip
    with pytest.raises(ValueError, match=msg):
        Round().resolve(Fraction(), Retraining(), None)


def test_resolve_checks_the_level_against_the_criterion():
    with pytest.raises(ValueError, match=r"^`level` must be a number in \[0, 1\], got 1\.2\.$"):
        Round(level=1.2).resolve(Fraction(), Retraining(), None)
    with pytest.raises(ValueError, match=r"^`level` must be a finite number >= 0, got -1\.$"):
        Round(level=-1).resolve(Std(), Retraining(), None)


def test_resolve_keeps_the_criterion_of_the_round():
    resolved = Round(criterion="fraction", level=0.5).resolve(Std(), Retraining(), None)
    assert type(resolved.rule) is Fraction and resolved.level == 0.5


def test_resolve_fills_retraining_defaults():
    retrain = Retraining(lr_scale=0.1, weight_decay=1e-4, l1=1e-5, train_only=["fc*"])
    resolved = Round(level=1.0).resolve(Std(), retrain, None)
    assert (resolved.lr_scale, resolved.weight_decay, resolved.l1, resolved.train_only) == (0.1, 1e-4, 1e-5, ["fc*"])
    own = Round(level=1.0, lr_scale=0.5, weight_decay=0.0, l1=0.0, train_only=["conv*"]).resolve(Std(), retrain, None)
    assert (own.lr_scale, own.weight_decay, own.l1, own.train_only) == (0.5, 0.0, 0.0, ["conv*"])  # 0 is not None
    assert Round().resolve(Std(), Retraining(), None).weight_decay is None  # the optimizer's own


def test_resolve_keeps_epochs_layers_min_remaining():
    resolved = Round(epochs=3, layers=["fc1"], min_remaining=0.1).resolve(Std(), Retraining(), None)
    assert (resolved.epochs, resolved.layers, resolved.min_remaining) == (3, ["fc1"], 0.1)


def test_resolve_loads_a_levels_file(tmp_path):
    path = tmp_path / "quality.yaml"
    SensitivityResult(0.99, [SensitivityRow("fc1", 1.5, 0.8, 0.99)]).write_quality(path, 0.01)
    assert Round(level=str(path)).resolve(Std(), Retraining(), None).level == {"fc1": 1.5}


def test_gentler_number_and_mapping():
    r = Round(level=1.0).resolve(Std(), Retraining(), None)
    assert r.gentler(1.0) is r
    assert r.gentler(0.8).level == pytest.approx(0.8)
    m = Round(level={"fc1": 1.0, "*": 0.5}).resolve(Std(), Retraining(), None)
    gentler = m.gentler(0.5)
    assert gentler.level == {"fc1": 0.5, "*": 0.25} and list(gentler.level) == ["fc1", "*"]
    assert m.level == {"fc1": 1.0, "*": 0.5}  # unchanged
    assert gentler.rule is m.rule


def test_gentler_uses_the_criterion(monkeypatch):
    class Stepped(Std):
        def gentler(self, level, scale):
            return level - 0.25

    r = Round(level=1.0, criterion=Stepped()).resolve(Std(), Retraining(), None)
    assert r.gentler(0.5).level == 0.75


def test_prune_kwargs():
    r = Round(level=0.5, layers=["fc1"], min_remaining=0.2, criterion="fraction").resolve(Std(), Retraining(), None)
    assert r.prune_kwargs() == {"criterion": r.rule, "level": 0.5, "min_remaining": 0.2, "layers": ["fc1"]}


# ---------------------------------------------------------------------------------------------------------------------
# check_prune_epochs, start_epochs
# ---------------------------------------------------------------------------------------------------------------------


def test_check_prune_epochs():
    assert check_prune_epochs(None) is None
    assert check_prune_epochs((0, 3)) == [0, 3]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([], r"^`prune_epochs` must be a non-empty list of epoch indices or None, got \[\]\.$"),
        ("3", r"^`prune_epochs` must be a non-empty list of epoch indices or None, got '3'\.$"),
        (3, r"^`prune_epochs` must be a non-empty list of epoch indices or None, got 3\.$"),
        ([1, -1], r"^`prune_epochs\[1\]` must be an integer >= 0, got -1\.$"),
        ([True], r"^`prune_epochs\[0\]` must be an integer >= 0, got True\.$"),
        ([1.5], r"^`prune_epochs\[0\]` must be an integer >= 0, got 1\.5\.$"),
        ([3, 1], r"^`prune_epochs` must be strictly increasing \(sorted, no duplicates\), got \[3, 1\]\.$"),
        ([2, 2], r"strictly increasing \(sorted, no duplicates\), got \[2, 2\]"),
    ],
)
def test_check_prune_epochs_refusals(value, match):
    with pytest.raises(ValueError, match=match):
        check_prune_epochs(value)


def test_start_epochs_with_prune_epochs():
    assert start_epochs([Round(), Round()], [2, 5], None) == [2, 5]
    with pytest.raises(ValueError, match=r"^`prune_epochs` has 1 entries but there are 2 rounds"):
        start_epochs([Round(), Round()], [2], 10)
    with pytest.raises(ValueError, match=r"^Give either `prune_epochs` or per-round `epochs`, not both\.$"):
        start_epochs([Round(epochs=1)], [2], 10)


def test_start_epochs_fill_the_end():
    assert start_epochs([Round(epochs=2), Round(epochs=3)], None, 10) == [5, 7]
    assert start_epochs([Round(epochs=2), Round(epochs=3)], None, 5) == [0, 2]
    with pytest.raises(ValueError, match=r"^`rounds\[1\]` has no `epochs`; without `prune_epochs` every round needs"):
        start_epochs([Round(epochs=2), Round()], None, 10)
    with pytest.raises(ValueError, match=r"needs a finite `Trainer\(max_epochs=\.\.\.\)` \(got None\)"):
        start_epochs([Round(epochs=2)], None, None)
    with pytest.raises(ValueError, match=r"\(got -1\)"):
        start_epochs([Round(epochs=2)], None, -1)
    with pytest.raises(ValueError, match=r"^The rounds retrain for 5 epochs in all, more than max_epochs=4\. Raise"):
        start_epochs([Round(epochs=2), Round(epochs=3)], None, 4)


@given(st.lists(st.integers(1, 6), min_size=1, max_size=6), st.integers(0, 40))
@FAST
def test_start_epochs_property(epochs, extra):
    rounds = [Round(epochs=e) for e in epochs]
    max_epochs = sum(epochs) + extra
    starts = start_epochs(rounds, None, max_epochs)
    assert len(starts) == len(rounds)
    assert starts[0] == extra >= 0  # the dense epochs come first
    assert all(b > a for a, b in itertools.pairwise(starts))
    assert all(s + e <= max_epochs for s, e in zip(starts, epochs, strict=True))
    assert starts[-1] + epochs[-1] == max_epochs  # the last round ends with training
    assert all(b - a == e for a, b, e in zip(starts, starts[1:], epochs, strict=False))


# ---------------------------------------------------------------------------------------------------------------------
# Schedule: construction
# ---------------------------------------------------------------------------------------------------------------------


def test_rounds_as_dicts_or_round_objects():
    s = schedule([{"level": 0.8, "epochs": 2}, Round(level=1.2, epochs=3, criterion="std")], retrain=Retraining(0.1))
    assert [r.level for r in s.rounds] == [0.8, 1.2]
    assert all(isinstance(r.rule, Std) for r in s.rounds)
    assert [r.lr_scale for r in s.rounds] == [0.1, 0.1]
    assert s.specs[0] == Round(level=0.8, epochs=2)  # as given, unresolved


def test_no_rounds_gives_one_per_prune_epoch_or_one():
    assert len(schedule().rounds) == 1
    s = schedule(None, [2, 5], Std(quality=0.7))
    assert [r.level for r in s.rounds] == [0.7, 0.7]
    assert s.prune_epochs == [2, 5]


@pytest.mark.parametrize("rounds", ["round", {"level": 1.0}, [], (), 3])
def test_rounds_must_be_a_non_empty_list(rounds):
    with pytest.raises(ValueError, match=r"^`rounds` must be a non-empty list of rounds, got "):
        schedule(rounds)


@pytest.mark.parametrize(
    ("rounds", "criterion", "match"),
    [
        ([{"level": 1.0}, {"quality": 1.2}],
         Std(), r"^rounds\[1\]: Unknown key 'quality'\. Accepted keys: level, epochs, "),
        ([{"level": 1.0}, {"epochs": 0}], Std(), r"^rounds\[1\]: `epochs` must be an integer >= 1 or None, got 0\.$"),
        ([{"level": -1.0}], Std(), r"^rounds\[0\]: `level` must be a finite number >= 0, got -1\.0\.$"),
        ([{"level": 0.5}, {}], Fraction(), r"^rounds\[1\]: `level` is missing: criterion Fraction\(amount=None\)"),
        ([{"level": 0.5}, 3], Std(), r"^`rounds\[1\]` must be a Round or a mapping of its fields, got 3"),
        ([{"criterion": "fraction", "level": 2}], Std(), r"^rounds\[0\]: `level` must be a number in \[0, 1\]"),
        ([{"level": 1, "criterion": "nope"}], Std(), r"^rounds\[0\]: `criterion` must be a registered name"),
    ],
)  # fmt: skip
def test_bad_rounds_are_named(rounds, criterion, match):
    with pytest.raises(ValueError, match=match):
        schedule(rounds, criterion=criterion)


def test_rounds_must_agree_with_prune_epochs():
    with pytest.raises(ValueError, match=r"^`prune_epochs` has 2 entries but there are 1 rounds"):
        schedule([{"level": 1.0}], [1, 2])
    with pytest.raises(ValueError, match=r"^Give either `prune_epochs` or per-round `epochs`, not both\.$"):
        schedule([{"level": 1.0, "epochs": 2}], [1])
    with pytest.raises(ValueError, match=r"^`prune_epochs` must be strictly increasing"):
        schedule(None, [3, 1])


# ---------------------------------------------------------------------------------------------------------------------
# Schedule: planning and due rounds
# ---------------------------------------------------------------------------------------------------------------------


def test_plan_fit_with_prune_epochs_returns_late_rounds():
    s = schedule([{}, {}, {}], [1, 4, 6])
    assert s.plan_fit(max_epochs=10) == []
    assert s.plan_fit(max_epochs=5) == [6]
    assert s.plan_fit(max_epochs=4) == [4, 6]  # epoch 4 does not run in a 4-epoch fit
    assert s.in_one_fit
    assert [s.start_of(k) for k in range(3)] == [1, 4, 6]


def test_plan_fit_with_epochs_fills_the_end():
    s = schedule([{"epochs": 2}, {"epochs": 3}])
    assert s.plan_fit(max_epochs=10) == []
    assert (s.start_of(0), s.start_of(1), s.start_of(2)) == (5, 7, None)
    assert s.due(4) == [] and s.due(5) == [0] and s.due(7) == [0, 1]
    with pytest.raises(ValueError, match=r"more than max_epochs=4"):
        s.plan_fit(max_epochs=4)
    with pytest.raises(ValueError, match=r"fill the end of training, which needs a finite"):
        s.plan_fit(max_epochs=None)


@pytest.mark.parametrize(("max_epochs", "start"), [(2, 1), (3, 1), (10, 5), (11, 5)])
def test_plan_fit_single_default_prune_at_half(max_epochs, start):
    s = schedule()
    assert s.plan_fit(max_epochs) == []
    assert s.start_of(0) == start
    assert s.due(start - 1) == [] and s.due(start) == [0]


@pytest.mark.parametrize("max_epochs", [None, -1, 0, 1])
def test_plan_fit_single_default_prune_needs_max_epochs(max_epochs):
    with pytest.raises(ValueError, match=rf"prunes once at max_epochs // 2, .*>= 2 \(got {max_epochs}\)\.$"):
        schedule().plan_fit(max_epochs)


def test_plan_fit_several_rounds_without_epochs_is_refused():
    with pytest.raises(ValueError, match=r"^`rounds\[0\]` has no `epochs`"):
        schedule([{}, {}]).plan_fit(10)


def test_due_catches_up_and_skips_done_skipped_and_stopped():
    s = schedule([{}, {}, {}], [1, 2, 3])
    s.plan_fit(10)
    assert s.due(0) == [] and s.due(1) == [0] and s.due(5) == [0, 1, 2]
    s.mark_done(0)
    assert s.due(5) == [1, 2]
    s.retry(0, 0.8, in_place_of=1)
    assert s.skipped == [1] and s.due(5) == [2]
    s.stop()
    assert s.stopped and s.due(5) == []


def test_due_is_empty_without_a_plan():
    s = schedule([{}, {}], [1, 2])
    assert s.due(5) == []
    s.plan_fit(10)
    assert s.due(5) == [0, 1]
    s.end_fit()
    assert s.due(5) == [] and s.in_one_fit and s.start_of(0) is None


def test_plan_single():
    s = schedule([{"epochs": 2}, {"epochs": 3}])
    s.plan_single(1)
    assert not s.in_one_fit
    assert s.due(0) == [1] and s.start_of(1) == 0 and s.start_of(0) is None
    assert s.active == s.round(1)
    s.plan_single(None)  # a dense fit
    assert s.due(0) == [] and s.active is None and not s.in_one_fit
    with pytest.raises(ValueError, match=r"^Round index 2 is out of range: there are 2 rounds\.$"):
        s.plan_single(2)
    with pytest.raises(ValueError, match=r"^Round index -1 is out of range"):
        s.plan_single(-1)
    s.end_fit()
    assert s.in_one_fit


def test_active_in_one_fit_is_the_last_done_round():
    s = schedule([{"level": 0.5, "lr_scale": 0.5}, {"level": 1.0, "lr_scale": 0.1}], [1, 2])
    s.plan_fit(5)
    assert s.active is None  # dense training
    s.mark_done(0)
    assert s.active.lr_scale == 0.5
    s.mark_done(1)
    assert s.active.lr_scale == 0.1


@given(
    st.lists(st.integers(1, 4), min_size=1, max_size=5),
    st.integers(0, 10),
    st.lists(st.tuples(st.integers(0, 20), st.sampled_from(["done", "skip", "stop", "none"])), max_size=8),
)
@FAST
def test_due_property(epochs, extra, events):
    s = schedule([{"epochs": e} for e in epochs])
    max_epochs = sum(epochs) + extra
    s.plan_fit(max_epochs)
    ran: list[int] = []
    events = dict(events)
    for epoch in range(max_epochs):
        due = s.due(epoch)
        assert len(due) == len(set(due))
        assert not set(due) & set(s.done) and not set(due) & set(s.skipped)
        assert all(s.start_of(k) <= epoch for k in due)
        if s.stopped:
            assert due == []
        for k in due:
            ran.append(k)
            s.mark_done(k)
        event = events.get(epoch, "none")
        pending = [k for k in range(len(epochs)) if k not in s.done and k not in s.skipped]
        if event == "skip" and pending:
            s.retry(0, 0.5, in_place_of=pending[-1])
        elif event == "stop":
            s.stop()
    assert len(ran) == len(set(ran))  # each round ran at most once
    assert not set(ran) & set(s.skipped)
    if not s.stopped:
        assert sorted(ran + s.skipped) == list(range(len(epochs)))  # every round ran or was skipped


# ---------------------------------------------------------------------------------------------------------------------
# Schedule: guard bookkeeping
# ---------------------------------------------------------------------------------------------------------------------


def test_record_tries_judged():
    s = schedule([{}, {}], [1, 2])
    assert s.tries(0) == 0 and not s.judged(0)
    s.record("rolled back", 0, "val_acc 0.9 is worse")
    s.record("rolled back", 0, "again")
    s.record("kept", 1, "within tolerance")
    assert s.tries(0) == 2 and s.tries(1) == 0
    assert not s.judged(0) and s.judged(1)
    assert s.decisions[0] == {"round": 0, "decision": "rolled back", "reason": "val_acc 0.9 is worse"}


def test_retry_scales_compound_and_make_the_round_gentler():
    s = schedule([{"level": 1.0}, {"level": {"0": 2.0, "*": 1.0}}], [1, 2])
    s.retry(0, 0.8)
    s.retry(0, 0.5)
    s.retry(1, 0.5)
    assert s.scales == pytest.approx({0: 0.4, 1: 0.5})
    assert s.skipped == []
    assert s.round(0).level == pytest.approx(0.4)
    assert s.round(1).level == {"0": 1.0, "*": 0.5}
    assert s.rounds[0].level == 1.0  # the configured round stays


def test_retry_in_place_of_skips_that_round():
    s = schedule([{}, {}, {}], [1, 3, 5])
    s.plan_fit(10)
    s.mark_done(0)
    s.done.remove(0)  # the guard's rollback restores the rounds done before it
    s.retry(0, 0.8, in_place_of=1)
    assert s.due(3) == [0] and s.due(5) == [0, 2]


def test_mark_done_and_stop():
    s = schedule([{}, {}], [1, 2])
    s.mark_done(1)
    assert s.done == [1]
    assert not s.stopped
    s.stop()
    assert s.stopped


def test_set_default_level_re_resolves_only_rounds_without_their_own_level():
    rounds = [{}, {"level": 0.5}, {"criterion": Std(quality=2.0)}, {"criterion": "std"}]
    s = schedule(rounds, [1, 2, 3, 4], Std(quality=1.2))
    assert [r.level for r in s.rounds] == [1.2, 0.5, 2.0, 1.2]  # a criterion named brings no level of its own
    s.set_default_level({"0": 0.7, "*": 0.9})
    chosen = {"0": 0.7, "*": 0.9}
    assert [r.level for r in s.rounds] == [chosen, 0.5, 2.0, chosen]  # Std(quality=2.0) is the round's own
    assert s.default_level == chosen
    s.set_default_level(None)
    assert [r.level for r in s.rounds] == [1.2, 0.5, 2.0, 1.2]


def test_set_default_level_refused_changes_nothing():
    s = schedule([{}, {"level": 0.5}], [1, 2], Fraction(amount=0.3))
    with pytest.raises(ValueError, match=r"^rounds\[0\]: `level` must be a number in \[0, 1\], got 1\.5\.$"):
        s.set_default_level(1.5)
    assert s.default_level is None and [r.level for r in s.rounds] == [0.3, 0.5]


# ---------------------------------------------------------------------------------------------------------------------
# Schedule: state_dict
# ---------------------------------------------------------------------------------------------------------------------


def test_state_dict_of_a_fresh_schedule():
    assert schedule().state_dict() == {
        "done": [], "skipped": [], "scales": {}, "stopped": False, "decisions": [], "default_level": None
    }  # fmt: skip


def test_state_dict_round_trip():
    s = schedule([{}, {}, {"level": 0.2}], [1, 2, 3])
    s.mark_done(0)
    s.record("rolled back", 1, "worse")
    s.retry(1, 0.8, in_place_of=2)
    s.set_default_level({"*": 0.6})
    s.stop()
    state = s.state_dict()
    assert state["scales"] == {"1": 0.8}  # string keys: a plain mapping for any checkpoint format
    other = schedule([{}, {}, {"level": 0.2}], [1, 2, 3])
    other.load_state_dict(state)
    assert other.state_dict() == state
    assert (other.done, other.skipped, other.scales, other.stopped) == ([0], [2], {1: 0.8}, True)
    assert other.decisions == s.decisions and other.decisions is not s.decisions
    assert [r.level for r in other.rounds] == [{"*": 0.6}, {"*": 0.6}, 0.2]  # the default level re-resolved
    assert other.round(1).level == pytest.approx({"*": 0.48})
    state["done"].append(1)  # the saved state is a copy
    assert other.done == [0]


def test_load_state_dict_of_an_empty_state():
    s = schedule([{}, {}], [1, 2])
    s.load_state_dict({})
    assert s.state_dict() == schedule([{}, {}], [1, 2]).state_dict()


@pytest.mark.parametrize("done", [[0, 1, 2], [2], [-1]])
def test_load_state_dict_refuses_more_rounds_done_than_exist(done):
    s = schedule([{}, {}], [1, 2])
    refused = rf"^The checkpoint has rounds {re.escape(str(done))} done, but this callback has 2 rounds\.$"
    with pytest.raises(ValueError, match=refused):
        s.load_state_dict({"done": done, "stopped": True})
    assert s.done == [] and not s.stopped


def test_load_state_dict_with_a_bad_default_level_changes_nothing():
    s = schedule([{}, {}], [1, 2], Fraction(0.5))
    with pytest.raises(ValueError, match=r"^rounds\[0\]: `level` must be a number in \[0, 1\]"):
        s.load_state_dict({"done": [0], "default_level": 3.0})
    assert s.done == [] and s.default_level is None


def test_a_schedule_keeps_criterion_objects_of_any_kind():
    class Keep(Criterion):
        name = "keep_all_schedule_test"

        def select(self, weights, keeps, levels, context):
            return {}

    s = schedule([{"criterion": Keep(2.0)}, {"level": 0.5}], [1, 2], Fraction(0.1))
    assert type(s.rounds[0].rule) is Keep and s.rounds[0].level == 2.0
    assert type(s.rounds[1].rule) is Fraction and s.rounds[1].level == 0.5


def test_the_sensitivity_level_goes_only_to_rounds_of_the_callbacks_kind_of_criterion():
    with pytest.raises(ValueError, match=r"rounds\[0\]: `level` is missing: criterion Fraction\(amount=None\)"):
        Schedule([{"criterion": "fraction"}], None, Std(quality=1.0), Retraining())  # no level for a fraction
    schedule = Schedule(
        [{}, {"criterion": "std"}, {"criterion": Fraction(amount=0.5)}, {"level": 2.0}],
        [1, 2, 3, 4],
        Std(quality=1.0),
        Retraining(),
    )
    schedule.set_default_level({"*": 0.7})
    levels = [r.level for r in schedule.rounds]
    assert levels == [{"*": 0.7}, {"*": 0.7}, 0.5, 2.0]  # a fraction round keeps its amount, not a quality


@pytest.mark.parametrize(
    ("callback", "spec", "expected"),
    [
        (Fraction(amount=0.5), {"criterion": "fraction"}, 0.5),  # named: the callback's level for that kind
        (Std(quality=0.5), {"criterion": "std"}, 0.5),
        (Std(quality=0.5), {"criterion": Std(quality=0.8, std_of="surviving")}, 0.8),  # an object's own level
        (
            Std(quality=0.5),
            {"criterion": {"class_path": "lightning_prune.Std", "init_args": {"std_of": "surviving"}}},
            0.5,
        ),
        (Std(quality=0.5), {"criterion": {"class_path": "lightning_prune.Std", "init_args": {"quality": 0.9}}}, 0.9),
        (Std(quality=0.5), {"criterion": Fraction(0.7)}, 0.7),
        (Std(quality=0.5), {"criterion": Fraction(0.7), "level": 0.2}, 0.2),
    ],
)
def test_the_level_of_a_round_naming_its_own_criterion(callback, spec, expected):
    assert Schedule([spec], None, callback, Retraining()).rounds[0].level == expected


@pytest.mark.parametrize(
    ("round_floor", "round_criterion", "expected"),
    [
        (0.3, Fraction(amount=0.5, min_remaining=0.2), 0.3),  # the round's own floor first
        (None, Fraction(amount=0.5, min_remaining=0.2), 0.2),  # then its criterion's
        (None, Fraction(amount=0.5), 0.1),  # then the callback criterion's
        (None, None, 0.1),
    ],
)
def test_a_rounds_floor_comes_from_the_round_then_its_criterion_then_the_callbacks(
    round_floor, round_criterion, expected
):
    spec = {"min_remaining": round_floor, "criterion": round_criterion}
    schedule = Schedule([spec], None, Std(quality=1.0, min_remaining=0.1), Retraining())
    assert schedule.rounds[0].min_remaining == expected


def test_a_state_with_a_round_done_twice_is_refused():
    schedule = Schedule([{}, {}], [1, 2], Std(), Retraining())
    with pytest.raises(ValueError, match=r"rounds \[0, 0\] done, but this callback has 2 rounds"):
        schedule.load_state_dict({"done": [0, 0]})
    assert schedule.done == []
