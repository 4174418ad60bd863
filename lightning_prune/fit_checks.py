"""What a fit checks before anything trains: the callback's settings against the model and the trainer.

Each check raises ``ValueError`` naming the bad value (the round, the strategy, the missing input) and
what to do; nothing is changed before the checks pass.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

from lightning_prune.core.criteria import Criterion, get_criterion
from lightning_prune.core.freezing import trainable_parameters
from lightning_prune.core.pruner import Pruner
from lightning_prune.core.schedule import Schedule
from lightning_prune.core.settings import Sensitivity
from lightning_prune.core.validation import check_levels

__all__ = [
    "check_rounds",
    "check_sensitivity",
    "check_shrink",
    "check_strategy",
    "clips_by_norm",
    "example_input",
]


def check_sensitivity(settings: Sensitivity, criterion: Criterion) -> None:
    """The criterion can be swept layer by layer, at the given levels or its own ``sweep_levels``."""
    if not criterion.per_layer:
        raise ValueError(f"`sensitivity` picks per-layer levels; criterion {criterion.describe()} has one level.")
    if settings.levels is None and not criterion.sweep_levels:
        raise ValueError(
            f"`sensitivity.levels` is needed: criterion {criterion.describe()} has no default sweep levels."
        )
    if settings.levels is not None:
        check_levels(settings.levels, "sensitivity.levels", criterion.check_level)


def check_rounds(pruner: Pruner, schedule: Schedule, model: pl.LightningModule) -> None:
    """Every round's prune and ``train_only`` resolve on the model (errors prefixed ``rounds[k]:``)."""
    for index, round_ in enumerate(schedule.rounds):
        try:
            pruner.check(**round_.prune_kwargs())
            if round_.train_only is not None:
                trainable_parameters(model, round_.train_only)
        except ValueError as err:
            raise ValueError(f"rounds[{index}]: {err}") from err


def check_strategy(
    trainer: pl.Trainer, schedule: Schedule, *, sensitivity: bool = False, shrink_at_end: bool = False
) -> None:
    """The strategy supports these settings; ``train_only`` inside one DDP fit needs ``find_unused_parameters``.

    ``ModelParallelStrategy`` (FSDP2) is supported with the shardable criteria, without a sensitivity
    sweep and without ``shrink_at_end``; ``FSDPStrategy`` (FSDP1) and DeepSpeed are refused.
    """
    strategy = trainer.strategy
    if isinstance(strategy, (FSDPStrategy, DeepSpeedStrategy)):
        raise ValueError(
            f"PruneRetrainCallback does not support {type(strategy).__name__}: it flattens parameters into shards "
            f"that do not follow the weights' rows. Shard with FSDP2 instead: strategy=ModelParallelStrategy(...) "
            f"and fully_shard(...) in configure_model (docs/cli-and-ddp.md, FSDP), or use strategy='ddp'."
        )
    if isinstance(strategy, ModelParallelStrategy):
        _check_sharded(schedule, sensitivity=sensitivity, shrink_at_end=shrink_at_end)
    unused = getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters", False)
    one_fit_ddp = isinstance(strategy, DDPStrategy) and not unused and schedule.in_one_fit
    if one_fit_ddp and any(r.train_only is not None for r in schedule.rounds):
        raise ValueError(
            "Rounds with `train_only` inside one fit under DDP need "
            "strategy='ddp_find_unused_parameters_true' (DDP fixes the set of trained parameters when it "
            "wraps the model), or run each round as its own fit with lightning_prune.fit_rounds."
        )


def _check_sharded(schedule: Schedule, *, sensitivity: bool, shrink_at_end: bool) -> None:
    """What a fit under ModelParallelStrategy cannot do yet."""
    for index, round_ in enumerate(schedule.rounds):
        criterion = get_criterion(round_.prune_kwargs()["criterion"])
        if not criterion.shardable:
            raise ValueError(
                f"rounds[{index}]: criterion {criterion.describe()} cannot prune sharded parameters under "
                f"ModelParallelStrategy; use Std, Fraction or Global (exact across shards)."
            )
    if sensitivity:
        raise ValueError(
            "`sensitivity` is not supported under ModelParallelStrategy: run the sweep on one device "
            "(lightning-prune sensitivity) and give its quality file to the criterion."
        )
    if shrink_at_end:
        raise ValueError(
            "`shrink_at_end=True` is not supported under ModelParallelStrategy: save a full checkpoint "
            "(ModelParallelStrategy(save_distributed_checkpoint=False)) and remove dead units from it on one "
            "process (lightning-prune export --shrink true)."
        )


def check_shrink(shrink_at_end: bool, model: pl.LightningModule) -> None:
    """Removing dead units at the end needs ``example_input_array`` on the module (see :func:`example_input`)."""
    if shrink_at_end:
        example_input(model, "`shrink_at_end=True`")


def example_input(model: pl.LightningModule, what: str) -> torch.Tensor | tuple[Any, ...]:
    """The module's ``example_input_array`` for dead-unit removal: a tensor or a tuple of positional inputs.

    Raises:
        ValueError: If it is missing, or a dict (removal traces the forward with positional inputs).
    """
    example = model.example_input_array
    if example is None:
        raise ValueError(
            f"{what} needs `example_input_array` on the LightningModule (a batch its forward takes), "
            "to trace the dataflow between layers and to check that outputs stay the same."
        )
    if isinstance(example, dict):
        raise ValueError(
            f"{what} needs `example_input_array` as a tensor or a tuple of positional inputs; it is a dict with keys "
            f"{sorted(example)}. Dead-unit removal traces the forward with positional inputs only."
        )
    return example


def clips_by_norm(trainer: pl.Trainer, model: pl.LightningModule) -> bool:
    """Whether gradients may be clipped by their norm: by the trainer's setting, or a module's own clipping hook."""
    overridden = type(model).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping
    by_trainer = bool(trainer.gradient_clip_val) and trainer.gradient_clip_algorithm != "value"
    return by_trainer or overridden
