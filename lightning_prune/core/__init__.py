"""Pure-PyTorch core of lightning-prune: selection, criteria, masks, the pruner and reports.

Nothing here imports Lightning; it works on any ``nn.Module`` and ``torch.optim.Optimizer``.
"""

from lightning_prune.core.criteria import fraction_mask, global_masks, std_mask, surviving_std
from lightning_prune.core.masks import mask_gradients, mask_weights, zero_optimizer_state
from lightning_prune.core.pruner import MagnitudePruner, PruningError
from lightning_prune.core.report import LayerStats, format_table
from lightning_prune.core.selection import resolve_per_layer, select_layers, select_parameters

__all__ = [
    "LayerStats",
    "MagnitudePruner",
    "PruningError",
    "format_table",
    "fraction_mask",
    "global_masks",
    "mask_gradients",
    "mask_weights",
    "resolve_per_layer",
    "select_layers",
    "select_parameters",
    "std_mask",
    "surviving_std",
    "zero_optimizer_state",
]
