"""Per-layer pruning sensitivity: prune one layer alone at increasing levels, measure without retraining.

This is how Han et al. (2015) choose each layer's quality parameter (their Figure 5): every layer is
pruned *alone* at increasing thresholds, the network is evaluated on validation data without any
retraining, and the most sensitive layers get the smallest thresholds. :func:`sweep` runs that
experiment on any ``nn.Module`` and returns a :class:`SensitivityResult`, which turns the curves into
a per-layer level mapping (:meth:`SensitivityResult.choose`, :meth:`SensitivityResult.quality_yaml`)
ready for a criterion (``Std(quality=...)``, or its levels file), and draws the paper's figure
(:func:`plot`). Any criterion that levels each layer on its own can be swept, your own included.

Speed: pruning layer ``L`` changes nothing that runs before ``L``. The model is traced once with
:func:`torch.fx.symbolic_trace`; for each layer the values of the part before ``L`` that the rest of
the network needs (the *cut*: the inputs of ``L`` and any skip connections around it) are computed
once per batch and kept, and every level of ``L`` runs only the graph from ``L`` on. Models that
torch.fx cannot trace (data-dependent control flow) are evaluated with full forward passes, with one
warning; the numbers are the same either way.

The model is left bit-identical: weights, buffers, and the train/eval mode of every module.

The package by job: :mod:`~lightning_prune.core.sensitivity.layer_sweep` (:func:`sweep`,
:func:`sweep_levels`), :mod:`~lightning_prune.core.sensitivity.split` (the torch.fx split at a layer),
:mod:`~lightning_prune.core.sensitivity.evaluation` (:func:`accuracy`, the batches and the metric),
:mod:`~lightning_prune.core.sensitivity.result` (:class:`SensitivityResult`, :func:`merge_results`),
:mod:`~lightning_prune.core.sensitivity.quality` (levels files, :func:`load_quality`) and
:mod:`~lightning_prune.core.sensitivity.figure` (:func:`plot`).
"""

from lightning_prune.core.sensitivity.evaluation import Batch, accuracy
from lightning_prune.core.sensitivity.figure import plot
from lightning_prune.core.sensitivity.layer_sweep import (
    DEFAULT_CACHE_BYTES,
    Progress,
    sweep,
    sweep_criterion,
    sweep_levels,
)
from lightning_prune.core.sensitivity.quality import QUALITY_SUFFIXES, load_quality
from lightning_prune.core.sensitivity.result import SensitivityResult, SensitivityRow, merge_results

__all__ = [
    "DEFAULT_CACHE_BYTES",
    "QUALITY_SUFFIXES",
    "Batch",
    "Progress",
    "SensitivityResult",
    "SensitivityRow",
    "accuracy",
    "load_quality",
    "merge_results",
    "plot",
    "sweep",
    "sweep_criterion",
    "sweep_levels",
]
