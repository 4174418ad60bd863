"""Pure-PyTorch core of lightning-prune: selection, criteria, masks, the pruner, schedule, settings and reports.

Nothing here imports Lightning; it works on any ``nn.Module`` and ``torch.optim.Optimizer``.
"""

from lightning_prune.core.criteria import (
    NM,
    Criterion,
    Decision,
    Fraction,
    Global,
    PruneContext,
    Std,
    StructuredFraction,
    StructuredGlobal,
    StructuredStd,
    fraction_mask,
    get_criterion,
    global_masks,
    register_criterion,
    registered_criteria,
    std_mask,
    surviving_std,
)
from lightning_prune.core.export import (
    SparseFormatError,
    export_sparse,
    load_sparse,
    load_sparse_into,
    semi_structured_problems,
    sparse_size_report,
    to_semi_structured,
    to_sparse_linear,
)
from lightning_prune.core.guard import Guard, GuardController, Verdict
from lightning_prune.core.masks import mask_gradients, mask_weights, zero_optimizer_state
from lightning_prune.core.native import mask_kernel, set_mask_kernel
from lightning_prune.core.pruner import Pruner, PruningError
from lightning_prune.core.report import LayerStats, format_table
from lightning_prune.core.schedule import Round, Schedule
from lightning_prune.core.selection import (
    Target,
    dense_tensors,
    resolve_per_layer,
    resolve_per_target,
    select_layers,
    select_parameters,
    select_targets,
)
from lightning_prune.core.settings import DropoutAdjustment, Logging, Regularization, Retraining, Sensitivity
from lightning_prune.core.structure import (
    find_dead_units,
    load_shrunk,
    remove_dead_units,
    resize_to,
    save_shrunk,
    shapes,
)

__all__ = [
    "NM",
    "Criterion",
    "Decision",
    "DropoutAdjustment",
    "Fraction",
    "Global",
    "Guard",
    "GuardController",
    "LayerStats",
    "Logging",
    "PruneContext",
    "Pruner",
    "PruningError",
    "Regularization",
    "Retraining",
    "Round",
    "Schedule",
    "Sensitivity",
    "SparseFormatError",
    "Std",
    "StructuredFraction",
    "StructuredGlobal",
    "StructuredStd",
    "Target",
    "Verdict",
    "dense_tensors",
    "export_sparse",
    "find_dead_units",
    "format_table",
    "fraction_mask",
    "get_criterion",
    "global_masks",
    "load_shrunk",
    "load_sparse",
    "load_sparse_into",
    "mask_gradients",
    "mask_kernel",
    "mask_weights",
    "register_criterion",
    "registered_criteria",
    "remove_dead_units",
    "resize_to",
    "resolve_per_layer",
    "resolve_per_target",
    "save_shrunk",
    "select_layers",
    "select_parameters",
    "select_targets",
    "semi_structured_problems",
    "set_mask_kernel",
    "shapes",
    "sparse_size_report",
    "std_mask",
    "surviving_std",
    "to_semi_structured",
    "to_sparse_linear",
    "zero_optimizer_state",
]
