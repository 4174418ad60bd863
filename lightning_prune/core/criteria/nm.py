"""N:M semi-structured sparsity: in every group of ``m`` consecutive inputs of a unit, the ``n`` largest survive.

NVIDIA's sparse tensor cores (Ampere and later) multiply at up to twice the dense rate when every
group of 4 consecutive weights along the reduction (input) dimension holds at most 2 non-zeros: 2:4
sparsity, for fp16, bf16 and int8. :class:`NM` (``"nm"``, 2:4 by default) prunes to that pattern, and
:func:`~lightning_prune.core.export.to_semi_structured` hands such ``Linear`` layers to
:func:`torch.sparse.to_sparse_semi_structured` for GPU inference.

**Groups.** For a ``Linear`` weight ``(out, in)``: ``m`` consecutive inputs of each row,
``w[o, g*m:(g+1)*m]``. For a ``Conv`` weight ``(out, in, *kernel)``: ``m`` consecutive *input channels*
at each kernel position, ``w[o, g*m:(g+1)*m, kh, kw]``: the layout of NVIDIA's ASP and of TensorRT's
sparse convolutions (their implicit GEMM reduces over kernel positions x channels, channels
innermost), not the flattened ``in x kh x kw`` order. A layer whose input size (features, or channels
of a conv) is not a multiple of ``m`` is refused, naming it (:meth:`NM.check_weights`, also called at
the start of :meth:`NM.select`): leave it out of the prune with ``layers``.

**The invariant.** Masks only shrink, so the choice is made among the weights still alive: in every
group, the kept weights are the ``min(n, alive)`` largest of those alive in it. So every group keeps
*at most* ``n``, and *exactly* ``n`` where at least ``n`` were alive: exactly ``n`` everywhere after
dense training, fewer in groups an earlier unstructured round thinned. The pruner's intersection with
the current mask changes nothing, and :meth:`NM.floor` refuses a floor the pattern cannot meet rather
than bringing weights back (which would break it).

**The level** is ``n``, one for all layers (``per_layer = False``; a round prunes some ``layers``
with another ``n``), an integer in ``[1, m]``; ``m`` is a setting. N:M has no threshold, so it is not
meant for sensitivity sweeps. A guard retry keeps more (:meth:`NM.gentler`): the share pruned per
group, ``(m - n) / m``, times the retry scale, ``n`` rounded up; 2:4 retried at 0.8 is 3:4, which
sparse tensor cores do not run, so for 2:4 meant for a GPU use the guard's ``action="stop"``.

**Biases** are not grouped: a selected bias keeps its mask.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_prune.core.criteria.base import (
    Criterion,
    Decision,
    Keeps,
    Levels,
    PruneContext,
    Weights,
    register_criterion,
)
from lightning_prune.core.criteria.magnitude import floor_count, magnitude_scores
from lightning_prune.core.validation import check_int

__all__ = ["NM", "nm_counts", "nm_groups", "nm_mask"]


def nm_groups(tensor: Tensor, m: int) -> Tensor:
    """``tensor`` (a weight or its mask, two or more dimensions) as ``(groups, m)``: ``m`` consecutive inputs each.

    Inputs are dimension 1 (features of a ``Linear``, channels of a conv); for a conv the groups run
    along the channels at each kernel position. The input size must be a multiple of ``m``.

    Example::

        >>> nm_groups(torch.arange(8).view(1, 8), 4)
        tensor([[0, 1, 2, 3],
                [4, 5, 6, 7]])
        >>> nm_groups(torch.arange(8).view(1, 4, 2, 1), 4)  # channels 0..3 at kernel position 0, then 1
        tensor([[0, 2, 4, 6],
                [1, 3, 5, 7]])
    """
    return tensor.movedim(1, -1).reshape(-1, m)


def nm_counts(mask: Tensor, m: int) -> Tensor:
    """How many connections each group of ``m`` (see :func:`nm_groups`) keeps.

    Example::

        >>> nm_counts(torch.tensor([[True, False, True, False, True, True, True, False]]), 4)
        tensor([2, 3])
    """
    return nm_groups(mask, m).sum(1)


def nm_mask(weight: Tensor, n: int, m: int, keep: Tensor | None = None) -> Tensor:
    """In every group of ``m`` consecutive inputs, keep the ``n`` largest weights still alive in ``keep``.

    Each group keeps ``min(n, alive in the group)``: exactly ``n`` where at least ``n`` are alive.
    Ties are broken by :func:`torch.topk`.

    Args:
        weight: A weight of two or more dimensions whose input size (dimension 1) is a multiple of ``m``.
        n: Weights kept per group, ``1 <= n <= m``.
        m: Group size.
        keep: The current mask; ``None`` if the layer was never pruned.

    Example::

        >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 2.0, 3.0, 4.0]]), 2, 4)
        tensor([[False,  True,  True, False, False, False,  True,  True]])
        >>> nm_mask(torch.tensor([[0.1, -3.0, 2.0, 0.5]]), 2, 4, torch.tensor([[True, False, False, True]]))
        tensor([[ True, False, False,  True]])
    """
    scores = magnitude_scores(weight, keep).movedim(1, -1)
    groups = scores.reshape(-1, m)
    chosen = torch.zeros(groups.shape, dtype=torch.bool, device=weight.device)
    chosen.scatter_(1, groups.topk(n, dim=1).indices, True)
    chosen &= groups >= 0
    return chosen.view(scores.shape).movedim(-1, 1).contiguous()


@register_criterion
class NM(Criterion):
    """N:M semi-structured sparsity: keep the ``n`` largest weights in every group of ``m`` consecutive inputs.

    See the module documentation for the groups of a conv, the invariant kept under the pruner's
    safety, the floor, the guard's retries and biases.

    Args:
        n: Weights kept per group, an integer in ``[1, m]``; the level (a round's ``level`` overrides it).
        m: Group size, an integer ``>= 2``; every pruned layer's input size must be a multiple of it.
        min_remaining: A floor the pattern must meet: a prune keeping fewer connections is refused
            (see :meth:`floor`).

    Example::

        >>> NM()
        NM(n=2, m=4)
        >>> NM(n=1, m=8).gentler(1, 0.8)
        3
    """

    name = "nm"
    level_name = "n"
    per_layer = False
    level_help = "weights kept in every group of m consecutive inputs"

    def __init__(self, n: int = 2, m: int = 4, min_remaining: float | None = None):
        self.m: int = check_int(m, "m", minimum=2)
        super().__init__(n, min_remaining)

    def check_level(self, value: Any, name: str) -> int:
        """An integer in ``[1, m]`` (``2.0`` is taken as 2).

        Raises:
            ValueError: Naming ``name``, the value and the range.
        """
        real = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if not real or not math.isfinite(value) or value != int(value) or not 1 <= value <= self.m:
            raise ValueError(
                f"`{name}` must be an integer in [1, {self.m}] (the weights criterion 'nm' keeps in every group of "
                f"m={self.m}), got {value!r}."
            )
        return int(value)

    def gentler(self, level: float, scale: float) -> int:
        """A retry keeps more: the share pruned per group times ``scale``, ``n`` rounded up (at most ``m``)."""
        return min(self.m, math.ceil(self.m - (self.m - int(level)) * scale - 1e-9))

    def check_weights(self, weights: Weights, layer_of: Mapping[str, str]) -> None:
        """Refuse a weight whose input size (features, or channels of a conv) is not a multiple of ``m``.

        Raises:
            ValueError: Naming the layer, the parameter, its shape and ``m``.
        """
        for name, weight in weights.items():
            if weight.dim() >= 2 and weight.shape[1] % self.m:
                what = "input features" if weight.dim() == 2 else "input channels"
                raise ValueError(
                    f"Criterion {self.describe()} keeps n of every {self.m} consecutive {what}, but layer "
                    f"{layer_of.get(name, name)!r} ({name!r}, shape {list(weight.shape)}) has {weight.shape[1]} "
                    f"{what}, not a multiple of {self.m}. Leave it out of the prune (`layers`)."
                )

    def select(self, weights: Weights, keeps: Keeps, levels: Levels, context: PruneContext) -> dict[str, Decision]:
        """``n`` of every ``m`` among the weights alive (:func:`nm_mask`); a bias keeps its mask.

        Raises:
            ValueError: For a weight :meth:`check_weights` refuses.
        """
        self.check_weights(weights, context.layer_of)
        out = {}
        for name, weight in weights.items():
            keep = keeps.get(name)
            if weight.dim() < 2:
                same = torch.ones(weight.shape, dtype=torch.bool, device=weight.device) if keep is None else keep
                out[name] = Decision(same.clone(), None, "not grouped (kept)")
                continue
            n = int(levels[name])
            out[name] = Decision(nm_mask(weight, n, self.m, keep), None, f"{n}:{self.m}")
        return out

    def floor(
        self,
        weights: Weights,
        keeps: Keeps,
        decided: Mapping[str, Tensor],
        min_remaining: float,
        context: PruneContext,
    ) -> dict[str, Tensor]:
        """The decisions as they are, if each keeps the floor's ``ceil(min_remaining * numel)`` (capped by those alive).

        Raises:
            ValueError: If one keeps fewer: more would break the N:M pattern.
        """
        for name, keep in decided.items():
            before = keeps.get(name)
            total = weights[name].numel()
            need = floor_count(total, total if before is None else int(before.sum()), min_remaining)
            if int(keep.sum()) < need:
                raise ValueError(
                    f"Criterion {self.describe()} keeps {int(keep.sum())} of the {total} connections of {name!r} "
                    f"(layer {context.layer_of.get(name, name)!r}), fewer than the floor min_remaining="
                    f"{min_remaining} asks ({need}); keeping more would break the N:M pattern. Lower "
                    f"`min_remaining` to at most n/m, or raise n."
                )
        return dict(decided)

    def describe(self) -> str:
        """E.g. ``NM(n=2, m=4)``."""
        floor = "" if self.min_remaining is None else f", min_remaining={self.min_remaining!r}"
        return f"NM(n={self.level!r}, m={self.m}{floor})"
