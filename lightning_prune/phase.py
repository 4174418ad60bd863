"""The retraining phase in force (dense training, or a round), put into the trainer's optimizers and the model.

:class:`RetrainingPhase` scales the learning rates (param groups and LR schedulers' base rates), sets
or restores weight decay in the groups holding a selected weight, keeps the L1 coefficient in force
(added to the gradients before each step), and freezes everything outside a round's ``train_only``.
It remembers what it changed (the scale in force, the optimizers' own weight decay), so a phase
change is relative and survives a resume.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from torch import Tensor
from torch.optim import Optimizer

from lightning_prune.core.freezing import Freezer
from lightning_prune.core.learning_rate import scale_learning_rate
from lightning_prune.core.regularization import (
    add_l1_gradient,
    params_without_optimizer,
    restore_weight_decay,
    set_weight_decay,
)
from lightning_prune.core.schedule import Round
from lightning_prune.core.settings import Regularization

__all__ = ["RetrainingPhase"]


class RetrainingPhase:
    """The settings of the phase in force, applied to a trainer's optimizers and its model.

    Args:
        dense: L1 and weight decay of dense training.
        freeze_bn_stats: Put BatchNorm modules of a frozen part in eval mode.
    """

    def __init__(self, dense: Regularization, freeze_bn_stats: bool):
        self.dense = dense
        self.freeze_bn_stats = freeze_bn_stats
        self.freezer = Freezer()
        self.lr_scale = 1.0
        self.original_weight_decay: list[list[float]] = []
        self.l1 = 0.0
        self._frozen_for: list[str] | None = None
        self._selected: dict[str, Tensor] = {}
        self._selected_in: dict[int, list[Tensor]] = {}

    def start(self, trainer: pl.Trainer, selected: Mapping[str, Tensor], rounds: list[Round], resumed: bool) -> None:
        """Begin a fit: remember the optimizers' own weight decay (unless resumed with it), check L1/L2 can apply.

        Raises:
            ValueError: If L1 or weight decay is configured but no optimizer holds a selected weight.
        """
        self._selected = dict(selected)
        self._selected_in.clear()
        if not resumed or not self.original_weight_decay:
            self.lr_scale = 1.0
            self.original_weight_decay = [
                [g.get("weight_decay", 0.0) for g in o.param_groups] for o in trainer.optimizers
            ]
        regularized = (
            self.dense.l1 > 0
            or self.dense.weight_decay is not None
            or any(r.l1 or r.weight_decay is not None for r in rounds)
        )
        missing = params_without_optimizer(trainer.optimizers, self._selected) if regularized else []
        if missing:
            raise ValueError(
                f"L1 or weight decay is configured, but no optimizer of the trainer holds {missing[0]!r}: the "
                f"callback applies them through the optimizers it finds in `configure_optimizers`."
            )

    def enter(self, trainer: pl.Trainer, model: pl.LightningModule, round_: Round | None) -> None:
        """Apply the settings of ``round_`` (``None``: dense training) to the optimizers and the model."""
        self.l1 = float(round_.l1 if round_ else self.dense.l1)  # type: ignore[arg-type]
        decay = round_.weight_decay if round_ else self.dense.weight_decay
        selected = list(self._selected.values())
        for index, optimizer in enumerate(trainer.optimizers):
            if decay is not None:
                set_weight_decay(optimizer, selected, decay)
            elif index < len(self.original_weight_decay):
                restore_weight_decay(optimizer, self.original_weight_decay[index])
        target = float(round_.lr_scale if round_ else 1.0)  # type: ignore[arg-type]
        if target != self.lr_scale:
            for optimizer in trainer.optimizers:
                schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
                scale_learning_rate(optimizer, target / self.lr_scale, schedulers)
            self.lr_scale = target
        self.freeze(model, round_.train_only if round_ else None)

    def freeze(self, model: pl.LightningModule, patterns: list[str] | None) -> None:
        """Freeze everything outside ``patterns`` (``None``: thaw), unless that is already so."""
        if patterns == self._frozen_for:
            return
        self.freezer.thaw()
        if patterns is not None:
            self.freezer.freeze(model, patterns, freeze_bn_stats=self.freeze_bn_stats)
        self._frozen_for = patterns

    def reapply(self) -> None:
        """Put the frozen part's BatchNorm modules back in eval mode (after Lightning's ``model.train()``)."""
        self.freezer.reapply()

    def thaw(self) -> None:
        """Thaw everything (the end of a fit)."""
        self.freezer.thaw()
        self._frozen_for = None

    def add_l1(self, optimizer: Optimizer) -> None:
        """Add ``l1 * sign(w)`` to the gradients of the selected weights ``optimizer`` holds (no-op at L1 0)."""
        if not self.l1:
            return
        params = self._selected_in.get(id(optimizer))
        if params is None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = self._selected_in[id(optimizer)] = [p for p in self._selected.values() if id(p) in owned]
        add_l1_gradient(params, self.l1)

    def forget_parameters(self, selected: Mapping[str, Tensor]) -> None:
        """The selected parameters were replaced (dead units removed): use these from now on."""
        self._selected = dict(selected)
        self._selected_in.clear()

    def state_dict(self) -> dict[str, Any]:
        """The learning-rate scale in force and the optimizers' own weight decay."""
        return {"lr_scale": self.lr_scale, "original_weight_decay": [list(g) for g in self.original_weight_decay]}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` (when the optimizers were resumed too)."""
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.original_weight_decay = [[float(v) for v in g] for g in state.get("original_weight_decay", [])]
