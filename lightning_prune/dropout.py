"""Dropout adjustment during a fit: the rates, and the links traced in the first training batch.

:class:`DropoutControl` wraps :class:`~lightning_prune.core.dropout.DropoutAdjuster` with what a fit
adds: the forward order is traced once (the first training batch, before its backward), taken from
rank zero under DDP, and warned about when the model calls dropout functionally.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from lightning_prune.core.dropout import DropoutAdjuster, ForwardTrace, weight_layers

__all__ = ["DropoutControl"]


class DropoutControl:
    """The dropout rates of a model, adjusted after each prune, with links traced once during a fit.

    Args:
        model: The network.
        links: Explicit ``{dropout module: layer}`` links (they win over traced ones).
    """

    def __init__(self, model: nn.Module, links: Mapping[str, str] | None):
        self.model = model
        self.adjuster = DropoutAdjuster(model, links)
        self.traced = False
        self._trace: ForwardTrace | None = None

    def begin_trace(self) -> None:
        """Start recording the forward order (once: before the first training batch)."""
        if not self.traced and self._trace is None:
            self._trace = ForwardTrace(self.model, weight_layers(self.model)).__enter__()

    def end_trace(self, trainer: pl.Trainer) -> bool:
        """Stop recording and link dropouts by the order seen (rank zero's under DDP); ``True`` if links changed."""
        if self._trace is None:
            return False
        trace, self._trace = self._trace, None
        trace.close()
        self.traced = True
        if trace.functional_dropout:
            rank_zero_warn(
                f"The model calls dropout functionally (torch.nn.functional.dropout in forward; "
                f"{trace.functional_dropout} call(s) in one step). lightning-prune cannot adjust those rates; use "
                f"nn.Dropout modules for the paper's dropout adjustment."
            )
        order = trace.order
        if trainer.world_size > 1:
            order = trainer.strategy.broadcast(order, src=0)
        if order:
            self.adjuster.use_order(order, "traced")
        return bool(order)

    def close(self) -> None:
        """Remove the trace's hooks if a fit ended inside the traced batch."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def apply(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Set every rate from ``{layer: (remaining, total)}``; returns the rates set."""
        return self.adjuster.apply(counts)

    def state_dict(self) -> dict[str, Any]:
        """Original and current rates, links, their source, and whether the order was traced."""
        return {**self.adjuster.state_dict(), "traced": self.traced}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.adjuster.load_state_dict(state)
        self.traced = bool(state.get("traced", False))
