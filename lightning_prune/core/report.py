"""Per-layer pruning report: the shape of Table 2 in Han et al. (2015)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["LayerStats", "format_table"]


@dataclass(frozen=True)
class LayerStats:
    """What one pruned parameter has left.

    Attributes:
        name: Qualified parameter name, e.g. ``"fc1.weight"``.
        shape: The parameter's shape.
        weights: Number of entries (connections) of the dense parameter.
        remaining: Entries still alive.
        threshold: Magnitude threshold of the last prune (``None`` if never pruned).
        rule: The rule of the last prune, e.g. ``"1.20 x std"`` or ``"90.0% of layer"``.
    """

    name: str
    shape: tuple[int, ...]
    weights: int
    remaining: int
    threshold: float | None = None
    rule: str = ""

    @property
    def remaining_pct(self) -> float:
        """Share of the connections still alive, in percent."""
        return 100.0 * self.remaining / self.weights if self.weights else 0.0

    def as_dict(self) -> dict[str, object]:
        """Plain values, for JSON and loggers."""
        return {**asdict(self), "shape": list(self.shape), "remaining_pct": self.remaining_pct}


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1_000_000 else f"{n / 1e3:.1f}K" if n >= 10_000 else str(n)


def format_table(stats: Sequence[LayerStats], title: str | None = None) -> str:
    """Render stats as an aligned text table with a total row and the compression rate.

    Example::

        >>> print(format_table([LayerStats("fc.weight", (10, 10), 100, 8, 0.05, "1.00 x std")]))
        layer      shape    weights  remaining  remaining %  threshold  rule
        ---------  -------  -------  ---------  -----------  ---------  -----------
        fc.weight  10 x 10      100          8        8.00%     0.0500  1.00 x std
        ---------  -------  -------  ---------  -----------  ---------  -----------
        total                   100          8        8.00%             12.5x fewer
    """
    total = sum(s.weights for s in stats)
    left = sum(s.remaining for s in stats)
    header = ("layer", "shape", "weights", "remaining", "remaining %", "threshold", "rule")
    rows = [
        (
            s.name,
            " x ".join(map(str, s.shape)),
            _count(s.weights),
            _count(s.remaining),
            f"{s.remaining_pct:.2f}%",
            "-" if s.threshold is None else f"{s.threshold:.4g}" if s.threshold < 1e-3 else f"{s.threshold:.4f}",
            s.rule,
        )
        for s in stats
    ]
    ratio = f"{total / left:.1f}x fewer" if left else "all pruned" if total else ""
    footer = ("total", "", _count(total), _count(left), f"{100.0 * left / total if total else 0.0:.2f}%", "", ratio)
    widths = [max(len(r[i]) for r in (header, *rows, footer)) for i in range(len(header))]
    right = {2, 3, 4, 5}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "  ".join("-" * w for w in widths)
    out = [title] if title else []
    out += [line(header), rule, *map(line, rows), rule, line(footer)]
    return "\n".join(x.rstrip() for x in out)
