"""The sweep: prune each layer alone at each level, measure without retraining, put everything back.

Every level of a layer runs only the part of the network from the layer on
(:class:`~lightning_prune.core.sensitivity.split.GraphSplit`, over cut values kept per batch); a
model torch.fx cannot trace, a cut larger than ``cache_bytes`` or a failing split falls back to full
forward passes, with one warning. The numbers are the same either way.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from lightning_prune.core.criteria import Criterion, PruneContext, checked_decisions, get_criterion, surviving_std
from lightning_prune.core.selection import Target, select_targets
from lightning_prune.core.sensitivity.evaluation import Batch, EvalData, accuracy, nbytes
from lightning_prune.core.sensitivity.result import SensitivityResult, SensitivityRow
from lightning_prune.core.sensitivity.split import GraphSplit
from lightning_prune.core.tracing import describe_error, eval_mode, outputs_match, trace
from lightning_prune.core.validation import check_levels

__all__ = ["DEFAULT_CACHE_BYTES", "Progress", "sweep", "sweep_criterion", "sweep_levels"]

DEFAULT_CACHE_BYTES: int = 2 * 1024**3
"""Largest cut (all batches together) kept for one layer; a layer needing more runs full forward passes."""

Progress = Callable[[str, float, float], None]


def sweep_criterion(criterion: str | Criterion) -> Criterion:
    """``criterion`` as an object, if it can prune one layer alone at a level (``per_layer``).

    Raises:
        ValueError: For a criterion with one level for all layers (``Global``), naming it.

    Example::

        >>> sweep_criterion("fraction").sweep_levels[:3]
        (0.1, 0.2, 0.3)
    """
    rule = get_criterion(criterion)
    if not rule.per_layer:
        raise ValueError(
            f"A sensitivity sweep prunes one layer at a time; criterion {rule.describe()} has one level for all "
            f"layers. Sweep with 'std' or 'fraction' instead."
        )
    return rule


def sweep_levels(rule: Criterion, levels: Sequence[float] | None) -> list[float]:
    """The levels of a sweep: ``levels`` checked by the criterion (increasing), or its ``sweep_levels``.

    Raises:
        ValueError: Naming the bad level, or the criterion if it has no default levels and none are given.

    Example::

        >>> from lightning_prune.core.criteria import Std
        >>> sweep_levels(Std(), [0.5, 1, 1.5])
        [0.5, 1.0, 1.5]
        >>> sweep_levels(Std(), [0.5, 0.5])
        Traceback (most recent call last):
        ...
        ValueError: `levels` must be strictly increasing, got 0.5 after 0.5 in [0.5, 0.5].
    """
    if levels is None:
        if not rule.sweep_levels:
            raise ValueError(f"Criterion {rule.describe()} has no default sweep levels; pass `levels`.")
        levels = rule.sweep_levels
    return check_levels(levels, "levels", rule.check_level)


def _mask(rule: Criterion, name: str, layer: str, weight: Tensor, level: float) -> Tensor:
    """What ``rule`` keeps of ``weight`` (never pruned) at ``level``, its std the dense one."""
    context = PruneContext(dense_std={name: surviving_std(weight)}, layer_of={name: layer})
    decisions = rule.select({name: weight}, {name: None}, {name: level}, context)
    return checked_decisions(rule, decisions, {name: weight})[name].keep


def sweep(
    model: nn.Module,
    batches: Iterable[Batch],
    levels: Sequence[float] | None = None,
    *,
    layers: Sequence[str] | None = None,
    criterion: str | Criterion = "std",
    metric: Callable[[Any, Any], Tensor | float] = accuracy,
    higher_is_better: bool = True,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    shard: tuple[int, int] = (0, 1),
) -> SensitivityResult:
    """Prune each selected layer alone at each level and measure ``metric`` without retraining.

    For every layer and level, the layer's weights are pruned by the criterion at that level, as a
    first prune of a fresh :class:`~lightning_prune.core.pruner.Pruner` would (``"std"``: keep
    ``|w| > level * std(W)``, the std of all the layer's current weights; ``"fraction"``: prune the
    smallest ``level`` share), the model is evaluated over all batches in eval mode under
    :func:`torch.no_grad`, and the weights are put back. The model is left bit-identical: weights,
    buffers, the train/eval mode of every module, and its device.

    Only the part of the network from the layer on is re-run for each level (torch.fx, see the module
    docs); a model torch.fx cannot trace is run whole, with one warning.

    Args:
        model: The network; called as ``model(inputs)``.
        batches: ``(inputs, targets)`` pairs, read once and kept (materialized into a list).
        levels: Increasing levels the criterion accepts: qualities ``>= 0`` (``"std"``), shares in
            ``[0, 1]`` (``"fraction"``); ``None``: the criterion's ``sweep_levels``.
        layers: Glob patterns over module or parameter names, as for the pruner; ``None``: every
            multiply-accumulate weight. A layer's targets (an attention block's q, k and v) are pruned together.
            Only weights are pruned.
        criterion: A criterion that levels each layer on its own (``per_layer``): a name (``"std"``,
            ``"fraction"``), a :class:`~lightning_prune.core.criteria.Criterion`, your own included.
        metric: ``metric(outputs, targets)``, the batch's mean value; the sweep reports the mean over
            all samples (each batch weighted by ``len(targets)``). Default: :func:`accuracy`.
        higher_is_better: ``False`` for a metric like a loss (used by :meth:`SensitivityResult.choose`).
        device: Where to evaluate: the model is moved there for the sweep and back afterwards, inputs
            are moved batch by batch. ``None``: the device of the model's first parameter.
        progress: Called as ``progress(layer, level, metric)`` after each evaluation.
        cache_bytes: Most bytes of cut values kept (on ``device``, all batches) for one layer; a layer
            that needs more is evaluated with full forward passes. ``0`` never caches (and never
            traces); ``None`` sets no limit.
        shard: ``(index, count)``: sweep only the selected layers ``index, index + count, ...``, for
            splitting the work among processes (:func:`merge_results` joins the parts). Only shard 0
            computes the baseline (the others report NaN).

    Returns:
        The baseline and one row per (layer, level).

    Raises:
        ValueError: On bad levels, criterion, shard or cache size (before anything is evaluated), no
            batches, a batch that is not a pair, or a selected weight holding NaN or inf.

    Example::

        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        >>> x = torch.randn(64, 6)
        >>> result = sweep(net, [(x, net(x).argmax(1))], levels=[0.5, 2.0])
        >>> result.baseline
        1.0
        >>> [(r.layer, r.level) for r in result.rows]
        [('0', 0.5), ('0', 2.0), ('2', 0.5), ('2', 2.0)]
        >>> all(r.metric <= 1.0 for r in result.rows) and result.rows[1].pruned_share > result.rows[0].pruned_share
        True
    """
    # Over 60 lines only by its signature and docstring: the steps are the helpers below.
    rule = sweep_criterion(criterion)
    levels = sweep_levels(rule, levels)
    _check_arguments(metric, shard, cache_bytes)
    names = _swept_layers(model, layers, shard)
    result = _empty_result(model, names, rule, metric, higher_is_better)
    data_list = _checked_batches(batches)
    with _kept_on(model, device) as target, eval_mode(model), torch.no_grad():
        run = _Run(model, EvalData(data_list, target, metric), levels, rule, cache_bytes, progress)
        if shard[0] == 0:
            result.baseline = run.data.evaluate(run.eager)
        if cache_bytes != 0 and names:
            run.traced = _traced_or_warn(model, run.data)
        for layer, targets in names.items():
            result.rows.extend(_sweep_layer(run, layer, targets))
        if run.problems:
            warnings.warn(
                f"The torch.fx split of {type(model).__name__} failed for {len(run.problems)} layer(s) (first: "
                f"{run.problems[0][:300]}); those ran full forward passes instead (same results, slower).",
                stacklevel=2,
            )
    return result


def _check_arguments(metric: Any, shard: Any, cache_bytes: Any) -> None:
    if not callable(metric):
        raise ValueError(f"`metric` must be a callable metric(outputs, targets), got {metric!r}.")
    if (
        not isinstance(shard, (tuple, list))
        or len(shard) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shard)
        or not 0 <= shard[0] < shard[1]
    ):
        raise ValueError(f"`shard` must be (index, count) with 0 <= index < count, got {shard!r}.")
    if cache_bytes is not None and (
        isinstance(cache_bytes, bool) or not isinstance(cache_bytes, int) or cache_bytes < 0
    ):
        raise ValueError(f"`cache_bytes` must be None or an integer >= 0, got {cache_bytes!r}.")


def _swept_layers(model: nn.Module, layers: Sequence[str] | None, shard: tuple[int, int]) -> dict[str, list[Target]]:
    """``{layer: its targets}`` of the shard's layers, in module order; their weights must be finite."""
    by_layer: dict[str, list[Target]] = {}
    for target in select_targets(model, layers):
        by_layer.setdefault(target.layer, []).append(target)
    mine = {layer: by_layer[layer] for layer in list(by_layer)[shard[0] :: shard[1]]}
    with torch.no_grad():
        for target in (t for ts in mine.values() for t in ts):
            if not torch.isfinite(target.weight(model)).all():
                raise ValueError(f"Parameter {target.name!r} holds NaN or inf; its sensitivity cannot be measured.")
    return mine


def _checked_batches(batches: Iterable[Batch]) -> list[Batch]:
    data_list = list(batches)
    if not data_list:
        raise ValueError("`batches` is empty: the sweep needs at least one (inputs, targets) batch.")
    for i, batch in enumerate(data_list):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"Batch {i} must be an (inputs, targets) pair, got {type(batch).__name__} {batch!r:.80}.")
    return data_list


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@contextmanager
def _kept_on(model: nn.Module, device: torch.device | str | None) -> Iterator[torch.device]:
    """Move the model to ``device`` (default: where it is) inside; on exit it is back, its buffers as they were."""
    home = _device_of(model)
    target = torch.device(device) if device is not None else home
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        if target != home:
            model.to(target)
        yield target
    finally:
        if target != home:
            model.to(home)
        with torch.no_grad():
            for name, saved in buffers.items():
                model.get_buffer(name).copy_(saved)


def _empty_result(
    model: nn.Module, names: dict[str, list[Target]], rule: Criterion, metric: Any, higher_is_better: bool
) -> SensitivityResult:
    return SensitivityResult(
        baseline=math.nan,
        rows=[],
        criterion=rule.name,
        level_name=rule.level_name,
        metric_name=getattr(metric, "__name__", type(metric).__name__),
        higher_is_better=bool(higher_is_better),
        shapes={layer: _shape(model, targets) for layer, targets in names.items()},
    )


def _traced_or_warn(model: nn.Module, data: EvalData) -> fx.GraphModule | None:
    """The model traced by torch.fx and checked on the first batch; else ``None``, with a warning why."""
    traced = trace(model)
    if not isinstance(traced, str):
        why = _first_batch_problem(model, traced, data)
        if why is None:
            return traced
    else:
        why = traced
    warnings.warn(
        f"torch.fx could not split {type(model).__name__} at its layers ({why[:300]}); the sensitivity "
        f"sweep runs full forward passes for every level instead (same results, slower).",
        stacklevel=3,  # the caller of sweep()
    )
    return None


def _first_batch_problem(model: nn.Module, traced: fx.GraphModule, data: EvalData) -> str | None:
    """Why the traced graph cannot stand in for the model on the first batch, or ``None``."""
    try:
        x = data.input(0)
        mismatch = outputs_match(traced(x), model(x))
    except Exception as err:  # running the traced graph fails in as many ways as tracing
        return describe_error(err)
    return None if mismatch is None else "the traced graph's output differs from the model's on the first batch"


@dataclass
class _Run:
    """What the sweeps of all layers share; ``problems`` collects the layers whose split failed."""

    model: nn.Module
    data: EvalData
    levels: list[float]
    criterion: Criterion
    cache_bytes: int | None
    progress: Progress | None
    traced: fx.GraphModule | None = None
    problems: list[str] = field(default_factory=list)

    def eager(self, i: int) -> Any:
        """The model's full forward pass on batch ``i``."""
        return self.model(self.data.input(i))


def _shape(model: nn.Module, targets: list[Target]) -> list[int]:
    """The shape the result records for a layer: its parameter's, or ``[entries]`` for several parameters."""
    params = list(dict.fromkeys(t.param for t in targets))
    if len(params) == 1:
        return list(model.get_parameter(params[0]).shape)
    return [sum(model.get_parameter(p).numel() for p in params)]


def _prune_layer(run: _Run, layer: str, targets: list[Target], saved: dict[str, Tensor], level: float) -> float:
    """Put the saved weights back, prune every target of ``layer`` at ``level``; the share of entries pruned."""
    params = {name: run.model.get_parameter(name) for name in saved}
    for name, param in params.items():
        param.copy_(saved[name])
    keeps = [_mask(run.criterion, t.name, layer, t.weight(run.model).detach(), level) for t in targets]
    for target, keep in zip(targets, keeps, strict=True):
        param = params[target.param]
        (param if target.rows is None else param[target.rows[0] : target.rows[1]]).masked_fill_(~keep, 0.0)
    return 1.0 - sum(int(k.sum()) for k in keeps) / sum(k.numel() for k in keeps)


def _sweep_layer(run: _Run, layer: str, targets: list[Target]) -> list[SensitivityRow]:
    """One row per level of ``layer`` (all its targets) pruned alone; its weights are put back."""
    saved = {t.param: run.model.get_parameter(t.param).detach().clone() for t in targets}
    eager: Callable[[int], Any] = run.eager
    forward = eager
    if run.traced is not None:
        forward = _split_forward(run, run.traced, layer, [run.model.get_parameter(p) for p in saved]) or eager
    rows = []
    try:
        for level in run.levels:
            share = _prune_layer(run, layer, targets, saved, level)
            try:
                value = run.data.evaluate(forward)
            except Exception as err:
                if forward is eager:
                    raise
                run.problems.append(f"{layer}: {type(err).__name__}: {err}")
                forward = eager
                value = run.data.evaluate(forward)
            rows.append(SensitivityRow(layer, level, share, value))
            if run.progress is not None:
                run.progress(layer, level, value)
    finally:
        for name, weight in saved.items():
            run.model.get_parameter(name).copy_(weight)
    return rows


def _split_forward(run: _Run, traced: fx.GraphModule, layer: str, weights: list[Tensor]) -> Callable[[int], Any] | None:
    """Forward passes from ``layer`` on, over its cut values kept per batch; ``None``: run the model whole."""
    try:
        owners = {n for n, m in run.model.named_modules(remove_duplicate=False) if any(_holds(m, w) for w in weights)}
        split = GraphSplit(traced, owners)
        cache: list[tuple[Any, ...]] = []
        for i in range(len(run.data.inputs)):
            cache.append(split.prefix(run.data.input(i)))
            if run.cache_bytes is not None and nbytes(cache[0]) * len(run.data.inputs) > run.cache_bytes:
                return None  # too big to keep: full forward passes
    except Exception as err:
        run.problems.append(f"{layer}: {type(err).__name__}: {err}")
        return None
    return lambda i: split.run(cache[i])


def _holds(module: nn.Module, weight: Tensor) -> bool:
    return any(p is weight for p in module._parameters.values())
