"""lightning-prune: Han et al.'s prune-retrain method (NIPS 2015) as a PyTorch Lightning callback."""

from lightning_prune.callback import PruneRetrainCallback
from lightning_prune.core import LayerStats, MagnitudePruner, PruningError, format_table
from lightning_prune.rounds import PhaseResult, fit_rounds
from lightning_prune.trainer import PruneTrainer

__all__ = [
    "LayerStats",
    "MagnitudePruner",
    "PhaseResult",
    "PruneRetrainCallback",
    "PruneTrainer",
    "PruningError",
    "fit_rounds",
    "format_table",
]
__version__ = "0.1.0"
