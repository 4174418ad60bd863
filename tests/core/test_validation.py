import dataclasses
import itertools
import re
from fractions import Fraction as Rational

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_prune.core.settings import Retraining
from lightning_prune.core.validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_levels,
    check_number,
    check_patterns,
    check_per_layer,
    coerce,
    preview,
)

NAN, INF = float("nan"), float("inf")


class Count(int):
    """An integer type that is not ``int`` itself."""


# ---------------------------------------------------------------------------------------------------------------------
# check_number
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (1, 1.0), (0.5, 0.5), (1e300, 1e300),
                                                 (Rational(1, 4), 0.25)])  # fmt: skip
def test_check_number_accepts_finite_non_negative_reals(value, expected):
    out = check_number(value, "x")
    assert out == expected and type(out) is float


@pytest.mark.parametrize(
    ("value", "shown"),
    [(-1, "-1"), (-1e-12, "-1e-12"), (NAN, "nan"), (INF, "inf"), (-INF, "-inf"), (True, "True"), (False, "False"),
     ("1.0", "'1.0'"), (None, "None"), ([1.0], r"\[1\.0\]"), (1j, "1j")],
)  # fmt: skip
def test_check_number_refuses(value, shown):
    with pytest.raises(ValueError, match=rf"^`retrain\.l1` must be a finite number >= 0, got {shown}\.$"):
        check_number(value, "retrain.l1")


def test_check_number_positive_refuses_zero_only():
    assert check_number(1e-9, "lr", positive=True) == 1e-9
    with pytest.raises(ValueError, match=r"^`lr` must be a finite number > 0, got 0\.$"):
        check_number(0, "lr", positive=True)
    with pytest.raises(ValueError, match=r"^`lr` must be a finite number > 0, got 0\.0\.$"):
        check_number(0.0, "lr", positive=True)
    with pytest.raises(ValueError, match=r"> 0, got -0\.0"):
        check_number(-0.0, "lr", positive=True)


def test_check_number_optional():
    assert check_number(None, "wd", optional=True) is None
    assert check_number(2, "wd", optional=True) == 2.0
    with pytest.raises(ValueError, match=r"^`wd` must be a finite number >= 0 or None, got -2\.$"):
        check_number(-2, "wd", optional=True)
    with pytest.raises(ValueError, match=r"^`lr` must be a finite number > 0 or None, got nan\.$"):
        check_number(NAN, "lr", positive=True, optional=True)


@given(st.floats(allow_nan=True, allow_infinity=True))
@settings(max_examples=80, deadline=None)
def test_check_number_property(value):
    good = value == value and value not in (INF, -INF) and value >= 0
    if good:
        assert check_number(value, "x") == value
    else:
        with pytest.raises(ValueError, match="`x` must be a finite number >= 0"):
            check_number(value, "x")


# ---------------------------------------------------------------------------------------------------------------------
# check_fraction
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(0, 0.0), (1, 1.0), (0.25, 0.25), (Rational(1, 2), 0.5)])
def test_check_fraction_accepts(value, expected):
    out = check_fraction(value, "amount")
    assert out == expected and type(out) is float


@pytest.mark.parametrize(
    ("value", "shown"),
    [(-0.01, r"-0\.01"), (1.0001, r"1\.0001"), (2, "2"), (NAN, "nan"), (INF, "inf"), (True, "True"),
     (False, "False"), ("0.5", "'0.5'"), (None, "None")],
)  # fmt: skip
def test_check_fraction_refuses(value, shown):
    with pytest.raises(ValueError, match=rf"^`amount` must be a number in \[0, 1\], got {shown}\.$"):
        check_fraction(value, "amount")


def test_check_fraction_optional():
    assert check_fraction(None, "min_remaining", optional=True) is None
    with pytest.raises(ValueError, match=r"^`min_remaining` must be a number in \[0, 1\] or None, got 1\.5\.$"):
        check_fraction(1.5, "min_remaining", optional=True)


def test_check_fraction_and_check_quality_helpers():  # was in core.pruner: check_fraction, check_quality
    assert check_fraction(0, "x") == 0.0 and isinstance(check_fraction(1, "x"), float)
    with pytest.raises(ValueError, match=r"`x` must be a number in \[0, 1\], got None"):
        check_fraction(None, "x")
    assert check_per_layer(0, "quality", check_number) == 0.0
    assert check_per_layer({"a": 0.0, "*": 3}, "quality", check_number) == {"a": 0.0, "*": 3.0}
    with pytest.raises(ValueError, match=r"`quality` must be a finite number >= 0, got -inf"):
        check_per_layer(float("-inf"), "quality", check_number)


# ---------------------------------------------------------------------------------------------------------------------
# check_int, check_bool, check_choice
# ---------------------------------------------------------------------------------------------------------------------


def test_check_int_accepts():
    assert check_int(0, "retries") == 0
    assert check_int(3, "epochs", minimum=1) == 3
    out = check_int(Count(4), "epochs", minimum=1)
    assert out == 4 and type(out) is int
    assert check_int(None, "epochs", optional=True) is None


@pytest.mark.parametrize(
    ("value", "shown"), [(0, "0"), (-1, "-1"), (True, "True"), (2.0, r"2\.0"), ("3", "'3'"), (None, "None")]
)
def test_check_int_refuses(value, shown):
    with pytest.raises(ValueError, match=rf"^`epochs` must be an integer >= 1, got {shown}\.$"):
        check_int(value, "epochs", minimum=1)


def test_check_int_optional_message():
    with pytest.raises(ValueError, match=r"^`epochs` must be an integer >= 1 or None, got 0\.$"):
        check_int(0, "epochs", minimum=1, optional=True)
    with pytest.raises(ValueError, match=r"^`retries` must be an integer >= 0, got False\.$"):
        check_int(False, "retries")


def test_check_bool():
    assert check_bool(True, "relative") is True and check_bool(False, "relative") is False
    for value in (0, 1, "yes", "False", None, 1.0):
        with pytest.raises(ValueError, match=r"^`guard\.relative` must be True or False, got "):
            check_bool(value, "guard.relative")


def test_check_choice():
    assert check_choice("min", "guard.mode", ("max", "min")) == "min"
    assert check_choice(None, "x", [None, 1]) is None
    with pytest.raises(ValueError, match=r"^`guard\.mode` must be one of \('max', 'min'\), got 'MAX'\.$"):
        check_choice("MAX", "guard.mode", ("max", "min"))
    with pytest.raises(ValueError, match=r"must be one of \('a', 'b'\), got 1"):
        check_choice(1, "x", ["a", "b"])


# ---------------------------------------------------------------------------------------------------------------------
# check_patterns
# ---------------------------------------------------------------------------------------------------------------------


def test_check_patterns_accepts():
    assert check_patterns(["fc*", "conv1"], "layers") == ["fc*", "conv1"]
    out = check_patterns(("fc*",), "layers")
    assert out == ["fc*"] and type(out) is list
    given_list = ["a"]
    assert check_patterns(given_list, "layers") is not given_list  # a copy
    assert check_patterns(None, "layers") is None


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (
            "fc1",
            r"^`layers` must be None or a non-empty list of glob patterns, got 'fc1' \(a string: wrap it in a list\)",
        ),
        ([], r"^`layers` must be None or a non-empty list of glob patterns, got \[\]\.$"),
        ((), r"got \(\)\.$"),
        ([""], r"got \[''\]\.$"),
        (["fc", 3], r"got \['fc', 3\]\.$"),
        ({"fc": 1}, r"got \{'fc': 1\}\.$"),
        (5, r"got 5\.$"),
    ],
)
def test_check_patterns_refuses(value, match):
    with pytest.raises(ValueError, match=match):
        check_patterns(value, "layers")


def test_check_patterns_not_optional():
    with pytest.raises(ValueError, match=r"^`train_only` must be a non-empty list of glob patterns, got None\.$"):
        check_patterns(None, "train_only", optional=False)


# ---------------------------------------------------------------------------------------------------------------------
# check_per_layer
# ---------------------------------------------------------------------------------------------------------------------


def test_check_per_layer_number_and_mapping():
    assert check_per_layer(2, "quality", check_number) == 2.0
    given_map = {"conv*": 1, "*": 0.5}
    out = check_per_layer(given_map, "quality", check_number)
    assert out == {"conv*": 1.0, "*": 0.5} and list(out) == ["conv*", "*"] and out is not given_map


@pytest.mark.parametrize(
    ("value", "check", "match"),
    [
        (
            {},
            check_number,
            r"^`quality` is an empty mapping; give a number, or \{pattern: number\} with a '\*' default",
        ),
        ({"": 1.0}, check_number, r"^`quality` keys must be glob patterns over layer names, got ''\.$"),
        ({1: 1.0}, check_number, r"^`quality` keys must be glob patterns over layer names, got 1\.$"),
        ({"fc*": -1}, check_number, r"^`quality\['fc\*'\]` must be a finite number >= 0, got -1\.$"),
        ({"*": 1.5}, check_fraction, r"^`quality\['\*'\]` must be a number in \[0, 1\], got 1\.5\.$"),
        (True, check_number, r"^`quality` must be a finite number >= 0, got True\.$"),
    ],
)
def test_check_per_layer_refuses(value, check, match):
    with pytest.raises(ValueError, match=match):
        check_per_layer(value, "quality", check)


# ---------------------------------------------------------------------------------------------------------------------
# check_levels
# ---------------------------------------------------------------------------------------------------------------------


def test_check_levels_accepts():
    assert check_levels([0.5, 1, 1.5], "levels", check_number) == [0.5, 1.0, 1.5]
    assert check_levels((0, 1), "levels", check_fraction) == [0.0, 1.0]
    assert check_levels(iter([0.1, 0.2]), "levels", check_number) == [0.1, 0.2]
    assert check_levels([3], "levels", check_number) == [3.0]


@pytest.mark.parametrize(
    ("value", "check", "match"),
    [
        ([0.5, 0.5], check_number, r"^`levels` must be strictly increasing, got 0\.5 after 0\.5 in \[0\.5, 0\.5\]\.$"),
        ([1, 2, 1.5], check_number, r"^`levels` must be strictly increasing, got 1\.5 after 2 in \[1, 2, 1\.5\]\.$"),
        ([], check_number, r"^`levels` must be a non-empty sequence of numbers, got \[\]\.$"),
        ("0.5,1.0", check_number, r"^`levels` must be a non-empty sequence of numbers, got '0\.5,1\.0'\.$"),
        (b"01", check_number, r"non-empty sequence of numbers, got b'01'"),
        (0.5, check_number, r"^`levels` must be a non-empty sequence of numbers, got 0\.5\.$"),
        ([0.5, -1], check_number, r"^`levels\[1\]` must be a finite number >= 0, got -1\.$"),
        ([0.5, NAN], check_number, r"^`levels\[1\]` must be a finite number >= 0, got nan\.$"),
        ([True], check_number, r"^`levels\[0\]` must be a finite number >= 0, got True\.$"),
        ([0.5, 1.5], check_fraction, r"^`levels\[1\]` must be a number in \[0, 1\], got 1\.5\.$"),
    ],
)
def test_check_levels_refuses(value, check, match):
    with pytest.raises(ValueError, match=match):
        check_levels(value, "levels", check)


@given(st.lists(st.floats(0, 10), min_size=1, max_size=8))
@settings(max_examples=60, deadline=None)
def test_check_levels_property(values):
    increasing = all(b > a for a, b in itertools.pairwise(values))
    if increasing:
        assert check_levels(values, "levels", check_number) == values
    else:
        with pytest.raises(ValueError, match="strictly increasing"):
            check_levels(values, "levels", check_number)


# ---------------------------------------------------------------------------------------------------------------------
# coerce, preview
# ---------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Point:
    x: int = 0
    y: int = 0
    z: int = 0


def test_coerce_instance_and_mapping():
    point = Point(1, 2)
    assert coerce(Point, point, "point") is point
    assert coerce(Point, {"y": 5}, "point") == Point(0, 5)
    assert coerce(Point, {}, "point") == Point()


def test_coerce_unknown_keys_name_them_and_the_accepted_keys_in_field_order():
    with pytest.raises(ValueError, match=r"^Unknown key 'w' in `point`\. Accepted keys: x, y, z\.$"):
        coerce(Point, {"x": 1, "w": 2}, "point")
    with pytest.raises(ValueError, match=r"Unknown key 'lr' in `retrain`\. Accepted keys: lr_scale, "
                                         r"weight_decay, l1, train_only, freeze_bn_stats\."):  # fmt: skip
        coerce(Retraining, {"lr": 0.1}, "retrain")


@pytest.mark.parametrize("value", [None, [("x", 1)], "x=1", 3])
def test_coerce_refuses_other_values(value):
    with pytest.raises(
        ValueError, match=r"^`point` must be a Point or a mapping of its fields, got " + re.escape(repr(value))
    ):
        coerce(Point, value, "point")


def test_coerce_runs_the_dataclass_checks():
    assert coerce(Retraining, {"lr_scale": 0.1}, "retrain") == Retraining(lr_scale=0.1)
    with pytest.raises(ValueError, match=r"`retrain\.lr_scale` must be a finite number > 0, got 0"):
        coerce(Retraining, {"lr_scale": 0}, "retrain")


def test_preview():
    assert preview([]) == ""
    assert preview(["a"]) == "'a'"
    assert preview(["a", "b", "c"], limit=3) == "'a', 'b', 'c'"
    assert preview(["a", "b", "c"], limit=2) == "'a', 'b', ... (1 more)"
    assert preview([str(i) for i in range(20)]).endswith("'11', ... (8 more)")
