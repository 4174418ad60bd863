"""The result of a sensitivity sweep: its rows, the levels they suggest, and its files (JSON, CSV, quality)."""

from __future__ import annotations

import csv
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from lightning_prune.core.criteria import registered_criteria
from lightning_prune.core.sensitivity.figure import plot
from lightning_prune.core.sensitivity.quality import criterion_path, criterion_yaml, quality_suffix, write_quality_file

__all__ = ["SensitivityResult", "SensitivityRow", "merge_results"]


class SensitivityRow(NamedTuple):
    """One evaluation: ``layer`` pruned alone at ``level``.

    Attributes:
        layer: Module name (``"fc1"``), as a level mapping takes it.
        level: The criterion's level: the quality (``"std"``), the share pruned (``"fraction"``), ...
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
        criterion: The criterion's registered name: ``"std"`` (levels are qualities: threshold
            ``level * std(W)``), ``"fraction"``, or your own.
        metric_name: Name of the metric (``"accuracy"``).
        higher_is_better: Whether a larger metric is better (accuracy) or worse (a loss).
        shapes: Weight shape of every layer swept, in module order; layers whose weight has more than
            two dimensions are drawn as convolutions.
        level_name: What the criterion calls its level (``"quality"``, ``"amount"``); ``None``: the
            registered criterion's.

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
    level_name: str | None = None

    def __post_init__(self) -> None:
        if self.level_name is None:
            known = registered_criteria().get(self.criterion)
            self.level_name = known.level_name if known is not None else "level"

    @property
    def level_help(self) -> str:
        """What a level means, from the registered criterion (``"threshold = quality x std(W)"``)."""
        known = registered_criteria().get(self.criterion)
        return known.level_help if known is not None else f"level = {self.level_name}"

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
        """The levels :meth:`choose` suggests, with the criterion they are for: what a levels file holds.

        Example::

            >>> SensitivityResult(0.9, [SensitivityRow("fc1", 1.5, 0.87, 0.9)]).quality_config(0.01)
            {'criterion': 'std', 'quality': {'fc1': 1.5}}
        """
        return {"criterion": self.criterion, str(self.level_name): self.choose(tolerance, relative=relative)}

    def quality_yaml(self, tolerance: float, relative: bool = False) -> str:
        """The levels of :meth:`choose` as the callback's ``criterion`` in YAML, to paste under its ``init_args``.

        A comment line says how they were chosen. Long mappings are written one layer per line.

        Example::

            >>> rows = [SensitivityRow("conv1", 0.5, 0.38, 0.99), SensitivityRow("fc1", 1.5, 0.87, 0.985)]
            >>> print(SensitivityResult(0.99, rows).quality_yaml(0.01), end="")
            # sensitivity: largest quality per layer with accuracy drop <= 0.01 (baseline 0.99)
            criterion:
              class_path: lightning_prune.core.criteria.Std
              init_args:
                quality: {conv1: 0.5, fc1: 1.5}
        """
        levels = {str(self.level_name): self.choose(tolerance, relative=relative)}
        return criterion_yaml(criterion_path(self.criterion), levels, self._comment(tolerance, relative))

    def write_quality(self, path: str | Path, tolerance: float, relative: bool = False) -> dict[str, Any]:
        """Write :meth:`quality_config` to ``path``: YAML for ``.yaml``/``.yml``, JSON for ``.json``.

        Returns:
            The mapping written.

        Raises:
            ValueError: On another suffix (naming it and the accepted ones), or a bad ``tolerance``.
        """
        quality_suffix(Path(path), "write")
        config = self.quality_config(tolerance, relative=relative)
        write_quality_file(path, config, self._comment(tolerance, relative))
        return config

    def _comment(self, tolerance: float, relative: bool) -> str:
        how = f"{100 * tolerance:g}% of the baseline" if relative else f"{tolerance:g}"
        return (
            f"sensitivity: largest {self.level_name} per layer with {self.metric_name} "
            f"{'drop' if self.higher_is_better else 'rise'} <= {how} (baseline {self.baseline:.6g})"
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values (what :meth:`to_json` writes)."""
        return {
            "criterion": self.criterion,
            "level_name": self.level_name,
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
            level_name=None if data.get("level_name") is None else str(data["level_name"]),
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
            sensitivity, criterion 'std' (threshold = quality x std(W)), baseline accuracy 0.9900
            layer  weights                 1
            -----  -------  --------  ------
            fc1     400000  pruned     68.0%
                            accuracy  0.9850
        """
        baseline = f"baseline {self.metric_name} {self.baseline:.4f}"
        title = f"sensitivity, criterion {self.criterion!r} ({self.level_help}), {baseline}"
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


def _cell(by_level: Mapping[float, SensitivityRow], level: float, what: str) -> str:
    row = by_level.get(level)
    if row is None:
        return "-"
    return f"{100 * row.pruned_share:.1f}%" if what == "pruned" else f"{row.metric:.4f}"


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
