"""Dropout adjustment while retraining: ``D_r = D_o * sqrt(C_ir / C_io)`` (Han et al. 2015, 3.2).

Dropout acts on neurons, and a layer's connection count is quadratic in its neuron counts, so a
pruned layer (fewer connections, less capacity) is retrained with a smaller dropout rate. A dropout
module is linked to the layer whose *inputs* it drops: the first layer with weights that runs after
it. ``C_io`` is that layer's dense connection count, ``C_ir`` its remaining count, ``D_o`` the rate
the model was built with. Rates are always computed from the original rate and count.

Links come, by priority, from an explicit ``{dropout: layer}`` map, from the order in which modules
ran in a traced forward pass (:class:`ForwardTrace`), or from the modules' registration order (which
is the forward order of ``nn.Sequential`` and of most models, torchvision's AlexNet and VGG included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812
from torch.nn.modules.dropout import _DropoutNd
from torch.overrides import TorchFunctionMode

__all__ = [
    "DropoutAdjuster",
    "ForwardTrace",
    "LinkSource",
    "adjusted_rate",
    "find_dropouts",
    "layer_counts",
    "link",
    "weight_layers",
]

LinkSource = Literal["explicit", "traced", "static"]
_FUNCTIONAL_DROPOUT = {
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    F.feature_alpha_dropout,
}


def find_dropouts(model: nn.Module) -> dict[str, float]:
    """``{name: p}`` of every dropout module (``nn.Dropout``, ``Dropout1d/2d/3d``, alpha dropouts).

    Example::

        >>> find_dropouts(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5)))
        {'1': 0.5}
    """
    return {name: float(m.p) for name, m in model.named_modules() if isinstance(m, _DropoutNd)}


def weight_layers(model: nn.Module) -> list[str]:
    """Names of the modules owning a ``weight`` of two or more dimensions, in registration order."""
    return [n for n, m in model.named_modules() if (w := m._parameters.get("weight")) is not None and w.dim() >= 2]


def link(order: Sequence[str], dropouts: Iterable[str], layers: Iterable[str]) -> dict[str, list[str]]:
    """Link each dropout to the first layer that runs after it, for every time it runs.

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


class ForwardTrace:
    """Context manager recording the call order of modules, and dropout done functionally.

    Forward pre-hooks on the watched modules and the dropout modules log their names in call order;
    a :class:`~torch.overrides.TorchFunctionMode` counts ``F.dropout``-family calls made outside a
    dropout module (dropout the callback cannot adjust). Meant for one forward pass: it is slow.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 2))
        >>> with ForwardTrace(net, ["0", "2"]) as trace:
        ...     _ = net(torch.randn(1, 4))
        >>> trace.order, trace.functional_dropout
        (['0', '1', '2'], 0)
    """

    def __init__(self, model: nn.Module, watch: Iterable[str]):
        self.model = model
        self.watch = set(watch)
        self.order: list[str] = []
        self.functional_dropout = 0
        self._handles: list[Any] = []
        self._inside_dropout = 0
        self._mode: TorchFunctionMode | None = None

    def __enter__(self) -> ForwardTrace:
        for name, module in self.model.named_modules():
            if isinstance(module, _DropoutNd):
                self._handles.append(module.register_forward_pre_hook(self._enter_dropout(name)))
                self._handles.append(module.register_forward_hook(self._leave_dropout))
            elif name in self.watch:
                self._handles.append(module.register_forward_pre_hook(lambda *_, n=name: self.order.append(n)))
        trace = self

        class _Spot(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func in _FUNCTIONAL_DROPOUT and not trace._inside_dropout:
                    trace.functional_dropout += 1
                return func(*args, **(kwargs or {}))

        self._mode = _Spot()
        self._mode.__enter__()
        return self

    def _enter_dropout(self, name: str) -> Any:
        def hook(*_: Any) -> None:
            self.order.append(name)
            self._inside_dropout += 1

        return hook

    def _leave_dropout(self, *_: Any) -> None:
        self._inside_dropout -= 1

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Remove the hooks and leave the function mode (idempotent)."""
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class DropoutAdjuster:
    """Original dropout rates, links to layers, and the rates in force after pruning.

    Args:
        model: The network.
        links: Explicit ``{dropout_name: layer_name}`` links; they win over traced and static ones.

    Raises:
        ValueError: If a map key is not a dropout module or a value is not a module with weights.

    Example::

        >>> net = nn.Sequential(nn.Linear(10, 10), nn.Dropout(0.5), nn.Linear(10, 2))
        >>> adjuster = DropoutAdjuster(net)
        >>> adjuster.apply({"2": (5, 20)})
        {'1': 0.25}
        >>> net[1].p
        0.25
    """

    def __init__(self, model: nn.Module, links: Mapping[str, str] | None = None):
        self.model = model
        self.original = find_dropouts(model)
        self.explicit = dict(links or {})
        modules = dict(model.named_modules())
        layers = weight_layers(model)
        for dropout, layer in self.explicit.items():
            if dropout not in modules:
                raise ValueError(
                    f"`dropout.links` key {dropout!r} is not a module of the model. Dropout modules: "
                    f"{sorted(self.original) or 'none'}."
                )
            if dropout not in self.original:
                raise ValueError(
                    f"`dropout.links` key {dropout!r} is a {type(modules[dropout]).__name__}, not a dropout module. "
                    f"Dropout modules: {sorted(self.original) or 'none'}."
                )
            if layer not in layers:
                raise ValueError(
                    f"`dropout.links[{dropout!r}]` = {layer!r} is not a module with weights. Accepted: {layers}."
                )
        self.links: dict[str, list[str]] = {}
        self.source: LinkSource = "static"
        self.use_order([name for name, _ in model.named_modules()], "static")

    def use_order(self, order: Sequence[str], source: LinkSource) -> None:
        """Link dropouts from a module call order (explicit links are kept)."""
        links = link(order, self.original, weight_layers(self.model))
        links.update({d: [layer] for d, layer in self.explicit.items()})
        self.links, self.source = links, source

    def rates(self, counts: Mapping[str, tuple[int, int]]) -> dict[str, float]:
        """Rates ``D_o * sqrt(C_ir / C_io)`` from ``{layer: (remaining, total)}``.

        A dropout linked to several layers (reused) uses their summed counts; one linked to no
        counted layer keeps its original rate.
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
        """Set the dropout modules' ``p`` to ``rates``."""
        for name, p in rates.items():
            self.model.get_submodule(name).p = p

    def current(self) -> dict[str, float]:
        """The rates now in the model."""
        return {name: float(self.model.get_submodule(name).p) for name in self.original}

    def state_dict(self) -> dict[str, Any]:
        """Original rates, rates in force, links and their source: plain values."""
        return {
            "original": dict(self.original),
            "current": self.current(),
            "links": {k: list(v) for k, v in self.links.items()},
            "source": self.source,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore original rates, links and the rates in force (set on the model)."""
        self.original = {k: v for k, v in state.get("original", self.original).items() if k in self.original}
        if state.get("links") is not None:
            self.links = {k: list(v) for k, v in state["links"].items()}
            self.links.update({d: [layer] for d, layer in self.explicit.items()})
            self.source = state.get("source", self.source)
        self.set({k: v for k, v in state.get("current", {}).items() if k in self.original})


def layer_counts(masks: Mapping[str, torch.Tensor], layer_of: Mapping[str, str]) -> dict[str, tuple[int, int]]:
    """``{layer: (remaining, total)}`` of each layer's weight mask.

    Example::

        >>> layer_counts({"fc.weight": torch.tensor([True, False])}, {"fc.weight": "fc"})
        {'fc': (1, 2)}
    """
    return {layer_of[name]: (int(keep.sum()), keep.numel()) for name, keep in masks.items() if name.endswith("weight")}
