"""Checks of argument values, written once: each error names the argument, the bad value and what is accepted.

Every settings class, the pruner, the criteria and the callback validate through these functions, so
"a finite number >= 0" or "a non-empty list of glob patterns" reads and behaves the same everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeVar, overload

__all__ = [
    "check_bool",
    "check_choice",
    "check_fraction",
    "check_int",
    "check_levels",
    "check_number",
    "check_patterns",
    "check_per_layer",
    "coerce",
    "preview",
]

T = TypeVar("T")


def _is_real(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Real)


@overload
def check_number(value: Any, name: str, *, positive: bool = ..., optional: Literal[False] = ...) -> float: ...
@overload
def check_number(value: Any, name: str, *, positive: bool = ..., optional: bool) -> float | None: ...


def check_number(value: Any, name: str, *, positive: bool = False, optional: bool = False) -> float | None:
    """Return ``value`` as a float if it is a finite number ``>= 0`` (``> 0`` if ``positive``), else raise.

    Args:
        value: The value to check.
        name: The argument's name as the user wrote it, e.g. ``"retrain.lr_scale"``.
        positive: Refuse 0 too.
        optional: Accept ``None`` (returned as ``None``).

    Example::

        >>> check_number(0.1, "lr_scale", positive=True)
        0.1
        >>> check_number(-1, "l1")
        Traceback (most recent call last):
        ...
        ValueError: `l1` must be a finite number >= 0, got -1.
    """
    if optional and value is None:
        return None
    if not _is_real(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"`{name}` must be a finite number {bound}{' or None' if optional else ''}, got {value!r}.")
    return float(value)


@overload
def check_fraction(value: Any, name: str, *, optional: Literal[False] = ...) -> float: ...
@overload
def check_fraction(value: Any, name: str, *, optional: bool) -> float | None: ...


def check_fraction(value: Any, name: str, *, optional: bool = False) -> float | None:
    """Return ``value`` as a float if it is a number in ``[0, 1]``, else raise.

    Example::

        >>> check_fraction(0.9, "amount")
        0.9
    """
    if optional and value is None:
        return None
    if not _is_real(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must be a number in [0, 1]{' or None' if optional else ''}, got {value!r}.")
    return float(value)


@overload
def check_int(value: Any, name: str, *, minimum: int = ..., optional: Literal[False] = ...) -> int: ...
@overload
def check_int(value: Any, name: str, *, minimum: int = ..., optional: bool) -> int | None: ...


def check_int(value: Any, name: str, *, minimum: int = 0, optional: bool = False) -> int | None:
    """Return ``value`` if it is an integer ``>= minimum`` (``bool`` is not), else raise.

    Example::

        >>> check_int(3, "epochs", minimum=1)
        3
    """
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}{' or None' if optional else ''}, got {value!r}.")
    return int(value)


def check_bool(value: Any, name: str) -> bool:
    """Return ``value`` if it is ``True`` or ``False`` (not a string, not a number), else raise.

    Example::

        >>> check_bool(False, "relative")
        False
        >>> check_bool("no", "relative")
        Traceback (most recent call last):
        ...
        ValueError: `relative` must be True or False, got 'no'.
    """
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be True or False, got {value!r}.")
    return value


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise listing them.

    Example::

        >>> check_choice("max", "mode", ("max", "min"))
        'max'
    """
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {tuple(choices)}, got {value!r}.")
    return value


def check_patterns(value: Any, name: str, *, optional: bool = True) -> list[str] | None:
    """Return ``value`` as a list if it is a non-empty list of non-empty glob patterns (or ``None``), else raise.

    Example::

        >>> check_patterns(["features.*", "fc1"], "layers")
        ['features.*', 'fc1']
        >>> check_patterns("fc1", "layers")
        Traceback (most recent call last):
        ...
        ValueError: `layers` must be None or a non-empty list of glob patterns, got 'fc1' (a string: wrap it in a list).
    """
    if optional and value is None:
        return None
    what = f"`{name}` must be {'None or ' if optional else ''}a non-empty list of glob patterns"
    if isinstance(value, str):
        raise ValueError(f"{what}, got {value!r} (a string: wrap it in a list).")
    if not isinstance(value, Sequence) or not value or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{what}, got {value!r}.")
    return list(value)


def check_per_layer(value: Any, name: str, check: Callable[[Any, str], float]) -> float | dict[str, float]:
    """A number, or ``{pattern: number}``, each number checked by ``check(number, name)``.

    Args:
        value: The value to check.
        name: The argument's name.
        check: ``check(number, name) -> float``, e.g. :func:`check_number` or :func:`check_fraction`.

    Returns:
        The float, or a new dict of floats (the pattern order kept).

    Example::

        >>> check_per_layer({"conv*": 0.5, "*": 1}, "quality", check_number)
        {'conv*': 0.5, '*': 1.0}
    """
    if isinstance(value, Mapping):
        if not value:
            raise ValueError(f"`{name}` is an empty mapping; give a number, or {{pattern: number}} with a '*' default.")
        out = {}
        for pattern, number in value.items():
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"`{name}` keys must be glob patterns over layer names, got {pattern!r}.")
            out[pattern] = check(number, f"{name}[{pattern!r}]")
        return out
    return check(value, name)


def check_levels(levels: Any, name: str, check: Callable[[Any, str], float]) -> list[float]:
    """A non-empty, strictly increasing sequence of levels, each checked by ``check(level, name)``.

    Example::

        >>> check_levels([0.5, 1, 1.5], "levels", check_number)
        [0.5, 1.0, 1.5]
        >>> check_levels([0.5, 0.5], "levels", check_number)
        Traceback (most recent call last):
        ...
        ValueError: `levels` must be strictly increasing, got 0.5 after 0.5 in [0.5, 0.5].
    """
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Iterable):
        raise ValueError(f"`{name}` must be a non-empty sequence of numbers, got {levels!r}.")
    values = list(levels)
    if not values:
        raise ValueError(f"`{name}` must be a non-empty sequence of numbers, got {levels!r}.")
    out: list[float] = []
    for value in values:
        checked = check(value, f"{name}[{len(out)}]")
        if out and checked <= out[-1]:
            raise ValueError(
                f"`{name}` must be strictly increasing, got {value!r} after {values[len(out) - 1]!r} in {values!r}."
            )
        out.append(checked)
    return out


def coerce(cls: type[T], value: Any, name: str) -> T:
    """``value`` if it is a ``cls`` (a dataclass), else ``cls(**value)`` for a mapping, else raise.

    Lets Python users pass settings as plain dicts, as YAML does.

    Example::

        >>> @dataclasses.dataclass
        ... class Point:
        ...     x: int = 0
        >>> coerce(Point, {"x": 2}, "point")
        Point(x=2)
    """
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = [k for k in value if k not in known]
        if unknown:
            where = f" in `{name}`" if name else ""
            raise ValueError(f"Unknown key {unknown[0]!r}{where}. Accepted keys: {', '.join(known)}.")
        return cls(**value)
    raise ValueError(
        f"{f'`{name}`' if name else 'It'} must be a {cls.__name__} or a mapping of its fields, got {value!r}."
    )


def preview(names: Sequence[str], limit: int = 12) -> str:
    """The first ``limit`` names, quoted and comma-separated, with a count of the rest.

    Example::

        >>> preview(["a", "b", "c"], limit=2)
        "'a', 'b', ... (1 more)"
    """
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
