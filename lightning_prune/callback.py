"""``PruneRetrainCallback``: Han et al.'s prune-retrain method for any LightningModule.

The callback decides *when* (at which epoch a round prunes, which retraining settings are in force);
the core (:mod:`lightning_prune.core`) decides *what*.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import pairwise
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities import move_data_to_device
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_prune.checkpoint import checksums, verify_checksums
from lightning_prune.core.dropout import DropoutAdjuster, ForwardTrace, layer_counts, weight_layers
from lightning_prune.core.freezing import Freezer, trainable_parameters
from lightning_prune.core.guard import AccuracyGuard, AccuracyGuardAction, AccuracyGuardMode, gentler
from lightning_prune.core.learning_rate import scale_learning_rate
from lightning_prune.core.pruner import Criterion, MagnitudePruner, StdOf
from lightning_prune.core.regularization import (
    add_l1_gradient,
    params_without_optimizer,
    restore_weight_decay,
    set_weight_decay,
)
from lightning_prune.core.report import format_table
from lightning_prune.core.schedule import Round, build_rounds, check_number, check_round, start_epochs
from lightning_prune.core.sensitivity import SensitivityResult, check_levels, load_quality
from lightning_prune.core.structure import StructureReport, remove_dead_units
from lightning_prune.sensitivity import analyze

_STATE_VERSION = 2
_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


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


def upgrade_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpointed state of :class:`PruneRetrainCallback` in the current layout (older versions upgraded).

    Version 1 (the first releases' ``done_epochs``, one prune per round) becomes ``done_rounds``.

    Raises:
        ValueError: If the state is not a mapping, its version is not a known one (a newer release wrote
            it, say), or its masks are not a mapping of parameter names to tensors.

    Example::

        >>> upgrade_state({"version": 1, "pruner": {}, "done_epochs": [4, 8]})["done_rounds"]
        [0, 1]
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"The checkpointed PruneRetrainCallback state must be a mapping, got {type(state).__name__}.")
    version = state.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= _STATE_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > _STATE_VERSION
        raise ValueError(
            f"The checkpointed PruneRetrainCallback state has version {version!r}; this lightning-prune reads "
            f"versions 1 to {_STATE_VERSION}"
            + (" (a newer lightning-prune wrote it: upgrade to load it)." if newer else ".")
        )
    upgraded = dict(state)
    if version == 1:
        upgraded["done_rounds"] = list(range(len(upgraded.pop("done_epochs", []) or [])))
    upgraded["version"] = _STATE_VERSION
    pruner = upgraded.get("pruner", {})
    if not isinstance(pruner, Mapping) or not isinstance(pruner.get("masks", {}), Mapping):
        raise ValueError(
            f"The checkpointed PruneRetrainCallback state holds no mapping of masks (pruner: {type(pruner).__name__})."
        )
    return upgraded


def _clips_by_norm(trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
    """Whether gradients may be clipped by their norm: by the trainer's setting, or a module's own clipping hook."""
    overridden = type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping
    by_trainer = bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm != "value"
    return by_trainer or overridden


class PruneRetrainCallback(Callback):
    """Prune connections by magnitude in rounds, and retrain the survivors the way Han et al. did.

    **Pruning.** At the start of each round every selected layer loses the connections below its
    threshold (``quality * std(W)``, or a fraction / global rule); from then on the pruned weights
    stay exactly zero: their gradients are masked before every optimizer step (before gradient
    clipping), their optimizer state is zeroed, and the weights are re-masked after the step for any
    optimizer that could move a zero weight with a zero gradient. Masks only shrink. They are part of
    this callback's checkpoint state; the model's own ``state_dict`` stays plain (dense tensors
    holding zeros).

    **Retraining** (each setting from the round in force, the dense phase having its own):

    - dropout: every dropout module's rate becomes ``D_o * sqrt(C_ir / C_io)`` of the layer whose
      inputs it drops (always from the original rate and count);
    - regularization: L2 as the optimizer's weight decay, L1 as a gradient term ``l1 * sign(w)``;
    - learning rate: scaled by ``lr_scale`` in the param groups and in LR schedulers' base rates;
    - local retraining: only the modules matching ``train_only`` train, the rest is frozen (no
      gradient, so backprop stops at a frozen prefix; BatchNorm statistics frozen too by default).

    **Rounds.** A round is a dict of the keys in :data:`~lightning_prune.core.schedule.ROUND_KEYS`;
    keys left out take the constructor's values (``lr_scale``, ``weight_decay`` and ``l1`` default to
    ``retrain_lr_scale``, ``retrain_weight_decay`` and ``retrain_l1``). Inside one ``fit``, round
    ``k`` starts at ``prune_epochs[k]``, or, when rounds carry ``epochs``, the rounds fill the end of
    training and what precedes them is dense training. :func:`lightning_prune.fit_rounds` runs each
    round as its own ``Trainer.fit`` instead.

    Args:
        layers: Glob patterns over module names (``["features.*", "fc1"]``). ``None``: every
            Linear and Conv1d/2d/3d layer.
        quality: Han's quality: a layer's threshold is ``quality * std(W)``. A number,
            ``{pattern: number}`` (exact names win, then the first matching pattern; ``"*"`` as default),
            or the path of a quality file written by the sensitivity analysis (``.yaml``/``.json``;
            one holding ``criterion: fraction`` and ``amount`` sets those instead).
        prune_epochs: Epochs (0-based) at whose start rounds prune, strictly increasing. ``None``:
            from the rounds' ``epochs``, or one prune at ``max_epochs // 2`` when there are no rounds.
        criterion: ``"std"`` (Han's rule), ``"fraction"`` (the smallest ``amount`` of each layer) or
            ``"global"`` (the smallest ``amount`` of all selected weights together).
        amount: Target share pruned for ``"fraction"`` (number or ``{pattern: number}``) and
            ``"global"``, counting connections pruned before.
        std_of: ``"dense"``: the std of a layer's weights when first pruned (cached: a quality always
            means the same cut); ``"surviving"``: the std of the weights alive at each prune.
        prune_bias: Prune the selected layers' biases too.
        min_remaining: ``None``: a prune that would remove every connection of a layer raises
            :class:`~lightning_prune.core.pruner.PruningError`; a share in ``[0, 1]``: each layer keeps
            at least that share (and one connection).
        adjust_dropout: Adjust dropout rates after each prune.
        dropout_map: ``{dropout_module: layer}`` links that override the automatic ones (forward
            order, traced in the first training batch; module registration order before that).
        l1: L1 coefficient during dense training (gradient term on the selected weights).
        weight_decay: Weight decay during dense training; ``None`` leaves the optimizer's own.
        retrain_l1: L1 coefficient while retraining (default for rounds' ``l1``).
        retrain_weight_decay: Weight decay while retraining (default for rounds' ``weight_decay``);
            ``None`` leaves the optimizer's own. Weight decay is set in the param groups that hold a
            selected weight; other groups (e.g. no-decay groups of biases and norms) keep theirs.
        retrain_lr_scale: Learning-rate factor while retraining (paper: 0.1 for LeNets, 0.01 for AlexNet).
        train_only: Glob patterns of the modules that retrain (default for rounds' ``train_only``);
            ``None``: everything trains.
        freeze_bn_stats: Put BatchNorm modules of the frozen part in eval mode (running statistics frozen).
        rounds: List of round dicts (see above); ``None``: one round per prune epoch, all defaults.
        guard_monitor: Metric guarding iterative pruning (e.g. ``"val_acc"``); ``None``: no guard. After
            each round's retraining the metric is compared with its dense value (taken at the first
            prune); a round that loses more than the tolerance is rolled back to the previous round's
            masks and weights, then the schedule stops or the round is retried gentler.
        guard_mode: ``"max"`` if higher is better, ``"min"`` if lower is.
        guard_tolerance: Largest allowed worsening from the dense value, ``>= 0``.
        guard_relative: Whether ``guard_tolerance`` is a share of the dense value.
        guard_action: ``"stop"`` the schedule after a rollback, or ``"retry"`` the round with its
            quality (or amount) times ``guard_retry_scale``. Within one fit a retry takes the next
            round's epochs (that round is dropped); under :func:`lightning_prune.fit_rounds` it is
            one more fit of the same round.
        guard_retries: How many times one round may be retried before the schedule stops.
        guard_retry_scale: Factor in ``(0, 1)`` on quality (or amount) at each retry.
        shrink_at_end: At the end of each fit, remove dead units (neurons / channels whose inputs or
            outputs are all pruned) from the model in place, with exactly the same outputs; the masks
            are restricted to the kept units. Needs ``example_input_array`` on the LightningModule.
            Save the result with :func:`lightning_prune.core.save_shrunk`.
        sensitivity_tolerance: Run the sensitivity analysis (:func:`lightning_prune.sensitivity.analyze`)
            on the validation data just before the first prune, and replace the default ``quality``
            (or ``amount``) with the largest level per layer whose accuracy drop is within this
            tolerance. Rounds giving their own ``quality``/``amount`` keep it. ``None``: off.
        sensitivity_levels: Levels of that sweep (``None``: the defaults of the criterion).
        sensitivity_relative: Whether ``sensitivity_tolerance`` is a share of the dense accuracy.
        verbose: Print the per-layer table at each prune and a summary at each round's end (rank zero).

    Example::

        from lightning_prune import PruneRetrainCallback

        prune = PruneRetrainCallback(
            retrain_lr_scale=0.1,
            rounds=[
                {"quality": {"conv*": 0.5, "*": 1.0}, "epochs": 4},
                {"quality": {"conv*": 0.7, "*": 1.4}, "epochs": 4, "train_only": ["fc*"]},
            ],
        )
        trainer = Trainer(max_epochs=20, callbacks=[prune])  # 12 dense epochs, then 2 rounds
        trainer.fit(model, datamodule=dm)
    """

    def __init__(
        self,
        layers: list[str] | None = None,
        quality: float | dict[str, float] | str = 1.0,
        prune_epochs: list[int] | None = None,
        criterion: Criterion = "std",
        amount: float | dict[str, float] | None = None,
        std_of: StdOf = "dense",
        prune_bias: bool = False,
        min_remaining: float | None = None,
        adjust_dropout: bool = True,
        dropout_map: dict[str, str] | None = None,
        l1: float = 0.0,
        weight_decay: float | None = None,
        retrain_l1: float = 0.0,
        retrain_weight_decay: float | None = None,
        retrain_lr_scale: float = 1.0,
        train_only: list[str] | None = None,
        freeze_bn_stats: bool = True,
        rounds: list[dict[str, Any]] | None = None,
        guard_monitor: str | None = None,
        guard_mode: AccuracyGuardMode = "max",
        guard_tolerance: float = 0.0,
        guard_relative: bool = False,
        guard_action: AccuracyGuardAction = "stop",
        guard_retries: int = 1,
        guard_retry_scale: float = 0.8,
        shrink_at_end: bool = False,
        sensitivity_tolerance: float | None = None,
        sensitivity_levels: list[float] | None = None,
        sensitivity_relative: bool = False,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(quality, str):
            loaded = load_quality(quality)
            quality = loaded.get("quality", 1.0)
            if "amount" in loaded:
                criterion, amount = loaded.get("criterion", "fraction"), loaded["amount"]
        if layers is not None and (
            isinstance(layers, str) or not layers or not all(isinstance(p, str) and p for p in layers)
        ):
            raise ValueError(f"`layers` must be None or a non-empty list of glob patterns, got {layers!r}.")
        if dropout_map is not None and (
            not isinstance(dropout_map, Mapping)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in dropout_map.items())
        ):
            raise ValueError(f"`dropout_map` must be a dict of dropout module name -> layer name, got {dropout_map!r}.")
        check_number(l1, "`l1`")
        check_number(weight_decay, "`weight_decay`", optional=True)
        check_number(retrain_l1, "`retrain_l1`")
        check_number(retrain_weight_decay, "`retrain_weight_decay`", optional=True)
        check_number(retrain_lr_scale, "`retrain_lr_scale`", positive=True)
        self.defaults: dict[str, Any] = {
            "criterion": criterion,
            "quality": dict(quality) if isinstance(quality, Mapping) else quality,
            "amount": dict(amount) if isinstance(amount, Mapping) else amount,
            "std_of": std_of,
            "min_remaining": min_remaining,
            "train_only": list(train_only) if train_only is not None else None,
            "lr_scale": retrain_lr_scale,
            "weight_decay": retrain_weight_decay,
            "l1": retrain_l1,
        }
        check_round({k: v for k, v in self.defaults.items() if k not in ("lr_scale", "weight_decay", "l1")})
        if criterion != "std" and amount is None:
            raise ValueError(f"criterion={criterion!r} needs `amount`, the share of weights to prune in [0, 1].")
        if criterion == "std" and amount is not None:
            raise ValueError("`amount` is for criterion='fraction' or 'global'; with criterion='std' use `quality`.")
        self.prune_epochs = _check_epochs(prune_epochs)
        self.rounds = build_rounds(rounds, len(self.prune_epochs or [0]), self.defaults)
        self._round_specs = [dict(r) for r in rounds] if rounds is not None else None
        if self.prune_epochs is not None:
            start_epochs(self.rounds, self.prune_epochs, None)
        self.layers = list(layers) if layers is not None else None
        self.prune_bias = prune_bias
        self.adjust_dropout = adjust_dropout
        self.dropout_map = dict(dropout_map) if dropout_map is not None else None
        self.l1 = l1
        self.weight_decay = weight_decay
        self.freeze_bn_stats = freeze_bn_stats
        self.verbose = verbose
        if sensitivity_tolerance is not None:
            check_number(sensitivity_tolerance, "`sensitivity_tolerance`", optional=True)
            if criterion == "global":
                raise ValueError("`sensitivity_tolerance` picks per-layer levels; use criterion 'std' or 'fraction'.")
            if sensitivity_levels is not None:
                check_levels(sensitivity_levels, criterion)
        self.sensitivity_tolerance = sensitivity_tolerance
        self.sensitivity_levels = list(sensitivity_levels) if sensitivity_levels is not None else None
        self.sensitivity_relative = sensitivity_relative
        self.sensitivity: SensitivityResult | None = None
        self.shrink_at_end = shrink_at_end
        self.structure_report: StructureReport | None = None
        self.guard = (
            AccuracyGuard(
                guard_monitor,
                mode=guard_mode,
                tolerance=guard_tolerance,
                relative=guard_relative,
                action=guard_action,
                retries=guard_retries,
                retry_scale=guard_retry_scale,
            )
            if guard_monitor is not None
            else None
        )
        self.decisions: list[dict[str, Any]] = []
        self.skipped_rounds: list[int] = []
        self.stopped = False
        self.round_scales: dict[int, float] = {}
        self._snapshot: dict[str, Any] | None = None

        self.pruner: MagnitudePruner | None = None
        self.dropout: DropoutAdjuster | None = None
        self.freezer = Freezer()
        self.done_rounds: list[int] = []
        self.lr_scale_in_force = 1.0
        self._original_weight_decay: list[list[float]] = []
        self._fit_plan: dict[int, list[int]] | None = None
        self._frozen_for: list[str] | None = None
        self._starts: list[int] = []
        self._pending_state: dict[str, Any] | None = None
        self._trace: ForwardTrace | None = None
        self._traced = False
        self._l1_in_force = 0.0
        self._clips_by_norm = False
        self._selected_cache: dict[int, list[torch.Tensor]] = {}

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints."""
        return self._generate_state_key(layers=self.layers)

    @property
    def active_round(self) -> Round | None:
        """The round whose retraining settings are in force (``None`` during dense training).

        In a fit that runs one round (:meth:`fit_round`), that round is in force from the fit's start.
        """
        if self._fit_plan and 0 in self._fit_plan:
            return self.round(self._fit_plan[0][-1])
        return self.round(self.done_rounds[-1]) if self.done_rounds else None

    def round(self, index: int) -> Round:
        """Round ``index`` as it runs: gentler than configured if the guard retried it."""
        return gentler(self.rounds[index], self.round_scales.get(index, 1.0))

    def fit_round(self, index: int | None, scale: float = 1.0) -> None:
        """Make the next ``fit`` run round ``index`` from its first epoch (``None``: a dense fit, no prune).

        Used by :func:`lightning_prune.fit_rounds`, which runs each round as its own ``Trainer.fit``;
        the next fit ignores ``prune_epochs`` and the rounds' start epochs.
        """
        if index is not None and not 0 <= index < len(self.rounds):
            raise ValueError(f"Round index {index} is out of range: there are {len(self.rounds)} rounds.")
        self._fit_plan = {} if index is None else {0: [index]}
        if index is not None:
            self.round_scales[index] = scale

    # ------------------------------------------------------------------ setup and validation
    def bind(self, model: pl.LightningModule) -> None:
        """Select the pruned parameters and dropout modules of ``model`` (done by ``setup``; idempotent).

        Raises:
            ValueError: If ``layers`` or ``dropout_map`` do not resolve on the model.
        """
        if self.pruner is None or self.pruner.model is not model:
            self.pruner = MagnitudePruner(model, self.layers, include_bias=self.prune_bias)
            self.dropout = DropoutAdjuster(model, self.dropout_map) if self.adjust_dropout else None
            self._traced = False

    def _schedule(self, trainer: pl.Trainer) -> dict[int, list[int]]:
        """``{epoch: [round indices starting then]}`` for this fit."""
        if self._fit_plan is not None:
            return self._fit_plan
        return {epoch: [k] for k, epoch in enumerate(self._starts)}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve and validate layers, rounds, dropout links and frozen sets against the model."""
        if stage != "fit":
            return
        self.bind(pl_module)
        assert self.pruner is not None
        for index, round_ in enumerate(self.rounds):
            try:
                self.pruner.check(**round_.prune_kwargs())
                if round_.train_only is not None:
                    trainable_parameters(pl_module, round_.train_only)
            except ValueError as err:
                raise ValueError(f"rounds[{index}]: {err}") from err
        self._check_strategy(trainer)
        if self.shrink_at_end and pl_module.example_input_array is None:
            raise ValueError(
                "`shrink_at_end=True` needs `example_input_array` on the LightningModule (a batch its forward takes), "
                "to trace the dataflow between layers and to check that outputs stay the same."
            )
        round_ = self.active_round
        if self._fit_plan and round_ is not None and round_.train_only is not None:
            # Freeze before the strategy wraps the model, so DDP only registers what trains.
            self._freeze(pl_module, round_)
        if self._fit_plan is None:
            self._starts = self._start_epochs(trainer)
            max_epochs = trainer.max_epochs
            late = [e for e in self._starts if max_epochs is not None and 0 <= max_epochs <= e]
            if late:
                rank_zero_warn(
                    f"Rounds starting at epochs {late} are at or beyond max_epochs={max_epochs}: they will not run "
                    f"in this fit (a later fit resumed from its checkpoint with a larger max_epochs runs them)."
                )

    def _check_strategy(self, trainer: pl.Trainer) -> None:
        strategy = trainer.strategy
        if isinstance(strategy, _SHARDED):
            raise ValueError(
                f"PruneRetrainCallback does not support {type(strategy).__name__} yet: it shards parameters, and "
                f"pruning shards by magnitude would be wrong. Use strategy='ddp' (or a single device)."
            )
        unused = getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
        in_one_fit = isinstance(strategy, DDPStrategy) and not unused and self._fit_plan is None
        if in_one_fit and any(r.train_only is not None for r in self.rounds):
            raise ValueError(
                "Rounds with `train_only` inside one fit under DDP need "
                "strategy='ddp_find_unused_parameters_true' (DDP fixes the set of trained parameters when it "
                "wraps the model), or run each round as its own fit with lightning_prune.fit_rounds."
            )

    def _freeze(self, pl_module: pl.LightningModule, round_: Round | None) -> None:
        patterns = round_.train_only if round_ is not None else None
        if patterns == self._frozen_for:
            return
        self.freezer.thaw()
        if patterns is not None:
            self.freezer.freeze(pl_module, patterns, freeze_bn_stats=self.freeze_bn_stats)
        self._frozen_for = patterns

    def _start_epochs(self, trainer: pl.Trainer) -> list[int]:
        if self.prune_epochs is None and len(self.rounds) == 1 and self.rounds[0].epochs is None:
            if trainer.max_epochs is None or trainer.max_epochs < 2:
                raise ValueError(
                    f"Without `prune_epochs` or rounds with `epochs`, the callback prunes once at max_epochs // 2, "
                    f"which needs a finite `Trainer(max_epochs=...)` >= 2 (got {trainer.max_epochs!r})."
                )
            return [trainer.max_epochs // 2]
        return start_epochs(self.rounds, self.prune_epochs, trainer.max_epochs)

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore checkpointed state on the model's device, hook the optimizers, enter the current phase."""
        assert self.pruner is not None
        self.pruner.refresh()
        self._selected_cache.clear()
        resumed_optimizers = trainer.ckpt_path is not None
        if self._pending_state is not None:
            self._restore(self._pending_state, resumed_optimizers)
            self._pending_state = None
        if not resumed_optimizers or not self._original_weight_decay:
            self.lr_scale_in_force = 1.0
            self._original_weight_decay = [
                [g.get("weight_decay", 0.0) for g in o.param_groups] for o in trainer.optimizers
            ]
        for optimizer in trainer.optimizers:
            self.pruner.attach(optimizer)
        self._clips_by_norm = _clips_by_norm(trainer, pl_module)
        needs_optimizer = (
            self.l1 > 0
            or self.weight_decay is not None
            or any(r.l1 > 0 or r.weight_decay is not None for r in self.rounds)
        )
        if needs_optimizer:
            selected = {name: self.pruner.parameter(name) for name in self.pruner.layer_of}
            missing = params_without_optimizer(trainer.optimizers, selected)
            if missing:
                raise ValueError(
                    f"L1 or weight decay is configured, but no optimizer of the trainer holds {missing[0]!r}: the "
                    f"callback applies them through the optimizers it finds in `configure_optimizers`."
                )
        self._enter_phase(trainer, pl_module)

    def _enter_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Apply the settings of the active round (or of dense training) to optimizers and model."""
        assert self.pruner is not None
        round_ = self.active_round
        self._l1_in_force = round_.l1 if round_ else self.l1
        decay = round_.weight_decay if round_ else self.weight_decay
        selected = [self.pruner.parameter(name) for name in self.pruner.layer_of]
        for index, optimizer in enumerate(trainer.optimizers):
            if decay is not None:
                set_weight_decay(optimizer, selected, decay)
            elif index < len(self._original_weight_decay):
                restore_weight_decay(optimizer, self._original_weight_decay[index])
        target = round_.lr_scale if round_ else 1.0
        if target != self.lr_scale_in_force:
            for optimizer in trainer.optimizers:
                schedulers = [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]
                scale_learning_rate(optimizer, target / self.lr_scale_in_force, schedulers)
            self.lr_scale_in_force = target
        self._freeze(pl_module, round_)
        if self.dropout is not None:
            self.dropout.apply(layer_counts(self.pruner.masks, self.pruner.layer_of))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the rounds due at this epoch (late ones too), then enter the latest one's phase."""
        assert self.pruner is not None
        epoch = trainer.current_epoch
        due = [k for start, ks in self._schedule(trainer).items() if start <= epoch for k in ks]
        due = [k for k in due if k not in self.done_rounds and k not in self.skipped_rounds and not self.stopped]
        if due and self.done_rounds and self.verbose and epoch > 0:
            self._summarize_round(trainer)
        if due and self.guard is not None and self._fit_plan is None:
            if self.done_rounds:
                due = self._apply_guard(trainer, pl_module, due)
            elif self.guard.baseline is None:
                self.guard.baseline = self.guard.value(trainer.callback_metrics)
        if due and self.sensitivity_tolerance is not None and self.sensitivity is None and not self.pruner.masks:
            self._analyze(trainer, pl_module)
        for k in due:
            start = next((s for s, ks in self._schedule(trainer).items() if k in ks), epoch)
            if start < epoch and k not in self.round_scales:
                rank_zero_warn(f"Round {k} was due at epoch {start}; it runs late, at the start of epoch {epoch}.")
            if self.guard is not None and self._fit_plan is None:
                self._snapshot = self._take_snapshot(pl_module)
            stats = self.pruner.prune(**self.round(k).prune_kwargs())
            if trainer.world_size > 1:
                # Decided once: every rank takes rank zero's masks and statistics.
                state = trainer.strategy.broadcast(self.pruner.state_dict(), src=0)
                if trainer.global_rank != 0:
                    self.pruner.load_state_dict(state)
                    stats = self.pruner.stats()
            self.done_rounds.append(k)
            self._enter_phase(trainer, pl_module)
            if self.verbose:
                rank_zero_info(self._describe_prune(k, epoch, stats))
            for s in stats:
                pl_module.log(f"prune/remaining_pct/{s.name}", s.remaining_pct, on_epoch=True, sync_dist=True)
        if not due:
            self.freezer.reapply()
        if self.pruner.masks:
            pl_module.log("prune/sparsity", self.pruner.sparsity(), on_epoch=True, sync_dist=True)
            pl_module.log("prune/round", float(len(self.done_rounds)), on_epoch=True, sync_dist=True)

    def _analyze(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Sensitivity sweep on the dense model; its per-layer levels become the default quality/amount."""
        assert self.pruner is not None and self.sensitivity_tolerance is not None
        datamodule = trainer.datamodule
        loaders = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
        if not loaders:
            raise ValueError("`sensitivity_tolerance` needs validation data (a val_dataloader) to measure on.")
        criterion = "fraction" if self.defaults["criterion"] == "fraction" else "std"
        self.sensitivity = analyze(
            pl_module,
            dataloaders=loaders,
            levels=self.sensitivity_levels,
            layers=self.pruner.layers,
            criterion=criterion,
            progress=self.verbose and trainer.is_global_zero,
        )
        chosen = self.sensitivity.choose(self.sensitivity_tolerance, relative=self.sensitivity_relative)
        self.defaults["amount" if criterion == "fraction" else "quality"] = chosen
        self.rounds = build_rounds(self._round_specs, len(self.rounds), self.defaults)
        if self.verbose:
            rank_zero_info(
                f"lightning-prune: sensitivity (accuracy without retraining, each layer pruned alone)\n"
                f"{self.sensitivity.table()}\n"
                f"{self.sensitivity.quality_yaml(self.sensitivity_tolerance, self.sensitivity_relative)}"
            )

    def _apply_guard(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: list[int]) -> list[int]:
        """Judge the round in force; on failure roll it back and return what runs now instead of ``due``."""
        assert self.guard is not None
        failed = self.done_rounds[-1]
        reason = self.guard.verdict(trainer.callback_metrics)
        if reason is None:
            self.record_decision("kept", failed, f"{self.guard.monitor} within tolerance")
            return due
        self._roll_back(trainer, pl_module)
        tries = sum(1 for d in self.decisions if d["round"] == failed and d["decision"] == "rolled back")
        if self.guard.action == "retry" and tries < self.guard.retries:
            self.record_decision(
                "rolled back", failed, reason + f"; retrying gentler in the epochs of round {due[0] + 1}"
            )
            self.skipped_rounds.append(due[0])
            self.round_scales[failed] = self.round_scales.get(failed, 1.0) * self.guard.retry_scale
            return [failed]
        self.record_decision("rolled back", failed, reason + "; the schedule stops")
        self.stopped = True
        return []

    def record_decision(self, decision: str, k: int, reason: str) -> None:
        """Record and print a guard decision on round ``k`` (``"kept"`` or ``"rolled back"``)."""
        self.decisions.append({"round": k, "decision": decision, "reason": reason})
        rank_zero_info(f"lightning-prune guard: round {k + 1} {decision}: {reason}.")

    def _take_snapshot(self, pl_module: pl.LightningModule) -> dict[str, Any]:
        weights = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        return {"model": weights, "callback": self._own_state(snapshot=False)}

    def _roll_back(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self._snapshot is not None and self.pruner is not None
        pl_module.load_state_dict(self._snapshot["model"])
        state = self._snapshot["callback"]
        self.pruner.load_state_dict(state["pruner"])
        self.done_rounds = list(state["done_rounds"])
        if self.dropout is not None and state.get("dropout"):
            self.dropout.load_state_dict(state["dropout"])
        self._enter_phase(trainer, pl_module)

    def _describe_prune(self, k: int, epoch: int, stats: list[Any]) -> str:
        round_ = self.round(k)
        where = f"round {k + 1}/{len(self.rounds)}, start of epoch {epoch}"
        lines = [format_table(stats, title=f"lightning-prune: pruned ({where})")]
        retrain = [f"lr x{round_.lr_scale:g}"]
        if round_.weight_decay is not None:
            retrain.append(f"weight decay {round_.weight_decay:g}")
        if round_.l1:
            retrain.append(f"L1 {round_.l1:g}")
        if round_.train_only is not None:
            retrain.append(f"training only {round_.train_only} ({len(self.freezer.frozen)} parameters frozen)")
        lines.append("retraining: " + ", ".join(retrain))
        if self.dropout is not None and self.dropout.original:
            now = self.dropout.current()
            rates = ", ".join(f"{name} {p:.3g}->{now[name]:.3g}" for name, p in self.dropout.original.items() if p > 0)
            if rates:
                lines.append(f"dropout ({self.dropout.source} links): {rates}")
        return "\n".join(lines)

    def _summarize_round(self, trainer: pl.Trainer) -> None:
        assert self.pruner is not None
        metrics = {
            k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("prune/") and v.numel() == 1
        }
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())) or "no metrics logged"
        rank_zero_info(
            f"lightning-prune: end of round {len(self.done_rounds)}/{len(self.rounds)}: "
            f"{100 * (1 - self.pruner.sparsity()):.2f}% of the selected weights remain; {shown}"
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Trace the forward order once (first batch) to link dropout modules to layers."""
        if self.dropout is not None and not self._traced and self._trace is None:
            self._trace = ForwardTrace(pl_module, weight_layers(pl_module)).__enter__()

    def _end_trace(self, trainer: pl.Trainer) -> None:
        if self._trace is None:
            return
        trace, self._trace = self._trace, None
        trace.close()
        self._traced = True
        if trace.functional_dropout:
            rank_zero_warn(
                f"The model calls dropout functionally (torch.nn.functional.dropout in forward; "
                f"{trace.functional_dropout} call(s) in one step). lightning-prune cannot adjust those rates; use "
                f"nn.Dropout modules for the paper's dropout adjustment."
            )
        assert self.dropout is not None and self.pruner is not None
        order = trace.order
        if trainer.world_size > 1:
            order = trainer.strategy.broadcast(order, src=0)
        if order:
            self.dropout.use_order(order, "traced")
            self.dropout.apply(layer_counts(self.pruner.masks, self.pruner.layer_of))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """End the one-batch trace before backward."""
        self._end_trace(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """End the one-batch trace if no backward ran."""
        self._end_trace(trainer)

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Add the L1 term; under norm clipping also zero the pruned gradients now, so the norm leaves them out.

        The optimizer's step masks them in any case, after clipping (see ``MagnitudePruner.attach``).
        """
        assert self.pruner is not None
        if self._l1_in_force:
            add_l1_gradient(self._selected_in(optimizer), self._l1_in_force)
        if self._clips_by_norm:
            self.pruner.mask_gradients(optimizer)

    def _selected_in(self, optimizer: Optimizer) -> list[torch.Tensor]:
        assert self.pruner is not None
        cached = self._selected_cache.get(id(optimizer))
        if cached is None:
            owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
            params = [self.pruner.parameter(name) for name in self.pruner.layer_of]
            cached = self._selected_cache[id(optimizer)] = [p for p in params if id(p) in owned]
        return cached

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Summarize the last round; with a guard, judge it (and roll it back if it failed)."""
        if self.done_rounds and self.verbose:
            self._summarize_round(trainer)
        judged = {d["round"] for d in self.decisions if d["decision"] == "kept"}
        last = self.done_rounds[-1] if self.done_rounds else None
        if self.guard is not None and self._fit_plan is None and last is not None and last not in judged:
            reason = self.guard.verdict(trainer.callback_metrics)
            if reason is None:
                self.record_decision("kept", last, f"{self.guard.monitor} within tolerance")
            else:
                self._roll_back(trainer, pl_module)
                self.record_decision("rolled back", last, reason + "; no epochs left to retry")
                self.stopped = True
        if self.shrink_at_end and self.pruner is not None and self.pruner.masks:
            self._shrink(pl_module)

    def _shrink(self, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None
        example = move_data_to_device(pl_module.example_input_array, pl_module.device)
        report = remove_dead_units(pl_module, example, masks=self.pruner.masks)
        if report.masks is not None:
            self.pruner.masks = dict(report.masks)
        self.pruner.refresh()
        self._selected_cache.clear()
        self.structure_report = report
        removed = ", ".join(f"{name} -{n}" for name, n in report.removed_units.items()) or "none"
        rank_zero_info(
            f"lightning-prune: removed dead units ({removed}); parameters {report.parameters_before} -> "
            f"{report.parameters_after}\n{report}"
        )

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Unhook the optimizers and thaw frozen layers, so the model is the user's own again after fit."""
        if self._trace is not None:
            self._trace.close()
            self._trace = None
        if self.pruner is not None:
            self.pruner.detach()
        self.freezer.thaw()
        self._frozen_for = None
        self._fit_plan = None

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Masks, threshold statistics, round position, dropout rates: tensors and plain values only."""
        if self.pruner is None:
            return dict(self._pending_state or {})
        return self._own_state(snapshot=True)

    def _own_state(self, snapshot: bool) -> dict[str, Any]:
        assert self.pruner is not None
        state = {
            "version": _STATE_VERSION,
            "pruner": self.pruner.state_dict(),
            "done_rounds": list(self.done_rounds),
            "lr_scale_in_force": self.lr_scale_in_force,
            "original_weight_decay": [list(g) for g in self._original_weight_decay],
            "dropout": self.dropout.state_dict() if self.dropout is not None else None,
            "traced": self._traced,
            "guard_baseline": self.guard.baseline if self.guard is not None else None,
            "decisions": [dict(d) for d in self.decisions],
            "skipped_rounds": list(self.skipped_rounds),
            "stopped": self.stopped,
            "round_scales": {str(k): v for k, v in self.round_scales.items()},
            "sensitivity": self.sensitivity.to_dict() if self.sensitivity is not None else None,
            "defaults": {k: self.defaults[k] for k in ("criterion", "quality", "amount")},
        }
        if snapshot and self._snapshot is not None:
            state["snapshot"] = self._snapshot
        return state

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Record CRCs of the checkpoint's weights and of the masks in this callback's state."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is not None and "pruner" in state:
            state["checksums"] = {
                "state_dict": checksums(checkpoint.get("state_dict", {})),
                "masks": checksums(state["pruner"].get("masks", {})),
            }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Refuse a checkpoint whose weights or masks changed since it was written (a corrupt file)."""
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if isinstance(state, Mapping):
            verify_checksums(checkpoint, state, trainer.ckpt_path or "the checkpoint")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check and upgrade the checkpointed state, and keep it until training starts on the model's device.

        Raises:
            ValueError: If the state is from a newer version of this callback, or malformed.
        """
        self._pending_state = upgrade_state(state_dict)

    def masks_from_checkpoint(
        self, checkpoint: Mapping[str, Any], model: pl.LightningModule, path: str = "the checkpoint"
    ) -> dict[str, torch.Tensor] | None:
        """The masks of this callback's state in ``checkpoint``, checked against ``model`` (``None``: no such state).

        The checkpoint's weights and masks are checked against the CRCs recorded when it was written, then
        the state is restored as :meth:`restore` does (``model``'s pruned weights are zero afterwards).

        Raises:
            CheckpointError: If a weight or a mask changed since the checkpoint was written.
            ValueError: If the state is from a newer version, or a mask is missing, mangled or does not fit.
        """
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return None
        if isinstance(state, Mapping):
            verify_checksums(checkpoint, state, path)
        self.restore(model, state)
        assert self.pruner is not None
        return dict(self.pruner.masks)

    def restore(self, model: pl.LightningModule, state: Mapping[str, Any]) -> None:
        """Bind to ``model`` and take a checkpointed state now: masks applied, dropout rates set, rounds done.

        What concerns optimizers (learning-rate scale, weight decay) starts afresh with the next fit.
        :func:`lightning_prune.fit_rounds` uses this between fits.
        """
        self.bind(model)
        self._restore(upgrade_state(state), resumed_optimizers=False)
        self._pending_state = None

    def _restore(self, state: Mapping[str, Any], resumed_optimizers: bool) -> None:
        assert self.pruner is not None
        self.pruner.load_state_dict(state.get("pruner", {}))
        self.done_rounds = [int(k) for k in state.get("done_rounds", [])]
        if len(self.done_rounds) > len(self.rounds):
            raise ValueError(
                f"The checkpoint has {len(self.done_rounds)} rounds done, but this callback has only "
                f"{len(self.rounds)} rounds."
            )
        if resumed_optimizers:
            self.lr_scale_in_force = float(state.get("lr_scale_in_force", 1.0))
            self._original_weight_decay = [list(g) for g in state.get("original_weight_decay", [])]
        if self.dropout is not None and state.get("dropout"):
            self.dropout.load_state_dict(state["dropout"])
            self._traced = bool(state.get("traced", False))
        if self.guard is not None and state.get("guard_baseline") is not None:
            self.guard.baseline = float(state["guard_baseline"])
        self.decisions = [dict(d) for d in state.get("decisions", [])]
        self.skipped_rounds = [int(k) for k in state.get("skipped_rounds", [])]
        self.stopped = bool(state.get("stopped", False))
        self.round_scales = {int(k): float(v) for k, v in state.get("round_scales", {}).items()}
        self._snapshot = state.get("snapshot")
        if state.get("sensitivity") is not None:
            self.sensitivity = SensitivityResult.from_dict(state["sensitivity"])
            self.defaults.update(state.get("defaults", {}))
            self.rounds = build_rounds(self._round_specs, len(self.rounds), self.defaults)
