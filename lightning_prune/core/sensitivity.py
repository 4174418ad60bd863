"""Per-layer pruning sensitivity: prune one layer alone at increasing levels, measure without retraining.

This is how Han et al. (2015) choose each layer's quality parameter (their Figure 5): every layer is
pruned *alone* at increasing thresholds, the network is evaluated on validation data without any
retraining, and the most sensitive layers get the smallest thresholds. :func:`sweep` runs that
experiment on any ``nn.Module`` and returns a :class:`SensitivityResult`, which turns the curves into
a per-layer ``quality`` mapping (:meth:`SensitivityResult.choose`, :meth:`SensitivityResult.quality_yaml`)
ready for :class:`~lightning_prune.core.pruner.MagnitudePruner` or the callback's ``quality`` argument,
and draws the paper's figure (:func:`plot`).

Speed: pruning layer ``L`` changes nothing that runs before ``L``. The model is traced once with
:func:`torch.fx.symbolic_trace`; for each layer the values of the part before ``L`` that the rest of
the network needs (the *cut*: the inputs of ``L`` and any skip connections around it) are computed
once per batch and kept, and every level of ``L`` runs only the graph from ``L`` on. Models that
torch.fx cannot trace (data-dependent control flow) are evaluated with full forward passes, with one
warning; the numbers are the same either way.

The model is left bit-identical: weights, buffers, and the train/eval mode of every module.
"""

from __future__ import annotations

import csv
import json
import math
import numbers
import operator
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor, fx, nn

from lightning_prune.core import criteria
from lightning_prune.core.selection import select_parameters

SweepCriterion = Literal["std", "fraction"]
SWEEP_CRITERIA: tuple[str, ...] = ("std", "fraction")
"""Rules a sweep prunes a layer by: ``"std"`` (``level`` = Han's quality) or ``"fraction"`` (share pruned)."""

DEFAULT_LEVELS: dict[str, tuple[float, ...]] = {
    "std": (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.25, 2.5),
    "fraction": (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95),
}
"""Levels used when none are given: quality 0.25..2.5 (about 20% to 99% of a Gaussian layer), or shares."""

DEFAULT_CACHE_BYTES: int = 2 * 1024**3
"""Largest cut (all batches together) kept for one layer; a layer needing more runs full forward passes."""

Batch = tuple[Any, Any]
Progress = Callable[[str, float, float], None]


def accuracy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Share of rows whose largest output (over dimension 1) is at the target class (float64 where supported).

    Example::

        >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
        tensor(0.5000, dtype=torch.float64)
    """
    dtype = torch.float32 if outputs.device.type == "mps" else torch.float64
    return (outputs.argmax(dim=1) == targets).to(dtype).mean()


class SensitivityRow(NamedTuple):
    """One evaluation: ``layer`` pruned alone at ``level``.

    Attributes:
        layer: Module name (``"fc1"``), as the callback's ``quality`` mapping takes it.
        level: The quality (criterion ``"std"``) or the share pruned (``"fraction"``).
        pruned_share: Share of the layer's weights that were zero during the evaluation, in ``[0, 1]``.
        metric: The metric over all batches with the layer pruned.
    """

    layer: str
    level: float
    pruned_share: float
    metric: float


@dataclass
class SensitivityResult:
    """The curves of a sensitivity sweep, and the per-layer levels they suggest.

    Attributes:
        baseline: The metric of the unpruned model (NaN in a part computed by another shard than 0).
        rows: One :class:`SensitivityRow` per (layer, level), layers in module order, levels increasing.
        criterion: ``"std"`` (levels are qualities: threshold ``level * std(W)``) or ``"fraction"``.
        metric_name: Name of the metric (``"accuracy"``).
        higher_is_better: Whether a larger metric is better (accuracy) or worse (a loss).
        shapes: Weight shape of every layer swept, in module order; layers whose weight has more than
            two dimensions are drawn as convolutions.

    Example::

        >>> rows = [SensitivityRow("fc1", 1.0, 0.68, 0.985), SensitivityRow("fc1", 2.0, 0.95, 0.9)]
        >>> SensitivityResult(0.99, rows).choose(0.01)
        {'fc1': 1.0}
    """

    baseline: float
    rows: list[SensitivityRow]
    criterion: str = "std"
    metric_name: str = "accuracy"
    higher_is_better: bool = True
    shapes: dict[str, list[int]] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        """Layer names in the order of the rows."""
        return list(dict.fromkeys(row.layer for row in self.rows))

    def curve(self, layer: str) -> list[SensitivityRow]:
        """The rows of one layer, levels increasing.

        Raises:
            KeyError: If ``layer`` was not swept (the message lists the swept layers).
        """
        found = [row for row in self.rows if row.layer == layer]
        if not found:
            raise KeyError(f"Layer {layer!r} is not in the sensitivity result; swept layers: {self.layers}.")
        return sorted(found, key=lambda row: row.level)

    def drop(self, row: SensitivityRow, *, relative: bool = False) -> float:
        """How much worse than the baseline ``row`` is (positive = worse); relative: divided by ``|baseline|``.

        Example::

            >>> SensitivityResult(0.5, []).drop(SensitivityRow("fc", 1.0, 0.5, 0.4), relative=True)
            0.19999...
        """
        worse = self.baseline - row.metric if self.higher_is_better else row.metric - self.baseline
        if not relative:
            return worse
        if self.baseline == 0:
            return 0.0 if worse <= 0 else math.inf
        return worse / abs(self.baseline)

    def choose(self, tolerance: float, *, relative: bool = False) -> dict[str, float]:
        """Per layer, the largest level whose metric drop is within ``tolerance``.

        Levels are taken in increasing order and the search stops at the first level beyond the
        tolerance, so a curve that recovers at a higher level does not lure the choice past a bad
        one. Drops are compared up to float rounding (``1e-9``), so ``0.99 - 0.98`` is within ``0.01``.
        Levels that prune the whole layer (``pruned_share == 1``) are never chosen: the pruner
        refuses to empty a layer. If even the smallest level is beyond the tolerance the layer gets
        ``0.0``: quality 0 keeps every non-zero weight (criterion ``"std"``), amount 0 prunes
        nothing (``"fraction"``).

        Args:
            tolerance: Largest acceptable drop, ``baseline - metric`` (``metric - baseline`` when lower is
                better), ``>= 0``.
            relative: Measure the drop as a share of the baseline (``0.01`` = 1% of it).

        Returns:
            ``{layer: level}`` in module order: the callback's ``quality`` (``"std"``) or ``amount``
            (``"fraction"``) mapping.

        Raises:
            ValueError: If ``tolerance`` is negative, NaN or not a number, or the baseline is unknown.

        Example::

            >>> rows = [SensitivityRow("conv1", q, s, m) for q, s, m in [(0.5, 0.4, 0.98), (1.0, 0.7, 0.9)]]
            >>> rows += [SensitivityRow("fc1", q, s, m) for q, s, m in [(0.5, 0.4, 0.99), (1.0, 0.7, 0.985)]]
            >>> SensitivityResult(0.99, rows).choose(0.01)
            {'conv1': 0.5, 'fc1': 1.0}
            >>> SensitivityResult(0.99, rows).choose(0.0)
            {'conv1': 0.0, 'fc1': 0.5}
        """
        if isinstance(tolerance, bool) or not isinstance(tolerance, numbers.Real) or not tolerance >= 0:
            raise ValueError(f"`tolerance` must be a number >= 0 (a metric drop), got {tolerance!r}.")
        if math.isnan(self.baseline):
            raise ValueError("The result has no baseline (NaN); it is a shard of a sweep, merge the parts first.")
        limit = tolerance + 1e-9 * (1.0 if relative else max(1.0, abs(self.baseline)))  # float rounding
        chosen: dict[str, float] = {}
        for layer in self.layers:
            chosen[layer] = 0.0
            for row in self.curve(layer):
                if not self.drop(row, relative=relative) <= limit:
                    break
                if row.pruned_share < 1.0:
                    chosen[layer] = row.level
        return chosen

    def quality_config(self, tolerance: float, *, relative: bool = False) -> dict[str, Any]:
        """The callback arguments :meth:`choose` suggests, as a mapping.

        ``{"quality": {layer: level}}`` for criterion ``"std"``, ``{"criterion": "fraction", "amount":
        {layer: level}}`` for ``"fraction"``.

        Example::

            >>> SensitivityResult(0.9, [SensitivityRow("fc1", 1.5, 0.87, 0.9)]).quality_config(0.01)
            {'quality': {'fc1': 1.5}}
        """
        chosen = self.choose(tolerance, relative=relative)
        if self.criterion == "fraction":
            return {"criterion": "fraction", "amount": chosen}
        return {"quality": chosen}

    def quality_yaml(self, tolerance: float, relative: bool = False) -> str:
        """The levels of :meth:`choose` as YAML to paste under the callback's ``init_args``.

        A comment line says how they were chosen; then ``quality: {layer: level, ...}`` (criterion
        ``"std"``) or ``criterion: fraction`` and ``amount: {...}``. Long mappings are written one layer
        per line.

        Example::

            >>> rows = [SensitivityRow("conv1", 0.5, 0.38, 0.99), SensitivityRow("fc1", 1.5, 0.87, 0.985)]
            >>> print(SensitivityResult(0.99, rows).quality_yaml(0.01), end="")
            # sensitivity: largest std level per layer with accuracy drop <= 0.01 (baseline 0.99)
            quality: {conv1: 0.5, fc1: 1.5}
        """
        import yaml

        config = self.quality_config(tolerance, relative=relative)
        how = f"{100 * tolerance:g}% of the baseline" if relative else f"{tolerance:g}"
        lines = [
            f"# sensitivity: largest {self.criterion} level per layer with {self.metric_name} "
            f"{'drop' if self.higher_is_better else 'rise'} <= {how} (baseline {self.baseline:.6g})"
        ]
        for key, value in config.items():
            if not isinstance(value, dict):
                lines.append(yaml.safe_dump({key: value}, sort_keys=False).rstrip("\n"))
                continue
            flow = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=None, width=10**6)
            if len(flow) > 110 or "\n" in flow.rstrip("\n"):
                flow = yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False)
            lines.append(flow.rstrip("\n"))
        return "\n".join(lines) + "\n"

    def write_quality(self, path: str | Path, tolerance: float, relative: bool = False) -> dict[str, Any]:
        """Write :meth:`quality_config` to ``path``: YAML for ``.yaml``/``.yml``, JSON for ``.json``.

        Returns:
            The mapping written.

        Raises:
            ValueError: On another suffix (naming it and the accepted ones), or a bad ``tolerance``.
        """
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in QUALITY_SUFFIXES:
            raise ValueError(f"Cannot write a quality file {str(path)!r}: suffix must be one of {QUALITY_SUFFIXES}.")
        config = self.quality_config(tolerance, relative=relative)
        if suffix == ".json":
            path.write_text(json.dumps(config, indent=2) + "\n")
        else:
            path.write_text(self.quality_yaml(tolerance, relative))
        return config

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what :meth:`to_json` writes)."""
        return {
            "criterion": self.criterion,
            "metric": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "baseline": self.baseline,
            "shapes": {layer: list(shape) for layer, shape in self.shapes.items()},
            "rows": [row._asdict() for row in self.rows],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityResult:
        """Inverse of :meth:`to_dict`."""
        return cls(
            baseline=float(data["baseline"]),
            rows=[
                SensitivityRow(str(r["layer"]), float(r["level"]), float(r["pruned_share"]), float(r["metric"]))
                for r in data["rows"]
            ],
            criterion=str(data.get("criterion", "std")),
            metric_name=str(data.get("metric", "metric")),
            higher_is_better=bool(data.get("higher_is_better", True)),
            shapes={str(k): [int(d) for d in v] for k, v in data.get("shapes", {}).items()},
        )

    def to_json(self, path: str | Path) -> None:
        """Write the result as JSON (floats round-trip exactly through :meth:`from_json`)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1, allow_nan=True) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> SensitivityResult:
        """Read a result written by :meth:`to_json`."""
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | Path) -> None:
        """Write one line per row: ``layer, weights, level, pruned_share, metric, baseline, drop``."""
        with Path(path).open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["layer", "weights", "level", "pruned_share", self.metric_name, "baseline", "drop"])
            for row in self.rows:
                shape = self.shapes.get(row.layer)
                weights = math.prod(shape) if shape is not None else ""
                values = (row.level, row.pruned_share, row.metric, self.baseline, self.drop(row))
                writer.writerow([row.layer, weights, *(repr(v) for v in values)])

    def table(self) -> str:
        """Aligned text: per layer, the share pruned and the metric at each level.

        Example::

            >>> r = SensitivityResult(0.99, [SensitivityRow("fc1", 1.0, 0.68, 0.985)], shapes={"fc1": [500, 800]})
            >>> print(r.table())
            sensitivity, criterion 'std' (threshold = level x std(W)), baseline accuracy 0.9900
            layer  weights                 1
            -----  -------  --------  ------
            fc1     400000  pruned     68.0%
                            accuracy  0.9850
        """
        rule = "threshold = level x std(W)" if self.criterion == "std" else "level = share pruned"
        title = f"sensitivity, criterion {self.criterion!r} ({rule}), baseline {self.metric_name} {self.baseline:.4f}"
        levels = sorted({row.level for row in self.rows})
        label = self.metric_name[:10]
        header = ["layer", "weights", "", *(f"{lv:g}" for lv in levels)]
        body: list[list[str]] = []
        for layer in self.layers:
            by_level = {row.level: row for row in self.curve(layer)}
            shape = self.shapes.get(layer)
            weights = str(math.prod(shape)) if shape is not None else "?"
            body.append([layer, weights, "pruned", *(_cell(by_level, lv, "pruned") for lv in levels)])
            body.append(["", "", label, *(_cell(by_level, lv, "metric") for lv in levels)])
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

        def fmt(cells: list[str]) -> str:
            out = [
                c.ljust(w) if i in (0, 2) else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ]
            return "  ".join(out).rstrip()

        rule_line = "  ".join("-" * w for w in widths)
        return "\n".join([title, fmt(header), rule_line, *(fmt(r) for r in body)])

    def plot(self, path: str | Path, *, title: str | None = None) -> None:
        """Draw the paper's Figure 5 to ``path`` (see :func:`plot`)."""
        plot(self, path, title=title)


QUALITY_SUFFIXES: tuple[str, ...] = (".yaml", ".yml", ".json")
"""File types :meth:`SensitivityResult.write_quality` and :func:`load_quality` handle."""


def _cell(by_level: Mapping[float, SensitivityRow], level: float, what: str) -> str:
    row = by_level.get(level)
    if row is None:
        return "-"
    return f"{100 * row.pruned_share:.1f}%" if what == "pruned" else f"{row.metric:.4f}"


def load_quality(path: str | Path) -> dict[str, Any]:
    """Read a file written by :meth:`SensitivityResult.write_quality` (YAML or JSON, by suffix).

    Returns:
        ``{"quality": {layer: level}}`` or ``{"criterion": "fraction", "amount": {layer: level}}``:
        keyword arguments for the callback or :meth:`MagnitudePruner.prune`.

    Raises:
        ValueError: On another suffix, unknown keys, or levels that are not finite numbers ``>= 0``.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in QUALITY_SUFFIXES:
        raise ValueError(f"Cannot read a quality file {str(path)!r}: suffix must be one of {QUALITY_SUFFIXES}.")
    if suffix == ".json":
        data = json.loads(path.read_text())
    else:
        import yaml

        data = yaml.safe_load(path.read_text())
    accepted = ("quality", "criterion", "amount")
    if not isinstance(data, dict) or not data or any(key not in accepted for key in data):
        raise ValueError(f"{str(path)!r} must hold a mapping with keys among {accepted}, got {data!r}.")
    for key in ("quality", "amount"):
        values = data.get(key)
        if values is None:
            continue
        items = values.items() if isinstance(values, dict) else [("", values)]
        for layer, value in items:
            ok = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
            if not ok or value < 0:
                raise ValueError(f"{str(path)!r}: `{key}[{layer!r}]` must be a finite number >= 0, got {value!r}.")
    return data


def check_levels(levels: Sequence[float], criterion: str = "std") -> list[float]:
    """Validate sweep levels: non-empty, finite numbers ``>= 0`` (and ``<= 1`` for ``"fraction"``), strictly increasing.

    Returns:
        The levels as floats.

    Raises:
        ValueError: Naming the bad value (or the criterion and the accepted ones).

    Example::

        >>> check_levels([0.5, 1, 1.5])
        [0.5, 1.0, 1.5]
        >>> check_levels([0.5, 0.5])
        Traceback (most recent call last):
        ...
        ValueError: `levels` must be strictly increasing, got 0.5 after 0.5 in [0.5, 0.5].
    """
    if criterion not in SWEEP_CRITERIA:
        raise ValueError(f"`criterion` must be one of {SWEEP_CRITERIA} for a sensitivity sweep, got {criterion!r}.")
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Iterable):
        raise ValueError(f"`levels` must be a non-empty sequence of numbers, got {levels!r}.")
    values = list(levels)
    if not values:
        raise ValueError(f"`levels` must be a non-empty sequence of numbers, got {levels!r}.")
    upper = 1.0 if criterion == "fraction" else math.inf
    what = "shares pruned in [0, 1]" if criterion == "fraction" else "qualities >= 0"
    out: list[float] = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            raise ValueError(f"`levels` must hold finite numbers ({what}), got {value!r} in {values!r}.")
        if not 0.0 <= float(value) <= upper:
            raise ValueError(f"`levels` for criterion {criterion!r} must be {what}, got {value!r} in {values!r}.")
        if out and float(value) <= out[-1]:
            raise ValueError(
                f"`levels` must be strictly increasing, got {value!r} after {values[len(out) - 1]!r} in {values!r}."
            )
        out.append(float(value))
    return out


def merge_results(parts: Sequence[SensitivityResult], order: Sequence[str] | None = None) -> SensitivityResult:
    """Join the results of shards of one sweep (``sweep(..., shard=(i, n))`` for every ``i``).

    Args:
        parts: The shards' results; the baseline is taken from the first that has one.
        order: Layer order of the rows; ``None``: the order of ``shapes`` over the parts.

    Example::

        >>> a = SensitivityResult(0.9, [SensitivityRow("fc1", 1.0, 0.7, 0.8)], shapes={"fc1": [4, 4]})
        >>> b = SensitivityResult(math.nan, [SensitivityRow("fc2", 1.0, 0.7, 0.85)], shapes={"fc2": [2, 4]})
        >>> m = merge_results([b, a], order=["fc1", "fc2"])
        >>> m.baseline, m.layers
        (0.9, ['fc1', 'fc2'])
    """
    if not parts:
        raise ValueError("`parts` must hold at least one SensitivityResult.")
    baseline = next((p.baseline for p in parts if not math.isnan(p.baseline)), math.nan)
    shapes: dict[str, list[int]] = {}
    for part in parts:
        shapes.update(part.shapes)
    rank = {layer: i for i, layer in enumerate(order if order is not None else shapes)}
    rows = sorted((row for p in parts for row in p.rows), key=lambda r: (rank.get(r.layer, len(rank)), r.level))
    first = parts[0]
    return SensitivityResult(
        baseline=baseline,
        rows=rows,
        criterion=first.criterion,
        metric_name=first.metric_name,
        higher_is_better=first.higher_is_better,
        shapes={layer: shapes[layer] for layer in sorted(shapes, key=lambda name: rank.get(name, len(rank)))},
    )


# --------------------------------------------------------------------------------------------------
# Evaluation


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(_to(v, device) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _nbytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    return 0


def _clone(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.clone()
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_clone(v) for v in obj)
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    return obj


def _close(a: Any, b: Any) -> bool:
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        if not (isinstance(a, Tensor) and isinstance(b, Tensor)) or a.shape != b.shape or a.dtype != b.dtype:
            return False
        if not a.is_floating_point():
            return bool(torch.equal(a, b))
        return bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    return bool(a == b)


def _weight_of(targets: Any) -> int:
    if isinstance(targets, Tensor):
        return int(targets.shape[0]) if targets.dim() > 0 else 1
    try:
        return len(targets)
    except TypeError:
        return 1


class _Data:
    """The batches, on the evaluation device, and the metric over all of them."""

    def __init__(self, batches: list[Batch], device: torch.device, metric: Callable[[Any, Any], Any]):
        self.inputs = [b[0] for b in batches]
        self.targets = [_to(b[1], device) for b in batches]
        self.weights = [_weight_of(t) for t in self.targets]
        self.device = device
        self.metric = metric
        self.total = sum(self.weights)

    def input(self, i: int) -> Any:
        return _to(self.inputs[i], self.device)

    def evaluate(self, forward: Callable[[int], Any]) -> float:
        """Weighted mean of ``metric(forward(i), targets[i])`` over the batches (weights: batch sizes)."""
        values = []
        for i, target in enumerate(self.targets):
            value = self.metric(forward(i), target)
            values.append(value.detach() if isinstance(value, Tensor) else value)
        return math.fsum(float(v) * w for v, w in zip(values, self.weights, strict=True)) / self.total


# --------------------------------------------------------------------------------------------------
# torch.fx: split the graph at a layer


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


class _Split:
    """The graph of a traced model split at a layer: a prefix computing the cut, and the suffix from the layer on."""

    def __init__(self, traced: fx.GraphModule, owners: set[str]):
        nodes = list(traced.graph.nodes)
        start = next((i for i, n in enumerate(nodes) if _touches(n, owners)), len(nodes) - 1)
        head = set(nodes[:start])
        needed = [n for n in nodes[:start] if any(user not in head for user in n.users)]
        cut = [n for n in needed if n.op != "get_attr"]
        constants = [n for n in needed if n.op == "get_attr"]

        modules = dict(traced.named_modules())
        prefix = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for node in nodes[:start]:
            env[node] = prefix.node_copy(node, lambda n: env[n])
        prefix.output(tuple(env[n] for n in cut))
        live = _live(list(prefix.nodes), modules)
        for node in reversed(list(prefix.nodes)):
            if node not in live:  # computed only for a part of the suffix's own inputs
                prefix.erase_node(node)

        suffix = fx.Graph()
        env = {}
        for i, node in enumerate(cut):
            env[node] = suffix.placeholder(f"cut_{i}")
        for node in [*constants, *nodes[start:]]:
            env[node] = suffix.node_copy(node, lambda n: env[n])

        index = {node: i for i, node in enumerate(cut)}
        clone: set[int] = set()
        for node in nodes[start:]:
            # A cut value the suffix writes into, or into a value that may be a view of it, is copied.
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
        self.prefix = fx.GraphModule(traced, prefix)
        self.suffix = fx.GraphModule(traced, suffix)
        self.clone = sorted(clone)
        """Positions of cut values the suffix may write into: they are copied before each use."""

    def run(self, values: tuple[Any, ...]) -> Any:
        if self.clone:
            values = tuple(_clone(v) if i in self.clone else v for i, v in enumerate(values))
        return self.suffix(*values)


def _trace(model: nn.Module, data: _Data) -> tuple[fx.GraphModule | None, str]:
    """The model traced by torch.fx and checked on the first batch, or ``None`` and the reason."""
    try:
        traced = fx.symbolic_trace(model)
        x = data.input(0)
        same = _close(traced(x), model(x))
    except Exception as err:  # torch.fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        return None, f"{type(err).__name__}: {err}".replace("\n", " ")[:300]
    if not same:
        return None, "the traced graph's output differs from the model's on the first batch"
    return traced, ""


# --------------------------------------------------------------------------------------------------
# The sweep


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def _holds(module: nn.Module, weight: Tensor) -> bool:
    return any(p is weight for p in module._parameters.values())


def _mask(weight: Tensor, level: float, criterion: str) -> Tensor:
    if criterion == "fraction":
        return criteria.fraction_mask(weight, level)[0]
    return criteria.std_mask(weight, level, criteria.surviving_std(weight))[0]


def sweep(
    model: nn.Module,
    batches: Iterable[Batch],
    levels: Sequence[float],
    *,
    layers: Sequence[str] | None = None,
    criterion: SweepCriterion = "std",
    metric: Callable[[Any, Any], Tensor | float] = accuracy,
    higher_is_better: bool = True,
    device: torch.device | str | None = None,
    progress: Progress | None = None,
    cache_bytes: int | None = DEFAULT_CACHE_BYTES,
    shard: tuple[int, int] = (0, 1),
) -> SensitivityResult:
    """Prune each selected layer alone at each level and measure ``metric`` without retraining.

    For every layer and level, the layer's weights are pruned (criterion ``"std"``: keep
    ``|w| > level * std(W)``, the std of all the layer's current weights, which is what a fresh
    :class:`~lightning_prune.core.pruner.MagnitudePruner` uses; ``"fraction"``: prune the smallest
    ``level`` share), the model is evaluated over all batches in eval mode under
    :func:`torch.no_grad`, and the weights are put back. The model is left bit-identical: weights,
    buffers, the train/eval mode of every module, and its device.

    Only the part of the network from the layer on is re-run for each level (torch.fx, see the module
    docs); a model torch.fx cannot trace is run whole, with one warning.

    Args:
        model: The network; called as ``model(inputs)``.
        batches: ``(inputs, targets)`` pairs, read once and kept (materialized into a list).
        levels: Increasing levels: qualities ``>= 0`` (``"std"``) or shares in ``[0, 1]`` (``"fraction"``).
        layers: Glob patterns over module names, as for the pruner; ``None``: every Linear and Conv.
            Only weights are pruned.
        criterion: ``"std"`` or ``"fraction"``.
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
    levels = check_levels(levels, criterion)
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
    selected = select_parameters(model, layers)
    names = {layer: name for name, layer in selected.items()}
    mine = list(names)[shard[0] :: shard[1]]
    for layer in mine:
        weight = model.get_parameter(names[layer])
        if not torch.isfinite(weight.detach()).all():
            raise ValueError(f"Parameter {names[layer]!r} holds NaN or inf values; its sensitivity cannot be measured.")
    data_list = list(batches)
    if not data_list:
        raise ValueError("`batches` is empty: the sweep needs at least one (inputs, targets) batch.")
    for i, batch in enumerate(data_list):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"Batch {i} must be an (inputs, targets) pair, got {type(batch).__name__} {batch!r:.80}.")

    result = SensitivityResult(
        baseline=math.nan,
        rows=[],
        criterion=criterion,
        metric_name=getattr(metric, "__name__", type(metric).__name__),
        higher_is_better=bool(higher_is_better),
        shapes={layer: list(model.get_parameter(names[layer]).shape) for layer in mine},
    )
    home = _device_of(model)
    target = torch.device(device) if device is not None else home
    modes = {name: module.training for name, module in model.named_modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        if target != home:
            model.to(target)
        model.eval()
        with torch.no_grad():
            data = _Data(data_list, target, metric)
            if shard[0] == 0:
                result.baseline = data.evaluate(lambda i: model(data.input(i)))
            traced = None
            if cache_bytes != 0 and mine:
                traced, why = _trace(model, data)
                if traced is None:
                    warnings.warn(
                        f"torch.fx could not split {type(model).__name__} at its layers ({why}); the sensitivity "
                        f"sweep runs full forward passes for every level instead (same results, slower).",
                        stacklevel=2,
                    )
            problems: list[str] = []
            for layer in mine:
                result.rows.extend(_sweep_layer(model, traced, data, layer, names[layer], levels, criterion,
                                                cache_bytes, progress, problems))  # fmt: skip
            if problems:
                warnings.warn(
                    f"The torch.fx split of {type(model).__name__} failed for {len(problems)} layer(s) (first: "
                    f"{problems[0][:300]}); those ran full forward passes instead (same results, slower).",
                    stacklevel=2,
                )
    finally:
        for name, module in model.named_modules():
            module.training = modes[name]
        if target != home:
            model.to(home)
        with torch.no_grad():
            for name, saved in buffers.items():
                model.get_buffer(name).copy_(saved)
    return result


def _sweep_layer(
    model: nn.Module,
    traced: fx.GraphModule | None,
    data: _Data,
    layer: str,
    name: str,
    levels: list[float],
    criterion: str,
    cache_bytes: int | None,
    progress: Progress | None,
    problems: list[str],
) -> list[SensitivityRow]:
    weight = model.get_parameter(name)
    saved = weight.detach().clone()

    def eager(i: int) -> Any:
        return model(data.input(i))

    forward: Callable[[int], Any] = eager
    if traced is not None:
        try:
            owners = {n for n, m in model.named_modules(remove_duplicate=False) if _holds(m, weight)}
            split = _Split(traced, owners)
            cache: list[tuple[Any, ...]] = []
            for i in range(len(data.inputs)):
                cache.append(split.prefix(data.input(i)))
                if cache_bytes is not None and _nbytes(cache[0]) * len(data.inputs) > cache_bytes:
                    break  # too big to keep: full forward passes
            else:
                forward = lambda i: split.run(cache[i])  # noqa: E731
        except Exception as err:
            problems.append(f"{layer}: {type(err).__name__}: {err}")
    rows = []
    try:
        for level in levels:
            keep = _mask(saved, level, criterion)
            weight.copy_(saved).masked_fill_(~keep, 0.0)
            try:
                value = data.evaluate(forward)
            except Exception as err:
                if forward is eager:
                    raise
                problems.append(f"{layer}: {type(err).__name__}: {err}")
                forward = eager
                value = data.evaluate(forward)
            rows.append(SensitivityRow(layer, level, 1.0 - int(keep.sum()) / keep.numel(), value))
            if progress is not None:
                progress(layer, level, value)
    finally:
        weight.copy_(saved)
    return rows


# --------------------------------------------------------------------------------------------------
# Figure 5


def plot(result: SensitivityResult, path: str | Path, *, title: str | None = None) -> None:
    """Draw the paper's Figure 5: the metric against the share of each layer's weights pruned away.

    One curve per layer; convolutions (weights of more than two dimensions) and fully connected
    layers in two panels (one panel if the model has only one kind). The baseline is a dashed line.
    Needs matplotlib (``pip install matplotlib``); the format follows the suffix of ``path`` (PNG).

    Raises:
        ImportError: If matplotlib is not installed.
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting the sensitivity needs matplotlib: `pip install matplotlib`.") from err

    groups = {"conv": [], "fc": []}
    for layer in result.layers:
        shape = result.shapes.get(layer, [])
        groups["conv" if len(shape) > 2 else "fc"].append(layer)
    panels = [(kind, names) for kind, names in groups.items() if names] or [("fc", [])]
    fig = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    percent = result.metric_name.lower() in ("accuracy", "acc", "top1", "top5") and result.higher_is_better
    scale = 100.0 if percent else 1.0
    markers = "os^Dv<>pPX*h"
    for ax, (kind, names) in zip(axes, panels, strict=True):
        for k, layer in enumerate(names):
            curve = result.curve(layer)
            shape = result.shapes.get(layer)
            label = layer if shape is None else f"{layer} ({math.prod(shape):,})"
            ax.plot(
                [0.0] + [100 * r.pruned_share for r in curve],
                [scale * result.baseline] + [scale * r.metric for r in curve],
                marker=markers[k % len(markers)],
                markersize=4,
                linewidth=1.5,
                label=label,
            )
        if not math.isnan(result.baseline):
            ax.axhline(scale * result.baseline, color="0.5", linestyle="--", linewidth=1, label="unpruned")
        ax.set_title("convolutional layers" if kind == "conv" else "fully connected layers")
        ax.set_xlabel("parameters pruned away (% of the layer)")
        ax.set_xlim(-1, 101)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="lower left")
    axes[0].set_ylabel(f"{result.metric_name} (%)" if percent else result.metric_name)
    rule = "threshold = quality x std(W)" if result.criterion == "std" else "smallest weights pruned"
    fig.suptitle(title or f"Sensitivity: one layer pruned at a time, no retraining ({rule})", fontsize=11)
    fig.savefig(str(path), dpi=130)
