"""Prune-retrain rounds: what each round prunes and how it retrains, and where rounds start.

A round prunes (some layers, at some quality or amount) and then retrains (some layers, for some
epochs, at a scaled learning rate, with its own regularization). Rounds are written as plain dicts,
so a schedule fits in a YAML file; :func:`build_rounds` checks them and fills in the defaults.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from lightning_prune.core.pruner import CRITERIA, STD_OF, check_fraction, check_quality


@dataclass(frozen=True)
class Round:
    """One prune followed by retraining.

    Attributes:
        epochs: Retraining epochs (``None`` when rounds start at given ``prune_epochs``).
        layers: Glob patterns of the layers this round prunes (``None``: all selected layers).
        criterion: ``"std"``, ``"fraction"`` or ``"global"``.
        quality: Han's quality, a number or ``{pattern: number}`` (criterion ``"std"``).
        amount: Target share pruned (criteria ``"fraction"`` and ``"global"``).
        std_of: ``"dense"`` or ``"surviving"``.
        min_remaining: Floor share of connections kept per layer, or ``None`` (error instead).
        train_only: Glob patterns of the modules that retrain; the rest is frozen (``None``: all train).
        lr_scale: Factor on the learning rates while this round retrains.
        weight_decay: L2 weight decay while retraining (``None``: the optimizer's own).
        l1: L1 coefficient while retraining (gradient term ``l1 * sign(w)`` on the pruned layers).
    """

    epochs: int | None = None
    layers: list[str] | None = None
    criterion: str = "std"
    quality: float | dict[str, float] = 1.0
    amount: float | dict[str, float] | None = None
    std_of: str = "dense"
    min_remaining: float | None = None
    train_only: list[str] | None = None
    lr_scale: float = 1.0
    weight_decay: float | None = None
    l1: float = 0.0

    def prune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`~lightning_prune.core.pruner.MagnitudePruner.prune`."""
        return {
            "criterion": self.criterion,
            "quality": self.quality,
            "amount": self.amount,
            "std_of": self.std_of,
            "min_remaining": self.min_remaining,
            "layers": self.layers,
        }


ROUND_KEYS: tuple[str, ...] = tuple(f.name for f in fields(Round))
"""Keys a round dict may hold."""


def _check_patterns(value: Any, name: str) -> None:
    if value is not None and (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not value
        or not all(isinstance(p, str) and p for p in value)
    ):
        raise ValueError(f"{name} must be None or a non-empty list of glob patterns, got {value!r}.")


def check_number(value: Any, name: str, *, positive: bool = False, optional: bool = False) -> None:
    """Raise unless ``value`` is a finite number ``>= 0`` (``> 0`` if ``positive``; ``None`` allowed if ``optional``).

    Example::

        >>> check_number(0.1, "`lr_scale`", positive=True)
    """
    if optional and value is None:
        return
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be a finite number {bound}{' or None' if optional else ''}, got {value!r}.")


def check_round(settings: Mapping[str, Any], where: str = "") -> None:
    """Validate the values of a round's settings (any subset of :data:`ROUND_KEYS`).

    Args:
        settings: ``{key: value}``.
        where: Prefix naming the round in messages, e.g. ``"rounds[1]."``.

    Raises:
        ValueError: On an unknown key or a bad value, naming both and what is accepted.

    Example::

        >>> check_round({"quality": 1.2, "lr_scale": 0.1})
        >>> check_round({"lr": 0.1}, "rounds[0].")
        Traceback (most recent call last):
        ...
        ValueError: Unknown key 'rounds[0].lr'. Accepted keys: epochs, layers, criterion, ...
    """
    unknown = [k for k in settings if k not in ROUND_KEYS]
    if unknown:
        raise ValueError(f"Unknown key {where + unknown[0]!r}. Accepted keys: {', '.join(ROUND_KEYS)}.")
    s = settings
    if (
        "epochs" in s
        and s["epochs"] is not None
        and (isinstance(s["epochs"], bool) or not isinstance(s["epochs"], int) or s["epochs"] < 1)
    ):
        raise ValueError(f"`{where}epochs` must be an integer >= 1, got {s['epochs']!r}.")
    for key in ("layers", "train_only"):
        if key in s:
            _check_patterns(s[key], f"`{where}{key}`")
    if "criterion" in s and s["criterion"] not in CRITERIA:
        raise ValueError(f"`{where}criterion` must be one of {CRITERIA}, got {s['criterion']!r}.")
    if "std_of" in s and s["std_of"] not in STD_OF:
        raise ValueError(f"`{where}std_of` must be one of {STD_OF}, got {s['std_of']!r}.")
    if "quality" in s:
        check_quality(s["quality"])
    if s.get("amount") is not None:
        amount = s["amount"]
        for key, value in amount.items() if isinstance(amount, Mapping) else [("", amount)]:
            check_fraction(value, f"{where}amount[{key!r}]" if key else f"{where}amount")
    if s.get("min_remaining") is not None:
        check_fraction(s["min_remaining"], f"{where}min_remaining")
    if "lr_scale" in s:
        check_number(s["lr_scale"], f"`{where}lr_scale`", positive=True)
    if "weight_decay" in s:
        check_number(s["weight_decay"], f"`{where}weight_decay`", optional=True)
    if "l1" in s:
        check_number(s["l1"], f"`{where}l1`")


def build_rounds(rounds: Sequence[Mapping[str, Any]] | None, count: int, defaults: Mapping[str, Any]) -> list[Round]:
    """Turn round dicts into :class:`Round` objects, each key defaulting to ``defaults``.

    Args:
        rounds: The user's round dicts, or ``None`` for ``count`` rounds of defaults.
        count: Number of rounds when ``rounds`` is ``None``.
        defaults: Values for keys a round leaves out (a subset of :data:`ROUND_KEYS`).

    Returns:
        One :class:`Round` per entry.

    Raises:
        ValueError: On an empty list, a non-dict entry, an unknown key or a bad value; a round
            with criterion ``"fraction"``/``"global"`` and no ``amount``.

    Example::

        >>> [r.quality for r in build_rounds([{"quality": 0.8}, {"quality": 1.2}], 0, {"lr_scale": 0.1})]
        [0.8, 1.2]
    """
    if rounds is None:
        entries: list[Mapping[str, Any]] = [{}] * count
    else:
        if isinstance(rounds, (str, bytes, Mapping)) or not isinstance(rounds, Sequence) or not rounds:
            raise ValueError(f"`rounds` must be a non-empty list of dicts (one per round), got {rounds!r}.")
        entries = list(rounds)
    built = []
    for index, entry in enumerate(entries):
        where = f"rounds[{index}]."
        if not isinstance(entry, Mapping):
            raise ValueError(f"`rounds[{index}]` must be a dict of round settings, got {entry!r}.")
        check_round(entry, where)
        merged = {**defaults, **entry}
        if merged.get("criterion", "std") != "std" and merged.get("amount") is None:
            raise ValueError(f"`{where}criterion` is {merged['criterion']!r}, which needs `amount`.")
        if merged.get("criterion", "std") == "std" and "amount" in entry and entry["amount"] is not None:
            raise ValueError(f"`{where}amount` is for criterion 'fraction' or 'global'; with 'std' use `quality`.")
        built.append(Round(**merged))
    return built


def start_epochs(rounds: Sequence[Round], prune_epochs: Sequence[int] | None, max_epochs: int | None) -> list[int]:
    """The epoch at which each round starts when all rounds run inside one ``fit``.

    With ``prune_epochs``, round ``k`` starts at ``prune_epochs[k]`` and retrains until the next one
    starts. Without, every round needs ``epochs`` and the rounds fill the end of training: the last
    round ends at ``max_epochs``, and what precedes the first round is dense training.

    Raises:
        ValueError: If counts disagree, epochs are missing, or the rounds do not fit ``max_epochs``.

    Example::

        >>> start_epochs(build_rounds([{"epochs": 2}, {"epochs": 3}], 0, {}), None, max_epochs=10)
        [5, 7]
    """
    if prune_epochs is not None:
        if len(prune_epochs) != len(rounds):
            raise ValueError(
                f"`prune_epochs` has {len(prune_epochs)} entries but there are {len(rounds)} rounds; "
                f"give one start epoch per round, or drop `prune_epochs` and give each round `epochs`."
            )
        if any(r.epochs is not None for r in rounds):
            raise ValueError("Give either `prune_epochs` or per-round `epochs`, not both.")
        return list(prune_epochs)
    missing = [i for i, r in enumerate(rounds) if r.epochs is None]
    if missing:
        raise ValueError(f"`rounds[{missing[0]}]` has no `epochs`; without `prune_epochs` every round needs them.")
    total = sum(r.epochs or 0 for r in rounds)
    if max_epochs is None or max_epochs < 0:
        raise ValueError(
            f"Rounds with `epochs` fill the end of training, which needs a finite `Trainer(max_epochs=...)` "
            f"(got {max_epochs!r})."
        )
    if total > max_epochs:
        raise ValueError(
            f"The rounds retrain for {total} epochs in all, more than max_epochs={max_epochs}. "
            f"Raise max_epochs to at least {total} (plus the dense epochs) or shorten the rounds."
        )
    starts = [max_epochs - total]
    for r in rounds[:-1]:
        starts.append(starts[-1] + (r.epochs or 0))
    return starts
