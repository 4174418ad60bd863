"""The callback's settings, as small self-validating dataclasses (nested mappings in YAML).

Each checks its values when built and names the bad one; :class:`~lightning_prune.PruneRetrainCallback`
composes them with the rounds (:class:`~lightning_prune.core.schedule.Round`) and the guard
(:class:`~lightning_prune.core.guard.Guard`). In YAML each is a mapping under its argument::

    retrain: {lr_scale: 0.1, weight_decay: 1.0e-4, train_only: ["classifier.*"]}
    dense: {weight_decay: 5.0e-4}
    dropout: {links: {drop1: fc2}}
    sensitivity: {tolerance: 0.005}
    logging: {figures: false}
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_prune.core.validation import check_bool, check_levels, check_number, check_patterns

__all__ = ["DropoutAdjustment", "Logging", "Regularization", "Retraining", "Sensitivity"]


@dataclass(frozen=True)
class Retraining:
    """How the survivors retrain after a prune (Han et al. 2015, 3.2-3.3); rounds may override each field.

    Attributes:
        lr_scale: Learning-rate factor while retraining, ``> 0`` (the paper: 0.1 for LeNets, 0.01 for
            AlexNet). Scales the param groups and the LR schedulers' base rates.
        weight_decay: L2 weight decay while retraining, set in the param groups holding a selected
            weight (others, e.g. no-decay groups, keep theirs); ``None``: the optimizer's own.
        l1: L1 coefficient while retraining: a gradient term ``l1 * sign(w)`` on the selected weights.
        train_only: Glob patterns of the modules that retrain; everything else is frozen (local
            retraining); ``None``: everything trains.
        freeze_bn_stats: Put BatchNorm modules of the frozen part in eval mode (running statistics frozen).

    Example::

        >>> Retraining(lr_scale=0.1, weight_decay=1e-4)
        Retraining(lr_scale=0.1, weight_decay=0.0001, l1=0.0, train_only=None, freeze_bn_stats=True)
    """

    lr_scale: float = 1.0
    weight_decay: float | None = None
    l1: float = 0.0
    train_only: list[str] | None = None
    freeze_bn_stats: bool = True

    def __post_init__(self) -> None:
        check_number(self.lr_scale, "retrain.lr_scale", positive=True)
        check_number(self.weight_decay, "retrain.weight_decay", optional=True)
        check_number(self.l1, "retrain.l1")
        check_patterns(self.train_only, "retrain.train_only")
        check_bool(self.freeze_bn_stats, "retrain.freeze_bn_stats")


@dataclass(frozen=True)
class Regularization:
    """L1 and L2 during dense training, before the first prune.

    Attributes:
        weight_decay: Weight decay in the param groups holding a selected weight; ``None``: the optimizer's own.
        l1: L1 coefficient (gradient term ``l1 * sign(w)`` on the selected weights).

    Example::

        >>> Regularization(weight_decay=5e-4)
        Regularization(weight_decay=0.0005, l1=0.0)
    """

    weight_decay: float | None = None
    l1: float = 0.0

    def __post_init__(self) -> None:
        check_number(self.weight_decay, "dense.weight_decay", optional=True)
        check_number(self.l1, "dense.l1")


@dataclass(frozen=True)
class DropoutAdjustment:
    """Dropout rates lowered after each prune to ``D_o * sqrt(C_ir / C_io)`` of the layer whose inputs they drop.

    Attributes:
        links: ``{dropout module: layer}`` links that override the automatic ones.

    Example::

        >>> DropoutAdjustment(links={"drop1": "fc2"}).links
        {'drop1': 'fc2'}
    """

    links: dict[str, str] | None = None

    def __post_init__(self) -> None:
        if self.links is not None and (
            not isinstance(self.links, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in self.links.items())
        ):
            raise ValueError(
                f"`dropout.links` must be a dict of dropout module name -> layer name, got {self.links!r}."
            )


@dataclass(frozen=True)
class Sensitivity:
    """A sensitivity analysis on the validation data just before the first prune, which sets the default levels.

    Each layer is pruned alone at each level, without retraining; its default level becomes the
    largest whose metric drop is within ``tolerance``. Rounds that give their own ``level`` keep it.

    Attributes:
        tolerance: Largest accepted accuracy drop per layer, ``>= 0``.
        levels: The levels to try, increasing; ``None``: the criterion's ``sweep_levels``.
        relative: Whether ``tolerance`` is a share of the dense accuracy.

    Example::

        >>> Sensitivity(tolerance=0.005)
        Sensitivity(tolerance=0.005, levels=None, relative=False)
    """

    tolerance: float
    levels: list[float] | None = None
    relative: bool = False

    def __post_init__(self) -> None:
        check_number(self.tolerance, "sensitivity.tolerance")
        check_bool(self.relative, "sensitivity.relative")
        if self.levels is not None:  # the criterion checks their range when the callback is built
            object.__setattr__(self, "levels", check_levels(self.levels, "sensitivity.levels", check_number))


@dataclass(frozen=True)
class Logging:
    """What goes to the trainer's loggers besides the ``prune/...`` scalars (rank zero, at prunes and round ends).

    Attributes:
        tables: The table of each prune: text in TensorBoard, a table in MLflow and W&B, ``prune_rounds.csv``
            in a ``CSVLogger``'s ``log_dir``.
        figures: Weight histograms of each pruned layer before the first prune and after each round, and a bar
            chart of the share of weights each layer keeps (needs matplotlib; TensorBoard, MLflow and W&B).

    Example::

        >>> Logging(figures=False)
        Logging(tables=True, figures=False)
    """

    tables: bool = True
    figures: bool = True

    def __post_init__(self) -> None:
        check_bool(self.tables, "logging.tables")
        check_bool(self.figures, "logging.figures")
