"""Dropout adjustment while retraining: ``D_r = D_o * sqrt(C_ir / C_io)`` (Han et al. 2015, 3.2).

Dropout acts on neurons, and a layer's connection count is quadratic in its neuron counts, so a
pruned layer (fewer connections, less capacity) is retrained with a smaller dropout rate. A dropout
module is linked to the layers whose *inputs* it drops: the layers with weights that take its output.
``C_io`` is their dense connection count, ``C_ir`` their remaining count, ``D_o`` the rate the model
was built with. Rates are always computed from the original rate and count.

Links come, by priority, from an explicit ``{dropout: layer}`` map, from the data flow of a traced
forward pass (:class:`ForwardTrace`: the layers that take a dropout's output, seen through reshapes,
activations, normalizations, pooling and other dropouts), or, before any trace, from the modules'
registration order (which is the forward order of ``nn.Sequential`` and of most models,
torchvision's AlexNet and VGG included).

The dropout between the layers of a multi-layer ``nn.RNN``/``nn.LSTM``/``nn.GRU`` (its ``dropout``
argument, named ``rnn.dropout`` for a module ``rnn``) drops the inputs of the RNN's layers 1 and up:
it is linked to their ``weight_ih`` (both directions), by the module's structure (:func:`rnn_dropouts`).
The dropout of ``nn.MultiheadAttention`` drops attention probabilities, not any layer's input
neurons: it keeps its rate.
"""

from __future__ import annotations

import math
import re
import weakref
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

__all__ = [
    "PASS_THROUGH",
    "SCALAR_OPS",
    "DropoutAdjuster",
    "ForwardTrace",
    "LinkRule",
    "LinkSource",
    "adjusted_rate",
    "find_dropouts",
    "is_weight_name",
    "layer_counts",
    "link",
    "rnn_dropouts",
    "weight_layers",
]

LinkSource = Literal["explicit", "traced", "static", "inner"]
LinkRule = Literal["data flow", "call order", "registration order"]
_FUNCTIONAL_DROPOUT = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}
_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)
_RNN_INPUT = re.compile(r"weight_ih_l(\d+)(?:_reverse)?")

PASS_THROUGH: frozenset[str] = frozenset(
    {
        # shape, view, indexing and copies
        *("view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "T"),
        *("mT", "swapaxes", "swapdims", "movedim", "moveaxis", "contiguous", "squeeze", "unsqueeze", "expand"),
        *("expand_as", "broadcast_to", "repeat", "tile", "repeat_interleave", "__getitem__", "narrow", "select"),
        *("chunk", "split", "tensor_split", "unbind", "index_select", "flip", "roll", "clone", "detach", "data"),
        *("to", "type", "type_as", "float", "double", "half", "bfloat16", "cpu", "cuda", "requires_grad"),
        "_pack_padded_sequence",
        # activations
        *("relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "tanh", "sigmoid"),
        *("hardtanh", "hardswish", "hardsigmoid", "softplus", "softsign", "tanhshrink", "logsigmoid", "threshold"),
        *("prelu", "rrelu", "softmax", "log_softmax", "softmin"),
        # normalization and pooling
        *("layer_norm", "batch_norm", "group_norm", "instance_norm", "rms_norm", "local_response_norm", "normalize"),
        *("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "lp_pool1d"),
        *("lp_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_avg_pool1d"),
        *("adaptive_avg_pool2d", "adaptive_avg_pool3d"),
        # other dropouts
        *("dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout"),
        *("feature_dropout", "native_dropout"),
    }
)
"""Torch functions (by name; in-place variants too) whose result carries the label of their first tensor argument."""

SCALAR_OPS: frozenset[str] = frozenset(
    {
        *("add", "sub", "rsub", "mul", "div", "true_divide", "neg", "pow", "__add__", "__radd__", "__iadd__"),
        *("__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__", "__truediv__", "__rtruediv__"),
        *("__itruediv__", "__div__", "__neg__", "__pos__", "__pow__"),
    }
)
"""Arithmetic that carries the label on when its labelled tensor is its only tensor (``x * 2``, not ``x + y``)."""


def find_dropouts(model: nn.Module) -> dict[str, float]:
    """``{name: p}`` of every dropout module (``nn.Dropout``, ``Dropout1d/2d/3d``, alpha dropouts).

    The between-layer dropout of a multi-layer RNN is :func:`rnn_dropouts`, not a module: it is not listed.

    Example::

        >>> find_dropouts(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
        {'1': 0.5}
    """
    return {name: float(m.p) for name, m in model.named_modules() if isinstance(m, _DropoutNd)}


def rnn_dropouts(model: nn.Module) -> dict[str, list[str]]:
    """``{"rnn.dropout": [input weights it drops for]}`` for each RNN/LSTM/GRU of 2+ layers with a nonzero ``dropout``.

    PyTorch drops each layer's output but the last's, which is the input of the next layer: the
    dropout is linked to the ``weight_ih`` of layers 1 and up, both directions, under their parameter
    names (a parametrized weight under the names of its original tensors, ``parametrizations.<name>.original*``).

    Example::

        >>> net = nn.Sequential(nn.LSTM(4, 4, num_layers=3, dropout=0.3), nn.LSTM(4, 4, dropout=0.0))
        >>> rnn_dropouts(net)
        {'0.dropout': ['0.weight_ih_l1', '0.weight_ih_l2']}
    """
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.RNNBase) and module.num_layers > 1 and module.dropout > 0:
            prefix = f"{name}." if name else ""
            inputs = [w for w in module._flat_weights_names if (m := _RNN_INPUT.fullmatch(w)) and int(m[1]) > 0]
            parametrized = getattr(module, "parametrizations", {})
            found[f"{prefix}dropout"] = [
                full
                for w in inputs
                for full in (
                    [f"{prefix}parametrizations.{w}.{n}" for n, _ in parametrized[w].named_parameters()]
                    if w in parametrized
                    else [prefix + w]
                )
            ]
    return found


def is_weight_name(name: str) -> bool:
    """Whether a parameter (or target) name is a weight (``in_proj_weight:q``, ``weight_ih_l0``), not a bias.

    Example::

        >>> [is_weight_name(n) for n in ["fc.weight", "attn.in_proj_weight:q", "rnn.weight_hh_l0", "fc.bias"]]
        [True, True, True, False]
    """
    leaf = name.rsplit(".", 1)[-1].split(":")[0]
    return leaf.endswith("weight") or "weight_" in leaf


def _owns_weights(module: nn.Module) -> bool:
    """A weight of 2+ dimensions of its own, or a parametrized weight (``weight_norm``); never an embedding."""
    if isinstance(module, _EMBEDDINGS):
        return False
    own = any(p.dim() >= 2 and is_weight_name(n) for n, p in module.named_parameters(recurse=False))
    return own or any(is_weight_name(n) for n in getattr(module, "parametrizations", {}))


def weight_layers(model: nn.Module) -> list[str]:
    """Modules owning a weight of two or more dimensions (Linear, Conv, RNN, attention), in registration order.

    Embeddings are left out: their input is indices, never the output of a dropout.

    Example::

        >>> net = nn.Sequential(nn.Embedding(5, 4), nn.LSTM(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
        >>> weight_layers(net)
        ['1', '3']
    """
    return [name for name, m in model.named_modules() if _owns_weights(m)]


def link(order: Sequence[str], dropouts: Iterable[str], layers: Iterable[str]) -> dict[str, list[str]]:
    """Link each dropout to the first layer that runs after it, for every time it runs (call order).

    Args:
        order: Module names in the order they ran (names may repeat: a module reused runs twice).
        dropouts: Dropout module names.
        layers: Names of the modules with weights.

    Returns:
        ``{dropout: [layer, ...]}``; an empty list for a dropout after the last layer.

    Example::

        >>> link(["fc1", "drop", "fc2", "drop", "fc3"], ["drop"], ["fc1", "fc2", "fc3"])
        {'drop': ['fc2', 'fc3']}
    """
    dropouts, layers = set(dropouts), set(layers)
    links: dict[str, list[str]] = {d: [] for d in dropouts}
    pending: list[str] = []
    for name in order:
        if name in dropouts:
            pending.append(name)
        elif name in layers and pending:
            for d in pending:
                if name not in links[d]:
                    links[d].append(name)
            pending = []
    return dict(sorted(links.items()))


def adjusted_rate(original: float, remaining: int, total: int) -> float:
    """``D_r = D_o * sqrt(C_ir / C_io)``.

    Example::

        >>> adjusted_rate(0.5, remaining=25, total=100)
        0.25
    """
    return original * math.sqrt(remaining / total) if total else original


def _tensors(tree: Any) -> Iterator[torch.Tensor]:
    """The tensors in nested tuples (``PackedSequence`` too), lists and dicts."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for item in tree:
            yield from _tensors(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _tensors(item)


def _op_name(func: Any) -> str:
    """``relu`` for ``torch.relu``, ``F.relu``, ``Tensor.relu`` and ``Tensor.relu_``; ``T`` for the ``.T`` getter."""
    name = getattr(func, "__name__", "")
    if name == "__get__":
        name = getattr(getattr(func, "__self__", None), "__name__", "")
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


class _Labels:
    """Which dropouts' outputs each live tensor is (by identity; weak references, so no tensor is kept alive)."""

    def __init__(self) -> None:
        self._by_id: dict[int, tuple[weakref.ref[torch.Tensor], frozenset[str]]] = {}

    def __bool__(self) -> bool:
        return bool(self._by_id)

    def get(self, tensor: torch.Tensor | None) -> frozenset[str]:
        entry = self._by_id.get(id(tensor))
        return entry[1] if entry is not None and entry[0]() is tensor else frozenset()

    def put(self, tensor: torch.Tensor, labels: frozenset[str]) -> None:
        if labels:
            self._by_id[id(tensor)] = (weakref.ref(tensor), labels)
        else:
            self._by_id.pop(id(tensor), None)

    def clear(self) -> None:
        self._by_id.clear()


class _Watch(TorchFunctionMode):
    """Counts functional dropout outside dropout modules and passes labels on through :data:`PASS_THROUGH`."""

    def __init__(self, trace: ForwardTrace):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        trace = self.trace
        if func in _FUNCTIONAL_DROPOUT and not trace._inside_dropout:
            trace.functional_dropout += 1
        out = func(*args, **kwargs)
        if trace._labels and trace.failed is None:
            try:
                trace._pass_on(_op_name(func), (args, kwargs), out)
            except Exception as err:  # bookkeeping must never break training
                trace._fail(err)
        return out


class ForwardTrace:
    """Context manager tracing one forward pass: the modules' call order, and which layers take each dropout's output.

    Forward hooks label each dropout module's output tensor with the dropout's name; a
    :class:`~torch.overrides.TorchFunctionMode` passes the label on through every function of
    :data:`PASS_THROUGH` (reshapes, indexing, conversions, activations, normalization, pooling, other
    dropouts) and :data:`SCALAR_OPS` with a number (``x * 2``); any other function (``x + y``, ``cat``,
    ``matmul``, a layer) stops it. A forward pre-hook on each watched layer links the labels of its
    tensor inputs to it. The mode also counts ``F.dropout``-family calls made outside a dropout module
    (dropout the callback cannot adjust). Meant for one forward pass: it is slow.

    Args:
        model: The network.
        watch: Names of the layers that may take a dropout's output (:func:`weight_layers`).

    Attributes:
        order: Dropout and watched module names in the order they ran.
        links: ``{dropout: [layers that took its output, in order]}``, every dropout module included.
        functional_dropout: Dropout calls made outside a dropout module.
        failed: Why the data flow could not be followed (``None``: it was); the order is still recorded.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 2))
        >>> with ForwardTrace(net, ["0", "3"]) as trace:
        ...     _ = net(torch.randn(1, 4))
        >>> trace.order, trace.links, trace.functional_dropout
        (['0', '1', '3'], {'1': ['3']}, 0)
    """

    def __init__(self, model: nn.Module, watch: Iterable[str]):
        self.model = model
        self.watch = set(watch)
        self.order: list[str] = []
        self.links: dict[str, list[str]] = {name: [] for name in find_dropouts(model)}
        self.functional_dropout = 0
        self.failed: str | None = None
        self._labels = _Labels()
        self._handles: list[Any] = []
        self._inside_dropout = 0
        self._mode: _Watch | None = None

    def __enter__(self) -> ForwardTrace:
        for name, module in self.model.named_modules():
            if isinstance(module, _DropoutNd):
                self._handles.append(module.register_forward_pre_hook(self._enter_dropout(name)))
                self._handles.append(module.register_forward_hook(self._leave_dropout(name)))
            elif name in self.watch:
                self._handles.append(module.register_forward_pre_hook(self._enter_layer(name), with_kwargs=True))
        self._mode = _Watch(self)
        self._mode.__enter__()  # type: ignore[no-untyped-call]
        return self

    def _enter_dropout(self, name: str) -> Any:
        def hook(*_: Any) -> None:
            self.order.append(name)
            self._inside_dropout += 1

        return hook

    def _leave_dropout(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            self._inside_dropout -= 1
            if self.failed is not None or not isinstance(output, torch.Tensor):
                return None
            source = args[0] if args and isinstance(args[0], torch.Tensor) else None
            try:
                if output is source:  # eval mode, p = 0 or in place: a view of its own, so the input keeps its label
                    output = output.view_as(output)
                self._labels.put(output, self._labels.get(source) | {name})
            except Exception as err:  # bookkeeping must never break training
                self._fail(err)
            return output

        return hook

    def _enter_layer(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.order.append(name)
            if self.failed is not None or not self._labels:
                return
            try:
                for tensor in _tensors((args, kwargs)):
                    for dropout in self._labels.get(tensor):
                        if name not in self.links[dropout]:
                            self.links[dropout].append(name)
            except Exception as err:  # bookkeeping must never break training
                self._fail(err)

        return hook

    def _pass_on(self, name: str, inputs: Any, out: Any) -> None:
        tensors = list(_tensors(inputs))
        through = name in PASS_THROUGH or (name in SCALAR_OPS and len(tensors) == 1)
        labels = self._labels.get(tensors[0]) if through and tensors else frozenset()
        for tensor in _tensors(out):
            self._labels.put(tensor, labels)

    def _fail(self, err: Exception) -> None:
        self.failed = f"{type(err).__name__}: {err}"
        self._labels.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks, leave the function mode and drop the labels (idempotent)."""
        if self._mode is not None:
            self._mode.__exit__(None, None, None)  # type: ignore[no-untyped-call]
            self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._labels.clear()


class DropoutAdjuster:
    """Original dropout rates, links to layers, and the rates in force after pruning.

    The dropouts are the dropout modules and the between-layer dropouts of multi-layer RNNs
    (:func:`rnn_dropouts`; ``"inner"`` links to the RNN's own input weights, whatever the trace).

    Args:
        model: The network.
        links: Explicit ``{dropout_name: layer_name}`` links; they win over traced and static ones.

    Attributes:
        links: ``{dropout: [layers whose inputs it drops]}``; an empty list keeps the dropout's rate. An
            RNN's inner dropout lists parameter names (its ``weight_ih`` of layers 1 and up).
        inner: ``{"rnn.dropout": [parameter names]}``: :func:`rnn_dropouts` of the model.
        source: Where the links that are not explicit or inner come from: ``"static"`` (registration
            order, until a trace) or ``"traced"``.
        rule: How they were found: ``"registration order"``, ``"data flow"`` (:meth:`use_flow`) or
            ``"call order"`` (:meth:`use_order` with a traced order; checkpoints written before data flow).

    Raises:
        ValueError: If a map key is not a dropout module (an RNN's inner dropout cannot be relinked) or a
            value is not a module with weights.

    Example::

        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Dropout(0.5), nn.Linear(10, 2))
        >>> adjuster = DropoutAdjuster(net)
        >>> adjuster.apply({"2": (5, 20)})
        {'1': 0.25}
        >>> net[1].p, adjuster.sources
        (0.25, {'1': 'static'})
    """

    def __init__(self, model: nn.Module, links: Mapping[str, str] | None = None):
        self.model = model
        self.inner = rnn_dropouts(model)
        self.original = {**find_dropouts(model), **{name: self._rate_of(name) for name in self.inner}}
        self.explicit = dict(links or {})
        self._check_explicit()
        self.links: dict[str, list[str]] = {}
        self.source: LinkSource = "static"
        self.rule: LinkRule = "registration order"
        self.use_order([name for name, _ in model.named_modules()], "static")

    def _check_explicit(self) -> None:
        modules = dict(self.model.named_modules())
        layers = weight_layers(self.model)
        for dropout, layer in self.explicit.items():
            if dropout in self.inner:
                raise ValueError(
                    f"`dropout.links` key {dropout!r} is the dropout between an RNN's layers: it drops the inputs of "
                    f"the RNN's own layers 1 and up and is linked to them {self.inner[dropout]}; it cannot be "
                    f"relinked. Dropout modules: {sorted(set(self.original) - set(self.inner)) or 'none'}."
                )
            if dropout not in modules:
                raise ValueError(
                    f"`dropout.links` key {dropout!r} is not a module of the model. Dropout modules: "
                    f"{sorted(set(self.original) - set(self.inner)) or 'none'}."
                )
            if dropout not in self.original:
                raise ValueError(
                    f"`dropout.links` key {dropout!r} is a {type(modules[dropout]).__name__}, not a dropout module. "
                    f"Dropout modules: {sorted(set(self.original) - set(self.inner)) or 'none'}."
                )
            if layer not in layers:
                raise ValueError(
                    f"`dropout.links[{dropout!r}]` = {layer!r} is not a module with weights. Accepted: {layers}."
                )

    @property
    def sources(self) -> dict[str, LinkSource]:
        """``{dropout: "explicit" | "inner" | "traced" | "static"}``: where each dropout's link comes from."""
        return {
            name: "explicit" if name in self.explicit else "inner" if name in self.inner else self.source
            for name in self.original
        }

    def use_order(self, order: Sequence[str], source: LinkSource) -> None:
        """Link dropouts from a module order: registration (``"static"``) or call order (explicit links kept)."""
        links = link(order, self.original, weight_layers(self.model))
        self._use(links, source, "registration order" if source == "static" else "call order")

    def use_flow(self, links: Mapping[str, Sequence[str]]) -> None:
        """Link dropouts to the layers that took their output (:attr:`ForwardTrace.links`; explicit links kept).

        Example::

            >>> net = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
            >>> adjuster = DropoutAdjuster(net)
            >>> adjuster.use_flow({"0": ["1"]})
            >>> adjuster.links, adjuster.source, adjuster.rule
            ({'0': ['1'], '2': []}, 'traced', 'data flow')
        """
        self._use({name: list(links.get(name, [])) for name in sorted(self.original)}, "traced", "data flow")

    def _use(self, links: dict[str, list[str]], source: LinkSource, rule: LinkRule) -> None:
        links.update({d: [layer] for d, layer in self.explicit.items()})
        links.update({d: list(weights) for d, weights in self.inner.items()})
        self.links, self.source, self.rule = links, source, rule

    def unlinked(self, order: Sequence[str] | None = None) -> dict[str, str]:
        """``{dropout: why it keeps its rate}`` for each dropout of a nonzero rate linked to no layer.

        Args:
            order: The traced call order, to say whether a dropout ran and where call order would link it.

        Example::

            >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Dropout(0.2))
            >>> DropoutAdjuster(net).unlinked(["0", "1"])
            {'1': 'no layer with weights takes its output', '2': 'it did not run in the traced batch'}
        """
        by_order = link(order, self.original, weight_layers(self.model)) if order is not None else {}
        why = {}
        for name, p in self.original.items():
            if p == 0 or self.links.get(name):
                continue
            if order is not None and name not in order:
                why[name] = "it did not run in the traced batch"
            elif by_order.get(name):
                why[name] = f"combined with another tensor before a layer takes it (call order: {by_order[name]})"
            else:
                why[name] = "no layer with weights takes its output"
        return why

    def rates(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Rates ``D_o * sqrt(C_ir / C_io)`` from ``{layer or parameter: (remaining, total)}``.

        A dropout linked to several layers (reused, or feeding several) uses their summed counts; one
        linked to no counted layer keeps its original rate. An RNN's inner dropout is linked to
        parameters: their counts are looked up by parameter name.

        Example::

            >>> adjuster = DropoutAdjuster(nn.LSTM(4, 4, num_layers=2, dropout=0.4))
            >>> adjuster.links
            {'dropout': ['weight_ih_l1']}
            >>> adjuster.rates({"weight_ih_l1": (4, 64), "weight_hh_l1": (64, 64)})
            {'dropout': 0.1}
        """
        out = {}
        for name, p in self.original.items():
            kept = [counts[layer] for layer in self.links.get(name, []) if layer in counts]
            remaining, total = sum(k for k, _ in kept), sum(t for _, t in kept)
            out[name] = adjusted_rate(p, remaining, total)
        return out

    def apply(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Set every dropout module's ``p`` from :meth:`rates`; return the rates set."""
        rates = self.rates(counts)
        self.set(rates)
        return rates

    def set(self, rates: Mapping[str, float]) -> None:
        """Set the dropout modules' ``p`` (an RNN's ``dropout``) to ``rates``."""
        for name, p in rates.items():
            module, attribute = self._holder(name)
            setattr(module, attribute, p)

    def current(self) -> dict[str, float]:
        """The rates now in the model."""
        return {name: self._rate_of(name) for name in self.original}

    def _holder(self, name: str) -> tuple[nn.Module, str]:
        """The module holding a dropout's rate and the attribute: ``(rnn, "dropout")`` or ``(dropout, "p")``."""
        if name in self.inner:
            return self.model.get_submodule(name.removesuffix("dropout").removesuffix(".")), "dropout"
        return cast(_DropoutNd, self.model.get_submodule(name)), "p"

    def _rate_of(self, name: str) -> float:
        module, attribute = self._holder(name)
        return float(getattr(module, attribute))

    def state_dict(self) -> dict[str, Any]:
        """Original rates, rates in force, links, their source and rule: plain values."""
        return {
            "original": dict(self.original),
            "current": self.current(),
            "links": {k: list(v) for k, v in self.links.items()},
            "source": self.source,
            "rule": self.rule,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore original rates, links and the rates in force (set on the model).

        Traced links of a state without a ``rule`` (written before data-flow linking) followed the call order.
        A dropout the state does not name (an RNN's inner dropout, in a state written before those were
        adjusted) keeps the rate the model was built with, until the next :meth:`apply`.
        """
        saved = state.get("original", {})
        self.original = {name: float(saved.get(name, p)) for name, p in self.original.items()}
        if state.get("links") is not None:
            links = {k: list(v) for k, v in state["links"].items()}
            source = state.get("source", self.source)
            self._use(links, source, state.get("rule", "call order" if source == "traced" else "registration order"))
        self.set({k: v for k, v in state.get("current", {}).items() if k in self.original})


def layer_counts(
    masks: Mapping[str, torch.Tensor],
    layer_of: Mapping[str, str],
    whole: Mapping[str, tuple[int, int]] | None = None,
) -> dict[str, tuple[int, int]]:
    """``{layer: (remaining, total)}``: the connections of each layer, summed over its weight masks.

    Connections are the entries of weights of two or more dimensions: an LSTM's ``weight_ih``/``weight_hh``
    add up, an attention block's ``in_proj_weight`` counts (its ``out_proj`` is a layer of its own), and
    so does a parametrized weight's masked tensor; biases and one-dimensional scales do not count.
    ``whole`` gives a mask's ``(remaining, total)`` over all its shards where the mask is one process's
    shard (FSDP); the others are counted from the mask.

    Example::

        >>> masks = {"fc.weight": torch.tensor([[True, False]]), "fc.bias": torch.tensor([False]),
        ...          "rnn.weight_ih_l0": torch.ones(2, 2, dtype=torch.bool),
        ...          "rnn.weight_hh_l0": torch.zeros(2, 2, dtype=torch.bool)}
        >>> layer_counts(masks, {name: name.split(".")[0] for name in masks})
        {'fc': (1, 2), 'rnn': (4, 8)}
    """
    counts: dict[str, tuple[int, int]] = {}
    for name, keep in masks.items():
        if keep.dim() >= 2 and "bias" not in name.rsplit(".", 1)[-1]:
            alive, size = whole[name] if whole is not None and name in whole else (int(keep.sum()), keep.numel())
            remaining, total = counts.get(layer_of[name], (0, 0))
            counts[layer_of[name]] = (remaining + alive, total + size)
    return counts
