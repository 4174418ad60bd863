"""Prune-retrain rounds, and the one object that knows where a run is in them.

A :class:`Round` prunes (some layers, with a criterion at a level) and then retrains (some layers,
for some epochs, at a scaled learning rate, with its own regularization). Fields a round leaves out
come from the callback's criterion and retraining settings. The :class:`Schedule` owns the state of
a run: which rounds are done, which were skipped (a retry took their epochs), the retry scale of each
round, whether the accuracy guard stopped the schedule, its decisions, and which rounds are due at an
epoch; it has its own ``state_dict``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from lightning_prune.core.criteria import Criterion, LevelSpec, get_criterion
from lightning_prune.core.settings import Retraining
from lightning_prune.core.validation import check_fraction, check_int, check_number, check_patterns, coerce

__all__ = ["Round", "Schedule", "check_prune_epochs", "start_epochs"]


@dataclass(frozen=True)
class Round:
    """One prune followed by retraining; a field left ``None`` takes the callback's value.

    Attributes:
        level: The criterion's level for this prune (Han's quality, a share pruned, ...): a number,
            ``{pattern: number}`` per layer, or the path of a levels file; ``None``: the default (the
            sensitivity analysis's choice, for a round of the callback's kind of criterion; else the
            criterion's own).
        epochs: Retraining epochs (``None`` when rounds start at given ``prune_epochs``).
        layers: Glob patterns of the layers this round prunes (``None``: all selected layers).
        criterion: The rule of this prune, a registered name or a criterion object (``None``: the callback's).
        min_remaining: Floor share of connections kept per layer (``None``: the floor of the round's
            criterion, else of the callback's).
        train_only: Glob patterns of the modules that retrain; the rest is frozen.
        lr_scale: Factor on the learning rates while this round retrains.
        weight_decay: L2 weight decay while retraining.
        l1: L1 coefficient while retraining.

    Example::

        >>> Round(level={"fc1": 1.2, "*": 0.8}, epochs=4, lr_scale=0.1).epochs
        4
    """

    level: LevelSpec | str | None = None
    epochs: int | None = None
    layers: list[str] | None = None
    criterion: str | Criterion | None = None
    min_remaining: float | None = None
    train_only: list[str] | None = None
    lr_scale: float | None = None
    weight_decay: float | None = None
    l1: float | None = None

    def __post_init__(self) -> None:
        check_int(self.epochs, "epochs", minimum=1, optional=True)
        check_patterns(self.layers, "layers")
        check_patterns(self.train_only, "train_only")
        check_fraction(self.min_remaining, "min_remaining", optional=True)
        check_number(self.lr_scale, "lr_scale", positive=True, optional=True)
        check_number(self.weight_decay, "weight_decay", optional=True)
        check_number(self.l1, "l1", optional=True)
        if self.criterion is not None:
            rule = get_criterion(self.criterion)
            object.__setattr__(self, "_own_level", _gives_level(self.criterion, rule))
            object.__setattr__(self, "criterion", rule)
            if self.level is not None:
                object.__setattr__(self, "level", rule.check_levels(self.level, "level"))

    @property
    def rule(self) -> Criterion:
        """The criterion of a resolved round (see :meth:`resolve`)."""
        if not isinstance(self.criterion, Criterion):
            raise RuntimeError("The round is not resolved: call resolve() first.")
        return self.criterion

    def resolve(self, criterion: Criterion, retrain: Retraining, default_level: LevelSpec | None) -> Round:
        """This round with every field filled: the criterion, its level, its floor, the retraining settings.

        The level is the round's ``level``; else the level of the round's own criterion, if it was given
        with one (an object, or a mapping whose ``init_args`` hold it; a criterion given by name brings
        none); else, for a round whose rule is of the callback's kind, ``default_level`` (the sensitivity
        analysis's choice) or ``criterion``'s level. The floor is the round's ``min_remaining``, else its
        own criterion's, else ``criterion``'s.

        Raises:
            ValueError: If the level does not suit the criterion, or there is no level at all.
        """
        rule = self.criterion if isinstance(self.criterion, Criterion) else criterion
        same_kind = type(rule) is type(criterion)
        own = rule.level if getattr(self, "_own_level", False) else None
        levels = (self.level, own, default_level if same_kind else None, criterion.level if same_kind else None)
        level = next((v for v in (*levels, rule.level) if v is not None), None)
        floors = (self.min_remaining, rule.min_remaining, criterion.min_remaining)
        floor = next((f for f in floors if f is not None), None)
        if level is None:
            raise ValueError(
                f"`level` is missing: criterion {rule.describe()} has no {rule.level_name} of its own; give it one "
                f"({type(rule).__name__}({rule.level_name}=...)) or give the round a `level`."
            )
        return dataclasses.replace(
            self,
            criterion=rule,
            level=rule.check_levels(level, "level"),
            min_remaining=floor,
            train_only=self.train_only if self.train_only is not None else retrain.train_only,
            lr_scale=self.lr_scale if self.lr_scale is not None else retrain.lr_scale,
            weight_decay=self.weight_decay if self.weight_decay is not None else retrain.weight_decay,
            l1=self.l1 if self.l1 is not None else retrain.l1,
        )

    def gentler(self, scale: float) -> Round:
        """This (resolved) round with its level made gentler by ``scale`` (the criterion says how)."""
        if scale == 1.0:
            return self
        level = self.level
        if isinstance(level, Mapping):
            return dataclasses.replace(self, level={k: self.rule.gentler(v, scale) for k, v in level.items()})
        return dataclasses.replace(self, level=self.rule.gentler(float(level), scale))  # type: ignore[arg-type]

    def prune_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :meth:`~lightning_prune.core.pruner.Pruner.prune` (a resolved round)."""
        return {"criterion": self.rule, "level": self.level, "min_remaining": self.min_remaining, "layers": self.layers}


def check_prune_epochs(prune_epochs: Any) -> list[int] | None:
    """``prune_epochs`` as a list: strictly increasing integers ``>= 0``, or ``None``.

    Example::

        >>> check_prune_epochs([2, 5])
        [2, 5]
    """
    if prune_epochs is None:
        return None
    if isinstance(prune_epochs, (str, bytes)) or not isinstance(prune_epochs, Sequence) or not prune_epochs:
        raise ValueError(f"`prune_epochs` must be a non-empty list of epoch indices or None, got {prune_epochs!r}.")
    epochs = [check_int(e, f"prune_epochs[{i}]") for i, e in enumerate(prune_epochs)]
    if any(b <= a for a, b in pairwise(epochs)):
        raise ValueError(f"`prune_epochs` must be strictly increasing (sorted, no duplicates), got {epochs}.")
    return epochs


def start_epochs(rounds: Sequence[Round], prune_epochs: Sequence[int] | None, max_epochs: int | None) -> list[int]:
    """The epoch at which each round starts when all rounds run inside one ``fit``.

    With ``prune_epochs``, round ``k`` starts at ``prune_epochs[k]`` and retrains until the next one
    starts. Without, every round needs ``epochs`` and the rounds fill the end of training: the last
    round ends at ``max_epochs``, and what precedes the first round is dense training.

    Raises:
        ValueError: If counts disagree, epochs are missing, or the rounds do not fit ``max_epochs``.

    Example::

        >>> start_epochs([Round(epochs=2), Round(epochs=3)], None, max_epochs=10)
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


class Schedule:
    """The rounds of a run and where the run is in them: due, done, skipped, retried, stopped.

    Args:
        rounds: The rounds as given (``Round`` objects or dicts of their fields); ``None``: one round per
            prune epoch (one round if there are none), every field from the defaults.
        prune_epochs: Epochs (0-based) at whose start the rounds prune, or ``None``.
        criterion: The default criterion.
        retrain: The default retraining settings.

    Raises:
        ValueError: On a bad round (named ``rounds[k]``), or rounds that disagree with ``prune_epochs``.

    Example::

        >>> from lightning_prune.core.criteria import Std
        >>> schedule = Schedule([{"level": 0.8}, {"level": 1.2}], [2, 4], Std(), Retraining(lr_scale=0.1))
        >>> schedule.plan_fit(max_epochs=6)
        []
        >>> schedule.due(2), schedule.round(0).level, schedule.round(0).lr_scale
        ([0], 0.8, 0.1)
    """

    def __init__(
        self,
        rounds: Sequence[Round | Mapping[str, Any]] | None,
        prune_epochs: Sequence[int] | None,
        criterion: Criterion,
        retrain: Retraining,
    ):
        self.prune_epochs = check_prune_epochs(prune_epochs)
        if rounds is not None and (
            isinstance(rounds, (str, bytes, Mapping)) or not isinstance(rounds, Sequence) or not rounds
        ):
            raise ValueError(f"`rounds` must be a non-empty list of rounds, got {rounds!r}.")
        count = len(self.prune_epochs or [0])
        self.specs = [_round(r, f"rounds[{k}]") for k, r in enumerate(rounds)] if rounds else [Round()] * count
        self.criterion, self.retrain = criterion, retrain
        self.default_level: LevelSpec | None = None
        self.rounds = self._resolve()
        if self.prune_epochs is not None:
            start_epochs(self.rounds, self.prune_epochs, None)
        self.done: list[int] = []
        self.skipped: list[int] = []
        self.scales: dict[int, float] = {}
        self.stopped = False
        self.decisions: list[dict[str, Any]] = []
        self._starts: dict[int, list[int]] = {}
        self._single: int | bool | None = False  # False: all rounds in one fit; None: a dense fit; k: round k

    def _resolve(self) -> list[Round]:
        out = []
        for k, spec in enumerate(self.specs):
            try:
                out.append(spec.resolve(self.criterion, self.retrain, self.default_level))
            except ValueError as err:
                raise ValueError(f"rounds[{k}]: {err}") from err
        return out

    def set_default_level(self, level: LevelSpec | None) -> None:
        """Rounds without a level of their own take ``level`` (the sensitivity analysis's choice).

        Raises:
            ValueError: If a round cannot take ``level`` (named ``rounds[k]``); the schedule is then unchanged.
        """
        previous, self.default_level = self.default_level, level
        try:
            self.rounds = self._resolve()
        except ValueError:
            self.default_level = previous
            raise

    def round(self, k: int) -> Round:
        """Round ``k`` as it runs: gentler than configured if the guard retried it."""
        return self.rounds[k].gentler(self.scales.get(k, 1.0))

    @property
    def in_one_fit(self) -> bool:
        """Whether all rounds run inside this fit (``False``: this fit runs one round, or is dense)."""
        return self._single is False

    @property
    def active(self) -> Round | None:
        """The round whose retraining settings are in force (``None`` during dense training)."""
        if not self.in_one_fit:
            return None if self._single is None else self.round(self._single)
        return self.round(self.done[-1]) if self.done else None

    def plan_single(self, index: int | None) -> None:
        """The next fit runs round ``index`` from its first epoch (``None``: a dense fit)."""
        if index is not None and not 0 <= index < len(self.rounds):
            raise ValueError(f"Round index {index} is out of range: there are {len(self.rounds)} rounds.")
        self._single = index
        self._starts = {} if index is None else {0: [index]}

    def plan_fit(self, max_epochs: int | None) -> list[int]:
        """Plan a fit that runs every round at its start epoch; returns the start epochs beyond ``max_epochs``.

        Raises:
            ValueError: If the rounds do not fit (see :func:`start_epochs`), or there is nothing to go by.
        """
        self._single = False
        if self.prune_epochs is None and len(self.rounds) == 1 and self.rounds[0].epochs is None:
            if max_epochs is None or max_epochs < 2:
                raise ValueError(
                    f"Without `prune_epochs` or rounds with `epochs`, the callback prunes once at max_epochs // 2, "
                    f"which needs a finite `Trainer(max_epochs=...)` >= 2 (got {max_epochs!r})."
                )
            starts = [max_epochs // 2]
        else:
            starts = start_epochs(self.rounds, self.prune_epochs, max_epochs)
        self._starts = {}
        for k, epoch in enumerate(starts):
            self._starts.setdefault(epoch, []).append(k)
        return [e for e in starts if max_epochs is not None and 0 <= max_epochs <= e]

    def due(self, epoch: int) -> list[int]:
        """Rounds to run at the start of ``epoch``: those starting by then that are not done, skipped or stopped."""
        if self.stopped:
            return []
        due = dict.fromkeys(k for start, ks in sorted(self._starts.items()) if start <= epoch for k in ks)
        return [k for k in due if k not in self.done and k not in self.skipped]

    def start_of(self, k: int) -> int | None:
        """The epoch round ``k`` starts at in this fit."""
        return next((start for start, ks in self._starts.items() if k in ks), None)

    def tries(self, k: int) -> int:
        """How many times round ``k`` was rolled back."""
        return sum(1 for d in self.decisions if d["round"] == k and d["decision"] == "rolled back")

    def judged(self, k: int) -> bool:
        """Whether the guard kept round ``k``."""
        return any(d["round"] == k and d["decision"] == "kept" for d in self.decisions)

    def record(self, decision: str, k: int, reason: str) -> None:
        """Log a guard decision on round ``k`` (``"kept"`` or ``"rolled back"``)."""
        self.decisions.append({"round": k, "decision": decision, "reason": reason})

    def mark_done(self, k: int) -> None:
        """Round ``k`` pruned."""
        self.done.append(k)

    def restore_done(self, done: Sequence[int]) -> None:
        """The rounds done go back to ``done`` (a guard rollback); decisions and retry scales stay."""
        self.done = [int(k) for k in done]

    def stop(self) -> None:
        """No round runs any more (the guard stopped the schedule)."""
        self.stopped = True

    def end_fit(self) -> None:
        """Forget this fit's plan: the next fit plans again (all rounds in it, unless told otherwise)."""
        self._single = False
        self._starts = {}

    def retry(self, k: int, factor: float, in_place_of: int | None = None) -> None:
        """Round ``k`` runs again, gentler by ``factor``; within one fit in the epochs of round ``in_place_of``.

        Round ``k`` is due again once it is no longer done (the guard's rollback restores the rounds done
        before it); round ``in_place_of`` is dropped.
        """
        self.scales[k] = self.scales.get(k, 1.0) * factor
        if in_place_of is not None:
            self.skipped.append(in_place_of)

    def state_dict(self) -> dict[str, Any]:
        """Plain values: rounds done and skipped, retry scales, stop flag, decisions, the default level."""
        return {
            "done": list(self.done),
            "skipped": list(self.skipped),
            "scales": {str(k): v for k, v in self.scales.items()},
            "stopped": self.stopped,
            "decisions": [dict(d) for d in self.decisions],
            "default_level": self.default_level,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuses more rounds done than this schedule has (and then changes nothing)."""
        done = [int(k) for k in state.get("done", [])]
        if len(set(done)) != len(done) or any(not 0 <= k < len(self.rounds) for k in done):
            raise ValueError(f"The checkpoint has rounds {done} done, but this callback has {len(self.rounds)} rounds.")
        if state.get("default_level") is not None:
            self.set_default_level(state["default_level"])
        self.done = done
        self.skipped = [int(k) for k in state.get("skipped", [])]
        self.scales = {int(k): float(v) for k, v in state.get("scales", {}).items()}
        self.stopped = bool(state.get("stopped", False))
        self.decisions = [dict(d) for d in state.get("decisions", [])]


def _gives_level(spec: Any, rule: Criterion) -> bool:
    """Whether a round's criterion, as the user wrote it, carries a level of its own (not just its class's default)."""
    if isinstance(spec, str):
        return False
    if isinstance(spec, Mapping):
        return rule.level_name in (spec.get("init_args") or {})
    return True


def _round(value: Round | Mapping[str, Any], where: str) -> Round:
    if not isinstance(value, (Round, Mapping)):
        raise ValueError(f"`{where}` must be a Round or a mapping of its fields, got {value!r}.")
    try:
        return coerce(Round, value, "")
    except (ValueError, TypeError) as err:
        raise ValueError(f"{where}: {err}") from err
