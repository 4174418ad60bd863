"""Structured criteria: whole output units (neurons, conv filters) pruned by the norm of their weights.

A *unit* is an index along dimension 0 of a weight: a row of a ``Linear`` weight (an output neuron),
a filter of a ``Conv1d/2d/3d`` weight (an output channel). A structured criterion prunes a unit as a
whole: its row of the mask is all ``False``, so the unit has no incoming connection left, and
:func:`~lightning_prune.core.structure.remove_dead_units` removes it (folding its constant output into
the next layer's bias): the model becomes smaller dense layers, faster at every batch size, where
sparse kernels only pay off at large batches.

A unit's *size* is the norm of its surviving weights per connection, over its whole fan-in (pruned
connections count as zero):

- ``norm="l2"`` (default): ``||w_u||_2 / sqrt(fan_in)``, the root mean square of its weights;
- ``norm="l1"``: ``||w_u||_1 / fan_in``, the mean magnitude of its weights.

Dividing by the fan-in changes no ranking within a layer; it puts a unit's size on the scale of the
layer's single weights, so that Han's ``quality x std`` rule reads for units as it does for
connections, and sizes compare across layers for the global rule:

- :class:`StructuredStd` (``"structured_std"``): keep a unit whose size exceeds ``quality x std(W)``
  (the std of the layer's weights when first pruned, as for :class:`~lightning_prune.core.criteria.Std`);
- :class:`StructuredFraction` (``"structured_fraction"``): prune the smallest ``amount`` of each
  layer's units, counting units pruned before;
- :class:`StructuredGlobal` (``"structured_global"``): prune the smallest ``amount`` of all selected
  units together, each size divided by its layer's std (one quality for all layers).

Units pruned before count as pruned (masks only shrink; a unit with no live connection is pruned); a
unit that lost some connections to an earlier, unstructured round is measured by the ones it kept.
A selected bias (``prune_bias=True``) is pruned with its units: its entry ``i`` goes with unit ``i``.
The floor ``min_remaining`` is a share of *units* (:meth:`StructuredCriterion.floor`): each layer keeps
at least ``ceil(min_remaining x units)`` units (and one), the largest, whole.

Never prune the units of the model's output layer with these rules: they are its classes. Select
the hidden layers (``layers=["conv1", "conv2", "fc1"]``). For ``ConvTranspose`` weights dimension 0
is the input channels: these rules are meant for ``Linear`` and ``Conv`` layers.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor

from lightning_prune.core.criteria.base import (
    Criterion,
    Decision,
    Keeps,
    Levels,
    LevelSpec,
    PruneContext,
    Weights,
    register_criterion,
)
from lightning_prune.core.criteria.magnitude import (
    STD_OF,
    ShareCriterion,
    StdOf,
    floor_count,
    global_keep,
    keep_share,
    keep_top,
    largest_pruned,
    rule_std,
)
from lightning_prune.core.validation import check_choice

__all__ = [
    "NORMS",
    "Norm",
    "StructuredCriterion",
    "StructuredFraction",
    "StructuredGlobal",
    "StructuredStd",
    "alive_units",
    "structured_fraction_mask",
    "structured_global_masks",
    "structured_std_mask",
    "unit_floor",
    "unit_mask",
    "unit_sizes",
]

Norm = Literal["l2", "l1"]
NORMS: tuple[str, ...] = ("l2", "l1")


def alive_units(weight: Tensor, keep: Tensor | None) -> Tensor:
    """Per output unit (dimension 0), whether any of its connections is alive in ``keep`` (all: ``None``).

    Example::

        >>> alive_units(torch.zeros(2, 3), torch.tensor([[False, True, False], [False, False, False]]))
        tensor([ True, False])
    """
    if keep is None:
        return torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
    return keep.reshape(keep.shape[0], -1).any(1)


def unit_sizes(weight: Tensor, keep: Tensor | None = None, norm: Norm = "l2") -> Tensor:
    """Per output unit, the norm of its surviving weights per connection; ``-1`` for a unit with none alive.

    ``"l2"``: ``||w_u||_2 / sqrt(fan_in)`` (the RMS of its weights); ``"l1"``: ``||w_u||_1 / fan_in``
    (their mean magnitude); pruned connections count as zero. ``weight`` has two or more dimensions.

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
        >>> unit_sizes(w)
        tensor([3.5355, 0.7071])
        >>> unit_sizes(w, torch.tensor([[True, False], [False, False]]), norm="l1")
        tensor([ 1.5000, -1.0000])
    """
    values = weight.detach().float()
    if keep is not None:
        values = values.masked_fill(~keep, 0.0)
    flat = values.flatten(1)
    fan_in = flat.shape[1]
    sizes = flat.norm(dim=1) / math.sqrt(fan_in) if norm == "l2" else flat.abs().sum(1) / fan_in
    return sizes.masked_fill(~alive_units(weight, keep), -1.0)


def unit_mask(units: Tensor, shape: torch.Size | tuple[int, ...], keep: Tensor | None) -> Tensor:
    """The mask of a parameter of ``shape`` whose units ``units`` survive: their rows of ``keep``, the others all False.

    Works for a weight (a unit is a row, a filter) and for a bias (a unit is an entry).

    Example::

        >>> unit_mask(torch.tensor([True, False]), (2, 3), None)
        tensor([[ True,  True,  True],
                [False, False, False]])
    """
    new = units.view(-1, *([1] * (len(shape) - 1))).expand(*shape).clone()
    return new if keep is None else new & keep


def structured_std_mask(
    weight: Tensor, quality: float, std: float, keep: Tensor | None = None, norm: Norm = "l2"
) -> tuple[Tensor, float]:
    """Han's rule on units: keep the units whose size (:func:`unit_sizes`) exceeds ``quality * std``.

    Returns:
        The new mask and the threshold ``quality * std`` (a size per connection).

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-2.0, 2.0]])
        >>> structured_std_mask(w, quality=1.0, std=1.0)
        (tensor([[ True,  True],
                [False, False],
                [ True,  True]]), 1.0)
    """
    threshold = quality * std
    return unit_mask(unit_sizes(weight, keep, norm) > threshold, weight.shape, keep), threshold


def structured_fraction_mask(
    weight: Tensor, amount: float, keep: Tensor | None = None, norm: Norm = "l2"
) -> tuple[Tensor, float]:
    """Prune the smallest units so that ``round(amount * units)`` of the layer's units are pruned (earlier ones count).

    Returns:
        The new mask and its threshold: the largest unit size pruned (0 when none is).

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-2.0, 2.0], [0.5, 0.5]])
        >>> structured_fraction_mask(w, amount=0.5)[0].all(1)
        tensor([ True, False,  True, False])
    """
    sizes = unit_sizes(weight, keep, norm)
    units = keep_share(sizes, amount)
    return unit_mask(units, weight.shape, keep), largest_pruned(sizes, units)


def structured_global_masks(
    weights: Mapping[str, Tensor],
    amount: float,
    stds: Mapping[str, float],
    keeps: Mapping[str, Tensor | None] | None = None,
    norm: Norm = "l2",
) -> tuple[dict[str, Tensor], float]:
    """Prune ``amount`` of the units of all ``weights`` together, ranked by size over their layer's std.

    Args:
        weights: ``{name: weight}`` of the layers pruned together.
        amount: Target share of all their units pruned, in ``[0, 1]``, counting units pruned before.
        stds: ``{name: std}`` each layer's sizes are divided by (a std of 0 leaves them as they are).
        keeps: Current masks by name; layers absent from it were never pruned.
        norm: ``"l2"`` or ``"l1"`` (:func:`unit_sizes`).

    Returns:
        The new masks by name and the common cut: the largest ``size / std`` pruned (a quality).

    Example::

        >>> a = torch.tensor([[1.0, 1.0], [4.0, 4.0]])
        >>> b = torch.tensor([[2.0, 2.0], [3.0, 3.0]])
        >>> masks, quality = structured_global_masks({"a": a, "b": b}, 0.5, {"a": 1.0, "b": 1.0})
        >>> masks["a"].all(1), masks["b"].all(1), quality
        (tensor([False,  True]), tensor([False,  True]), 2.0)
    """
    keeps = keeps or {}
    ratios = {}
    for name, weight in weights.items():
        sizes = unit_sizes(weight, keeps.get(name), norm)
        ratios[name] = torch.where(sizes >= 0, sizes / stds[name], sizes) if stds[name] > 0 else sizes
    units, quality = global_keep(ratios, amount)
    return {name: unit_mask(units[name], w.shape, keeps.get(name)) for name, w in weights.items()}, quality


def unit_floor(weight: Tensor, new: Tensor, keep: Tensor | None, min_remaining: float, norm: Norm = "l2") -> Tensor:
    """Widen ``new`` so that at least ``ceil(min_remaining * units)`` (and one) units survive, whole.

    The units brought back are the largest (:func:`unit_sizes`) still alive in ``keep``, with their rows
    of ``keep``; ``new`` is returned as it is if it keeps enough units.

    Example::

        >>> w = torch.tensor([[3.0, 4.0], [1.0, 0.0], [-2.0, 2.0]])
        >>> unit_floor(w, torch.zeros(3, 2, dtype=torch.bool), None, 0.5).all(1)
        tensor([ True, False,  True])
    """
    sizes = unit_sizes(weight, keep, norm)
    n_min = floor_count(sizes.numel(), int((sizes >= 0).sum()), min_remaining)
    kept = alive_units(weight, new)
    if int(kept.sum()) >= n_min:
        return new
    return unit_mask(kept | keep_top(sizes, n_min), weight.shape, keep)


class StructuredCriterion(Criterion):
    """Shared by the structured criteria: unit sizes by ``norm``, biases pruned with their units, a floor of units.

    A subclass implements :meth:`select_units`, the decisions on the weights (two or more dimensions);
    :meth:`select` adds the biases, and :meth:`floor` keeps whole units.

    Args:
        level: The default level (see :class:`~lightning_prune.core.criteria.Criterion`).
        min_remaining: Floor share of *units* each layer keeps (and one), the largest, whole.
        norm: ``"l2"`` (a unit's RMS weight) or ``"l1"`` (its mean magnitude), see :func:`unit_sizes`.
    """

    def __init__(self, level: LevelSpec | str | None, min_remaining: float | None, norm: Norm):
        super().__init__(level, min_remaining)
        self.norm = check_choice(norm, "norm", NORMS)

    @abstractmethod
    def select_units(
        self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext
    ) -> dict[str, Decision]:
        """The decisions on ``weights``, all of two or more dimensions: whole units kept or pruned."""

    def select(self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext) -> dict[str, Decision]:
        """Whole units of each weight (:meth:`select_units`); each selected bias follows its layer's units.

        Raises:
            ValueError: For a bias pruned without its layer's weight, or not one entry per unit.
        """
        matrices = {name: w for name, w in weights.items() if w.dim() >= 2}
        decided = self.select_units(matrices, keeps, levels, context)
        out = {}
        for name, param in weights.items():
            if name in matrices:
                out[name] = decided[name]
                continue
            weight = self._weight_of(name, param, matrices, context)
            units = alive_units(matrices[weight], decided[weight].keep)
            out[name] = Decision(unit_mask(units, param.shape, keeps.get(name)), None, f"with the units of {weight}")
        return out

    def floor(
        self,
        weights: Weights,
        keeps: Keeps,
        decided: Mapping[str, Tensor],
        min_remaining: float,
        context: PruneContext,
    ) -> dict[str, Tensor]:
        """Each layer keeps at least ``ceil(min_remaining * units)`` units (and one), whole (:func:`unit_floor`).

        A bias keeps the entries of its layer's surviving units.
        """
        matrices = {name: w for name, w in weights.items() if w.dim() >= 2}
        out = {
            name: unit_floor(weight, decided[name], keeps.get(name), min_remaining, self.norm)
            for name, weight in matrices.items()
        }
        for name, param in weights.items():
            if name not in matrices:
                weight = self._weight_of(name, param, matrices, context)
                out[name] = unit_mask(alive_units(matrices[weight], out[weight]), param.shape, keeps.get(name))
        return out

    def _weight_of(self, name: str, bias: Tensor, matrices: Weights, context: PruneContext) -> str:
        """The weight whose units the 1-D parameter ``name`` belongs to.

        The one named alike (``fc.bias`` -> ``fc.weight``), else the only weight of the same layer.
        """
        layer = context.layer_of.get(name)
        alike = name.replace("bias", "weight")
        found = [alike] if alike in matrices else [n for n in matrices if context.layer_of.get(n) == layer]
        if len(found) != 1:
            what = "that layer's weight is not pruned in the same prune" if not found else f"it has {len(found)}"
            raise ValueError(
                f"Criterion {self.describe()} prunes {name!r} with the units of its layer's weight, but {what} "
                f"(layer {layer!r})."
            )
        units = matrices[found[0]].shape[0]
        if bias.dim() != 1 or bias.numel() != units:
            raise ValueError(
                f"Criterion {self.describe()} prunes {name!r} (shape {list(bias.shape)}) with the units of "
                f"{found[0]!r}, which has {units}: a bias needs one entry per unit."
            )
        return found[0]

    def describe(self) -> str:
        """E.g. ``StructuredFraction(amount=0.5, norm='l2')``."""
        return f"{type(self).__name__}({self._settings()}, norm={self.norm!r})"


@register_criterion
class StructuredStd(StructuredCriterion):
    """Han's rule on whole units: keep a neuron or filter whose size exceeds ``quality * std(W)``.

    A unit's size is its RMS weight (``norm="l2"``) or mean magnitude (``"l1"``) over its fan-in, its
    pruned connections counting as zero (:func:`unit_sizes`); ``std(W)`` is that of the layer's
    weights. For weights drawn from one Gaussian every unit's RMS is close to ``std(W)``, so what a
    quality prunes depends on how much the units of a trained layer differ: sweep it
    (``sweep_levels``) rather than reading it off a table.

    Args:
        quality: A number ``>= 0`` or ``{pattern: number}`` per layer (or a levels file).
        norm: ``"l2"`` or ``"l1"``.
        std_of: ``"dense"``: the std of a layer's weights when first pruned (a quality means the same
            cut in every round); ``"surviving"``: of the weights alive at each prune.
        min_remaining: Floor share of units each layer keeps (see :class:`StructuredCriterion`).

    Example::

        >>> StructuredStd(quality={"conv*": 0.5, "*": 0.8})
        StructuredStd(quality={'conv*': 0.5, '*': 0.8}, norm='l2', std_of='dense')
    """

    name = "structured_std"
    level_name = "quality"
    level_help = "unit pruned if its RMS weight <= quality x std(W)"
    sweep_levels = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4)

    def __init__(
        self,
        quality: LevelSpec | str = 1.0,
        norm: Norm = "l2",
        std_of: StdOf = "dense",
        min_remaining: float | None = None,
    ):
        super().__init__(quality, min_remaining, norm)
        self.std_of = check_choice(std_of, "std_of", STD_OF)

    def select_units(
        self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext
    ) -> dict[str, Decision]:
        """Units whose size exceeds ``quality * std``, the std as ``std_of`` says."""
        out = {}
        for name, weight in weights.items():
            std = rule_std(self.std_of, name, weight, keeps, context)
            keep, threshold = structured_std_mask(weight, levels[name], std, keeps.get(name), self.norm)
            surviving = " (surviving)" * (self.std_of != "dense")
            out[name] = Decision(keep, threshold, f"units, {levels[name]:.2f} x std{surviving}")
        return out

    def describe(self) -> str:
        """E.g. ``StructuredStd(quality=1.0, norm='l2', std_of='dense')``."""
        return f"StructuredStd({self._settings()}, norm={self.norm!r}, std_of={self.std_of!r})"


@register_criterion
class StructuredFraction(StructuredCriterion, ShareCriterion):
    """Prune the smallest ``amount`` of each layer's units (neurons, filters), counting units pruned before.

    Args:
        amount: The share of units pruned, in ``[0, 1]``, or ``{pattern: share}`` per layer; ``None``:
            every round gives its own.
        norm: ``"l2"`` or ``"l1"`` (:func:`unit_sizes`).
        min_remaining: Floor share of units each layer keeps (see :class:`StructuredCriterion`).

    Example::

        >>> StructuredFraction(amount={"conv*": 0.5, "fc1": 0.8}, norm="l1")
        StructuredFraction(amount={'conv*': 0.5, 'fc1': 0.8}, norm='l1')
    """

    name = "structured_fraction"
    level_help = "share of the layer's units pruned"
    sweep_levels = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

    def __init__(self, amount: LevelSpec | str | None = None, norm: Norm = "l2", min_remaining: float | None = None):
        super().__init__(amount, min_remaining, norm)

    def select_units(
        self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext
    ) -> dict[str, Decision]:
        """The largest units of each layer, so that ``amount`` of its units is pruned."""
        out = {}
        for name, weight in weights.items():
            keep, threshold = structured_fraction_mask(weight, levels[name], keeps.get(name), self.norm)
            out[name] = Decision(keep, threshold, f"{100 * levels[name]:.1f}% of units")
        return out


@register_criterion
class StructuredGlobal(StructuredCriterion, ShareCriterion):
    """Prune the smallest ``amount`` of all selected units together, each unit's size over its layer's std(W).

    Sizes are divided by the std of their layer's weights when first pruned (layers of different fan-in
    have weights of different scales), so the cut is one quality for all layers
    (:func:`structured_global_masks`); ``amount`` counts units, whatever their fan-in.

    Args:
        amount: The share of all selected units pruned, in ``[0, 1]``; ``None``: every round gives its own.
        norm: ``"l2"`` or ``"l1"`` (:func:`unit_sizes`).
        min_remaining: Floor share of units each layer keeps (see :class:`StructuredCriterion`).

    Example::

        >>> StructuredGlobal(amount=0.5).per_layer
        False
    """

    name = "structured_global"
    level_help = "share of all selected units pruned"
    per_layer = False

    def __init__(self, amount: float | None = None, norm: Norm = "l2", min_remaining: float | None = None):
        super().__init__(amount, min_remaining, norm)

    def select_units(
        self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext
    ) -> dict[str, Decision]:
        """One cut over the units of all the weights, pruning ``amount`` of them."""
        amount = next(iter(levels.values()))
        stds = {name: context.dense_std[name] for name in weights}
        masks, quality = structured_global_masks(weights, amount, stds, keeps, self.norm)
        return {
            name: Decision(keep, quality * stds[name], f"{100 * amount:.1f}% of all units ({quality:.2f} x std)")
            for name, keep in masks.items()
        }
