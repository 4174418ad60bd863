"""Module surgery: building the smaller layers, swapping them in, checking the output, resizing to a record."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from lightning_prune.core.export.container import is_int
from lightning_prune.core.structure.plan import StructurePlan, Work, plan_removal
from lightning_prune.core.tracing import eval_mode, outputs_match

__all__ = [
    "LayerChange",
    "StructureReport",
    "layer_like",
    "remove_dead_units",
    "resize_to",
    "resized_modules",
    "shapes",
    "swap_modules",
]

_RESIZABLE: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d, nn.BatchNorm1d, nn.BatchNorm2d)


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
# Removing dead units
# ---------------------------------------------------------------------------------------------------------------------


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
    pruner (``pruner.set_masks(report.masks)``) so its masks match the new shapes.

    Args:
        model: The network.
        example_input: A batch the model accepts (tensor or tuple of positional arguments).
        masks: As in :func:`~lightning_prune.core.structure.find_dead_units`.
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
    # Over 60 lines only by its docstring: the body is short.
    plan, work, _ = plan_removal(model, example_input, masks)
    if strict and plan.blocking:
        raise _blocking(plan)
    before = sum(p.numel() for p in model.parameters())
    touched = [n for n in work.weight if not (bool(work.keep_out[n].all()) and bool(work.keep_in[n].all()))]
    if not touched:
        return StructureReport(plan, {}, None if masks is None else dict(masks), before, before)
    modules = dict(model.named_modules())
    with torch.no_grad():
        new, changes = _sliced_modules(modules, work, touched)
    new_masks = None if masks is None else _restrict_masks(masks, work, touched)
    _swap_checked(model, example_input, new)
    after = sum(p.numel() for p in model.parameters())
    ordered = {n: changes[n] for n in modules if n in changes}
    return StructureReport(plan, ordered, new_masks, before, after)


def _blocking(plan: StructurePlan) -> ValueError:
    """The error of ``strict=True``: the first layer that keeps dead units, and why."""
    name, reason = next(iter(plan.blocking.items()))
    units = plan.layers[name].kept
    return ValueError(
        f"Layer {name!r} keeps {len(units)} dead unit(s) {list(units[:8])}{'...' if len(units) > 8 else ''}: "
        f"{reason}. Pass strict=False to remove what can be removed and leave the rest."
    )


def _sliced_modules(
    modules: Mapping[str, nn.Module], work: Work, touched: list[str]
) -> tuple[dict[str, nn.Module], dict[str, LayerChange]]:
    """The smaller layers and BatchNorm modules holding the kept units, and what changed."""
    new: dict[str, nn.Module] = {}
    changes: dict[str, LayerChange] = {}
    for name in touched:
        old = modules[name]
        out_keep, in_keep = work.keep_out[name], work.keep_in[name]
        weight = work.weight[name][out_keep][:, in_keep]
        new[name] = layer = layer_like(name, old, list(weight.shape))
        _copy_parameter(layer, old, "weight", weight)
        bias = work.bias[name]
        if bias is not None:
            _copy_parameter(layer, old, "bias", bias[out_keep])
        removed = (int((~out_keep).sum()), int((~in_keep).sum()))
        before = tuple(old.get_parameter("weight").shape)
        changes[name] = LayerChange(name, type(old).__name__, before, tuple(weight.shape), *removed)
    for name, producer in work.norm_of.items():
        keep = work.keep_out[producer]
        if bool(keep.all()):
            continue
        norm = cast("nn.BatchNorm1d | nn.BatchNorm2d", modules[name])
        new[name] = _sliced_norm(name, norm, keep)
        changes[name] = LayerChange(
            name, type(norm).__name__, (norm.num_features,), (int(keep.sum()),), int((~keep).sum()), 0
        )
    return new, changes


def _copy_parameter(new: nn.Module, old: nn.Module, name: str, value: Tensor) -> None:
    param = new.get_parameter(name)
    param.copy_(value)
    param.requires_grad_(old.get_parameter(name).requires_grad)


def _sliced_norm(name: str, old: nn.BatchNorm1d | nn.BatchNorm2d, keep: Tensor) -> nn.Module:
    norm = layer_like(name, old, [int(keep.sum())])
    if old.affine:
        _copy_parameter(norm, old, "weight", old.weight[keep])
        _copy_parameter(norm, old, "bias", old.bias[keep])
    norm.get_buffer("running_mean").copy_(old.get_buffer("running_mean")[keep])
    norm.get_buffer("running_var").copy_(old.get_buffer("running_var")[keep])
    norm.get_buffer("num_batches_tracked").copy_(old.get_buffer("num_batches_tracked"))
    return norm


def _restrict_masks(masks: Mapping[str, Tensor], work: Work, touched: list[str]) -> dict[str, Tensor]:
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


def _swap_checked(model: nn.Module, example_input: Tensor | tuple[Any, ...], new: Mapping[str, nn.Module]) -> None:
    """Swap the new modules in; put the old ones back and raise if the output in eval mode changed."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    with eval_mode(model), torch.no_grad():
        reference = model(*args)
        old = swap_modules(model, new)
        model.eval()  # the modules swapped in carry the mode of those they replace
        try:
            mismatch = outputs_match(model(*args), reference)
        except Exception:
            swap_modules(model, old)
            raise
        if mismatch is not None:
            swap_modules(model, old)
            raise RuntimeError(
                f"Removing dead units changed the model's output ({mismatch}); the model was restored. "
                f"This is a bug in lightning_prune: please report it with the model definition."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Building, swapping and resizing modules
# ---------------------------------------------------------------------------------------------------------------------


def layer_like(name: str, module: nn.Module, shape: Sequence[int], device: torch.device | None = None) -> nn.Module:
    """A new ``Linear``, ``Conv2d`` or BatchNorm like ``module`` (options, dtype, train/eval mode) with another shape.

    Its values are fresh (as the constructor initializes them).

    Args:
        name: The module's name, for messages.
        module: The module to copy the options of.
        shape: The weight shape of the new module (``[num_features]`` for BatchNorm), as :func:`shapes` gives it.
        device: Where to build it; ``None``: where ``module`` is (``meta`` allocates nothing).

    Raises:
        ValueError: If ``shape`` does not fit the module (rank, Conv2d kernel size, groups).

    Example::

        >>> layer_like("conv", nn.Conv2d(3, 8, 5, padding=2).eval(), [4, 3, 5, 5])
        Conv2d(3, 4, kernel_size=(5, 5), stride=(1, 1), padding=(2, 2))
    """
    ref = next(iter(module.state_dict().values()), None)  # the weight or running_mean, if any: device and dtype
    if device is None and ref is not None:
        device = ref.device
    kwargs: dict[str, Any] = {"device": device, "dtype": None if ref is None else ref.dtype}
    if isinstance(module, nn.Linear):
        if len(shape) != 2:
            raise ValueError(f"The recorded shape of Linear {name!r} must be [out, in], got {shape}.")
        layer: nn.Module = nn.Linear(shape[1], shape[0], bias=module.bias is not None, **kwargs)
    elif isinstance(module, nn.Conv2d):
        if len(shape) != 4 or tuple(shape[2:]) != tuple(module.kernel_size) or module.groups != 1:
            raise ValueError(
                f"The recorded shape of Conv2d {name!r} must be [out, in, {module.kernel_size[0]}, "
                f"{module.kernel_size[1]}] (groups=1), got {shape}."
            )
        # torch types the sizes of every _ConvNd as tuple[int, ...]; a Conv2d's are pairs.
        sizes: dict[str, Any] = {
            "kernel_size": module.kernel_size,
            "stride": module.stride,
            "padding": module.padding,
            "dilation": module.dilation,
        }
        layer = nn.Conv2d(
            shape[1],
            shape[0],
            **sizes,
            bias=module.bias is not None,
            padding_mode=module.padding_mode,
            **kwargs,
        )
    else:
        if len(shape) != 1:
            raise ValueError(f"The recorded shape of {type(module).__name__} {name!r} must be [features], got {shape}.")
        layer = type(module)(
            shape[0],
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            **kwargs,
        )
    return layer.train(module.training)


def swap_modules(model: nn.Module, new: Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    """Put each module of ``new`` in place (``setattr`` on its parent); return the modules they replaced.

    Example::

        >>> net = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
        >>> swap_modules(net, {"1": nn.Tanh()})
        {'1': ReLU()}
        >>> net[1]
        Tanh()
    """
    old = {}
    for name, module in new.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old[name] = getattr(parent, child)
        setattr(parent, child, module)
    return old


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


def resized_modules(
    model: nn.Module, record: Mapping[str, Any], device: torch.device | None = None
) -> dict[str, nn.Module]:
    """New modules for every recorded layer whose shape differs (on ``device``, default: the old module's).

    Validates everything first; on the ``meta`` device the modules allocate nothing. The model is
    not changed (swap them in with :func:`swap_modules`).

    Raises:
        ValueError: If a name is not a Linear/Conv2d/BatchNorm module of the model (or is the root),
            or a shape is not a list of positive ints that fits its module.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> resized_modules(net, {"0": [1, 4], "2": [2, 3]}, device=torch.device("meta"))
        {'0': Linear(in_features=4, out_features=1, bias=True)}
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
        if not isinstance(shape, (list, tuple)) or not all(is_int(s) and s > 0 for s in shape):
            raise ValueError(f"The recorded shape of {name!r} must be a list of positive ints, got {shape!r}.")
        shape = list(shape)
        if shape != shapes(module)[""]:
            new[name] = layer_like(name, module, shape, device)
    return new


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
    new = resized_modules(model, record)
    swap_modules(model, new)
    return list(new)
