"""``PruneRetrainCallback``: Han et al.'s prune-retrain method for any LightningModule.

The callback decides *when*; what happens is done by the objects it composes: the
:class:`~lightning_prune.core.schedule.Schedule` (which rounds are due, done, retried, stopped), the
:class:`~lightning_prune.core.pruner.Pruner` (masks, by a criterion), the
:class:`~lightning_prune.phase.RetrainingPhase` (learning rate, L1/L2, freezing), the
:class:`~lightning_prune.dropout.DropoutControl` and the
:class:`~lightning_prune.core.guard.GuardController`. See ``docs/design.md``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_prune import reporting
from lightning_prune.checkpoint import STATE_VERSION, record_checksums, upgrade_state, verify_recorded
from lightning_prune.core.criteria import Criterion, get_criterion
from lightning_prune.core.guard import Guard, GuardController, Verdict
from lightning_prune.core.pruner import Pruner
from lightning_prune.core.schedule import Round, Schedule
from lightning_prune.core.selection import dense_tensors
from lightning_prune.core.sensitivity import SensitivityResult
from lightning_prune.core.settings import DropoutAdjustment, Logging, Regularization, Retraining, Sensitivity
from lightning_prune.core.structure import StructureReport, remove_dead_units
from lightning_prune.core.validation import check_patterns, coerce
from lightning_prune.dropout import DropoutControl
from lightning_prune.fit_checks import (
    check_rounds,
    check_sensitivity,
    check_shrink,
    check_strategy,
    clips_by_norm,
    example_input,
)
from lightning_prune.loggers import LoggerOutput
from lightning_prune.phase import RetrainingPhase
from lightning_prune.sensitivity import analyze_before_pruning
from lightning_prune.sharded_checkpoint import load_sharded_masks, save_masks

__all__ = ["PruneRetrainCallback"]


class PruneRetrainCallback(Callback):
    """Prune connections in rounds and retrain the survivors the way Han et al. did.

    Each round prunes by its criterion (Han's ``quality x std(W)`` by default), keeps pruned weights
    exactly zero, and retrains with its settings (dropout ``D_o * sqrt(C_ir / C_io)``, L1/L2, a scaled
    learning rate, the rest frozen). Rounds run inside one fit, or each as its own fit with
    :func:`lightning_prune.fit_rounds`. Every option: ``docs/usage.md``; the design: ``docs/design.md``.

    Args:
        rounds: The rounds (:class:`~lightning_prune.core.schedule.Round`, or dicts of its fields);
            ``None``: one round per prune epoch (one if none), every field from the defaults.
        criterion: The default rule: a :class:`~lightning_prune.core.criteria.Criterion` (``Std``,
            ``Fraction``, ``Global``, or your own) or a registered name (``"std"``).
        layers: Glob patterns over module or parameter names (see ``select_targets``); ``None``: every Linear,
            Conv, ConvTranspose, attention and recurrent weight.
        prune_bias: Prune the selected layers' biases too.
        prune_epochs: Epochs (0-based) at whose start the rounds prune, strictly increasing. ``None``:
            from the rounds' ``epochs``, or one prune at ``max_epochs // 2``.
        retrain: Retraining settings (:class:`~lightning_prune.core.settings.Retraining`); rounds override them.
        dense: L1/L2 during dense training (:class:`~lightning_prune.core.settings.Regularization`).
        dropout: Dropout adjustment (:class:`~lightning_prune.core.settings.DropoutAdjustment`); ``None``: off.
        guard: Accuracy guard (:class:`~lightning_prune.core.guard.Guard`): a round that loses more
            than its tolerance is rolled back, then retried gentler or the schedule stops. ``None``: off.
        sensitivity: Run a sensitivity analysis before the first prune and take the levels it chooses
            as the default (:class:`~lightning_prune.core.settings.Sensitivity`). ``None``: off.
        shrink_at_end: Remove dead units at the end of each fit (needs ``example_input_array``).
        verbose: Print the per-layer table at each prune and a summary at each round's end.
        logging: What goes to the trainer's loggers besides the ``prune/...`` scalars: the table of each prune,
            weight histograms and the remaining-share chart (:class:`~lightning_prune.core.settings.Logging`).

    Example::

        from lightning_prune import PruneRetrainCallback, Retraining, Std

        prune = PruneRetrainCallback(
            criterion=Std(quality={"conv*": 0.5, "*": 1.0}),
            retrain=Retraining(lr_scale=0.1),
            rounds=[{"epochs": 4}, {"level": {"conv*": 0.7, "*": 1.4}, "epochs": 4, "train_only": ["fc*"]}],
        )
        trainer = Trainer(max_epochs=20, callbacks=[prune])  # 12 dense epochs, then 2 rounds
    """

    def __init__(
        self,
        rounds: list[Round] | None = None,
        criterion: str | Criterion = "std",
        layers: list[str] | None = None,
        prune_bias: bool = False,
        prune_epochs: list[int] | None = None,
        retrain: Retraining = Retraining(),  # noqa: B008 - frozen dataclasses: shared defaults are safe
        dense: Regularization = Regularization(),  # noqa: B008
        dropout: DropoutAdjustment | None = DropoutAdjustment(),  # noqa: B008
        guard: Guard | None = None,
        sensitivity: Sensitivity | None = None,
        shrink_at_end: bool = False,
        verbose: bool = True,
        logging: Logging = Logging(),  # noqa: B008
    ) -> None:
        super().__init__()
        self.criterion = get_criterion(criterion)
        self.layers = check_patterns(layers, "layers")
        self.prune_bias, self.shrink_at_end, self.verbose = prune_bias, shrink_at_end, verbose
        self.retrain = coerce(Retraining, retrain, "retrain")
        self.dropout_settings = None if dropout is None else coerce(DropoutAdjustment, dropout, "dropout")
        self.sensitivity_settings = None if sensitivity is None else coerce(Sensitivity, sensitivity, "sensitivity")
        self.logger_output = LoggerOutput(coerce(Logging, logging, "logging"))
        self.schedule = Schedule(rounds, prune_epochs, self.criterion, self.retrain)
        self.guard = None if guard is None else GuardController(coerce(Guard, guard, "guard"))
        self.phase = RetrainingPhase(coerce(Regularization, dense, "dense"), self.retrain.freeze_bn_stats)
        if self.sensitivity_settings is not None:
            check_sensitivity(self.sensitivity_settings, self.criterion)
        self.pruner: Pruner | None = None
        self.dropout: DropoutControl | None = None
        self.sensitivity: SensitivityResult | None = None
        self.structure_report: StructureReport | None = None
        self._pending_state: dict[str, Any] | None = None
        self._clips_by_norm = False

    # ------------------------------------------------------------------ what drivers use
    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints."""
        return self._generate_state_key(layers=self.layers)

    @property
    def active_round(self) -> Round | None:
        """The round whose retraining settings are in force (``None`` during dense training)."""
        return self.schedule.active

    def fit_round(self, index: int | None) -> None:
        """Make the next ``fit`` run round ``index`` from its first epoch (``None``: a dense fit, no prune).

        Used by :func:`lightning_prune.fit_rounds`; the next fit ignores ``prune_epochs`` and start epochs.
        """
        self.schedule.plan_single(index)

    def bind(self, model: pl.LightningModule) -> None:
        """Select the pruned parameters and dropout modules of ``model`` (done by ``setup``; idempotent).

        Raises:
            ValueError: If ``layers`` or the dropout links do not resolve on the model.
        """
        if self.pruner is None or self.pruner.model is not model:
            self.pruner = Pruner(model, self.layers, include_bias=self.prune_bias)
            links = self.dropout_settings.links if self.dropout_settings is not None else None
            self.dropout = DropoutControl(model, links) if self.dropout_settings is not None else None

    def is_bound_to(self, model: pl.LightningModule) -> bool:
        """Whether this callback prunes ``model`` (``False`` after a fit in spawned processes)."""
        return self.pruner is not None and self.pruner.model is model

    @property
    def has_guard(self) -> bool:
        """Whether an accuracy guard judges the rounds."""
        return self.guard is not None

    @property
    def needs_guard_baseline(self) -> bool:
        """Whether the guard still needs its dense baseline (:meth:`set_guard_baseline`)."""
        return self.guard is not None and self.guard.baseline is None

    def progress(self) -> tuple[int, int]:
        """``(remaining, total)`` connections of the selected layers (``(0, 0)`` before binding)."""
        return self.pruner.counts() if self.pruner is not None else (0, 0)

    def set_guard_baseline(self, metrics: Mapping[str, Any]) -> None:
        """Take the dense value of the guard's metric from ``metrics`` (no-op without a guard)."""
        if self.guard is not None:
            self.guard.set_baseline(metrics)

    def take_guard_snapshot(self, model: pl.LightningModule) -> None:
        """Keep a CPU copy of the model and the pruning state, to roll a failed round back to."""
        if self.guard is not None:
            self.bind(model)
            self.guard.take_snapshot(model, self._rollback_state())

    def judge_round(
        self, model: pl.LightningModule, k: int, metrics: Mapping[str, Any], *, can_retry: bool = True,
        in_place_of: int | None = None, trainer: pl.Trainer | None = None,
    ) -> Verdict:  # fmt: skip
        """Judge round ``k`` by ``metrics`` (see :meth:`GuardController.decide`); on failure roll it back.

        Within one fit, ``trainer`` gets the settings of the phase rolled back to.
        """
        if self.guard is None:
            raise ValueError("judge_round needs an accuracy guard: build the callback with `guard=Guard(...)`.")
        verdict, decision = self.guard.decide(self.schedule, k, metrics, can_retry=can_retry, in_place_of=in_place_of)
        if verdict.action != "keep":
            self._restore_rollback(self.guard.roll_back(model))
            if trainer is not None:
                self._enter_phase(trainer, model)
        rank_zero_info(f"lightning-prune guard: {decision}.")
        return verdict

    # ------------------------------------------------------------------ setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve and validate layers, rounds, dropout links and frozen sets against the model."""
        if stage != "fit":
            return
        self.bind(pl_module)
        assert self.pruner is not None
        check_rounds(self.pruner, self.schedule, pl_module)
        check_strategy(
            trainer, self.schedule, sensitivity=self.sensitivity_settings is not None, shrink_at_end=self.shrink_at_end
        )
        check_shrink(self.shrink_at_end, pl_module)
        if not self.schedule.in_one_fit:
            round_ = self.schedule.active  # freeze before the strategy wraps the model: DDP registers what trains
            self.phase.freeze(pl_module, round_.train_only if round_ is not None else None)
            return
        late = self.schedule.plan_fit(trainer.max_epochs)
        if late:
            rank_zero_warn(
                f"Rounds starting at epochs {late} are at or beyond max_epochs={trainer.max_epochs}: they will not run "
                f"in this fit (a later fit resumed from its checkpoint with a larger max_epochs runs them)."
            )

    # ------------------------------------------------------------------ training
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Restore checkpointed state on the model's device, hook the optimizers, enter the current phase."""
        assert self.pruner is not None
        self.pruner.refresh()
        resumed = trainer.ckpt_path is not None
        if self._pending_state is not None:
            self._restore(self._pending_state, resumed_optimizers=resumed)
            self._pending_state = None
        self.phase.start(trainer, self.pruner.selected(), self.schedule.rounds, resumed)
        for optimizer in trainer.optimizers:
            self.pruner.attach(optimizer)
        self._clips_by_norm = clips_by_norm(trainer, pl_module)
        self._enter_phase(trainer, pl_module)

    def _enter_phase(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None
        self.phase.enter(trainer, pl_module, self.schedule.active)
        self._apply_dropout()

    def _apply_dropout(self) -> None:
        if self.dropout is not None:
            assert self.pruner is not None
            self.dropout.apply({**self.pruner.layer_counts(), **self.pruner.parameter_counts()})

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the round in force (summary, guard), then run the rounds due at this epoch."""
        assert self.pruner is not None
        epoch = trainer.current_epoch
        due = self.schedule.due(epoch)
        if due and self.schedule.done:
            due = self._close_round(trainer, pl_module, due, epoch)
        if due and not self.pruner.masks:
            self._before_first_prune(trainer, pl_module)
        for k in due:
            self._prune(trainer, pl_module, k, epoch)
        if not due:
            self.phase.reapply()
        if self.pruner.masks:
            reporting.log_progress(pl_module, self.pruner.sparsity(), len(self.schedule.done))

    def _close_round(self, trainer: pl.Trainer, pl_module: pl.LightningModule, due: list[int], epoch: int) -> list[int]:
        if epoch > 0:
            self._end_round(trainer)
        if self.guard is None or not self.schedule.in_one_fit:
            return due
        last = self.schedule.done[-1]
        self.judge_round(pl_module, last, trainer.callback_metrics, in_place_of=due[0], trainer=trainer)
        return self.schedule.due(epoch)

    def _before_first_prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.guard is not None and self.guard.baseline is None and self.schedule.in_one_fit:
            self.guard.set_baseline(trainer.callback_metrics)
        if self.sensitivity_settings is not None and self.sensitivity is None:
            assert self.pruner is not None
            settings, layers = self.sensitivity_settings, self.pruner.layers
            self.sensitivity = analyze_before_pruning(
                trainer, pl_module, self.criterion, layers, settings, self.verbose
            )
            self.schedule.set_default_level(self.sensitivity.choose(settings.tolerance, relative=settings.relative))

    def _prune(self, trainer: pl.Trainer, pl_module: pl.LightningModule, k: int, epoch: int) -> None:
        assert self.pruner is not None
        start = self.schedule.start_of(k)
        if start is not None and start < epoch and k not in self.schedule.scales:
            rank_zero_warn(f"Round {k} was due at epoch {start}; it runs late, at the start of epoch {epoch}.")
        if self.schedule.in_one_fit:
            self.take_guard_snapshot(pl_module)
        round_ = self.schedule.round(k)
        if not self.schedule.done and self.verbose:
            notice = reporting.unpruned_notice(dense_tensors(pl_module, list(self.pruner.targets.values())))
            if notice is not None:
                rank_zero_info(notice)
            on_cpu = any(self.pruner.parameter(t.param).device.type == "cpu" for t in self.pruner.targets.values())
            notice = reporting.mask_kernel_notice(on_cpu)
            if notice is not None:
                rank_zero_info(notice)
        if not self.pruner.masks:
            self.logger_output.log_weights(trainer, self.pruner, "before", k + 1)
        stats = self.pruner.prune(**round_.prune_kwargs())
        if trainer.world_size > 1 and not self.pruner.sharded:  # every rank takes rank zero's masks and statistics
            stats = _take_rank_zeros_masks(trainer, self.pruner) or stats
        self.schedule.mark_done(k)
        self._enter_phase(trainer, pl_module)
        if self.verbose:
            frozen = len(self.phase.freezer.frozen)
            rounds = len(self.schedule.rounds)
            rank_zero_info(reporting.prune_report(k, rounds, epoch, round_, stats, frozen, self.dropout))
        reporting.log_prune(pl_module, stats)
        self.logger_output.log_prune(trainer, k + 1, epoch, stats)

    def _end_round(self, trainer: pl.Trainer) -> None:
        """The summary of the round that ends (if ``verbose``) and its weights' histograms to the loggers."""
        assert self.pruner is not None
        if self.verbose:
            self._summarize(trainer)
        self.logger_output.log_weights(trainer, self.pruner, "after", self.schedule.done[-1] + 1)

    def _summarize(self, trainer: pl.Trainer) -> None:
        assert self.pruner is not None
        remaining = 100 * (1 - self.pruner.sparsity())
        done, rounds = len(self.schedule.done), len(self.schedule.rounds)
        rank_zero_info(reporting.round_summary(done, rounds, remaining, trainer.callback_metrics))

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Trace the forward order once (first batch) to link dropout modules to layers."""
        if self.dropout is not None:
            self.dropout.begin_trace()

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        """End the one-batch trace before backward."""
        self._end_trace(trainer)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """End the one-batch trace if no backward ran."""
        self._end_trace(trainer)

    def _end_trace(self, trainer: pl.Trainer) -> None:
        if self.dropout is not None and self.dropout.end_trace(trainer):
            self._apply_dropout()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Optimizer
    ) -> None:
        """Add the L1 term; under norm clipping mask the gradients now too, for the norm (the step masks anyway)."""
        assert self.pruner is not None
        self.phase.add_l1(optimizer)
        if self._clips_by_norm:
            self.pruner.mask_gradients(optimizer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Summarize the last round; with a guard, judge it (and roll it back if it failed); shrink if asked."""
        last = self.schedule.done[-1] if self.schedule.done else None
        if last is not None:
            self._end_round(trainer)
        if self.guard is not None and self.schedule.in_one_fit and last is not None and not self.schedule.judged(last):
            self.judge_round(pl_module, last, trainer.callback_metrics, can_retry=False, trainer=trainer)
        if self.shrink_at_end and self.pruner is not None and self.pruner.masks:
            self._shrink(pl_module)

    def _shrink(self, pl_module: pl.LightningModule) -> None:
        assert self.pruner is not None
        example = move_data_to_device(example_input(pl_module, "`shrink_at_end=True`"), pl_module.device)
        self.structure_report = remove_dead_units(pl_module, example, masks=self.pruner.masks)
        if self.structure_report.masks is not None:
            self.pruner.set_masks(self.structure_report.masks)
        self.phase.forget_parameters(self.pruner.selected())
        rank_zero_info(reporting.shrink_summary(self.structure_report))

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Unhook the optimizers and thaw frozen layers, so the model is the user's own again after fit."""
        if self.dropout is not None:
            self.dropout.close()
        if self.pruner is not None:
            self.pruner.detach()
        self.phase.thaw()
        self.schedule.end_fit()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Each owner's state under its key (version 3): tensors and plain values only."""
        if self.pruner is None:
            return dict(self._pending_state or {})
        owners = {key: owner.state_dict() for key, owner in self._owners().items() if owner is not None}
        sensitivity = self.sensitivity.to_dict() if self.sensitivity is not None else None
        return {"version": STATE_VERSION, "dropout": None, "guard": None, **owners, "sensitivity": sensitivity}

    def _owners(self) -> dict[str, Any]:
        """What has a state of its own, under its key in the checkpoint (``dropout``, ``guard`` may be ``None``)."""
        return {"pruner": self.pruner, "dropout": self.dropout, "schedule": self.schedule, "phase": self.phase,
                "guard": self.guard}  # fmt: skip

    def _restore(self, state: Mapping[str, Any], resumed_optimizers: bool) -> None:
        for key, owner in self._owners().items():  # the phase only goes with the optimizers it concerns
            if owner is not None and state.get(key) is not None and (key != "phase" or resumed_optimizers):
                owner.load_state_dict(state[key])
        if state.get("sensitivity") is not None:
            self.sensitivity = SensitivityResult.from_dict(state["sensitivity"])

    def _rollback_state(self) -> dict[str, Any]:
        """What a guard rollback restores: masks, rounds done, dropout rates."""
        assert self.pruner is not None
        dropout = self.dropout.state_dict() if self.dropout is not None else None
        return {"pruner": self.pruner.state_dict(), "done": list(self.schedule.done), "dropout": dropout}

    def _restore_rollback(self, state: Mapping[str, Any]) -> None:
        assert self.pruner is not None
        self.pruner.load_state_dict(state.get("pruner", {}))
        self.schedule.restore_done(state.get("done", []))
        if self.dropout is not None and state.get("dropout"):
            self.dropout.load_state_dict(state["dropout"])

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Record CRCs of the checkpoint's weights and of the masks; sharded masks go beside the weights' shards."""
        if (
            self.pruner is not None
            and self.pruner.sharded
            and save_masks(trainer, self.pruner, checkpoint, self.state_key)
        ):
            return
        record_checksums(checkpoint, self.state_key)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Read sharded masks back; refuse a checkpoint whose weights or masks changed since it was written."""
        if self.pruner is not None:
            load_sharded_masks(trainer, self.pruner, checkpoint, self.state_key)
        verify_recorded(checkpoint, self.state_key, trainer.ckpt_path or "the checkpoint")

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Check and upgrade a checkpointed state (``ValueError`` if newer or malformed); it applies at train start."""
        self._pending_state = upgrade_state(state_dict)

    def restore(self, model: pl.LightningModule, state: Mapping[str, Any]) -> None:
        """Bind to ``model`` and take a checkpointed state now (what concerns optimizers starts afresh next fit)."""
        self.bind(model)
        self._restore(upgrade_state(state), resumed_optimizers=False)
        self._pending_state = None

    def masks_from_checkpoint(
        self, checkpoint: Mapping[str, Any], model: pl.LightningModule, path: str = "the checkpoint"
    ) -> dict[str, torch.Tensor] | None:
        """The masks of this callback's state in ``checkpoint`` (``None``: none), restored into ``model``.

        Raises:
            CheckpointError: If a weight or a mask changed since the checkpoint was written (CRCs).
            ValueError: If the state is from a newer version, or a mask is missing, mangled or does not fit.
        """
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if state is None:
            return None
        verify_recorded(checkpoint, self.state_key, path)
        self.restore(model, state)
        assert self.pruner is not None
        return dict(self.pruner.masks)


def _take_rank_zeros_masks(trainer: pl.Trainer, pruner: Pruner) -> list[Any] | None:
    """Every rank takes rank zero's masks and statistics; the other ranks' new stats (``None`` on rank zero)."""
    state = trainer.strategy.broadcast(pruner.state_dict(), src=0)
    if trainer.global_rank == 0:
        return None
    pruner.load_state_dict(state)
    return pruner.stats()
