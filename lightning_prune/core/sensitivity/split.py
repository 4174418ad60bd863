"""Splitting a traced model at a layer: a prefix computing the *cut*, and the suffix from the layer on.

Pruning layer ``L`` changes nothing that runs before ``L``. For each layer the values of the part
before ``L`` that the rest of the network needs (the *cut*: the inputs of ``L`` and any skip
connections around it) are computed once per batch by :attr:`GraphSplit.prefix` and kept, and every
level of ``L`` runs only :attr:`GraphSplit.suffix`. Cut values the suffix may write into (in-place
operations, also through views) are copied before each run.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx, nn

__all__ = ["GraphSplit"]

_VIEW_FREE = frozenset({operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv,
                        operator.matmul, operator.neg, operator.pow, operator.mod, operator.getitem})  # fmt: skip
_IN_PLACE_OPERATORS = frozenset({operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
                                 operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand,
                                 operator.ior, operator.ixor, operator.ilshift, operator.irshift})  # fmt: skip
_KNOWN_MODULES = ("torch", "operator", "math", "builtins", "_operator")


def _in_place(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool | None:
    """Whether ``node`` may write into its first argument (``True``), any input (``None``), or none (``False``).

    Conservative: functions from outside torch (``torch.fx.wrap``) may write into any input, and a
    positional ``True`` flag counts as ``inplace=True``.
    """
    if node.op == "call_module":
        return getattr(modules.get(str(node.target)), "inplace", False) is True
    if node.op == "call_method":
        name = str(node.target)
        return (name.endswith("_") and not name.startswith("__")) or name == "__setitem__" or name.startswith("__i")
    if node.op != "call_function":
        return False
    target = node.target
    if target in _IN_PLACE_OPERATORS:
        return True
    if target in _VIEW_FREE:
        return False
    name = getattr(target, "__name__", "")
    module = getattr(target, "__module__", None) or ""
    if module.split(".")[0] not in _KNOWN_MODULES or node.kwargs.get("out") is not None:
        return None
    if node.kwargs.get("inplace") is True or (name.endswith("_") and not name.endswith("__")):
        return True
    return any(a is True for a in node.args[1:])


def _written(node: fx.Node, modules: Mapping[str, nn.Module]) -> list[fx.Node]:
    """The input nodes ``node`` may write into."""
    writes = _in_place(node, modules)
    if writes is False:
        return []
    if writes is True and node.args and isinstance(node.args[0], fx.Node):
        return [node.args[0]]
    return list(node.all_input_nodes)


_FRESH_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.conv._ConvNd,
    nn.Linear,
    nn.Bilinear,
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.Embedding,
)
"""Leaf modules whose output is always a new tensor, never a view of their input."""
_FRESH_FUNCTIONS = frozenset(
    {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.matmul, operator.neg,
     operator.pow, operator.mod, torch.cat, torch.stack}
)  # fmt: skip
"""Functions whose output is always a new tensor (``x + y``, as torch.fx records ``x += y`` as well)."""


def _fresh(node: fx.Node, modules: Mapping[str, nn.Module]) -> bool:
    """Whether ``node``'s output is surely a new tensor (a write into it cannot reach its inputs)."""
    if node.op == "call_function":
        return node.target in _FRESH_FUNCTIONS
    module = modules.get(str(node.target)) if node.op == "call_module" else None
    return module is not None and isinstance(module, _FRESH_MODULES) and not getattr(module, "inplace", False)


def _live(nodes: list[fx.Node], modules: Mapping[str, nn.Module]) -> set[fx.Node]:
    """Nodes the output depends on, and those that write in place (and what they depend on)."""
    live: set[fx.Node] = set()
    for node in reversed(nodes):
        if (
            node.op in ("output", "placeholder")
            or any(u in live for u in node.users)
            or _in_place(node, modules) is not False
        ):
            live.add(node)
    return live


def _touches(node: fx.Node, owners: set[str]) -> bool:
    """Whether ``node`` runs or reads one of ``owners`` (the names of the modules holding the pruned weight)."""
    if node.op not in ("call_module", "get_attr"):
        return False
    target = str(node.target)
    for owner in owners:
        if owner == "" or target == owner or target.startswith(owner + "."):
            return True
        if node.op == "call_module" and owner.startswith(target + "."):
            return True  # a leaf module that contains the layer (nn.MultiheadAttention's out_proj)
    return False


class GraphSplit:
    """The graph of a traced model split at a layer: a prefix computing the cut, and the suffix from the layer on.

    Args:
        traced: The model traced by torch.fx.
        owners: Names of the modules holding the layer's weight: the suffix starts at the first node
            that runs or reads one of them.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> split = GraphSplit(fx.symbolic_trace(net), {"2"})
        >>> x = torch.randn(3, 4)
        >>> torch.equal(split.run(split.prefix(x)), net(x))
        True
    """

    def __init__(self, traced: fx.GraphModule, owners: set[str]):
        nodes = list(traced.graph.nodes)
        start = next((i for i, n in enumerate(nodes) if _touches(n, owners)), len(nodes) - 1)
        head = set(nodes[:start])
        needed = [n for n in nodes[:start] if any(user not in head for user in n.users)]
        cut = [n for n in needed if n.op != "get_attr"]
        constants = [n for n in needed if n.op == "get_attr"]
        modules = dict(traced.named_modules())
        self.prefix = fx.GraphModule(traced, _prefix_graph(nodes[:start], cut, modules))
        """Computes the cut values from the model's inputs."""
        self.suffix = fx.GraphModule(traced, _suffix_graph(cut, [*constants, *nodes[start:]]))
        """Computes the model's output from the cut values."""
        self.clone = _written_cut(nodes[start:], head, cut, modules)
        """Positions of cut values the suffix may write into: they are copied before each use."""

    def run(self, values: tuple[Any, ...]) -> Any:
        """The suffix on cut values computed by :attr:`prefix`, copying those it may write into."""
        if self.clone:
            values = tuple(_clone(v) if i in self.clone else v for i, v in enumerate(values))
        return self.suffix(*values)


def _prefix_graph(nodes: list[fx.Node], cut: list[fx.Node], modules: Mapping[str, nn.Module]) -> fx.Graph:
    """The graph of ``nodes`` returning the ``cut`` values, without what only a part of them would need."""
    prefix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in nodes:
        env[node] = prefix.node_copy(node, lambda n: env[n])
    prefix.output(tuple(env[n] for n in cut))
    live = _live(list(prefix.nodes), modules)
    for node in reversed(list(prefix.nodes)):
        if node not in live:  # computed only for a part of the suffix's own inputs
            prefix.erase_node(node)
    return prefix


def _suffix_graph(cut: list[fx.Node], nodes: list[fx.Node]) -> fx.Graph:
    """The graph of ``nodes`` taking the ``cut`` values as inputs."""
    suffix = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i, node in enumerate(cut):
        env[node] = suffix.placeholder(f"cut_{i}")
    for node in nodes:
        env[node] = suffix.node_copy(node, lambda n: env[n])
    return suffix


def _written_cut(
    nodes: list[fx.Node], head: set[fx.Node], cut: list[fx.Node], modules: Mapping[str, nn.Module]
) -> list[int]:
    """Positions of the cut values that ``nodes`` write into, directly or through a value that may be a view."""
    index = {node: i for i, node in enumerate(cut)}
    clone: set[int] = set()
    for node in nodes:
        stack, seen = _written(node, modules), set()
        while stack:
            current = stack.pop()
            if current in seen:
                continue
            seen.add(current)
            if current in index:
                clone.add(index[current])
            elif current not in head and not _fresh(current, modules):
                stack.extend(current.all_input_nodes)
    return sorted(clone)


def _clone(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_clone(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj
