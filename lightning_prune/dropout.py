"""Dropout adjustment during a fit: the rates, and the links traced in the first training batch.

:class:`DropoutControl` wraps :class:`~lightning_prune.core.dropout.DropoutAdjuster` with what a fit
adds: which layers take each dropout's output is traced once (the first training batch, before its
backward), taken from rank zero under DDP; the dropouts left unlinked are named once, and the model
is warned about when it calls dropout functionally or when the data flow cannot be traced.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
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
        """Start tracing the forward pass (once: before the first training batch)."""
        if not self.traced and self._trace is None:
            self._trace = ForwardTrace(self.model, weight_layers(self.model)).__enter__()

    def end_trace(self, trainer: pl.Trainer) -> bool:
        """Stop tracing and link dropouts by the data flow seen (rank zero's under DDP); ``True`` if links changed.

        If the data flow could not be followed, dropouts are linked by the call order seen; if no dropout
        or layer ran, the static links stay. Either is warned about.
        """
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
        seen: dict[str, Any] = {"order": trace.order, "links": trace.links, "failed": trace.failed}
        if trainer.world_size > 1:
            seen = trainer.strategy.broadcast(seen, src=0)
        return self._link(seen["order"], seen["links"], seen["failed"])

    def _link(self, order: list[str], links: Mapping[str, list[str]], failed: str | None) -> bool:
        adjusting = any(p > 0 for name, p in self.adjuster.original.items() if name not in self.adjuster.inner)
        fix = "Set the links with `DropoutAdjustment(links={dropout: layer})` where these are wrong."
        if not order:
            if adjusting:
                rank_zero_warn(
                    "lightning-prune traced the first training batch but saw none of the model's dropout or weight "
                    "modules run (a compiled model, or a training_step that bypasses the modules?): the dropout links "
                    f"stay those of the modules' registration order {self.adjuster.links}. {fix}"
                )
            return False
        if failed is not None:
            self.adjuster.use_order(order, "traced")
            if adjusting:
                rank_zero_warn(
                    f"lightning-prune could not follow the dropouts' outputs through the model ({failed}): dropouts "
                    f"are linked to the first layer with weights that runs after them instead {self.adjuster.links}. "
                    f"{fix}"
                )
            return True
        self.adjuster.use_flow(links)
        unlinked = self.adjuster.unlinked(order)
        if unlinked:
            reasons = "; ".join(f"{name!r}: {why}" for name, why in unlinked.items())
            rank_zero_info(f"lightning-prune: these dropouts are linked to no layer and keep their rates: {reasons}.")
        return True

    def close(self) -> None:
        """Remove the trace's hooks if a fit ended inside the traced batch."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None

    def apply(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Set every rate from ``{layer: (remaining, total)}``; returns the rates set."""
        return self.adjuster.apply(counts)

    def state_dict(self) -> dict[str, Any]:
        """Original and current rates, links, their source and rule, and whether the data flow was traced."""
        return {**self.adjuster.state_dict(), "traced": self.traced}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`; links traced by call order (older checkpoints) are traced again."""
        self.adjuster.load_state_dict(state)
        self.traced = bool(state.get("traced", False)) and self.adjuster.rule == "data flow"
