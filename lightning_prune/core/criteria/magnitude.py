"""Magnitude criteria: Han et al.'s ``quality x std`` rule, a share of each layer, a share of all layers.

The classes are the registered criteria (:class:`Std` ``"std"``, :class:`Fraction` ``"fraction"``,
:class:`Global` ``"global"``); the functions are the mask computations they use. Every function takes
the current ``keep`` mask (``True`` = connection alive) and returns a new one that is a subset of it:
masks only ever shrink, a pruned connection never comes back.

- :func:`std_mask`: Han et al.'s rule, keep ``|w| > quality * std``.
- :func:`fraction_mask`: keep the largest weights so that a share ``amount`` of the layer is pruned.
- :func:`global_masks`: one magnitude threshold over several layers at once, pruning ``amount`` of
  all their weights together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch  # noqa: F401 (the examples use it)
from torch import Tensor

from lightning_prune.core.collective import LOCAL, Collective, count_true, lowest_mask, std, total
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
from lightning_prune.core.validation import check_choice, check_fraction

__all__ = [
    "STD_OF",
    "Fraction",
    "Global",
    "ShareCriterion",
    "Std",
    "StdOf",
    "floor_count",
    "floor_mask",
    "fraction_mask",
    "global_keep",
    "global_masks",
    "keep_share",
    "keep_top",
    "largest_pruned",
    "magnitude_scores",
    "rule_std",
    "std_mask",
    "surviving_std",
]

StdOf = Literal["dense", "surviving"]
STD_OF: tuple[str, ...] = ("dense", "surviving")


def magnitude_scores(weight: Tensor, keep: Tensor | None) -> Tensor:
    """Magnitudes as float32, with already pruned entries (``keep`` False) at ``-1``, below every real magnitude.

    Example::

        >>> magnitude_scores(torch.tensor([0.5, -2.0]), torch.tensor([True, False]))
        tensor([ 0.5000, -1.0000])
    """
    scores = weight.detach().abs().float()
    if keep is not None:
        scores = scores.masked_fill(~keep, -1.0)
    return scores


def keep_top(scores: Tensor, n_keep: int, collective: Collective = LOCAL) -> Tensor:
    """A mask of ``scores``' shape keeping its ``n_keep`` largest entries; of equal scores, the later ones.

    ``scores`` may be one shard of a tensor split over ``collective``'s processes (``n_keep`` then counts
    the whole tensor): the shards' masks are exactly the whole tensor's (see
    :func:`~lightning_prune.core.collective.lowest_mask`).

    Example::

        >>> keep_top(torch.tensor([0.5, -1.0, 2.0]), 2)
        tensor([ True, False,  True])
    """
    return ~lowest_mask([scores], total([scores], collective) - n_keep, collective)[0]


def largest_pruned(scores: Tensor, keep: Tensor, collective: Collective = LOCAL) -> float:
    """The largest score ``keep`` prunes (0 when it prunes none, or only entries pruned before, scored ``-1``).

    Example::

        >>> largest_pruned(torch.tensor([0.5, -1.0, 2.0]), torch.tensor([False, False, True]))
        0.5
    """
    pruned = scores[~keep]
    return max(0.0, collective.all_max(float(pruned.max()) if pruned.numel() else 0.0))


def surviving_std(weight: Tensor, keep: Tensor | None = None, collective: Collective = LOCAL) -> float:
    """Standard deviation of the weights still alive (of all weights when ``keep`` is ``None``), in float64.

    ``weight`` may be one shard of a tensor split over ``collective``'s processes: the std is the whole
    tensor's (:func:`~lightning_prune.core.collective.std`).

    Example::

        >>> surviving_std(torch.tensor([0.0, -1.0, 1.0]), torch.tensor([False, True, True]))
        1.4142...
    """
    values = weight.detach()
    return std([values if keep is None else values[keep]], collective)


def rule_std(std_of: StdOf, name: str, weight: Tensor, keeps: Keeps, context: PruneContext) -> float:
    """The std a ``quality x std`` rule scales by: the dense one from ``context``, or that of the surviving weights.

    Example::

        >>> context = PruneContext(dense_std={"w": 2.0}, layer_of={"w": "fc"})
        >>> w = torch.tensor([1.0, 3.0, 100.0])
        >>> rule_std("dense", "w", w, {}, context), rule_std("surviving", "w", w, {"w": w < 10}, context)
        (2.0, 1.4142...)
    """
    return context.dense_std[name] if std_of == "dense" else surviving_std(weight, keeps.get(name), context.collective)


def std_mask(weight: Tensor, quality: float, std: float, keep: Tensor | None = None) -> tuple[Tensor, float]:
    """Han et al.'s rule: keep the connections with ``|w| > quality * std``.

    Args:
        weight: The layer's weights.
        quality: The quality parameter (per-layer sensitivity), ``>= 0``.
        std: The standard deviation the threshold is scaled by (see :func:`surviving_std`).
        keep: The current mask; ``None`` if the layer was never pruned.

    Returns:
        The new mask and the threshold ``quality * std``.

    Example::

        >>> w = torch.tensor([0.1, -0.5, 2.0, -3.0])
        >>> std_mask(w, quality=0.5, std=2.0)
        (tensor([False, False,  True,  True]), 1.0)
    """
    threshold = quality * std
    new = weight.detach().abs() > threshold
    if keep is not None:
        new &= keep
    return new, threshold


def fraction_mask(
    weight: Tensor, amount: float, keep: Tensor | None = None, collective: Collective = LOCAL
) -> tuple[Tensor, float]:
    """Keep the largest weights so that ``round(amount * numel)`` of the layer is pruned.

    ``amount`` is the layer's target sparsity after this call, counting connections pruned before;
    if more than that are already pruned nothing changes. Of equal magnitudes the earlier ones go first.

    Args:
        weight: The layer's weights (or this process's shard of them).
        amount: Target share of the layer pruned, in ``[0, 1]``.
        keep: The current mask; ``None`` if the layer was never pruned.
        collective: The processes holding the shards of ``weight`` (:data:`LOCAL`: it is whole).

    Returns:
        The new mask and its threshold: the largest magnitude pruned (0 when nothing is).

    Example::

        >>> fraction_mask(torch.tensor([0.1, -0.5, 2.0, -3.0]), amount=0.5)
        (tensor([False, False,  True,  True]), 0.5)
    """
    scores = magnitude_scores(weight, keep)
    new = keep_share(scores, amount, collective)
    return new, largest_pruned(scores, new, collective)


def keep_share(scores: Tensor, amount: float, collective: Collective = LOCAL) -> Tensor:
    """Keep the largest ``scores`` so that ``round(amount * numel)`` of them are pruned, counting those pruned before.

    Entries scored below 0 are pruned already and stay pruned; if more than that share are, nothing more is.

    Example::

        >>> keep_share(torch.tensor([0.3, -1.0, 2.0, 1.0]), 0.5)
        tensor([False, False,  True,  True])
    """
    n = total([scores], collective)
    return keep_top(scores, min(count_true([scores >= 0], collective), n - round(amount * n)), collective)


def global_keep(
    scores: Mapping[str, Tensor], amount: float, collective: Collective = LOCAL
) -> tuple[dict[str, Tensor], float]:
    """:func:`keep_share` over several tensors of scores at once: one cut for all of them.

    Returns:
        The masks by name (each on its scores' device) and the largest score pruned.

    Example::

        >>> global_keep({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0, 3.0])}, 0.5)
        ({'a': tensor([False,  True]), 'b': tensor([False,  True])}, 2.0)
    """
    values = list(scores.values())
    n = total(values, collective)
    n_keep = min(count_true([v >= 0 for v in values], collective), n - round(amount * n))
    pruned = lowest_mask(values, n - n_keep, collective)
    masks = {name: ~p for name, p in zip(scores, pruned, strict=True)}
    largest = max((largest_pruned(v, m) for v, m in zip(values, masks.values(), strict=True)), default=0.0)
    return masks, max(0.0, collective.all_max(largest))


def global_masks(
    weights: Mapping[str, Tensor],
    amount: float,
    keeps: Mapping[str, Tensor] | None = None,
    collective: Collective = LOCAL,
) -> tuple[dict[str, Tensor], float]:
    """One magnitude threshold for several layers: prune ``amount`` of all their weights together.

    Args:
        weights: ``{name: weight}`` of the layers pruned together.
        amount: Target share of all their weights pruned, in ``[0, 1]``.
        keeps: Current masks by name; layers absent from it were never pruned.
        collective: The processes holding the shards of the weights (:data:`LOCAL`: they are whole).

    Returns:
        The new masks by name and the common threshold (largest magnitude pruned).

    Example::

        >>> masks, t = global_masks({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0, 3.0])}, 0.5)
        >>> masks["a"], masks["b"], t
        (tensor([False,  True]), tensor([False,  True]), 2.0)
    """
    keeps = keeps or {}
    return global_keep({name: magnitude_scores(w, keeps.get(name)) for name, w in weights.items()}, amount, collective)


def floor_mask(
    weight: Tensor, new: Tensor, keep: Tensor | None, min_remaining: float, collective: Collective = LOCAL
) -> Tensor:
    """Widen ``new`` so that at least ``ceil(min_remaining * numel)`` (and one) connections survive.

    The extra survivors are the largest weights still alive in ``keep``.

    Example::

        >>> floor_mask(torch.tensor([0.1, -0.5, 2.0, -3.0]), torch.zeros(4, dtype=torch.bool), None, 0.25)
        tensor([False, False, False,  True])
    """
    scores = magnitude_scores(weight, keep)
    n = total([scores], collective)
    n_min = floor_count(n, n if keep is None else count_true([keep], collective), min_remaining)
    if count_true([new], collective) >= n_min:
        return new
    return keep_top(scores, n_min, collective)


def floor_count(total: int, alive: int, min_remaining: float) -> int:
    """What a floor keeps: ``ceil(min_remaining * total)`` and at least one, but no more than are ``alive``.

    Example::

        >>> floor_count(10, 8, 0.25), floor_count(10, 2, 0.5), floor_count(10, 8, 0.0)
        (3, 2, 1)
    """
    return min(alive, max(1, math.ceil(min_remaining * total - 1e-9)))


@register_criterion
class Std(Criterion):
    """Han et al.'s rule: keep the connections with ``|w| > quality * std(W)``, per layer.

    Args:
        quality: The quality parameter, a number ``>= 0`` or ``{pattern: number}`` per layer (from a
            sensitivity analysis: the path of its quality file).
        std_of: ``"dense"``: the std of a layer's weights when first pruned (cached, so a quality means
            the same cut in every round); ``"surviving"``: the std of the weights alive at each prune
            (the threshold climbs round after round).
        min_remaining: Floor share of connections each layer keeps (see :class:`Criterion`).

    Example::

        >>> Std(quality={"conv*": 0.5, "*": 1.0}).level
        {'conv*': 0.5, '*': 1.0}
    """

    name = "std"
    level_name = "quality"
    shardable = True
    level_help = "threshold = quality x std(W)"
    sweep_levels = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5)

    def __init__(self, quality: LevelSpec | str = 1.0, std_of: StdOf = "dense", min_remaining: float | None = None):
        super().__init__(quality, min_remaining)
        self.std_of = check_choice(std_of, "std_of", STD_OF)

    def select(self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext) -> dict[str, Decision]:
        """``|w| > quality * std`` for each parameter, the std as ``std_of`` says."""
        out = {}
        for name, weight in weights.items():
            keep, threshold = std_mask(
                weight, levels[name], rule_std(self.std_of, name, weight, keeps, context), keeps.get(name)
            )
            out[name] = Decision(
                keep, threshold, f"{levels[name]:.2f} x std" + " (surviving)" * (self.std_of != "dense")
            )
        return out

    def describe(self) -> str:
        """E.g. ``Std(quality=1.0, std_of='dense')``."""
        return f"Std({self._settings()}, std_of={self.std_of!r})"


class ShareCriterion(Criterion):
    """A rule whose level is a share pruned, in ``[0, 1]`` (of weights, or of units for a structured rule)."""

    level_name = "amount"

    def check_level(self, value: Any, name: str) -> float:
        """A share in ``[0, 1]``."""
        return check_fraction(value, name)


@register_criterion
class Fraction(ShareCriterion):
    """Prune the smallest ``amount`` of each layer (its target sparsity, counting connections pruned before).

    Args:
        amount: The share pruned, in ``[0, 1]``, or ``{pattern: share}`` per layer; ``None``: every
            round gives its own.
        min_remaining: Floor share of connections each layer keeps (see :class:`Criterion`).

    Example::

        >>> Fraction(amount=0.9).level
        0.9
    """

    name = "fraction"
    shardable = True
    level_help = "share of the layer pruned"
    sweep_levels = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)

    def __init__(self, amount: LevelSpec | str | None = None, min_remaining: float | None = None):
        super().__init__(amount, min_remaining)

    def select(self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext) -> dict[str, Decision]:
        """The largest weights of each layer, so that ``amount`` of it is pruned."""
        out = {}
        for name, weight in weights.items():
            keep, threshold = fraction_mask(weight, levels[name], keeps.get(name), context.collective)
            out[name] = Decision(keep, threshold, f"{100 * levels[name]:.1f}% of layer")
        return out


@register_criterion
class Global(ShareCriterion):
    """Prune the smallest ``amount`` of all selected weights together: one magnitude threshold for every layer.

    Args:
        amount: The share of all the weights pruned, in ``[0, 1]``; ``None``: every round gives its own.
        min_remaining: Floor share of connections each layer keeps (see :class:`Criterion`).

    Example::

        >>> Global(amount=0.5).per_layer
        False
    """

    name = "global"
    shardable = True
    level_help = "share of all selected weights pruned"
    per_layer = False

    def __init__(self, amount: float | None = None, min_remaining: float | None = None):
        super().__init__(amount, min_remaining)

    def select(self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext) -> dict[str, Decision]:
        """One threshold over all the weights, pruning ``amount`` of them."""
        amount = next(iter(levels.values()))
        alive = {n: k for n, k in keeps.items() if k is not None}
        masks, threshold = global_masks(weights, amount, alive, context.collective)
        return {name: Decision(keep, threshold, f"{100 * amount:.1f}% global") for name, keep in masks.items()}
