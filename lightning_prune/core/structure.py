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
"""

from __future__ import annotations

import json
import math
import operator
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_prune.core.export import (
    SparseFormatError,
    _DefectError,
    _fail,
    _is_int,
    _Kind,
    _read_sealed,
    _show,
    _strict_json,
    _write_sealed,
)
from lightning_prune.core.masks import check_mask

__all__ = [
    "LayerChange",
    "LayerPlan",
    "StructurePlan",
    "StructureReport",
    "find_dead_units",
    "load_shrunk",
    "remove_dead_units",
    "resize_to",
    "save_shrunk",
    "shapes",
]

Status = Literal["removable", "output", "refused"]

_ELEMENTWISE_MODULES: tuple[type[nn.Module], ...] = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.LogSigmoid,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {
        torch.relu,
        torch.tanh,
        torch.sigmoid,
        F.relu,
        F.relu6,
        F.elu,
        F.selu,
        F.celu,
        F.leaky_relu,
        F.gelu,
        F.silu,
        F.mish,
        F.hardtanh,
        F.hardsigmoid,
        F.hardswish,
        F.softplus,
        F.softsign,
        F.tanhshrink,
        F.logsigmoid,
        F.tanh,
        F.sigmoid,
    }
)
_ELEMENTWISE_METHODS = frozenset({"relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"})
_POOL_MODULES: tuple[type[nn.Module], ...] = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_POOL_FUNCTIONS: frozenset[Callable[..., Any]] = frozenset(
    {F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
)
_RESIZABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)
_FORMAT = "lightning_prune.shrunk"
_VERSION = "2"
_SHRUNK = _Kind(
    _FORMAT, _VERSION, frozenset({"format", "version", "sha256", "shapes"}), "Shrunk checkpoint", "save_shrunk"
)


# ---------------------------------------------------------------------------------------------------------------------
# Public results
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerPlan:
    """What happens to the output units of one ``Linear`` or ``Conv2d`` layer.

    Attributes:
        name: Qualified module name.
        units: Output units (features or channels) before removal.
        status: ``"removable"`` (a supported chain leads to ``consumer``), ``"output"`` (the units
            feed the model output: nothing to remove) or ``"refused"`` (unsupported topology).
        consumer: The layer reading these units through a supported chain, else ``None``.
        remove: Units removed (indices before removal), after the fixed point.
        folded: The removed units that had no incoming connections: their constant output went
            into the consumer's bias.
        kept: Dead units that stay: constants that cannot be folded exactly (zero padding of a
            conv consumer, a consumer without bias, the last unit of a layer) or, for a refused
            layer, its units with no incoming connections.
        reason: Why the layer is refused or units are kept; ``None`` when everything dead goes.
    """

    name: str
    units: int
    status: Status
    consumer: str | None = None
    remove: tuple[int, ...] = ()
    folded: tuple[int, ...] = ()
    kept: tuple[int, ...] = ()
    reason: str | None = None

    @property
    def remaining(self) -> int:
        """Output units left after removal."""
        return self.units - len(self.remove)


@dataclass(frozen=True)
class StructurePlan:
    """Per-layer outcome of :func:`find_dead_units`, in module order.

    Attributes:
        layers: ``{layer_name: LayerPlan}`` for every ``Linear`` and ``Conv2d`` module.
    """

    layers: dict[str, LayerPlan]

    @property
    def removable(self) -> int:
        """Total number of units the plan removes."""
        return sum(len(p.remove) for p in self.layers.values())

    @property
    def refused(self) -> dict[str, str]:
        """``{layer: reason}`` for every refused layer (whether or not it has dead units)."""
        return {n: p.reason or "" for n, p in self.layers.items() if p.status == "refused"}

    @property
    def blocking(self) -> dict[str, str]:
        """``{layer: reason}`` for layers keeping dead units (what ``strict=True`` raises on)."""
        return {n: p.reason or "" for n, p in self.layers.items() if p.kept and p.status != "output"}

    def __str__(self) -> str:
        rows = [("layer", "units", "remove", "folded", "kept", "status", "consumer / reason")]
        for p in self.layers.values():
            note = p.consumer or ""
            if p.reason:
                note = f"{note}: {p.reason}" if note else p.reason
            rows.append(
                (p.name, str(p.units), str(len(p.remove)), str(len(p.folded)), str(len(p.kept)), p.status, note)
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows]
        return "\n".join(line.rstrip() for line in lines)


@dataclass(frozen=True)
class LayerChange:
    """A module replaced by :func:`remove_dead_units`.

    Attributes:
        name: Qualified module name (unchanged).
        type: Module class name.
        old_shape: Weight shape before (``[num_features]`` for BatchNorm).
        new_shape: Weight shape after.
        removed_outputs: Output units (rows / channels) removed.
        removed_inputs: Input units (columns / channels) removed.
    """

    name: str
    type: str
    old_shape: tuple[int, ...]
    new_shape: tuple[int, ...]
    removed_outputs: int
    removed_inputs: int


@dataclass(frozen=True)
class StructureReport:
    """Outcome of :func:`remove_dead_units`.

    Attributes:
        plan: The plan that was applied.
        changes: ``{module_name: LayerChange}`` for every replaced module.
        masks: The masks restricted to the kept units (``None`` if none were given): pass them on
            to the pruner so its state matches the smaller layers.
        parameters_before: Parameter count of the model before.
        parameters_after: Parameter count after.
    """

    plan: StructurePlan
    changes: dict[str, LayerChange]
    masks: dict[str, Tensor] | None
    parameters_before: int
    parameters_after: int

    @property
    def removed_units(self) -> dict[str, int]:
        """``{layer: output units removed}`` for layers that lost units."""
        return {n: len(p.remove) for n, p in self.plan.layers.items() if p.remove}

    def __str__(self) -> str:
        lines = [f"{c.name}: {list(c.old_shape)} -> {list(c.new_shape)}" for c in self.changes.values()]
        lines.append(f"parameters: {self.parameters_before} -> {self.parameters_after}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------------
# Tracing the dataflow
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Link:
    producer: str
    consumer: str
    kind: Literal["linear", "conv", "flatten"]
    steps: list[Callable[[Tensor], Tensor]]
    norms: list[str]
    group: int
    unit_shape: tuple[int, ...]  # producer output without the batch dim: (F,) or (C, H, W)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside; on exit every module *name* gets its flag back, so modules swapped in meanwhile do too."""
    flags = {name: m.training for name, m in model.named_modules(remove_duplicate=False)}
    model.eval()
    try:
        yield
    finally:
        for name, m in model.named_modules(remove_duplicate=False):
            if name in flags:
                m.training = flags[name]


def _func_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", repr(fn))
    module = "operator" if module == "_operator" else module
    return f"{module}.{name}" if module else name


class _Graph:
    """The traced model: module call sites, parameter sharing, per-node shapes."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model = model
        self.gm = gm
        self.modules = dict(model.named_modules(remove_duplicate=False))
        self.calls: dict[int, list[fx.Node]] = {}
        self.direct: set[str] = set()
        for node in gm.graph.nodes:
            if node.op == "call_module":
                self.calls.setdefault(id(self.modules[node.target]), []).append(node)
            elif node.op == "get_attr":
                self.direct.add(str(node.target))
        owners: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(param), []).append(name)
        self.param_owners = owners

    def shape(self, node: fx.Node) -> tuple[int, ...] | None:
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"module {node.target!r} ({type(self.modules[node.target]).__name__})"
        if node.op == "call_function":
            return _func_name(node.target)
        if node.op == "call_method":
            return f"tensor method .{node.target}()"
        if node.op == "output":
            return "the model output"
        return f"{node.op} {node.target!r}"

    def module_problem(self, name: str, role: str) -> str | None:
        """Why the module ``name`` cannot be resized (as ``role``), or ``None``."""
        module = self.modules[name]
        if not name:
            return f"the {role} is the model itself, which cannot be replaced"
        if type(module) not in (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d):
            return f"the {role} {name!r} is a {type(module).__name__}, not a plain Linear/Conv2d/BatchNorm"
        sites = len(self.calls.get(id(module), []))
        if sites == 0:
            return (
                f"the {role} {name!r} is not called directly in the traced forward pass (unused, or inside a "
                f"module that torch.fx does not trace into)"
            )
        if sites != 1:
            return f"the {role} {name!r} is called {sites} times in the forward pass (a shared layer)"
        if any(t == name or t.startswith(f"{name}.") for t in self.direct):
            return f"the parameters of the {role} {name!r} are also read directly in the forward pass"
        for pname, param in module.named_parameters(recurse=False):
            if len(self.param_owners[id(param)]) > 1:
                others = [o for o in self.param_owners[id(param)] if o != f"{name}.{pname}"]
                return f"the {role} {name!r} shares its parameter {pname!r} with {others}"
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "parametrizations"):
            return f"the {role} {name!r} has forward hooks or parametrizations"
        if isinstance(module, nn.Conv2d) and module.groups != 1:
            return f"the {role} {name!r} is a grouped convolution (groups={module.groups})"
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and not module.track_running_stats:
            return f"the {role} {name!r} uses batch statistics in eval mode (track_running_stats=False)"
        return None

    def follow(self, name: str) -> _Link | tuple[Status, str]:
        """The supported chain from layer ``name`` to its consumer, else ``(status, reason)``."""
        problem = self.module_problem(name, "layer")
        if problem is not None:
            return "refused", problem
        producer = self.modules[name]
        node = self.calls[id(producer)][0]
        is_conv = isinstance(producer, nn.Conv2d)
        out_shape = self.shape(node)
        if out_shape is None:
            return "refused", "shape propagation gave no tensor shape for its output"
        if is_conv and len(out_shape) != 4:
            return "refused", f"its output has shape {list(out_shape)}; a batched 4-D (N, C, H, W) output is needed"
        unit_shape = tuple(out_shape[1:]) if is_conv else (out_shape[-1],)
        steps: list[Callable[[Tensor], Tensor]] = []
        norms: list[str] = []
        flattened, group = False, 1
        path = [name]
        while True:
            users = [u for u in node.users if not _is_shape_query(u)]
            odd = [u for u in node.users if u not in users and not _is_batch_query(u)]
            if odd:
                return "refused", f"its output's shape is read by {self.describe(odd[0])} after {' -> '.join(path)}"
            if not users:
                return "refused", f"the output of {' -> '.join(path)} is not used"
            if len(users) > 1:
                what = ", ".join(self.describe(u) for u in users)
                return "refused", (
                    f"the output of {' -> '.join(path)} has {len(users)} users ({what}): a branch, residual "
                    f"connection or concatenation"
                )
            user = users[0]
            if user.op == "output":
                return "output", f"{' -> '.join(path)} feeds the model output"
            module = self.modules.get(user.target) if user.op == "call_module" else None
            if type(module) in (nn.Linear, nn.Conv2d):
                return self._consumer(name, user, node, steps, norms, flattened, group, unit_shape, is_conv)
            step = self._step(user, node, is_conv, flattened)
            if isinstance(step, str):
                return "refused", f"the output of {' -> '.join(path)} flows into {self.describe(user)}: {step}"
            kind, fn = step
            if kind == "norm":
                norms.append(str(user.target))
            if kind == "flatten":
                shape_in, shape_out = self.shape(node), self.shape(user)
                if (
                    shape_in is None
                    or shape_out is None
                    or len(shape_in) != 4
                    or shape_in[1] != producer.out_channels
                    or tuple(shape_out) != (shape_in[0], shape_in[1] * shape_in[2] * shape_in[3])
                ):
                    return "refused", (
                        f"{self.describe(user)} turns shape {shape_in and list(shape_in)} into "
                        f"{shape_out and list(shape_out)}, not a flatten of (N, C, H, W) to (N, C*H*W)"
                    )
                flattened, group = True, shape_in[2] * shape_in[3]
            steps.append(fn)
            path.append(self.describe(user) if user.op != "call_module" else str(user.target))
            node = user

    def _step(
        self, user: fx.Node, node: fx.Node, is_conv: bool, flattened: bool
    ) -> tuple[str, Callable[[Tensor], Tensor]] | str:
        """Classify ``user`` (which reads ``node``) as a per-unit step, or return why it is not one."""
        args, kwargs = user.args, dict(user.kwargs)
        first_only = bool(args) and args[0] is node and not _mentions(args[1:], node) and not _mentions(kwargs, node)
        if user.op == "call_module":
            module = self.modules[user.target]
            if type(module) in _ELEMENTWISE_MODULES:
                return ("elementwise", module) if first_only and len(args) == 1 else "unexpected arguments"
            if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
                if flattened or (type(module) is nn.BatchNorm2d) != is_conv:
                    return (
                        "BatchNorm only between a Conv2d and the next layer (BatchNorm2d) or two Linear (BatchNorm1d)"
                    )
                shape = self.shape(node)
                if type(module) is nn.BatchNorm1d and (shape is None or len(shape) != 2):
                    return "BatchNorm1d is supported on 2-D (N, features) activations only"
                problem = self.module_problem(str(user.target), "BatchNorm")
                return problem if problem else ("norm", module)
            if type(module) in _POOL_MODULES:
                if not is_conv or flattened:
                    return "pooling is supported between Conv2d layers only"
                if getattr(module, "return_indices", False):
                    return "pooling that returns indices"
                return ("pool", module) if first_only and len(args) == 1 else "unexpected arguments"
            if type(module) is nn.Flatten:
                if not is_conv or flattened or module.start_dim != 1 or module.end_dim not in (-1, 3):
                    return "only Flatten(start_dim=1) of a Conv2d output is supported"
                return ("flatten", _flatten)
            return "not an elementwise activation, dropout, BatchNorm, pooling or flatten step"
        if not args or args[0] is not node or _mentions(args[1:], node) or _mentions(kwargs, node):
            return "the tensor is not its only tensor argument"
        reshape = (user.op == "call_method" and user.target in ("view", "reshape")) or (
            user.op == "call_function" and user.target is torch.reshape
        )
        if not reshape and (_has_nodes(args[1:]) or _has_nodes(kwargs)):
            return "it takes other tensors as arguments"
        if user.op == "call_function":
            target = user.target
            if target in _ELEMENTWISE_FUNCTIONS:
                return "elementwise", _bind(target, args[1:], kwargs)
            if target is F.dropout:
                training = kwargs.get("training", args[2] if len(args) > 2 else True)
                if training is not False:
                    return "F.dropout with training=True is not the identity in eval mode"
                return "elementwise", _identity
            if target in _POOL_FUNCTIONS:
                if not is_conv or flattened:
                    return "pooling is supported between Conv2d layers only"
                if kwargs.get("return_indices", False) or (len(args) > 5 and args[5]):
                    return "pooling that returns indices"
                return "pool", _bind(target, args[1:], kwargs)
            if target is torch.flatten:
                start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
                end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
                if not is_conv or flattened or start != 1 or end not in (-1, 3):
                    return "only torch.flatten(x, 1) of a Conv2d output is supported"
                return "flatten", _flatten
            if target is torch.reshape:
                return _reshape_step(args[1:], kwargs, is_conv, flattened)
            return "not an elementwise activation, dropout, BatchNorm, pooling or flatten step"
        if user.op == "call_method":
            if user.target in _ELEMENTWISE_METHODS:
                return "elementwise", _bind_method(str(user.target), args[1:], kwargs)
            if user.target == "flatten":
                start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
                end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
                if not is_conv or flattened or start != 1 or end not in (-1, 3):
                    return "only x.flatten(1) of a Conv2d output is supported"
                return "flatten", _flatten
            if user.target in ("view", "reshape"):
                return _reshape_step(args[1:], kwargs, is_conv, flattened)
        return "not an elementwise activation, dropout, BatchNorm, pooling or flatten step"

    def _consumer(
        self,
        name: str,
        user: fx.Node,
        node: fx.Node,
        steps: list[Callable[[Tensor], Tensor]],
        norms: list[str],
        flattened: bool,
        group: int,
        unit_shape: tuple[int, ...],
        is_conv: bool,
    ) -> _Link | tuple[Status, str]:
        consumer_name = str(user.target)
        consumer = self.modules[consumer_name]
        if user.args != (node,) or user.kwargs:
            return "refused", f"{consumer_name!r} is called with extra arguments"
        problem = self.module_problem(consumer_name, "consumer")
        if problem is not None:
            return "refused", problem
        producer = self.modules[name]
        units = producer.out_channels if is_conv else producer.out_features
        if isinstance(consumer, nn.Conv2d):
            if not is_conv or flattened:
                return "refused", f"a Linear output feeds the Conv2d {consumer_name!r}"
            if consumer.in_channels != units:
                return "refused", f"{consumer_name!r} expects {consumer.in_channels} channels, {name!r} gives {units}"
            in_shape = self.shape(node)
            if in_shape is None or len(in_shape) != 4:
                return "refused", f"the input of {consumer_name!r} is not a batched 4-D tensor"
            return _Link(name, consumer_name, "conv", steps, norms, 1, unit_shape)
        if is_conv and not flattened:
            return "refused", f"a 4-D Conv2d output reaches the Linear {consumer_name!r} without a flatten"
        if consumer.in_features != units * group:
            return "refused", f"{consumer_name!r} expects {consumer.in_features} features, not {units} x {group}"
        return _Link(name, consumer_name, "flatten" if flattened else "linear", steps, norms, group, unit_shape)


def _identity(x: Tensor) -> Tensor:
    return x


def _flatten(x: Tensor) -> Tensor:
    return x.flatten(1)


def _bind(fn: Callable[..., Tensor], rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    return lambda x: fn(x, *rest, **kwargs)


def _bind_method(name: str, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    return lambda x: getattr(x, name)(*rest, **kwargs)


def _reshape_step(
    rest: tuple[Any, ...], kwargs: dict[str, Any], is_conv: bool, flattened: bool
) -> tuple[str, Callable[[Tensor], Tensor]] | str:
    sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    if kwargs or not is_conv or flattened or len(sizes) != 2 or sizes[1] != -1:
        return "only a view/reshape to (batch, -1) of a Conv2d output is supported"
    return "flatten", _flatten


def _has_nodes(value: Any) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return bool(found)


def _mentions(value: Any, node: fx.Node) -> bool:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return node in found


def _is_batch_query(user: fx.Node) -> bool:
    """``x.size(0)``, ``x.dim()`` or ``x.shape`` read only at index 0: the same after units are removed."""
    if user.op == "call_method" and user.target in ("dim", "ndimension"):
        return True
    if user.op == "call_method" and user.target == "size":
        return len(user.args) == 2 and user.args[1] == 0 and not user.kwargs
    if user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",):
        return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in user.users)
    return user.op == "call_function" and user.target is getattr and user.args[1] in ("dtype", "device", "ndim")


def _is_shape_query(user: fx.Node) -> bool:
    return (user.op == "call_method" and user.target in ("size", "dim", "ndimension")) or (
        user.op == "call_function" and user.target is getattr
    )


# ---------------------------------------------------------------------------------------------------------------------
# Planning
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class _Work:
    """Working copies, edited by the fixed point; the model is never touched while planning."""

    weight: dict[str, Tensor] = field(default_factory=dict)
    bias: dict[str, Tensor | None] = field(default_factory=dict)
    alive: dict[str, Tensor] = field(default_factory=dict)
    keep_out: dict[str, Tensor] = field(default_factory=dict)
    keep_in: dict[str, Tensor] = field(default_factory=dict)
    norm_of: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> producer name


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> None:
    if masks is None:
        return
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        if name not in params:
            raise ValueError(f"`masks` names {name!r}, which is not a parameter of the model.")
        check_mask(name, keep, params[name].shape, "parameter")


def _alive(name: str, weight: Tensor, masks: Mapping[str, Tensor] | None) -> Tensor:
    """Connections alive: with masks, pruned means masked out *and* zero; without, zero."""
    key = f"{name}.weight" if name else "weight"
    if masks is None:
        return weight != 0
    keep = masks.get(key)
    if keep is None:
        return torch.ones_like(weight, dtype=torch.bool)
    return keep.to(weight.device) | (weight != 0)


def _no_input(alive: Tensor) -> Tensor:
    return ~alive.flatten(1).any(1)


def _contributions(link: _Link, work: _Work, graph: _Graph, units: Tensor) -> tuple[Tensor, Tensor]:
    """Per-unit constant contribution to the consumer's pre-activation, and whether it folds exactly.

    Returns ``(contrib, ok)``: ``contrib[i]`` is the float64 contribution of ``units[i]`` (one value per
    consumer output), ``ok[i]`` whether it is the same at every position (always for a Linear consumer).
    """
    producer = graph.modules[link.producer]
    consumer = graph.modules[link.consumer]
    weight = work.weight[link.producer]
    bias = work.bias[link.producer]
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    if isinstance(producer, nn.Conv2d):
        x = bias.view(1, -1, 1, 1).expand(1, -1, *link.unit_shape[1:]).contiguous()
    else:
        x = bias.view(1, -1)
    for step in link.steps:
        x = step(x)
    w_c = work.weight[link.consumer].double()
    if isinstance(consumer, nn.Linear):
        feats = x.reshape(weight.shape[0], link.group).double()[units]  # (k, g)
        cols = w_c.view(w_c.shape[0], weight.shape[0], link.group)[:, units]  # (out, k, g)
        contrib = torch.einsum("okg,kg->ko", cols, feats)
        return contrib, torch.isfinite(contrib).all(1)
    maps = x[0].double()[units].unsqueeze(0)  # (1, k, H, W)
    k, out = len(units), w_c.shape[0]
    kernel = w_c[:, units].transpose(0, 1).reshape(k * out, 1, *w_c.shape[2:])
    padding = consumer.padding
    if consumer.padding_mode != "zeros":
        maps = F.pad(maps, consumer._reversed_padding_repeated_twice, mode=consumer.padding_mode)
        padding = 0
    result = F.conv2d(maps, kernel, None, consumer.stride, padding, consumer.dilation, groups=k).view(k, out, -1)
    value = result.mean(-1)
    spread = (result - value.unsqueeze(-1)).abs().amax(-1)
    ok = (spread <= 1e-9 * (1 + value.abs())).all(1) & torch.isfinite(value).all(1)
    return value, ok


def _plan(
    model: nn.Module, example_input: Tensor | tuple[Any, ...], masks: Mapping[str, Tensor] | None
) -> tuple[StructurePlan, _Work, dict[str, _Link]]:
    _check_masks(model, masks)
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not nn.parameter.is_lazy(m.weight)
    }
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with _eval_mode(model), torch.no_grad():
        try:
            gm = fx.symbolic_trace(model)
        except Exception as err:  # tracing failures come in many types
            reason = f"torch.fx could not trace the model ({type(err).__name__}: {err})".replace("\n", " ")
            plans = {n: _refused(n, m, reason, masks) for n, m in layers.items()}
            return StructurePlan(plans), _Work(), {}
        ShapeProp(gm).propagate(*args)
    graph = _Graph(model, gm)
    links: dict[str, _Link] = {}
    plans: dict[str, LayerPlan] = {}
    for name, module in layers.items():
        outcome = graph.follow(name)
        if isinstance(outcome, _Link):
            links[name] = outcome
        else:
            status, reason = outcome
            plans[name] = (
                _refused(name, module, reason, masks) if status == "refused" else _output(name, module, reason)
            )
    work = _Work()
    with torch.no_grad():
        for link in links.values():
            for name in (link.producer, link.consumer):
                if name in work.weight:
                    continue
                module = graph.modules[name]
                work.weight[name] = module.weight.detach().clone()
                work.bias[name] = None if module.bias is None else module.bias.detach().clone()
                work.alive[name] = _alive(name, work.weight[name], masks)
                work.keep_out[name] = torch.ones(module.weight.shape[0], dtype=torch.bool, device=module.weight.device)
                work.keep_in[name] = torch.ones(module.weight.shape[1], dtype=torch.bool, device=module.weight.device)
            for norm in link.norms:
                work.norm_of[norm] = link.producer
        with _eval_mode(model):
            notes = _fixed_point(links, work, graph)
    for name, module in layers.items():
        if name not in links and name in work.alive and plans[name].status == "refused":
            dead = _no_input(work.alive[name]).nonzero().flatten().tolist()
            plans[name] = LayerPlan(name, plans[name].units, "refused", kept=tuple(dead), reason=plans[name].reason)
        if name in links:
            link = links[name]
            removed = (~work.keep_out[name]).nonzero().flatten().tolist()
            folded = sorted(notes[name]["folded"] & set(removed))
            alive = work.keep_out[name]
            dead = _no_input(work.alive[name]) & alive
            if link.kind == "linear" or link.kind == "flatten":
                used = work.alive[link.consumer].any(0).view(-1, link.group).any(1)
            else:
                used = work.alive[link.consumer].transpose(0, 1).flatten(1).any(1)
            kept = ((dead | ~used) & alive).nonzero().flatten().tolist()
            reasons = sorted(notes[name]["reasons"])
            plans[name] = LayerPlan(
                name=name,
                units=module.weight.shape[0],
                status="removable",
                consumer=link.consumer,
                remove=tuple(removed),
                folded=tuple(folded),
                kept=tuple(kept),
                reason="; ".join(reasons) if kept and reasons else None,
            )
    ordered = {n: plans[n] for n in layers}
    return StructurePlan(ordered), work, links


def _refused(name: str, module: nn.Module, reason: str, masks: Mapping[str, Tensor] | None) -> LayerPlan:
    with torch.no_grad():
        dead = _no_input(_alive(name, module.weight.detach(), masks)).nonzero().flatten().tolist()
    return LayerPlan(name=name, units=module.weight.shape[0], status="refused", kept=tuple(dead), reason=reason)


def _output(name: str, module: nn.Module, reason: str) -> LayerPlan:
    return LayerPlan(name=name, units=module.weight.shape[0], status="output", reason=reason)


def _fixed_point(links: dict[str, _Link], work: _Work, graph: _Graph) -> dict[str, dict[str, set[Any]]]:
    notes: dict[str, dict[str, set[Any]]] = {n: {"folded": set(), "reasons": set()} for n in links}
    changed = True
    while changed:
        changed = False
        for link in links.values():
            p, c = link.producer, link.consumer
            keep = work.keep_out[p]
            no_in = _no_input(work.alive[p]) & keep
            consumer_alive = work.alive[c]
            if link.kind == "conv":
                used = consumer_alive.transpose(0, 1).flatten(1).any(1)
            else:
                used = consumer_alive.any(0).view(-1, link.group).any(1)
            no_out = ~used & keep
            remove = no_out | no_in
            if not bool(remove.any()):
                continue
            fold = no_in & ~no_out
            units = fold.nonzero().flatten()
            contrib = None
            if len(units):
                contrib, ok = _contributions(link, work, graph, units)
                if not bool(ok.all()):
                    notes[p]["reasons"].add(
                        f"the contribution of a constant unit to {c!r} is not the same at every position (zero "
                        f"padding or pooling at the borders), so it cannot be folded into a bias"
                    )
                if work.bias[c] is None:
                    nonzero = (contrib != 0).any(1)
                    if bool((nonzero & ok).any()):
                        notes[p]["reasons"].add(f"{c!r} has no bias to absorb the constant output of dead units")
                    ok = ok & ~nonzero
                remove[units[~ok]] = False
                contrib = contrib[ok]
                units = units[ok]
            if int(remove.sum()) == int(keep.sum()):  # keep one unit: a layer never becomes empty
                spare = int((no_out & remove).nonzero()[0]) if bool((no_out & remove).any()) else int(units[0])
                remove[spare] = False
                notes[p]["reasons"].add("a layer keeps at least one unit")
                if contrib is not None and spare in units.tolist():
                    sel = units != spare
                    contrib, units = contrib[sel], units[sel]
            if not bool(remove.any()):
                continue
            if contrib is not None and len(units):
                bias_c = work.bias[c]
                assert bias_c is not None or bool((contrib == 0).all())
                if bias_c is not None:
                    work.bias[c] = (bias_c.double() + contrib.sum(0)).to(bias_c.dtype)
                notes[p]["folded"].update(units.tolist())
            idx = remove.nonzero().flatten()
            work.keep_out[p][idx] = False
            work.alive[p][idx] = False
            work.weight[p][idx] = 0
            if link.kind == "conv":
                cols = idx
            else:
                cols = (idx.unsqueeze(1) * link.group + torch.arange(link.group, device=idx.device)).flatten()
            work.keep_in[c][cols] = False
            work.alive[c][:, cols] = False
            work.weight[c][:, cols] = 0
            changed = True
    return notes


# ---------------------------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------------------------


def find_dead_units(
    model: nn.Module, example_input: Tensor | tuple[Any, ...], masks: Mapping[str, Tensor] | None = None
) -> StructurePlan:
    """Find the units :func:`remove_dead_units` would remove, and the layers it refuses; changes nothing.

    Args:
        model: The network (traced with :func:`torch.fx.symbolic_trace`; run once in eval mode on
            ``example_input`` for shapes, its train/eval flags are restored).
        example_input: A batch the model accepts (a tensor, or a tuple of positional arguments).
        masks: ``{parameter_name: bool mask}`` (``True`` = alive). A connection counts as pruned when
            its mask is ``False`` and its weight is zero. ``None``: every zero weight counts as pruned.

    Returns:
        The plan, one :class:`LayerPlan` per ``Linear`` and ``Conv2d`` module.

    Raises:
        ValueError: If a mask names no parameter or does not match its parameter's shape.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     net[0].weight[1] = 0  # unit 1 has no inputs: it outputs relu(bias)
        >>> plan = find_dead_units(net, torch.randn(5, 4))
        >>> plan.layers["0"].remove, plan.layers["0"].folded, plan.layers["2"].status
        ((1,), (1,), 'output')
    """
    return _plan(model, example_input, masks)[0]


def remove_dead_units(
    model: nn.Module,
    example_input: Tensor | tuple[Any, ...],
    masks: Mapping[str, Tensor] | None = None,
    *,
    strict: bool = False,
) -> StructureReport:
    """Remove dead units in place, folding constant ones into the next bias; outputs stay the same.

    The ``Linear``, ``Conv2d`` and ``BatchNorm`` modules that lose units are replaced (``setattr`` on
    their parent, same names) by smaller ones holding the kept rows/columns/channels. Every other
    module, and every layer of a refused chain, is left as it is. The result is checked: in eval mode
    the model's output on ``example_input`` must match the one before (``allclose``, atol 1e-5);
    otherwise the old modules are put back and :class:`RuntimeError` is raised.

    Parameters are new tensors: build optimizers after the call, and hand ``report.masks`` to the
    pruner (``pruner.masks = report.masks; pruner.refresh()``) so its masks match the new shapes.

    Args:
        model: The network.
        example_input: A batch the model accepts (tensor or tuple of positional arguments).
        masks: As in :func:`find_dead_units`.
        strict: Raise instead of leaving dead units in place when a layer is refused or units
            cannot be folded exactly.

    Returns:
        The applied plan, the replaced modules with old and new shapes, and the restricted masks.

    Raises:
        ValueError: With ``strict=True``, naming the first layer that keeps dead units and why;
            or on bad masks. The model is unchanged.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
        >>> with torch.no_grad():
        ...     net[0].weight[1] = 0  # unit 1 outputs the constant relu(bias[1])
        ...     net[2].weight[:, 2] = 0  # unit 2 is never read
        >>> x = torch.randn(5, 4)
        >>> before = net(x)
        >>> report = remove_dead_units(net, x)
        >>> net[0], net[2]
        (Linear(in_features=4, out_features=1, bias=True), Linear(in_features=1, out_features=2, bias=True))
        >>> torch.allclose(net(x), before, atol=1e-6)
        True
    """
    plan, work, _ = _plan(model, example_input, masks)
    if strict and plan.blocking:
        name, reason = next(iter(plan.blocking.items()))
        units = plan.layers[name].kept
        raise ValueError(
            f"Layer {name!r} keeps {len(units)} dead unit(s) {list(units[:8])}{'...' if len(units) > 8 else ''}: "
            f"{reason}. Pass strict=False to remove what can be removed and leave the rest."
        )
    before = sum(p.numel() for p in model.parameters())
    touched = [n for n in work.weight if not (bool(work.keep_out[n].all()) and bool(work.keep_in[n].all()))]
    if not touched:
        return StructureReport(plan, {}, None if masks is None else dict(masks), before, before)
    modules = dict(model.named_modules())
    new: dict[str, nn.Module] = {}
    changes: dict[str, LayerChange] = {}
    with torch.no_grad():
        for name in touched:
            old = modules[name]
            out_keep, in_keep = work.keep_out[name], work.keep_in[name]
            new[name] = _sliced_layer(old, work.weight[name], work.bias[name], out_keep, in_keep)
            changes[name] = LayerChange(
                name,
                type(old).__name__,
                tuple(old.weight.shape),
                tuple(new[name].weight.shape),
                int((~out_keep).sum()),
                int((~in_keep).sum()),
            )
        for norm, producer in work.norm_of.items():
            keep = work.keep_out[producer]
            if bool(keep.all()):
                continue
            old = modules[norm]
            new[norm] = _sliced_norm(old, keep)
            changes[norm] = LayerChange(
                norm, type(old).__name__, (old.num_features,), (int(keep.sum()),), int((~keep).sum()), 0
            )
    new_masks = None if masks is None else _restrict_masks(masks, work, touched)
    with _eval_mode(model), torch.no_grad():
        reference = model(*(example_input if isinstance(example_input, tuple) else (example_input,)))
        old_modules = _swap(model, new)
        model.eval()  # the modules swapped in carry the mode of those they replace
        try:
            result = model(*(example_input if isinstance(example_input, tuple) else (example_input,)))
            mismatch = _mismatch(result, reference)
        except Exception:
            _swap(model, old_modules)
            raise
        if mismatch is not None:
            _swap(model, old_modules)
            raise RuntimeError(
                f"Removing dead units changed the model's output ({mismatch}); the model was restored. "
                f"This is a bug in lightning_prune: please report it with the model definition."
            )
    after = sum(p.numel() for p in model.parameters())
    ordered = {n: changes[n] for n in modules if n in changes}
    return StructureReport(plan, ordered, new_masks, before, after)


def _sliced_layer(old: nn.Module, weight: Tensor, bias: Tensor | None, out_keep: Tensor, in_keep: Tensor) -> nn.Module:
    w = weight[out_keep][:, in_keep].clone()
    kw = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(old, nn.Linear):
        layer: nn.Module = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, **kw)
    else:
        layer = nn.Conv2d(
            w.shape[1],
            w.shape[0],
            old.kernel_size,
            stride=old.stride,
            padding=old.padding,
            dilation=old.dilation,
            groups=1,
            bias=bias is not None,
            padding_mode=old.padding_mode,
            **kw,
        )
    layer.weight.copy_(w)
    layer.weight.requires_grad_(old.weight.requires_grad)
    if bias is not None:
        layer.bias.copy_(bias[out_keep])
        layer.bias.requires_grad_(old.bias.requires_grad)
    layer.train(old.training)
    return layer


def _sliced_norm(old: nn.Module, keep: Tensor) -> nn.Module:
    norm = type(old)(
        int(keep.sum()),
        eps=old.eps,
        momentum=old.momentum,
        affine=old.affine,
        track_running_stats=old.track_running_stats,
        device=old.running_mean.device,
        dtype=old.running_mean.dtype,
    )
    if old.affine:
        norm.weight.copy_(old.weight[keep])
        norm.bias.copy_(old.bias[keep])
        norm.weight.requires_grad_(old.weight.requires_grad)
        norm.bias.requires_grad_(old.bias.requires_grad)
    norm.running_mean.copy_(old.running_mean[keep])
    norm.running_var.copy_(old.running_var[keep])
    norm.num_batches_tracked.copy_(old.num_batches_tracked)
    norm.train(old.training)
    return norm


def _restrict_masks(masks: Mapping[str, Tensor], work: _Work, touched: list[str]) -> dict[str, Tensor]:
    out = dict(masks)
    for name in touched:
        keep_out = work.keep_out[name].to("cpu")
        keep_in = work.keep_in[name].to("cpu")
        prefix = f"{name}." if name else ""
        if f"{prefix}weight" in out:
            mask = out[f"{prefix}weight"]
            out[f"{prefix}weight"] = mask[keep_out.to(mask.device)][:, keep_in.to(mask.device)].clone()
        if f"{prefix}bias" in out:
            mask = out[f"{prefix}bias"]
            out[f"{prefix}bias"] = mask[keep_out.to(mask.device)].clone()
    return out


def _swap(model: nn.Module, new: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module of ``new`` in place; return the modules they replaced."""
    old = {}
    for name, module in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old[name] = getattr(parent, child)
        setattr(parent, child, module)
    return old


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _leaves(item)]
    if isinstance(value, Mapping):
        return [leaf for key in sorted(value, key=str) for leaf in _leaves(value[key])]
    return [value]


def _mismatch(result: Any, reference: Any) -> str | None:
    got, want = _leaves(result), _leaves(reference)
    if len(got) != len(want):
        return f"{len(got)} outputs instead of {len(want)}"
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        if isinstance(b, Tensor):
            if not isinstance(a, Tensor) or a.shape != b.shape:
                return f"output {i} has another shape"
            if not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
                return f"output {i} differs by up to {float((a - b).abs().max()):.3g}"
        elif a != b:
            return f"output {i} differs"
    return None


# ---------------------------------------------------------------------------------------------------------------------
# Shapes, resizing, shrunk checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def shapes(model: nn.Module) -> dict[str, list[int]]:
    """Weight shapes of the resizable modules: ``Linear``/``Conv2d`` weight shape, BatchNorm ``[num_features]``.

    Example::

        >>> shapes(nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(36, 2)))
        {'0': [4, 1, 3, 3], '1': [4], '3': [2, 36]}
    """
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            out[name] = [module.num_features]
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            out[name] = list(module.weight.shape)
    return out


def _resized(model: nn.Module, record: Mapping[str, Any], device: torch.device | None = None) -> dict[str, nn.Module]:
    """New modules for every recorded layer whose shape differs (on ``device``, default: the old module's).

    Validates everything first; on the ``meta`` device the modules allocate nothing.
    """
    modules = dict(model.named_modules())
    new: dict[str, nn.Module] = {}
    for name, shape in record.items():
        if name not in modules or not name:
            raise ValueError(
                f"The recorded shapes name module {name!r}, which the model does not have (or is the root)."
            )
        module = modules[name]
        if type(module) not in _RESIZABLE:
            raise ValueError(
                f"Module {name!r} is a {type(module).__name__}; only Linear, Conv2d and BatchNorm1d/2d are resized."
            )
        if not isinstance(shape, (list, tuple)) or not all(_is_int(s) and s > 0 for s in shape):
            raise ValueError(f"The recorded shape of {name!r} must be a list of positive ints, got {shape!r}.")
        shape = list(shape)
        if shape != shapes(module)[""]:
            new[name] = _layer(name, module, shape, device)
            new[name].train(module.training)
    return new


def _layer(name: str, module: nn.Module, shape: list[int], device: torch.device | None) -> nn.Module:
    """A fresh copy of a Linear, Conv2d or BatchNorm module with another shape."""
    ref = next(iter(module.state_dict().values()), None)  # the weight or running_mean, if any: device and dtype
    if device is None and ref is not None:
        device = ref.device
    kwargs: dict[str, Any] = {"device": device, "dtype": None if ref is None else ref.dtype}
    if isinstance(module, nn.Linear):
        if len(shape) != 2:
            raise ValueError(f"The recorded shape of Linear {name!r} must be [out, in], got {shape}.")
        return nn.Linear(shape[1], shape[0], bias=module.bias is not None, **kwargs)
    if isinstance(module, nn.Conv2d):
        if len(shape) != 4 or tuple(shape[2:]) != tuple(module.kernel_size) or module.groups != 1:
            raise ValueError(
                f"The recorded shape of Conv2d {name!r} must be [out, in, {module.kernel_size[0]}, "
                f"{module.kernel_size[1]}] (groups=1), got {shape}."
            )
        return nn.Conv2d(
            shape[1],
            shape[0],
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            **kwargs,
        )
    if len(shape) != 1:
        raise ValueError(f"The recorded shape of {type(module).__name__} {name!r} must be [features], got {shape}.")
    return type(module)(
        shape[0],
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        **kwargs,
    )


def resize_to(model: nn.Module, record: Mapping[str, list[int]]) -> list[str]:
    """Re-create the recorded layers with the recorded shapes (fresh values), in place.

    Used to load a shrunk checkpoint into a freshly constructed model. Every entry is validated
    before any module is replaced.

    Args:
        model: The network, as its constructor builds it.
        record: ``{module_name: shape}`` as given by :func:`shapes` on the shrunk model.

    Returns:
        Names of the modules replaced (those whose shape differed).

    Raises:
        ValueError: If a name is not a Linear/Conv2d/BatchNorm module of the model, or a shape does
            not fit its module (rank, kernel size).

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> resize_to(net, {"0": [1, 4], "2": [2, 1]})
        ['0', '2']
        >>> net[0]
        Linear(in_features=4, out_features=1, bias=True)
    """
    new = _resized(model, record)
    _swap(model, new)
    return list(new)


def save_shrunk(model: nn.Module, path: str | PathLike[str]) -> None:
    """Save the state dict and the layer shapes to a safetensors file (no pickle).

    The metadata holds ``{"format", "version", "sha256", "shapes"}``: the shapes of :func:`shapes`
    as JSON and a SHA-256 of the whole file (see :mod:`lightning_prune.core.export`), format
    version ``"2"``. Tied parameters are stored once per name.

    Example::

        >>> import tempfile, os
        >>> net = nn.Sequential(nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
        >>> save_shrunk(net, path)
        >>> fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> load_shrunk(fresh, path)
        ['0', '2']
        >>> torch.equal(fresh[0].weight, net[0].weight)
        True
    """
    tensors: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in model.state_dict().items():
        value = value.detach().to("cpu").contiguous()
        ptr = value.untyped_storage().data_ptr()
        if ptr in seen and value.numel():
            value = value.clone()
        seen.add(ptr)
        tensors[name] = value
    _write_sealed(path, tensors, {"format": _FORMAT, "version": _VERSION, "shapes": json.dumps(shapes(model))})


def _record(path: str | PathLike[str], text: str, file_bytes: int) -> dict[str, list[int]]:
    """The shape record of a shrunk checkpoint: ``{module name: 1 to 4 positive ints}``.

    A recorded layer has at most as many entries as the file has bytes (its weight is in the file).
    """
    try:
        record = _strict_json(text, "the 'shapes' metadata")
        if not isinstance(record, dict):
            raise _DefectError(f"the 'shapes' metadata must be a JSON object, got {_show(record)}")
        for name, shape in record.items():
            if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(_is_int(s) and s > 0 for s in shape):
                raise _DefectError(f"the recorded shape of {_show(name)} is {_show(shape)}, not 1 to 4 positive ints")
            if math.prod(shape) > file_bytes:
                raise _DefectError(f"the recorded shape of {_show(name)}, {shape}, is larger than the file")
    except _DefectError as err:
        raise _fail(path, str(err), _SHRUNK.label) from err
    return record


def _check_planned(
    model: nn.Module, path: str | PathLike[str], record: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> None:
    """Build the layers the record asks for on the meta device and check their tensors against the file's.

    Nothing is allocated, and afterwards the real layers take no more than the tensors in the file:
    a record cannot make the resize build layers larger than what the file holds.
    """
    for name, module in _resized(model, record, device=torch.device("meta")).items():
        for key, value in module.state_dict().items():
            full = f"{name}.{key}"
            if full not in tensors:
                raise ValueError(f"the file lacks {full!r}.")
            if tensors[full].shape != value.shape:
                problem = (
                    f"the shape record gives {name!r} as {record[name]}, but {full!r} is {list(tensors[full].shape)}"
                )
                raise _fail(path, problem, _SHRUNK.label)


def _misfit(expected: Mapping[str, Tensor], tensors: Mapping[str, Tensor]) -> str | None:
    """The first key, shape or dtype of the (resized) model that the file's tensors do not match."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        return f"the file lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if unexpected:
        return f"the file has {unexpected[0]!r}, which the model does not" + (
            f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        )
    for key, own in expected.items():
        if tensors[key].shape != own.shape:
            return f"{key!r} has shape {list(tensors[key].shape)} in the file and {list(own.shape)} in the model"
        if tensors[key].dtype != own.dtype:
            return f"{key!r} is {tensors[key].dtype} in the file and {own.dtype} in the model"
    return None


def load_shrunk(model: nn.Module, path: str | PathLike[str]) -> list[str]:
    """Resize a freshly built model to the shapes saved by :func:`save_shrunk`, then load the weights.

    The file is verified first (its SHA-256, then its layout and shape record against the tensors
    in it); the layers the record asks for are planned on the ``meta`` device and checked against
    the file's tensors before any is built. Keys, shapes and dtypes are checked against the file
    before anything is loaded (``strict=True``); on any problem the model is left as it was.

    Args:
        model: The network as its constructor builds it (or already shrunk the same way).
        path: A file written by :func:`save_shrunk` (format version ``"2"``; files of version
            ``"1"`` cannot be verified and are refused: save them again).

    Returns:
        Names of the modules that were resized.

    Raises:
        SparseFormatError: If the file is corrupt, truncated, inconsistent, not a shrunk checkpoint
            or of another version (a ``ValueError``; names the file and the problem).
        ValueError: If the file does not fit the model (names the first missing/unexpected key,
            mismatched shape or dtype, or the recorded module the model lacks).
    """
    metadata, tensors, file_bytes = _read_sealed(path, _SHRUNK)
    record = _record(path, metadata["shapes"], file_bytes)
    try:
        _check_planned(model, path, record, tensors)
        new = _resized(model, record)
    except SparseFormatError:
        raise
    except ValueError as err:
        raise ValueError(f"{str(path)!r} does not fit the model: {err} Nothing was loaded.") from err
    old = _swap(model, new)
    problem = _misfit(model.state_dict(), tensors)
    if problem is not None:
        _swap(model, old)
        raise ValueError(f"{str(path)!r} does not fit the model: {problem}. Nothing was loaded.")
    model.load_state_dict(tensors, strict=True)
    return list(new)
