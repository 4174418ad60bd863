"""``PruneRetrainCallback``: Han et al.'s prune-retrain method for any LightningModule.

The callback decides *when* to prune; :class:`~lightning_prune.core.pruner.MagnitudePruner`
decides *what*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_prune.core.pruner import (
    CRITERIA,
    STD_OF,
    Criterion,
    MagnitudePruner,
    StdOf,
    check_fraction,
    check_quality,
)
from lightning_prune.core.report import format_table

_STATE_VERSION = 1


def _check_epochs(prune_epochs: Sequence[int] | None) -> list[int] | None:
    if prune_epochs is None:
        return None
    if isinstance(prune_epochs, (str, bytes)) or not isinstance(prune_epochs, Sequence):
        raise ValueError(f"`prune_epochs` must be a list of epoch indices, got {prune_epochs!r}.")
    epochs = list(prune_epochs)
    if not epochs:
        raise ValueError("`prune_epochs` is empty; give at least one epoch index (e.g. [5]) or None.")
    for epoch in epochs:
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"`prune_epochs` must hold integers >= 0, got {epoch!r} in {epochs}.")
    if any(b <= a for a, b in pairwise(epochs)):
        raise ValueError(f"`prune_epochs` must be strictly increasing (sorted, no duplicates), got {epochs}.")
    return epochs


class PruneRetrainCallback(Callback):
    """Prune connections by magnitude at chosen epochs and keep them pruned while the rest retrain.

    At the start of each epoch in ``prune_epochs`` every selected layer loses the connections below
    its threshold (Han et al. 2015: ``quality * std(W)``); from then on the pruned weights stay
    exactly zero: their gradients are masked before every optimizer step (before gradient clipping),
    the weights are re-masked after it, and the optimizer's state of pruned entries is zeroed. Masks
    only shrink. They are part of this callback's checkpoint state, so ``trainer.fit(ckpt_path=...)``
    resumes with them; the model's own ``state_dict`` stays plain (dense tensors holding zeros).

    Args:
        layers: Glob patterns over module names (``["features.*", "fc1"]``). ``None``: every
            Linear and Conv1d/2d/3d layer.
        quality: Han's quality parameter: the threshold of a layer is ``quality * std(W)``. A number,
            or ``{pattern: number}`` for per-layer sensitivity (exact names win, then the first
            matching pattern; ``"*"`` gives a default).
        prune_epochs: Epochs (0-based) at whose start masks are (re)computed, strictly increasing.
            ``None``: one prune at ``max_epochs // 2``, dense training then retraining.
        criterion: ``"std"`` (Han's rule, uses ``quality``), ``"fraction"`` (prune the smallest
            ``amount`` of each layer) or ``"global"`` (the smallest ``amount`` of all selected weights
            together); the last two are what ``ModelPruning`` users know.
        amount: Target share pruned for ``"fraction"`` (number or ``{pattern: number}``) and
            ``"global"`` (number), counting connections pruned before.
        std_of: ``"dense"`` (default): the std is that of the layer's weights when first pruned, cached,
            so a quality always means the same cut; ``"surviving"``: the std of the weights alive at
            each prune, so repeated prunes at one quality keep cutting deeper.
        prune_bias: Prune the selected layers' biases too (by their own std / amount).
        min_remaining: ``None``: a prune that would remove every connection of a layer raises
            :class:`~lightning_prune.core.pruner.PruningError`. A share in ``[0, 1]``: each layer keeps
            at least that share (and one connection), the largest weights.
        verbose: Print the per-layer table at each prune (rank zero only).

    Example::

        from lightning_prune import PruneRetrainCallback

        trainer = Trainer(
            max_epochs=20,
            callbacks=[PruneRetrainCallback(quality={"conv*": 0.6, "*": 1.2}, prune_epochs=[10])],
        )
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        quality: float | dict[str, float] = 1.0,
        prune_epochs: list[int] | None = None,
        criterion: Criterion = "std",
        amount: float | dict[str, float] | None = None,
        std_of: StdOf = "dense",
        prune_bias: bool = False,
        min_remaining: float | None = None,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if layers is not None and (
            isinstance(layers, str) or not all(isinstance(p, str) and p for p in layers) or not layers
        ):
            raise ValueError(f"`layers` must be None or a non-empty list of glob patterns, got {layers!r}.")
        if criterion not in CRITERIA:
            raise ValueError(f"`criterion` must be one of {CRITERIA}, got {criterion!r}.")
        if std_of not in STD_OF:
            raise ValueError(f"`std_of` must be one of {STD_OF}, got {std_of!r}.")
        check_quality(quality)
        if criterion == "std" and amount is not None:
            raise ValueError("`amount` is for criterion='fraction' or 'global'; with criterion='std' use `quality`.")
        if criterion != "std":
            if amount is None:
                raise ValueError(f"criterion={criterion!r} needs `amount`, the share of weights to prune in [0, 1].")
            for key, value in amount.items() if isinstance(amount, Mapping) else [("", amount)]:
                check_fraction(value, f"amount[{key!r}]" if key else "amount")
        if min_remaining is not None:
            check_fraction(min_remaining, "min_remaining")
        self.layers = list(layers) if layers is not None else None
        self.quality = dict(quality) if isinstance(quality, Mapping) else quality
        self.prune_epochs = _check_epochs(prune_epochs)
        self.criterion = criterion
        self.amount = dict(amount) if isinstance(amount, Mapping) else amount
        self.std_of = std_of
        self.prune_bias = prune_bias
        self.min_remaining = min_remaining
        self.verbose = verbose
        self.pruner: MagnitudePruner | None = None
        self.done_epochs: list[int] = []
        self._pending_state: dict[str, Any] | None = None

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints."""
        return self._generate_state_key(layers=self.layers)

    def _prune_kwargs(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "quality": self.quality,
            "amount": self.amount,
            "std_of": self.std_of,
            "min_remaining": self.min_remaining,
        }

    def _schedule(self, trainer: pl.Trainer) -> list[int]:
        if self.prune_epochs is not None:
            return self.prune_epochs
        if trainer.max_epochs is None or trainer.max_epochs < 2:
            raise ValueError(
                f"`prune_epochs=None` prunes once at max_epochs // 2, which needs a finite "
                f"`Trainer(max_epochs=...)` >= 2 (got {trainer.max_epochs!r}). Pass `prune_epochs` explicitly."
            )
        return [trainer.max_epochs // 2]

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve and validate layers, per-layer values and the schedule against the model."""
        if stage != "fit":
            return
        if self.pruner is None or self.pruner.model is not pl_module:
            self.pruner = MagnitudePruner(pl_module, self.layers, include_bias=self.prune_bias)
        self.pruner.check(**self._prune_kwargs())
        epochs = self._schedule(trainer)
        max_epochs = trainer.max_epochs
        late = [e for e in epochs if max_epochs is not None and 0 <= max_epochs <= e]
        if late:
            rank_zero_warn(
                f"`prune_epochs` {late} are >= max_epochs={max_epochs}: they will not run in this fit "
                f"(a later fit resumed from its checkpoint with a larger max_epochs runs them)."
            )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore checkpointed masks on the model's device and hook into every optimizer."""
        assert self.pruner is not None
        self.pruner.refresh()
        if self._pending_state is not None:
            self.pruner.load_state_dict(self._pending_state.get("pruner", {}))
            self.done_epochs = list(self._pending_state.get("done_epochs", []))
            self._pending_state = None
        for optimizer in trainer.optimizers:
            self.pruner.attach(optimizer, mask_grads=False)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Prune if this epoch (or a missed earlier one) is scheduled."""
        assert self.pruner is not None
        epoch = trainer.current_epoch
        due = [e for e in self._schedule(trainer) if e <= epoch and e not in self.done_epochs]
        if due:
            if due[0] < epoch:
                rank_zero_warn(f"Prune scheduled for epoch {due[0]} runs late, at the start of epoch {epoch}.")
            stats = self.pruner.prune(**self._prune_kwargs())
            self.done_epochs.extend(due)
            if self.verbose:
                title = f"lightning-prune: pruned at the start of epoch {epoch} (prune {len(self.done_epochs)})"
                rank_zero_info(format_table(stats, title=title))
            for s in stats:
                pl_module.log(f"prune/remaining_pct/{s.name}", s.remaining_pct, on_epoch=True)
        if self.pruner.masks:
            pl_module.log("prune/sparsity", self.pruner.sparsity(), on_epoch=True)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Zero the gradients of pruned weights, before gradient clipping and the step."""
        if self.pruner is not None:
            self.pruner.mask_gradients(optimizer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Unhook the optimizers, so they behave as the user's own after fit."""
        if self.pruner is not None:
            self.pruner.detach()

    def state_dict(self) -> dict[str, Any]:
        """Masks, threshold statistics and schedule position: tensors and plain values only."""
        if self.pruner is None:
            return dict(self._pending_state or {})
        return {"version": _STATE_VERSION, "pruner": self.pruner.state_dict(), "done_epochs": list(self.done_epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpointed state until training starts, when the model is on its device."""
        self._pending_state = dict(state_dict)
