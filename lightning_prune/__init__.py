"""lightning-prune: Han et al.'s prune-retrain method (NIPS 2015) as a PyTorch Lightning callback."""

from lightning_prune.callback import PruneRetrainCallback
from lightning_prune.core import (
    NM,
    Criterion,
    Decision,
    DropoutAdjustment,
    Fraction,
    Global,
    Guard,
    LayerStats,
    Logging,
    PruneContext,
    Pruner,
    PruningError,
    Regularization,
    Retraining,
    Round,
    Sensitivity,
    Std,
    StructuredFraction,
    StructuredGlobal,
    StructuredStd,
    format_table,
    register_criterion,
)
from lightning_prune.rounds import PhaseResult, fit_rounds
from lightning_prune.trainer import PruneTrainer

__all__ = [
    "NM",
    "Criterion",
    "Decision",
    "DropoutAdjustment",
    "Fraction",
    "Global",
    "Guard",
    "LayerStats",
    "Logging",
    "PhaseResult",
    "PruneContext",
    "PruneRetrainCallback",
    "PruneTrainer",
    "Pruner",
    "PruningError",
    "Regularization",
    "Retraining",
    "Round",
    "Sensitivity",
    "Std",
    "StructuredFraction",
    "StructuredGlobal",
    "StructuredStd",
    "fit_rounds",
    "format_table",
    "register_criterion",
]
__version__ = "0.1.0"
