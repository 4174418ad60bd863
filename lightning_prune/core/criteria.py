"""Pruning criteria: which connections of a weight tensor survive.

Every function here takes the current ``keep`` mask (``True`` = connection alive) and returns a new
one that is a subset of it: masks only ever shrink, a pruned connection never comes back.

- :func:`std_mask`: Han et al.'s rule, keep ``|w| > quality * std``.
- :func:`fraction_mask`: keep the largest weights so that a share ``amount`` of the layer is pruned.
- :func:`global_masks`: one magnitude threshold over several layers at once, pruning ``amount`` of
  all their weights together.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor


def _scores(weight: Tensor, keep: Tensor | None) -> Tensor:
    """Magnitudes as float32, with already pruned entries below every real magnitude."""
    scores = weight.detach().abs().float()
    if keep is not None:
        scores = scores.masked_fill(~keep, -1.0)
    return scores


def _keep_top(scores: Tensor, n_keep: int) -> Tensor:
    keep = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_keep > 0:
        keep[torch.topk(scores.flatten(), n_keep, sorted=False).indices] = True
    return keep.view_as(scores)


def _largest_pruned(scores: Tensor, keep: Tensor) -> float:
    pruned = scores[~keep]
    return float(pruned.max().clamp_min(0.0)) if pruned.numel() else 0.0


def surviving_std(weight: Tensor, keep: Tensor | None = None) -> float:
    """Standard deviation of the weights still alive (of all weights when ``keep`` is ``None``).

    Example::

        >>> surviving_std(torch.tensor([0.0, -1.0, 1.0]), torch.tensor([False, True, True]))
        1.4142...
    """
    values = weight.detach().float()
    if keep is not None:
        values = values[keep]
    return float(values.std()) if values.numel() > 1 else 0.0


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


def fraction_mask(weight: Tensor, amount: float, keep: Tensor | None = None) -> tuple[Tensor, float]:
    """Keep the largest weights so that ``round(amount * numel)`` of the layer is pruned.

    ``amount`` is the layer's target sparsity after this call, counting connections pruned before;
    if more than that are already pruned nothing changes. Ties are broken by :func:`torch.topk`.

    Args:
        weight: The layer's weights.
        amount: Target share of the layer pruned, in ``[0, 1]``.
        keep: The current mask; ``None`` if the layer was never pruned.

    Returns:
        The new mask and its threshold: the largest magnitude pruned (0 when nothing is).

    Example::

        >>> fraction_mask(torch.tensor([0.1, -0.5, 2.0, -3.0]), amount=0.5)
        (tensor([False, False,  True,  True]), 0.5)
    """
    scores = _scores(weight, keep)
    alive = scores.numel() if keep is None else int(keep.sum())
    n_keep = min(alive, scores.numel() - round(amount * scores.numel()))
    new = _keep_top(scores, n_keep)
    return new, _largest_pruned(scores, new)


def global_masks(
    weights: Mapping[str, Tensor], amount: float, keeps: Mapping[str, Tensor] | None = None
) -> tuple[dict[str, Tensor], float]:
    """One magnitude threshold for several layers: prune ``amount`` of all their weights together.

    Args:
        weights: ``{name: weight}`` of the layers pruned together.
        amount: Target share of all their weights pruned, in ``[0, 1]``.
        keeps: Current masks by name; layers absent from it were never pruned.

    Returns:
        The new masks by name and the common threshold (largest magnitude pruned).

    Example::

        >>> masks, t = global_masks({"a": torch.tensor([1.0, 4.0]), "b": torch.tensor([2.0, 3.0])}, 0.5)
        >>> masks["a"], masks["b"], t
        (tensor([False,  True]), tensor([False,  True]), 2.0)
    """
    keeps = keeps or {}
    scores = {name: _scores(w, keeps.get(name)) for name, w in weights.items()}
    flat = torch.cat([s.flatten().cpu() for s in scores.values()])
    alive = int((flat >= 0).sum())
    kept = _keep_top(flat, min(alive, flat.numel() - round(amount * flat.numel())))
    pieces = kept.split([s.numel() for s in scores.values()])
    masks = {name: piece.view_as(s).to(s.device) for (name, s), piece in zip(scores.items(), pieces, strict=True)}
    return masks, _largest_pruned(flat, kept)


def floor_mask(weight: Tensor, new: Tensor, keep: Tensor | None, min_remaining: float) -> Tensor:
    """Widen ``new`` so that at least ``ceil(min_remaining * numel)`` (and one) connections survive.

    The extra survivors are the largest weights still alive in ``keep``.

    Example::

        >>> floor_mask(torch.tensor([0.1, -0.5, 2.0, -3.0]), torch.zeros(4, dtype=torch.bool), None, 0.25)
        tensor([False, False, False,  True])
    """
    scores = _scores(weight, keep)
    alive = scores.numel() if keep is None else int(keep.sum())
    n_min = min(alive, max(1, math.ceil(min_remaining * scores.numel() - 1e-9)))
    if int(new.sum()) >= n_min:
        return new
    return _keep_top(scores, n_min)
