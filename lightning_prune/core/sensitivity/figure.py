"""The paper's Figure 5: the metric of a sweep against the share of each layer's weights pruned away."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lightning_prune.core.sensitivity.result import SensitivityResult

__all__ = ["plot"]


def plot(result: SensitivityResult, path: str | Path, *, title: str | None = None) -> None:
    """Draw the paper's Figure 5: the metric against the share of each layer's weights pruned away.

    One curve per layer; convolutions (weights of more than two dimensions) and fully connected
    layers in two panels (one panel if the model has only one kind). The baseline is a dashed line.
    Needs matplotlib (``pip install matplotlib``); the format follows the suffix of ``path`` (PNG).

    Raises:
        ImportError: If matplotlib is not installed.

    Example::

        >>> import tempfile, os
        >>> from lightning_prune.core.sensitivity import SensitivityResult, SensitivityRow
        >>> rows = [SensitivityRow("fc1", q, s, m) for q, s, m in [(0.5, 0.38, 0.99), (1.5, 0.87, 0.9)]]
        >>> path = os.path.join(tempfile.mkdtemp(), "figure5.png")
        >>> plot(SensitivityResult(0.99, rows, shapes={"fc1": [500, 800]}), path)  # doctest: +SKIP
    """
    try:
        from matplotlib.figure import Figure
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("Plotting the sensitivity needs matplotlib: `pip install matplotlib`.") from err

    groups: dict[str, list[str]] = {"conv": [], "fc": []}
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
            recorded = result.shapes.get(layer)
            label = layer if recorded is None else f"{layer} ({math.prod(recorded):,})"
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
    fig.suptitle(title or f"Sensitivity: one layer pruned at a time, no retraining ({result.level_help})", fontsize=11)
    fig.savefig(str(path), dpi=130)
