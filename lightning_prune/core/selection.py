"""Which parameters are pruned: glob patterns over module names, resolved to parameter names.

Patterns use :func:`fnmatch.fnmatchcase` syntax and are matched against qualified module names as
given by :meth:`torch.nn.Module.named_modules` (``"features.0"``, ``"classifier.1"``, ``"fc1"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from fnmatch import fnmatchcase

from torch import nn

from lightning_prune.core.validation import check_patterns, preview

__all__ = ["DEFAULT_LAYER_TYPES", "resolve_per_layer", "select_layers", "select_parameters"]

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
)
"""Module types pruned when no pattern is given."""


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Modules that own a ``weight`` parameter of at least two dimensions (connections, not scales)."""
    found = {}
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is not None and weight.dim() >= 2:
            found[name] = module
    return found


def select_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """Names of the modules whose weights are pruned, in the model's module order.

    Args:
        model: The network.
        layers: Glob patterns over module names. ``None`` selects every ``Linear`` and
            ``Conv1d/2d/3d`` module. A pattern may only match modules owning a weight of two or
            more dimensions (normalization scales are never selected).

    Returns:
        The selected module names.

    Raises:
        ValueError: If ``layers`` is a string or empty, or a pattern matches no such module.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> select_layers(net)
        ['0', '2']
        >>> select_layers(net, ["2"])
        ['2']
    """
    layers = check_patterns(layers, "layers")
    candidates = _candidates(model)
    if layers is None:
        selected = [n for n, m in candidates.items() if isinstance(m, DEFAULT_LAYER_TYPES)]
        if not selected:
            raise ValueError(
                f"The model has no Linear or Conv1d/2d/3d layer to prune. Pass `layers` as glob patterns "
                f"over module names; modules with prunable weights: {preview(list(candidates)) or 'none'}."
            )
        return selected
    chosen: set[str] = set()
    for pattern in layers:
        hits = [n for n in candidates if fnmatchcase(n, pattern)]
        if not hits:
            raise ValueError(
                f"Pattern {pattern!r} in `layers` matches no module with a prunable weight "
                f"(a `weight` of two or more dimensions). Modules it could match: "
                f"{preview(list(candidates)) or 'none'}."
            )
        chosen.update(hits)
    return [n for n in candidates if n in chosen]


def select_parameters(
    model: nn.Module, layers: Sequence[str] | None = None, *, include_bias: bool = False
) -> dict[str, str]:
    """Qualified names of the pruned parameters, mapped to the name of the layer owning each.

    Args:
        model: The network.
        layers: Glob patterns over module names, as in :func:`select_layers`.
        include_bias: Also prune the biases of the selected layers.

    Returns:
        ``{parameter_name: layer_name}`` in the model's module order.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> select_parameters(net, ["0"], include_bias=True)
        {'0.weight': '0', '0.bias': '0'}
    """
    modules = dict(model.named_modules())
    selected: dict[str, str] = {}
    for layer in select_layers(model, layers):
        prefix = f"{layer}." if layer else ""
        selected[f"{prefix}weight"] = layer
        if include_bias and modules[layer]._parameters.get("bias") is not None:
            selected[f"{prefix}bias"] = layer
    return selected


def resolve_per_layer(value: float | Mapping[str, float], layers: Sequence[str], *, name: str) -> dict[str, float]:
    """Expand a number, or a mapping from glob pattern to number, to one number per layer.

    In a mapping an exact layer name wins over patterns; among patterns the first that matches (in
    the mapping's order) wins, so a trailing ``"*"`` gives a default.

    Args:
        value: One number for every layer, or ``{pattern: number}``.
        layers: The selected layer names.
        name: The argument's name, for error messages.

    Returns:
        ``{layer: number}`` for every layer.

    Raises:
        ValueError: If a layer matches no pattern, or a pattern matches no selected layer.

    Example::

        >>> resolve_per_layer({"conv*": 0.5, "*": 1.2}, ["conv1", "fc1"], name="quality")
        {'conv1': 0.5, 'fc1': 1.2}
    """
    if not isinstance(value, Mapping):
        return dict.fromkeys(layers, float(value))
    unused = [p for p in value if not any(fnmatchcase(layer, p) for layer in layers)]
    if unused:
        raise ValueError(
            f"Pattern {unused[0]!r} in `{name}` matches none of the pruned layers: {preview(list(layers))}."
        )
    resolved = {}
    for layer in layers:
        if layer in value:
            resolved[layer] = float(value[layer])
            continue
        pattern = next((p for p in value if fnmatchcase(layer, p)), None)
        if pattern is None:
            raise ValueError(
                f"Layer {layer!r} matches no pattern in `{name}` ({preview(list(value))}). "
                f'Add it, or a default entry "*".'
            )
        resolved[layer] = float(value[pattern])
    return resolved
