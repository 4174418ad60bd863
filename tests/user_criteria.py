"""A criterion of a user's own, for the tests that plug one in from Python and by ``class_path`` in YAML.

It is deliberately not registered (``register_criterion``): the registry is global, and the error
messages other tests match list the registered names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from lightning_prune import Criterion, Decision, PruneContext


class KeepTop(Criterion):
    """Keep the ``count`` largest-magnitude connections still alive in each layer, prune the rest."""

    name = "keep_top"
    level_name = "count"

    def __init__(self, count: float | dict[str, float] | None = None, min_remaining: float | None = None):
        super().__init__(count, min_remaining)

    def select(
        self,
        weights: Mapping[str, Tensor],
        keeps: Mapping[str, Tensor | None],
        levels: Mapping[str, float],
        context: PruneContext,
    ) -> dict[str, Decision]:
        out = {}
        for name, weight in weights.items():
            scores = weight.detach().abs().flatten().float()
            keep = keeps.get(name)
            if keep is not None:
                scores = scores.masked_fill(~keep.flatten(), -1.0)
            k = min(int(levels[name]), weight.numel())
            new = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
            new[scores.topk(k).indices] = True
            out[name] = Decision(new.view_as(weight), None, f"top {k}")
        return out


def top_k_mask(weight: Tensor, k: int) -> Tensor:
    """The mask of the ``k`` largest magnitudes of ``weight`` (what :class:`KeepTop` keeps on a dense layer)."""
    keep = torch.zeros(weight.numel(), dtype=torch.bool)
    keep[weight.detach().abs().flatten().topk(k).indices] = True
    return keep.view_as(weight)
