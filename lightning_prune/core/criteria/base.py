"""The criterion protocol: from the weights, their masks and a level per layer, the connections that survive.

A criterion is an object, so that a rule carries its own settings (Han's rule: which std it scales by)
and a user can plug in a rule of their own, in Python or in YAML by ``class_path``, as Lightning's
``ModelPruning`` takes a ``BasePruningMethod`` and ``torch.ao``'s sparsifiers have ``update_mask``.

Writing one: subclass :class:`Criterion`, give it a ``name`` (and ``level_name``, ``sweep_levels``
if it is meant for sensitivity sweeps), take its default level in ``__init__``, and implement
:meth:`Criterion.select`. :func:`register_criterion` makes it available by name::

    @register_criterion
    class Largest(Criterion):
        '''Keep the ``level`` largest weights of each layer.'''

        name = "largest"
        level_name = "count"

        def __init__(self, count: float | dict[str, float] | None = None, min_remaining: float | None = None):
            super().__init__(count, min_remaining)

        def select(self, weights, keeps, levels, context):
            out = {}
            for name, weight in weights.items():
                k = min(int(levels[name]), weight.numel())
                keep = torch.zeros(weight.numel(), dtype=torch.bool)
                keep[weight.detach().abs().flatten().topk(k).indices] = True
                out[name] = Decision(keep.view_as(weight), None, f"top {k}")
            return out

The pruner intersects every decision with the current mask (masks only shrink), checks its dtype and
shape, applies ``min_remaining`` and refuses to empty a layer, whatever the criterion. Two hooks let a
criterion with a structure keep it: :meth:`Criterion.floor` (how ``min_remaining`` widens a decision;
by default connection by connection) and :meth:`Criterion.check_weights` (parameters it refuses).
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

from torch import Tensor

from lightning_prune.core.collective import LOCAL, Collective
from lightning_prune.core.masks import check_mask
from lightning_prune.core.validation import check_fraction, check_number, check_per_layer

__all__ = [
    "Criterion",
    "Decision",
    "LevelSpec",
    "PruneContext",
    "checked_decisions",
    "get_criterion",
    "register_criterion",
    "registered_criteria",
]

LevelSpec = float | dict[str, float]
"""A level for every layer, or ``{glob pattern: level}`` (exact names win, then the first matching pattern)."""

Weights = Mapping[str, Tensor]
"""``{parameter name: weight}``: what :meth:`Criterion.select` decides on."""
Keeps = Mapping[str, "Tensor | None"]
"""``{parameter name: current mask}`` (``None`` for a parameter never pruned)."""
Levels = Mapping[str, float]
"""``{parameter name: level}``, resolved from a :data:`LevelSpec`."""


class Decision(NamedTuple):
    """A criterion's verdict on one parameter.

    Attributes:
        keep: ``bool`` mask shaped like the parameter, ``True`` = the connection survives.
        threshold: The magnitude threshold it amounts to, if there is one (for the table), else ``None``.
        rule: How the decision was made, for the table (``"1.20 x std"``).
    """

    keep: Tensor
    threshold: float | None
    rule: str


@dataclass(frozen=True)
class PruneContext:
    """What a criterion may read besides the weights.

    Attributes:
        dense_std: For every parameter being pruned, the standard deviation of its weights when it was
            first pruned (now, for one pruned for the first time): a quality then always means the same cut.
        layer_of: ``{parameter name: layer name}`` of the parameters being pruned.
        collective: The processes whose shards make up the weights (FSDP), for statistics of the whole
            tensors (:mod:`lightning_prune.core.collective`); :data:`~lightning_prune.core.collective.LOCAL`
            when each weight is whole. Only a criterion with ``shardable = True`` is given shards.
    """

    dense_std: Mapping[str, float]
    layer_of: Mapping[str, str]
    collective: Collective = LOCAL


class Criterion(ABC):
    """A rule that decides which connections of the selected parameters survive a prune.

    Class attributes a subclass sets:

    - ``name``: its registry name (``"std"``), used in YAML as ``criterion: std`` and in files.
    - ``level_name``: what its level is called in tables and errors (``"quality"``, ``"amount"``).
    - ``per_layer``: whether layers may have different levels (``False``: one level for all, e.g. global).
    - ``sweep_levels``: the levels a sensitivity sweep tries by default (empty: not meant for sweeps).
    - ``level_help``: what a level means, in a few words, for tables and figures.
    - ``shardable``: whether :meth:`select` and :meth:`floor` decide exactly from shards of the weights
      (FSDP), taking every statistic of a whole tensor through ``context.collective``. Pruning sharded
      parameters with a criterion that is not is refused.

    Args:
        level: The default level (a number, ``{pattern: number}``, or the path of a levels file written
            by the sensitivity analysis), used by rounds that give none; ``None``: every round must give one.
        min_remaining: A floor: each layer keeps at least this share of its connections (and one), the
            largest; ``None``: a prune that would empty a layer is an error. Rounds may override it.
    """

    name: ClassVar[str] = ""
    level_name: ClassVar[str] = "level"
    per_layer: ClassVar[bool] = True
    sweep_levels: ClassVar[tuple[float, ...]] = ()
    level_help: ClassVar[str] = "the level"
    shardable: ClassVar[bool] = False

    def __init__(self, level: LevelSpec | str | None = None, min_remaining: float | None = None):
        self.level: LevelSpec | None = None if level is None else self.check_levels(level, self.level_name)
        self.min_remaining = check_fraction(min_remaining, "min_remaining", optional=True)

    def check_level(self, value: Any, name: str) -> float:
        """One level, checked (here: a finite number >= 0); subclasses narrow the range."""
        return check_number(value, name)

    def check_levels(self, value: LevelSpec | str, name: str) -> LevelSpec:
        """A level spec checked: a number, ``{pattern: number}`` (if ``per_layer``), or a levels file's path.

        Raises:
            ValueError: Naming ``name`` and the bad value, or the file and what is wrong with it.
        """
        if isinstance(value, str):
            value = self.load_levels(value)
        if isinstance(value, Mapping) and not self.per_layer:
            raise ValueError(f"Criterion {self.name!r} takes one `{name}` for all layers, not a mapping: {value!r}.")
        return check_per_layer(value, name, self.check_level)

    def load_levels(self, path: str) -> LevelSpec:
        """The levels in a file written by :meth:`~lightning_prune.core.sensitivity.SensitivityResult.write_quality`.

        Raises:
            ValueError: If the file was written for another criterion, or holds no levels of this one.
        """
        from lightning_prune.core.sensitivity import load_quality

        data = load_quality(path)
        written_for = data.get("criterion", "std")
        if written_for != self.name:
            raise ValueError(f"{path!r} holds levels for criterion {written_for!r}, not {self.name!r}.")
        if data.get(self.level_name) is None:
            raise ValueError(f"{path!r} holds no `{self.level_name}` for criterion {self.name!r}.")
        levels: LevelSpec = data[self.level_name]
        return levels

    def gentler(self, level: float, scale: float) -> float:
        """A gentler level, for a round the accuracy guard retries (here: ``level * scale``)."""
        return level * scale

    def check_weights(self, weights: Weights, layer_of: Mapping[str, str]) -> None:  # noqa: B027 (optional hook)
        """Refuse parameters this criterion cannot prune, before anything is pruned (here: none is refused).

        A criterion that needs a shape (:class:`~lightning_prune.core.criteria.nm.NM` needs input sizes that
        are multiples of ``m``) overrides it, and calls it at the start of :meth:`select` too.

        Args:
            weights: ``{parameter name: parameter}`` of the parameters a prune would touch.
            layer_of: ``{parameter name: layer name}``, for the message.

        Raises:
            ValueError: Naming the layer, the parameter and what is wrong with it.
        """

    def floor(
        self,
        weights: Weights,
        keeps: Keeps,
        decided: Mapping[str, Tensor],
        min_remaining: float,
        context: PruneContext,
    ) -> dict[str, Tensor]:
        """The decided masks widened to the floor ``min_remaining``, for a prune that has one.

        Here, connection by connection: each parameter keeps at least ``ceil(min_remaining * numel)``
        (and one) of its connections, the largest still alive
        (:func:`~lightning_prune.core.criteria.magnitude.floor_mask`). A criterion whose masks have a
        structure (whole units, N:M groups) overrides it so that the floor keeps the structure.

        Args:
            weights: ``{parameter name: weight}``, as given to :meth:`select`.
            keeps: ``{parameter name: mask before this prune}`` (``None`` for a parameter never pruned).
            decided: ``{parameter name: mask}``: the decisions, checked and intersected with ``keeps``.
            min_remaining: The floor, a share in ``[0, 1]``.
            context: As given to :meth:`select`.

        Returns:
            A mask for every parameter of ``decided``; the pruner checks them and intersects them with
            ``keeps`` again.

        Example::

            >>> import torch
            >>> from lightning_prune.core.criteria import Fraction
            >>> w = {"w": torch.tensor([0.1, -0.5, 2.0, -3.0])}
            >>> context = PruneContext(dense_std={"w": 1.0}, layer_of={"w": "fc"})
            >>> Fraction().floor(w, {"w": None}, {"w": torch.zeros(4, dtype=torch.bool)}, 0.5, context)
            {'w': tensor([False, False,  True,  True])}
        """
        from lightning_prune.core.criteria.magnitude import floor_mask  # magnitude imports this module

        return {
            name: floor_mask(weights[name], keep, keeps.get(name), min_remaining, context.collective)
            for name, keep in decided.items()
        }

    @abstractmethod
    def select(self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext) -> dict[str, Decision]:
        """Decide which connections survive.

        Args:
            weights: ``{parameter name: weight}`` of the parameters to prune now.
            keeps: ``{parameter name: current mask}`` (``None`` for a parameter never pruned).
            levels: ``{parameter name: level}``, resolved from the level spec.
            context: Statistics a rule may need (:class:`PruneContext`).

        Returns:
            A :class:`Decision` for every parameter of ``weights``.
        """

    def describe(self) -> str:
        """The criterion as one would write it in Python, e.g. ``Std(quality=1.0, std_of='dense')``."""
        return f"{type(self).__name__}({self._settings()})"

    def _settings(self) -> str:
        floor = "" if self.min_remaining is None else f", min_remaining={self.min_remaining!r}"
        return f"{self.level_name}={self.level!r}{floor}"

    def __repr__(self) -> str:
        return self.describe()

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and vars(self) == vars(other)

    __hash__ = None  # type: ignore[assignment]  # settings may be mappings: equal by value, not hashable


def checked_decisions(rule: Criterion, decisions: Any, weights: Mapping[str, Tensor]) -> dict[str, Decision]:
    """``rule``'s decisions, checked: a :class:`Decision` for every parameter, with a bool mask of its shape.

    Raises:
        ValueError: Naming the criterion and the parameter whose decision is missing or malformed.
    """
    if not isinstance(decisions, Mapping):
        raise ValueError(f"Criterion {rule.describe()}.select returned a {type(decisions).__name__}, not a dict.")
    out = {}
    for name, weight in weights.items():
        decision = decisions.get(name)
        if decision is None:
            raise ValueError(f"Criterion {rule.describe()} gave no decision for {name!r}.")
        if not isinstance(decision, Decision):
            raise ValueError(
                f"Criterion {rule.describe()} gave a {type(decision).__name__} for {name!r}; select() must return a "
                f"Decision(keep, threshold, rule) per parameter."
            )
        check_mask(name, decision.keep, weight.shape, f"parameter (criterion {rule.describe()})")
        out[name] = Decision(decision.keep.to(weight.device), decision.threshold, decision.rule)
    return out


_REGISTRY: dict[str, type[Criterion]] = {}


def register_criterion(cls: type[Criterion]) -> type[Criterion]:
    """Class decorator: make a :class:`Criterion` subclass available by its ``name``.

    Raises:
        ValueError: If the class has no ``name`` or another class has it.
    """
    if not isinstance(cls, type) or not issubclass(cls, Criterion) or not cls.name:
        raise ValueError(f"register_criterion takes a Criterion subclass with a `name`, got {cls!r}.")
    known = _REGISTRY.get(cls.name)
    if known is not None and known is not cls:
        raise ValueError(f"Criterion name {cls.name!r} is taken by {known.__module__}.{known.__qualname__}.")
    _REGISTRY[cls.name] = cls
    return cls


def registered_criteria() -> dict[str, type[Criterion]]:
    """``{name: class}`` of every registered criterion.

    Example::

        >>> sorted(registered_criteria())
        ['fraction', 'global', 'nm', 'std', 'structured_fraction', 'structured_global', 'structured_std']
    """
    return dict(_REGISTRY)


def get_criterion(spec: str | Criterion | Mapping[str, Any]) -> Criterion:
    """A criterion object from a name, a class path, a ``{class_path, init_args}`` mapping, or a criterion.

    A registered name (``"std"``) or a dotted class path alone gives an instance with the class's
    default settings; a ``{"class_path": ..., "init_args": {...}}`` mapping (as in YAML) one with those.

    Raises:
        ValueError: If ``spec`` is none of these, naming it and the registered names, or the class cannot be
            built from its ``init_args``.

    Example::

        >>> get_criterion("fraction")
        Fraction(amount=None)
        >>> get_criterion({"class_path": "lightning_prune.Std", "init_args": {"quality": 0.8}})
        Std(quality=0.8, std_of='dense')
    """
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, Mapping) and set(spec) <= {"class_path", "init_args"} and "class_path" in spec:
        init_args = spec.get("init_args") or {}
        if not isinstance(init_args, Mapping):
            raise ValueError(f"`init_args` of criterion {spec['class_path']!r} must be a mapping, got {init_args!r}.")
        return _instantiate(_criterion_class(str(spec["class_path"])), init_args)
    if isinstance(spec, str):
        return _instantiate(_criterion_class(spec), {})
    raise ValueError(
        f"`criterion` must be a registered name ({', '.join(sorted(_REGISTRY))}), the dotted path of a Criterion "
        f"subclass, or a Criterion object, got {spec!r}."
    )


def _instantiate(cls: type[Criterion], init_args: Mapping[str, Any]) -> Criterion:
    try:
        return cls(**init_args)
    except TypeError as err:  # unknown or missing init_args, an abstract class
        raise ValueError(
            f"Criterion {cls.__qualname__} cannot be built from init_args {dict(init_args)!r}: {err}."
        ) from err


def _criterion_class(name: str) -> type[Criterion]:
    if name in _REGISTRY:
        return _REGISTRY[name]
    if "." in name:
        module, _, attr = name.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"`criterion` {name!r} cannot be imported ({err}).") from err
        if isinstance(cls, type) and issubclass(cls, Criterion):
            return cls
    raise ValueError(
        f"`criterion` must be a registered name ({', '.join(sorted(_REGISTRY))}) or the dotted path of a Criterion "
        f"subclass, got {name!r}."
    )
