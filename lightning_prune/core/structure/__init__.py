"""Removing dead units ("pruning neurons", Han et al. 2015) with exact output equivalence.

After connection pruning some units are dead:

* a unit whose incoming weights are **all** pruned outputs a constant: its bias through the layers
  between it and the next weight layer (activation, BatchNorm in eval mode, pooling). Its
  contribution to the next layer is a constant too, so it is added to that layer's bias ("folded")
  and the unit is removed;
* a unit whose outgoing weights are all pruned contributes nothing: it is removed with its bias.

Removing units can kill others (a unit fed only by a removed constant unit becomes constant, a unit
whose only consumer was removed becomes unused), so removal iterates to a fixed point.

Supported chains, from a *producer* layer to the *consumer* layer that reads its units:

* ``Linear -> [elementwise]* -> Linear`` (``BatchNorm1d`` allowed on 2-D activations);
* ``Conv2d -> [elementwise | BatchNorm2d | MaxPool2d/AvgPool2d/adaptive pools]* -> Conv2d``;
* ``Conv2d -> [...]* -> flatten -> [elementwise]* -> Linear``: channel ``c`` is the ``H*W``
  consecutive input features ``c*H*W .. (c+1)*H*W - 1`` of the Linear, ``H*W`` read from shape
  propagation of ``example_input``.

"Elementwise" means activations (ReLU, Tanh, Sigmoid, GELU, ...), Identity and Dropout (identity in
eval mode). The chain is read from the model's dataflow, traced with :func:`torch.fx.symbolic_trace`,
not guessed from module order. A producer is *refused* (left untouched, with the reason reported)
when its output is consumed by anything else: a residual add, ``torch.cat``, a second user, an
operator outside the list above, or the model output; when the producer or consumer is called more
than once, shares parameters, has hooks, or is a grouped convolution.

Exactness is the contract, in eval mode: a constant unit is folded only if its contribution to the
consumer is exactly representable as a bias. Into a Linear consumer it always is. Into a Conv2d
consumer with ``padding > 0`` the contribution of a constant map is smaller at the borders, so such
units are **kept** (reported) unless their constant is zero (e.g. ``relu`` of a negative bias), which
folds exactly. Every change is computed first, applied by swapping in new modules, and checked
against the output on ``example_input``; if anything fails the old modules are put back.

Why torch.fx and not Torch-Pruning (``torch-pruning``): its ``DependencyGraph`` traces autograd to
find *coupled* layers and prunes whole groups across residual adds and concatenations, chosen by
importance, without folding the constant output of removed units into the next bias. Removing
provably dead units needs the opposite: the exact op-by-op dataflow (which fx gives, with module
names and per-node shapes from ``ShapeProp``) and a refusal of any coupling, so that the smaller
model computes the same function. A small allow-list over the fx graph does that without a
dependency.

The package by job: :mod:`~lightning_prune.core.structure.graph` (tracing the dataflow and the
allow-lists), :mod:`~lightning_prune.core.structure.plan` (the fixed point, :func:`find_dead_units`),
:mod:`~lightning_prune.core.structure.surgery` (building and swapping the smaller modules,
:func:`remove_dead_units`, :func:`resize_to`) and :mod:`~lightning_prune.core.structure.shrunk_file`
(:func:`save_shrunk`, :func:`load_shrunk`).
"""

from lightning_prune.core.structure.graph import Status
from lightning_prune.core.structure.plan import LayerPlan, StructurePlan, find_dead_units
from lightning_prune.core.structure.shrunk_file import load_shrunk, save_shrunk
from lightning_prune.core.structure.surgery import (
    LayerChange,
    StructureReport,
    remove_dead_units,
    resize_to,
    shapes,
)

__all__ = [
    "LayerChange",
    "LayerPlan",
    "Status",
    "StructurePlan",
    "StructureReport",
    "find_dead_units",
    "load_shrunk",
    "remove_dead_units",
    "resize_to",
    "save_shrunk",
    "shapes",
]
