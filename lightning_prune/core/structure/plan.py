"""Planning the removal of dead units: which units go, which fold into the next bias, which stay and why.

Every supported :class:`~lightning_prune.core.structure.graph.Link` is worked on copies of the
weights (:class:`Work`) until a fixed point: removing units can kill others (a unit fed only by a
removed constant unit becomes constant, a unit whose only consumer was removed becomes unused).
The model is never touched while planning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import Tensor, nn

from lightning_prune.core.masks import check_mask
from lightning_prune.core.structure.graph import Graph, Link, Status, trace_graph
from lightning_prune.core.tracing import eval_mode

__all__ = ["LayerPlan", "StructurePlan", "Work", "find_dead_units", "plan_removal"]


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


@dataclass
class Work:
    """Working copies of the linked layers, edited by the fixed point; the model is never touched while planning.

    Attributes:
        weight: ``{layer: weight}``, removed rows and columns zeroed.
        bias: ``{layer: bias or None}``, constants of removed units folded in.
        alive: ``{layer: bool tensor}`` of the connections still alive.
        keep_out: ``{layer: bool per output unit}``: the units that stay.
        keep_in: ``{layer: bool per input unit}``: the inputs that stay.
        norm_of: ``{BatchNorm name: producer name}`` for the BatchNorm modules inside links.
    """

    weight: dict[str, Tensor] = field(default_factory=dict)
    bias: dict[str, Tensor | None] = field(default_factory=dict)
    alive: dict[str, Tensor] = field(default_factory=dict)
    keep_out: dict[str, Tensor] = field(default_factory=dict)
    keep_in: dict[str, Tensor] = field(default_factory=dict)
    norm_of: dict[str, str] = field(default_factory=dict)


@dataclass
class _Notes:
    """What the fixed point did to one producer: units folded into the consumer's bias, reasons units stay."""

    folded: set[int] = field(default_factory=set)
    reasons: set[str] = field(default_factory=set)


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
    return plan_removal(model, example_input, masks)[0]


def plan_removal(
    model: nn.Module, example_input: Tensor | tuple[Any, ...], masks: Mapping[str, Tensor] | None
) -> tuple[StructurePlan, Work, dict[str, Link]]:
    """The plan of :func:`find_dead_units`, the working copies it settled on, and the links by producer.

    Raises:
        ValueError: If a mask names no parameter or does not match its parameter's shape.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> with torch.no_grad():
        ...     net[2].weight[:, 0] = 0  # unit 0 of the first layer is never read
        >>> plan, work, links = plan_removal(net, torch.randn(5, 4), None)
        >>> work.keep_out["0"], links["0"].consumer
        (tensor([False,  True,  True]), '2')
    """
    _check_masks(model, masks)
    layers = {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and not nn.parameter.is_lazy(m.weight)
    }
    graph = trace_graph(model, example_input if isinstance(example_input, tuple) else (example_input,))
    if isinstance(graph, str):
        return StructurePlan({n: _refused(n, m, graph, masks) for n, m in layers.items()}), Work(), {}
    links, plans = _follow_all(graph, layers, masks)
    work = _working_copies(links, graph, masks)
    with torch.no_grad(), eval_mode(model):
        notes = _fixed_point(links, work, graph)
    for name, module in layers.items():
        if name in links:
            plans[name] = _removable(name, module, links[name], work, notes[name])
        elif name in work.alive and plans[name].status == "refused":
            dead = _no_input(work.alive[name]).nonzero().flatten().tolist()
            plans[name] = LayerPlan(name, plans[name].units, "refused", kept=tuple(dead), reason=plans[name].reason)
    return StructurePlan({n: plans[n] for n in layers}), work, links


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


def _read_by_consumer(link: Link, work: Work) -> Tensor:
    """Per producer unit, whether the consumer still reads it through a live connection."""
    alive = work.alive[link.consumer]
    if link.kind == "conv":
        return alive.transpose(0, 1).flatten(1).any(1)
    return alive.any(0).view(-1, link.group).any(1)


def _refused(name: str, module: nn.Linear | nn.Conv2d, reason: str, masks: Mapping[str, Tensor] | None) -> LayerPlan:
    with torch.no_grad():
        dead = _no_input(_alive(name, module.weight.detach(), masks)).nonzero().flatten().tolist()
    return LayerPlan(name=name, units=module.weight.shape[0], status="refused", kept=tuple(dead), reason=reason)


def _follow_all(
    graph: Graph, layers: Mapping[str, nn.Linear | nn.Conv2d], masks: Mapping[str, Tensor] | None
) -> tuple[dict[str, Link], dict[str, LayerPlan]]:
    """The supported links by producer, and the plans of the layers without one (refused or feeding the output)."""
    links: dict[str, Link] = {}
    plans: dict[str, LayerPlan] = {}
    for name, module in layers.items():
        outcome = graph.follow(name)
        if isinstance(outcome, Link):
            links[name] = outcome
            continue
        status, reason = outcome
        if status == "refused":
            plans[name] = _refused(name, module, reason, masks)
        else:
            plans[name] = LayerPlan(name=name, units=module.weight.shape[0], status="output", reason=reason)
    return links, plans


def _working_copies(links: Mapping[str, Link], graph: Graph, masks: Mapping[str, Tensor] | None) -> Work:
    work = Work()
    with torch.no_grad():
        for link in links.values():
            for name in (link.producer, link.consumer):
                if name in work.weight:
                    continue
                module = graph.modules[name]
                weight = module.weight
                work.weight[name] = weight.detach().clone()
                work.bias[name] = None if module.bias is None else module.bias.detach().clone()
                work.alive[name] = _alive(name, work.weight[name], masks)
                work.keep_out[name] = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
                work.keep_in[name] = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
            for norm in link.norms:
                work.norm_of[norm] = link.producer
    return work


def _removable(name: str, module: nn.Linear | nn.Conv2d, link: Link, work: Work, notes: _Notes) -> LayerPlan:
    """The plan of a linked layer once the fixed point is reached."""
    removed = (~work.keep_out[name]).nonzero().flatten().tolist()
    alive = work.keep_out[name]
    dead = _no_input(work.alive[name]) & alive
    kept = ((dead | ~_read_by_consumer(link, work)) & alive).nonzero().flatten().tolist()
    reasons = sorted(notes.reasons)
    return LayerPlan(
        name=name,
        units=module.weight.shape[0],
        status="removable",
        consumer=link.consumer,
        remove=tuple(removed),
        folded=tuple(sorted(notes.folded & set(removed))),
        kept=tuple(kept),
        reason="; ".join(reasons) if kept and reasons else None,
    )


# ---------------------------------------------------------------------------------------------------------------------
# The fixed point
# ---------------------------------------------------------------------------------------------------------------------


def _fixed_point(links: Mapping[str, Link], work: Work, graph: Graph) -> dict[str, _Notes]:
    """Remove dead units from every link until none is left; ``work`` is edited in place."""
    notes = {name: _Notes() for name in links}
    changed = True
    while changed:
        changed = False
        for link in links.values():
            if _remove_dead(link, work, graph, notes[link.producer]):
                changed = True
    return notes


def _remove_dead(link: Link, work: Work, graph: Graph, notes: _Notes) -> bool:
    """Remove the producer's dead units that can go (folding constant ones); whether any went."""
    keep = work.keep_out[link.producer]
    no_in = _no_input(work.alive[link.producer]) & keep
    no_out = ~_read_by_consumer(link, work) & keep
    remove = no_out | no_in
    if not bool(remove.any()):
        return False
    units, contrib = _foldable(link, work, graph, no_in & ~no_out, remove, notes)
    if int(remove.sum()) == int(keep.sum()):
        units, contrib = _keep_one(remove, no_out, units, contrib, notes)
    if not bool(remove.any()):
        return False
    if contrib is not None and len(units):
        bias = work.bias[link.consumer]
        assert bias is not None or bool((contrib == 0).all())
        if bias is not None:
            work.bias[link.consumer] = (bias.double() + contrib.sum(0)).to(bias.dtype)
        notes.folded.update(units.tolist())
    _drop(link, work, remove.nonzero().flatten())
    return True


def _foldable(
    link: Link, work: Work, graph: Graph, fold: Tensor, remove: Tensor, notes: _Notes
) -> tuple[Tensor, Tensor | None]:
    """The constant units of ``fold`` whose contribution folds exactly, and those contributions.

    The others are taken out of ``remove``, with the reason in ``notes``.
    """
    units = fold.nonzero().flatten()
    if not len(units):
        return units, None
    contrib, ok = _contributions(link, work, graph, units)
    if not bool(ok.all()):
        notes.reasons.add(
            f"the contribution of a constant unit to {link.consumer!r} is not the same at every position (zero "
            f"padding or pooling at the borders), so it cannot be folded into a bias"
        )
    if work.bias[link.consumer] is None:
        nonzero = (contrib != 0).any(1)
        if bool((nonzero & ok).any()):
            notes.reasons.add(f"{link.consumer!r} has no bias to absorb the constant output of dead units")
        ok = ok & ~nonzero
    remove[units[~ok]] = False
    return units[ok], contrib[ok]


def _keep_one(
    remove: Tensor, no_out: Tensor, units: Tensor, contrib: Tensor | None, notes: _Notes
) -> tuple[Tensor, Tensor | None]:
    """Take one unit out of ``remove`` (an unused one if any): a layer never becomes empty."""
    spare = int((no_out & remove).nonzero()[0]) if bool((no_out & remove).any()) else int(units[0])
    remove[spare] = False
    notes.reasons.add("a layer keeps at least one unit")
    if contrib is not None and spare in units.tolist():
        sel = units != spare
        return units[sel], contrib[sel]
    return units, contrib


def _drop(link: Link, work: Work, idx: Tensor) -> None:
    """Remove the producer's units ``idx``: its rows, and the consumer's columns that read them."""
    producer, consumer = link.producer, link.consumer
    work.keep_out[producer][idx] = False
    work.alive[producer][idx] = False
    work.weight[producer][idx] = 0
    if link.kind == "conv":
        cols = idx
    else:
        cols = (idx.unsqueeze(1) * link.group + torch.arange(link.group, device=idx.device)).flatten()
    work.keep_in[consumer][cols] = False
    work.alive[consumer][:, cols] = False
    work.weight[consumer][:, cols] = 0


def _contributions(link: Link, work: Work, graph: Graph, units: Tensor) -> tuple[Tensor, Tensor]:
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
