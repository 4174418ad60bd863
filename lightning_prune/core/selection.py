"""What is pruned: the weight tensors that do a network's multiply-accumulate work, as *targets*.

By default every ``Linear``, ``Conv1d/2d/3d`` and ``ConvTranspose1d/2d/3d`` weight, the input
projection of every ``nn.MultiheadAttention`` (``in_proj_weight`` as three targets, its q, k and v
rows, named ``attn.in_proj_weight:q`` and so on, judged separately because their scales differ; or
``q/k/v_proj_weight``; its ``out_proj`` is a ``Linear``), and the input and hidden weights of every
``RNN``, ``LSTM`` and ``GRU``. Embeddings and norms are opt-in, by naming them.

Patterns use :func:`fnmatch.fnmatchcase` syntax. A pattern that matches module names (as
:meth:`torch.nn.Module.named_modules` gives them: ``"features.*"``, ``"fc1"``) selects those modules'
weights: the default ones above for those types, every own parameter of two or more dimensions for
other modules (an ``Embedding``'s ``weight``). A pattern that matches no module is matched against
target and parameter names, so it can name parameters: ``"rnn.weight_hh_*"``, ``"ln.weight"``.

A parametrized weight (``torch.nn.utils.parametrizations.weight_norm`` or ``spectral_norm``) is
pruned through its parametrization: the criterion judges the effective weight, and the mask is
enforced on the parameter under it (``original1`` of weight norm, ``original`` of spectral norm),
which keeps the effective weight zero where pruned. Other parametrizations are refused, naming the
layer. A parameter shared by several modules (tied weights) is one target, under its first name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from torch import Tensor, nn

from lightning_prune.core.validation import check_patterns, preview

__all__ = [
    "DEFAULT_LAYER_TYPES",
    "Target",
    "dense_tensors",
    "resolve_per_layer",
    "resolve_per_target",
    "select_layers",
    "select_parameters",
    "select_targets",
]

DEFAULT_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
"""Module types whose ``weight`` is pruned when no pattern is given (with attention and recurrent weights)."""

_MASK_SAFE_PARAMETRIZATIONS = {"_WeightNorm": "original1", "_SpectralNorm": "original"}
"""Parametrizations under which a zero of the parameter is a zero of the effective weight: the one masked."""


@dataclass(frozen=True)
class Target:
    """One tensor a criterion judges, and where its mask is enforced.

    Attributes:
        name: What tables, levels and statistics call it: ``"fc1.weight"``, ``"attn.in_proj_weight:q"``.
        param: Qualified name of the parameter whose mask keeps it zero (a state-dict key).
        layer: The module it belongs to (level patterns and dropout adjustment go by it).
        rows: A block of the parameter's rows (``(start, stop)``), or ``None`` for all of it.
        value: Attribute path of the effective weight when a parametrization computes it, else ``None``.
    """

    name: str
    param: str
    layer: str
    rows: tuple[int, int] | None = None
    value: str | None = None

    def weight(self, model: nn.Module) -> Tensor:
        """The tensor the criterion judges: the parameter (its rows), or the parametrization's effective weight."""
        tensor = _attribute(model, self.value) if self.value is not None else model.get_parameter(self.param)
        return tensor if self.rows is None else tensor[self.rows[0] : self.rows[1]]


def _attribute(model: nn.Module, path: str) -> Tensor:
    owner, _, attr = path.rpartition(".")
    tensor: Tensor = getattr(model.get_submodule(owner) if owner else model, attr)
    return tensor


def _qualified(layer: str, attr: str) -> str:
    return f"{layer}.{attr}" if layer else attr


def _parametrized(layer: str, module: nn.Module, attr: str) -> Target | None:
    """The target of a parametrized weight, or ``None`` if ``attr`` is not parametrized; refuses unsafe ones."""
    lists = getattr(module, "parametrizations", None)
    if lists is None or attr not in lists:
        return None
    kinds = [type(p).__name__ for p in lists[attr]]
    if len(kinds) != 1 or kinds[0] not in _MASK_SAFE_PARAMETRIZATIONS:
        raise ValueError(
            f"Layer {layer!r} has its `{attr}` parametrized by {kinds}; only weight_norm and spectral_norm keep a "
            f"pruned weight at zero. Remove the parametrization (torch.nn.utils.parametrize.remove_parametrizations) "
            f"before pruning, or leave the layer out with `layers`."
        )
    under = _qualified(layer, f"parametrizations.{attr}.{_MASK_SAFE_PARAMETRIZATIONS[kinds[0]]}")
    return Target(_qualified(layer, attr), under, layer, value=_qualified(layer, attr))


def _weight_target(layer: str, module: nn.Module, attr: str) -> Target | None:
    found = _parametrized(layer, module, attr)
    if found is not None:
        return found
    param = module._parameters.get(attr)
    return None if param is None else Target(_qualified(layer, attr), _qualified(layer, attr), layer)


def _attention_targets(layer: str, module: nn.MultiheadAttention) -> list[Target]:
    if module._parameters.get("in_proj_weight") is None:
        return [_weight_target(layer, module, f"{p}_proj_weight") for p in "qkv"]  # type: ignore[misc]
    name, e = _qualified(layer, "in_proj_weight"), module.embed_dim
    return [Target(f"{name}:{part}", name, layer, (i * e, (i + 1) * e)) for i, part in enumerate("qkv")]


def _default_targets(layer: str, module: nn.Module) -> list[Target]:
    """The multiply-accumulate weights of one module (nothing for other types)."""
    if isinstance(module, DEFAULT_LAYER_TYPES):
        found = _weight_target(layer, module, "weight")
        return [found] if found is not None else []
    if isinstance(module, nn.MultiheadAttention):
        return _attention_targets(layer, module)
    if isinstance(module, nn.RNNBase):
        weights = [_weight_target(layer, module, n) for n in module._flat_weights_names if n.startswith("weight_")]
        return [t for t in weights if t is not None]
    return []


def _module_targets(layer: str, module: nn.Module) -> list[Target]:
    """What a pattern naming ``module`` selects: its default weights, else its own parameters of 2+ dimensions."""
    defaults = _default_targets(layer, module)
    if defaults or isinstance(module, (nn.MultiheadAttention, nn.RNNBase, *DEFAULT_LAYER_TYPES)):
        return defaults
    out = [_parametrized(layer, module, attr) for attr in getattr(module, "parametrizations", {})]
    out += [Target(_qualified(layer, n), _qualified(layer, n), layer) for n, p in module._parameters.items()
            if p is not None and p.dim() >= 2]  # fmt: skip
    return [t for t in out if t is not None]


def _all_targets(model: nn.Module) -> list[Target]:
    """Every tensor a pattern could select: each module's targets, then every other parameter, by name.

    A module with a parametrization that is not safe is left out here; selecting it by name raises.
    """
    out = []
    for name, module in model.named_modules():
        try:
            out.extend(_module_targets(name, module))
        except ValueError:
            continue
    taken = {t.param for t in out} | {t.value for t in out if t.value is not None}
    for name, param in model.named_parameters():
        if name not in taken and ".parametrizations." not in name and param.dim() >= 1:
            out.append(Target(name, name, name.rpartition(".")[0]))
    return out


def _unique(model: nn.Module, targets: list[Target]) -> list[Target]:
    """Each tensor once (tied parameters under their first name), in the order given."""
    seen: set[tuple[int, tuple[int, int] | None]] = set()
    out = []
    for target in targets:
        key = (id(model.get_parameter(target.param)), target.rows)
        if key not in seen:
            seen.add(key)
            out.append(target)
    return out


def _with_biases(model: nn.Module, targets: list[Target]) -> list[Target]:
    out = []
    for target in targets:
        out.append(target)
        module = model.get_submodule(target.layer) if target.layer else model
        is_weight = target.name == _qualified(target.layer, "weight")
        if is_weight and target.rows is None and module._parameters.get("bias") is not None:
            out.append(Target(_qualified(target.layer, "bias"), _qualified(target.layer, "bias"), target.layer))
    return out


def select_targets(
    model: nn.Module, layers: Sequence[str] | None = None, *, include_bias: bool = False
) -> list[Target]:
    """What is pruned, in the model's module order; each tensor once.

    Args:
        model: The network.
        layers: Glob patterns over module names, or over parameter names (see the module docs);
            ``None``: every multiply-accumulate weight.
        include_bias: Also prune the biases of the selected ``weight`` parameters' modules.

    Raises:
        ValueError: If ``layers`` is not a non-empty list of patterns, a pattern selects nothing (naming it
            and what it could have matched), or a selected weight has a parametrization that is not safe.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.MultiheadAttention(3, 1))
        >>> [t.name for t in select_targets(net)]
        ['0.weight', '1.in_proj_weight:q', '1.in_proj_weight:k', '1.in_proj_weight:v', '1.out_proj.weight']
    """
    layers = check_patterns(layers, "layers")
    if layers is None:
        chosen = [t for name, module in model.named_modules() for t in _default_targets(name, module)]
        if not chosen:
            names = [t.name for t in _all_targets(model)]
            raise ValueError(
                f"The model has no Linear, Conv, ConvTranspose, MultiheadAttention or RNN weight to prune. Pass "
                f"`layers` as glob patterns over module or parameter names; candidates: {preview(names) or 'none'}."
            )
    else:
        chosen = _matching(model, layers)
    chosen = _unique(model, chosen)
    return _with_biases(model, chosen) if include_bias else chosen


def _matching(model: nn.Module, patterns: Sequence[str]) -> list[Target]:
    modules = dict(model.named_modules())
    candidates = _all_targets(model)
    picked: set[str] = set()
    for pattern in patterns:
        hits = {t.name for name, m in modules.items() if fnmatchcase(name, pattern) for t in _module_targets(name, m)}
        if not hits:
            hits = {t.name for t in candidates if fnmatchcase(t.name, pattern) or fnmatchcase(t.param, pattern)}
        if not hits:
            matched = [name for name in modules if fnmatchcase(name, pattern)]
            own = [t.name for t in candidates if t.layer in matched]
            hint = f" It matches {preview(matched)}: name their parameters ({preview(own)})." if own else ""
            raise ValueError(
                f"Pattern {pattern!r} in `layers` matches no module with weights to prune and no parameter.{hint} "
                f"Candidates: {preview([t.name for t in candidates]) or 'none'}."
            )
        picked |= hits
    return [t for t in candidates if t.name in picked]


def select_parameters(
    model: nn.Module, layers: Sequence[str] | None = None, *, include_bias: bool = False
) -> dict[str, str]:
    """``{parameter name: layer name}`` of the parameters :func:`select_targets` masks, in module order.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> select_parameters(net, ["0"], include_bias=True)
        {'0.weight': '0', '0.bias': '0'}
    """
    return {t.param: t.layer for t in select_targets(model, layers, include_bias=include_bias)}


def select_layers(model: nn.Module, layers: Sequence[str] | None = None) -> list[str]:
    """Names of the modules whose weights are pruned, in the model's module order.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> select_layers(net), select_layers(net, ["2"])
        (['0', '2'], ['2'])
    """
    return list(dict.fromkeys(t.layer for t in select_targets(model, layers)))


def dense_tensors(model: nn.Module, targets: Sequence[Target], share: float = 0.01) -> list[tuple[str, int, float]]:
    """Weight tensors of 2+ dimensions holding at least ``share`` of the model's parameters that nothing prunes.

    Returns:
        ``(name, entries, share of the model's parameters)``, largest first.

    Example::

        >>> net = nn.Sequential(nn.Embedding(100, 8), nn.Linear(8, 2))
        >>> [(name, entries, round(share, 3)) for name, entries, share in dense_tensors(net, select_targets(net))]
        [('0.weight', 800, 0.978)]
    """
    total = sum(p.numel() for p in model.parameters())
    covered = {(id(model.get_parameter(t.param)), t.rows) for t in targets}
    whole = {key[0] for key in covered if key[1] is None}
    parts = {key[0] for key in covered if key[1] is not None}
    out = []
    for name, param in model.named_parameters():
        if param.dim() < 2 or id(param) in whole or id(param) in parts or not total:
            continue
        if param.numel() / total >= share:
            out.append((name, param.numel(), param.numel() / total))
    return sorted(out, key=lambda item: -item[1])


def resolve_per_layer(value: float | Mapping[str, float], layers: Sequence[str], *, name: str) -> dict[str, float]:
    """Expand a number, or a mapping from glob pattern to number, to one number per layer.

    In a mapping an exact layer name wins over patterns; among patterns the first that matches (in
    the mapping's order) wins, so a trailing ``"*"`` gives a default.

    Raises:
        ValueError: If a layer matches no pattern, or a pattern matches no selected layer.

    Example::

        >>> resolve_per_layer({"conv*": 0.5, "*": 1.2}, ["conv1", "fc1"], name="quality")
        {'conv1': 0.5, 'fc1': 1.2}
    """
    return resolve_per_target(value, {layer: layer for layer in layers}, name=name)


def resolve_per_target(
    value: float | Mapping[str, float], layer_of: Mapping[str, str], *, name: str
) -> dict[str, float]:
    """One number per target, from a number or ``{pattern: number}`` over target or layer names.

    An exact target name wins, then an exact layer name, then the first pattern (in the mapping's order)
    matching either; so ``{"attn.in_proj_weight:v": 0.5, "attn": 1.0}`` gives v its own level.

    Args:
        value: One number, or ``{pattern: number}``.
        layer_of: ``{target name: layer name}``.
        name: The argument's name, for messages.

    Raises:
        ValueError: If a target matches no entry, or an entry matches no target.

    Example::

        >>> resolve_per_target({"a:v": 0.5, "*": 1.0}, {"a:q": "a", "a:v": "a"}, name="quality")
        {'a:q': 1.0, 'a:v': 0.5}
    """
    if not isinstance(value, Mapping):
        return dict.fromkeys(layer_of, float(value))
    names = list(layer_of) + [layer for layer in dict.fromkeys(layer_of.values()) if layer not in layer_of]
    unused = [p for p in value if p not in names and not any(fnmatchcase(n, p) for n in names)]
    if unused:
        shown = preview(list(dict.fromkeys(layer_of.values())))
        raise ValueError(f"Pattern {unused[0]!r} in `{name}` matches none of the pruned layers: {shown}.")
    resolved = {}
    for target, layer in layer_of.items():
        key = target if target in value else layer if layer in value else None
        key = key or next((p for p in value if fnmatchcase(target, p) or fnmatchcase(layer, p)), None)
        if key is None:
            raise ValueError(
                f"Layer {layer!r} matches no pattern in `{name}` ({preview(list(value))}). Add it, or a default entry "
                f'"*".'
            )
        resolved[target] = float(value[key])
    return resolved
