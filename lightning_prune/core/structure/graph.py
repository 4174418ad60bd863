"""Tracing the dataflow of a model: which layer's output units reach which layer, through which steps.

:func:`trace_graph` traces the model with torch.fx (in eval mode) and propagates the shapes of an
example input; :meth:`Graph.follow` walks from a ``Linear`` or ``Conv2d`` layer (the *producer*)
through per-unit steps (the allow-lists below: activations, Identity, Dropout, BatchNorm, pooling,
flatten) to the layer that reads its units (the *consumer*), and gives the :class:`Link`, or why
the chain is refused or ends at the model output.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from lightning_prune.core.tracing import eval_mode, trace

__all__ = ["Graph", "Link", "Status", "trace_graph"]

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

_NOT_A_STEP = "not an elementwise activation, dropout, BatchNorm, pooling or flatten step"
_POOL_PLACE = "pooling is supported between Conv2d layers only"
_POOL_INDICES = "pooling that returns indices"

_Step = tuple[str, Callable[[Tensor], Tensor]]


@dataclass
class Link:
    """A supported chain from a producer layer to its consumer.

    Attributes:
        producer: Name of the layer whose output units are followed.
        consumer: Name of the layer that reads them.
        kind: ``"linear"`` (Linear to Linear), ``"conv"`` (Conv2d to Conv2d) or ``"flatten"``
            (Conv2d, flatten, Linear).
        steps: The per-unit steps in between, as functions of a tensor.
        norms: Names of the BatchNorm modules among the steps.
        group: Consumer input features per producer unit (``H*W`` after a flatten, else 1).
        unit_shape: The producer's output without the batch dim: ``(F,)`` or ``(C, H, W)``.
    """

    producer: str
    consumer: str
    kind: Literal["linear", "conv", "flatten"]
    steps: list[Callable[[Tensor], Tensor]]
    norms: list[str]
    group: int
    unit_shape: tuple[int, ...]


@dataclass
class _Chain:
    """A chain being followed from ``producer``: its steps so far and the node it has reached."""

    producer: str
    is_conv: bool
    units: int
    unit_shape: tuple[int, ...]
    node: fx.Node
    path: list[str]
    steps: list[Callable[[Tensor], Tensor]] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    flattened: bool = False
    group: int = 1

    @property
    def where(self) -> str:
        return " -> ".join(self.path)


def trace_graph(model: nn.Module, args: tuple[Any, ...]) -> Graph | str:
    """The traced model with per-node shapes from running ``args`` in eval mode, or why torch.fx could not trace it.

    The train/eval flags of the model are restored.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> link = trace_graph(net, (torch.randn(5, 4),)).follow("0")
        >>> link.consumer, link.kind, link.unit_shape
        ('2', 'linear', (3,))
    """
    with eval_mode(model), torch.no_grad():
        traced = trace(model)
        if isinstance(traced, str):
            return f"torch.fx could not trace the model ({traced})"
        ShapeProp(traced).propagate(*args)
    return Graph(model, traced)


class Graph:
    """The traced model: module call sites, parameter sharing, per-node shapes.

    Args:
        model: The network.
        gm: Its torch.fx trace, with ``tensor_meta`` from shape propagation.
    """

    def __init__(self, model: nn.Module, gm: fx.GraphModule):
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
        """The shape shape propagation recorded for ``node``'s output, if it is a tensor."""
        meta = node.meta.get("tensor_meta")
        return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None

    def describe(self, node: fx.Node) -> str:
        """``node`` for messages: the module and its type, the function or the method."""
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

    def follow(self, name: str) -> Link | tuple[Status, str]:
        """The supported chain from layer ``name`` to its consumer, else ``(status, reason)``."""
        chain = self._start(name)
        if not isinstance(chain, _Chain):
            return chain
        while True:
            user = self._only_user(chain)
            if isinstance(user, tuple):
                return user
            if user.op == "output":
                return "output", f"{chain.where} feeds the model output"
            module = self.modules.get(user.target) if user.op == "call_module" else None
            if type(module) in (nn.Linear, nn.Conv2d):
                return self._consumer(chain, user)
            problem = self._extend(chain, user)
            if problem is not None:
                return "refused", problem

    def _start(self, name: str) -> _Chain | tuple[Status, str]:
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
        units = producer.out_channels if is_conv else producer.out_features
        return _Chain(name, is_conv, units, unit_shape, node, [name])

    def _only_user(self, chain: _Chain) -> fx.Node | tuple[Status, str]:
        """The one node that reads the chain's output, or why there is not exactly one."""
        node = chain.node
        users = [u for u in node.users if not _is_shape_query(u)]
        odd = [u for u in node.users if u not in users and not _is_batch_query(u)]
        if odd:
            return "refused", f"its output's shape is read by {self.describe(odd[0])} after {chain.where}"
        if not users:
            return "refused", f"the output of {chain.where} is not used"
        if len(users) > 1:
            what = ", ".join(self.describe(u) for u in users)
            return "refused", (
                f"the output of {chain.where} has {len(users)} users ({what}): a branch, residual "
                f"connection or concatenation"
            )
        return users[0]

    def _extend(self, chain: _Chain, user: fx.Node) -> str | None:
        """Add ``user`` to the chain as a per-unit step, or say why it is not one."""
        step = self._step(user, chain)
        if isinstance(step, str):
            return f"the output of {chain.where} flows into {self.describe(user)}: {step}"
        kind, fn = step
        if kind == "norm":
            chain.norms.append(str(user.target))
        if kind == "flatten":
            shape_in, shape_out = self.shape(chain.node), self.shape(user)
            if (
                shape_in is None
                or shape_out is None
                or len(shape_in) != 4
                or shape_in[1] != chain.units
                or tuple(shape_out) != (shape_in[0], shape_in[1] * shape_in[2] * shape_in[3])
            ):
                return (
                    f"{self.describe(user)} turns shape {shape_in and list(shape_in)} into "
                    f"{shape_out and list(shape_out)}, not a flatten of (N, C, H, W) to (N, C*H*W)"
                )
            chain.flattened, chain.group = True, shape_in[2] * shape_in[3]
        chain.steps.append(fn)
        chain.path.append(self.describe(user) if user.op != "call_module" else str(user.target))
        chain.node = user
        return None

    def _step(self, user: fx.Node, chain: _Chain) -> _Step | str:
        """Classify ``user`` (which reads the chain's node) as a per-unit step, or return why it is not one."""
        node, args, kwargs = chain.node, user.args, dict(user.kwargs)
        first_only = bool(args) and args[0] is node and not _mentions(args[1:], node) and not _mentions(kwargs, node)
        if user.op == "call_module":
            return self._module_step(user, chain, first_only and len(args) == 1)
        if not first_only:
            return "the tensor is not its only tensor argument"
        reshape = (user.op == "call_method" and user.target in ("view", "reshape")) or (
            user.op == "call_function" and user.target is torch.reshape
        )
        if not reshape and (_has_nodes(args[1:]) or _has_nodes(kwargs)):
            return "it takes other tensors as arguments"
        if user.op == "call_function":
            return _function_step(user.target, args, kwargs, chain)
        if user.op == "call_method":
            return _method_step(str(user.target), args, kwargs, chain)
        return _NOT_A_STEP

    def _module_step(self, user: fx.Node, chain: _Chain, plain_call: bool) -> _Step | str:
        module = self.modules[user.target]
        if type(module) in _ELEMENTWISE_MODULES:
            return ("elementwise", module) if plain_call else "unexpected arguments"
        if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d):
            if chain.flattened or (type(module) is nn.BatchNorm2d) != chain.is_conv:
                return "BatchNorm only between a Conv2d and the next layer (BatchNorm2d) or two Linear (BatchNorm1d)"
            shape = self.shape(chain.node)
            if type(module) is nn.BatchNorm1d and (shape is None or len(shape) != 2):
                return "BatchNorm1d is supported on 2-D (N, features) activations only"
            problem = self.module_problem(str(user.target), "BatchNorm")
            return problem if problem else ("norm", module)
        if type(module) in _POOL_MODULES:
            problem = _pool_problem(chain, getattr(module, "return_indices", False))
            if problem is not None:
                return problem
            return ("pool", module) if plain_call else "unexpected arguments"
        if type(module) is nn.Flatten:
            return _flatten_step(chain, module.start_dim, module.end_dim, "Flatten(start_dim=1)")
        return _NOT_A_STEP

    def _consumer(self, chain: _Chain, user: fx.Node) -> Link | tuple[Status, str]:
        name, consumer_name = chain.producer, str(user.target)
        consumer = self.modules[consumer_name]
        if user.args != (chain.node,) or user.kwargs:
            return "refused", f"{consumer_name!r} is called with extra arguments"
        problem = self.module_problem(consumer_name, "consumer")
        if problem is not None:
            return "refused", problem
        units = chain.units
        if isinstance(consumer, nn.Conv2d):
            if not chain.is_conv or chain.flattened:
                return "refused", f"a Linear output feeds the Conv2d {consumer_name!r}"
            if consumer.in_channels != units:
                return "refused", f"{consumer_name!r} expects {consumer.in_channels} channels, {name!r} gives {units}"
            in_shape = self.shape(chain.node)
            if in_shape is None or len(in_shape) != 4:
                return "refused", f"the input of {consumer_name!r} is not a batched 4-D tensor"
            return Link(name, consumer_name, "conv", chain.steps, chain.norms, 1, chain.unit_shape)
        if chain.is_conv and not chain.flattened:
            return "refused", f"a 4-D Conv2d output reaches the Linear {consumer_name!r} without a flatten"
        if consumer.in_features != units * chain.group:
            return "refused", f"{consumer_name!r} expects {consumer.in_features} features, not {units} x {chain.group}"
        kind: Literal["linear", "flatten"] = "flatten" if chain.flattened else "linear"
        return Link(name, consumer_name, kind, chain.steps, chain.norms, chain.group, chain.unit_shape)


def _function_step(target: Any, args: tuple[Any, ...], kwargs: dict[str, Any], chain: _Chain) -> _Step | str:
    if target in _ELEMENTWISE_FUNCTIONS:
        return "elementwise", _bind(target, args[1:], kwargs)
    if target is F.dropout:
        training = kwargs.get("training", args[2] if len(args) > 2 else True)
        if training is not False:
            return "F.dropout with training=True is not the identity in eval mode"
        return "elementwise", _identity
    if target in _POOL_FUNCTIONS:
        problem = _pool_problem(chain, kwargs.get("return_indices", False) or (len(args) > 5 and args[5]))
        return problem if problem is not None else ("pool", _bind(target, args[1:], kwargs))
    if target is torch.flatten:
        return _flatten_step(chain, *_flatten_dims(args, kwargs), "torch.flatten(x, 1)")
    if target is torch.reshape:
        return _reshape_step(args[1:], kwargs, chain)
    return _NOT_A_STEP


def _method_step(target: str, args: tuple[Any, ...], kwargs: dict[str, Any], chain: _Chain) -> _Step | str:
    if target in _ELEMENTWISE_METHODS:
        return "elementwise", _bind_method(target, args[1:], kwargs)
    if target == "flatten":
        return _flatten_step(chain, *_flatten_dims(args, kwargs), "x.flatten(1)")
    if target in ("view", "reshape"):
        return _reshape_step(args[1:], kwargs, chain)
    return _NOT_A_STEP


def _pool_problem(chain: _Chain, returns_indices: Any) -> str | None:
    if not chain.is_conv or chain.flattened:
        return _POOL_PLACE
    return _POOL_INDICES if returns_indices else None


def _flatten_dims(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``start_dim`` and ``end_dim`` of a ``torch.flatten(x, ...)`` or ``x.flatten(...)`` call."""
    start = kwargs.get("start_dim", args[1] if len(args) > 1 else 0)
    end = kwargs.get("end_dim", args[2] if len(args) > 2 else -1)
    return start, end


def _flatten_step(chain: _Chain, start: Any, end: Any, what: str) -> _Step | str:
    if not chain.is_conv or chain.flattened or start != 1 or end not in (-1, 3):
        return f"only {what} of a Conv2d output is supported"
    return "flatten", _flatten


def _reshape_step(rest: tuple[Any, ...], kwargs: dict[str, Any], chain: _Chain) -> _Step | str:
    sizes = rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
    if kwargs or not chain.is_conv or chain.flattened or len(sizes) != 2 or sizes[1] != -1:
        return "only a view/reshape to (batch, -1) of a Conv2d output is supported"
    return "flatten", _flatten


def _func_name(fn: Any) -> str:
    module = getattr(fn, "__module__", None) or ""
    name = getattr(fn, "__name__", repr(fn))
    module = "operator" if module == "_operator" else module
    return f"{module}.{name}" if module else name


def _identity(x: Tensor) -> Tensor:
    return x


def _flatten(x: Tensor) -> Tensor:
    return x.flatten(1)


def _bind(fn: Callable[..., Tensor], rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    return lambda x: fn(x, *rest, **kwargs)


def _bind_method(name: str, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> Callable[[Tensor], Tensor]:
    return lambda x: getattr(x, name)(*rest, **kwargs)


def _nodes_in(value: Any) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(value, found.append)
    return found


def _has_nodes(value: Any) -> bool:
    return bool(_nodes_in(value))


def _mentions(value: Any, node: fx.Node) -> bool:
    return node in _nodes_in(value)


def _is_batch_query(user: fx.Node) -> bool:
    """``x.size(0)``, ``x.dim()`` or ``x.shape`` read only at index 0: the same after units are removed."""
    if user.op == "call_method" and user.target in ("dim", "ndimension"):
        return True
    if user.op == "call_method" and user.target == "size":
        return len(user.args) == 2 and bool(user.args[1] == 0) and not user.kwargs
    if user.op == "call_function" and user.target is getattr and user.args[1:] == ("shape",):
        return all(u.op == "call_function" and u.target is operator.getitem and u.args[1] == 0 for u in user.users)
    return user.op == "call_function" and user.target is getattr and user.args[1] in ("dtype", "device", "ndim")


def _is_shape_query(user: fx.Node) -> bool:
    return (user.op == "call_method" and user.target in ("size", "dim", "ndimension")) or (
        user.op == "call_function" and user.target is getattr
    )
