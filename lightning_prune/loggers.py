"""The prune tables and figures, sent to the trainer's loggers (the ``prune/...`` scalars go by ``pl_module.log``).

:class:`LoggerOutput` writes, on rank zero and only at prunes and round ends, to each logger that can take it:

- the table of each prune (one row per pruned parameter): Markdown text ``prune/table`` in TensorBoard, the
  table ``prune/table`` in W&B, the table artifact ``prune_rounds.json`` (MLflow's ``log_table`` needs pandas)
  and the Markdown artifact ``prune/table_round<r>.md`` in MLflow, and the file ``prune_rounds.csv`` in a
  ``CSVLogger``'s ``log_dir``;
- figures (matplotlib, drawn off-screen): ``prune/weights/<parameter>/before`` (the histogram of the weights
  just before the first prune), ``prune/weights/<parameter>/after`` (the surviving weights at each round's
  end: Figure 4 of Han et al. 2015) and ``prune/remaining_share`` (a bar chart of the share each parameter
  keeps, at each prune). TensorBoard ``add_figure``, MLflow ``log_figure`` (``<tag>.png``, ``after`` and
  ``remaining_share`` with ``_round<r>``), W&B ``log_image``.

Other loggers get the scalars only. The optional packages (tensorboard, mlflow, wandb, matplotlib) are
imported only when a logger of theirs is in use.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from lightning_prune.core.pruner import Pruner
from lightning_prune.core.report import LayerStats
from lightning_prune.core.settings import Logging

if TYPE_CHECKING:
    import PIL.Image
    from matplotlib.figure import Figure

__all__ = [
    "BINS",
    "COLUMNS",
    "ROUND_TABLE_FILE",
    "LoggerOutput",
    "histogram_figure",
    "markdown_table",
    "remaining_share_figure",
    "round_rows",
    "weight_histogram",
]

ROUND_TABLE_FILE = "prune_rounds.csv"
"""The round table's file in a ``CSVLogger``'s ``log_dir``: one row per pruned parameter per prune."""

COLUMNS = ("round", "epoch", "step", "name", "shape", "weights", "remaining", "remaining_pct", "threshold", "rule")
"""The round table's columns."""

BINS = 100
"""Bins of the weight histograms."""

_FIGURE_LOGGERS = (TensorBoardLogger, MLFlowLogger, WandbLogger)
_TABLE_LOGGERS = (*_FIGURE_LOGGERS, CSVLogger)


def round_rows(stats: Sequence[LayerStats], round_: int, epoch: int, step: int) -> list[dict[str, Any]]:
    """The rows of one prune in the round table: :data:`COLUMNS`, one row per parameter.

    Example::

        >>> row = round_rows([LayerStats("fc.weight", (10, 10), 100, 8, 0.05, "1.00 x std")], 1, 4, 40)[0]
        >>> row["name"], row["shape"], row["remaining"], row["remaining_pct"], row["threshold"]
        ('fc.weight', '10x10', 8, 8.0, 0.05)
    """
    return [
        {
            "round": round_,
            "epoch": epoch,
            "step": step,
            "name": s.name,
            "shape": "x".join(map(str, s.shape)),
            "weights": s.weights,
            "remaining": s.remaining,
            "remaining_pct": s.remaining_pct,
            "threshold": s.threshold,
            "rule": s.rule,
        }
        for s in stats
    ]


def markdown_table(stats: Sequence[LayerStats], title: str) -> str:
    """The per-parameter table as Markdown (TensorBoard's text dashboard renders it), with a total row.

    Example::

        >>> print(markdown_table([LayerStats("fc.weight", (10, 10), 100, 8, 0.05, "1.00 x std")], "round 1"))
        **round 1**
        <BLANKLINE>
        | layer | shape | weights | remaining | remaining % | threshold | rule |
        |---|---|--:|--:|--:|--:|---|
        | fc.weight | 10 x 10 | 100 | 8 | 8.00% | 0.05 | 1.00 x std |
        | **total** | | 100 | 8 | 8.00% | | 12.5x fewer |
    """
    lines = [
        f"**{title}**",
        "",
        "| layer | shape | weights | remaining | remaining % | threshold | rule |",
        "|---|---|--:|--:|--:|--:|---|",
    ]
    for s in stats:
        threshold = "-" if s.threshold is None else f"{s.threshold:.4g}"
        shape = " x ".join(map(str, s.shape))
        lines.append(
            f"| {s.name} | {shape} | {s.weights} | {s.remaining} | {s.remaining_pct:.2f}% | {threshold} | {s.rule} |"
        )
    total, left = sum(s.weights for s in stats), sum(s.remaining for s in stats)
    share = f"{100.0 * left / total if total else 0.0:.2f}%"
    ratio = f"{total / left:.1f}x fewer" if left else "all pruned" if total else ""
    lines.append(f"| **total** | | {total} | {left} | {share} | | {ratio} |")
    return "\n".join(lines)


class LoggerOutput:
    """Sends the table of each prune and the figures to the trainer's loggers, on rank zero.

    Nothing runs during training steps: each method runs once per prune or round end, and returns at
    once when no logger can take what it would make.

    Args:
        settings: What to send (:class:`~lightning_prune.core.settings.Logging`).

    Example::

        output = LoggerOutput(Logging(figures=False))
        output.log_prune(trainer, round_=1, epoch=4, stats=pruner.stats())  # the table, to every logger
    """

    def __init__(self, settings: Logging) -> None:
        self.settings = settings
        self._can_draw: bool | None = None
        self._can_tabulate: bool | None = None

    def log_prune(self, trainer: pl.Trainer, round_: int, epoch: int, stats: Sequence[LayerStats]) -> None:
        """The table of the prune of round ``round_`` (1-based), and the remaining-share chart."""
        step = trainer.global_step
        if self.settings.tables and trainer.is_global_zero:
            rows = round_rows(stats, round_, epoch, step)
            text = markdown_table(stats, f"round {round_}, start of epoch {epoch}")
            for logger in _of_kind(trainer, _TABLE_LOGGERS):
                _log_table(logger, rows, text, round_, step, mlflow_table=self._mlflow_table(logger))
        loggers = self._figure_loggers(trainer)
        if loggers:
            figure = remaining_share_figure(stats, f"weights left per parameter after round {round_}")
            for logger in loggers:
                _log_figure(logger, "prune/remaining_share", figure, step, f"_round{round_}")

    def log_weights(self, trainer: pl.Trainer, pruner: Pruner, when: Literal["before", "after"], round_: int) -> None:
        """Histograms of each pruned parameter: the dense weights ``"before"`` the first prune, or the survivors.

        ``"after"``: at the end of round ``round_`` (1-based), its weights retrained, the pruned zeros left out.
        Parameters sharded by FSDP are not drawn (rank zero holds only its rows).
        """
        loggers = self._figure_loggers(trainer)
        if not loggers or pruner.sharded:
            return
        suffix = "" if when == "before" else f"_round{round_}"
        for name, target in pruner.targets.items():
            histogram = weight_histogram(target.weight(pruner.model).detach(), survivors=when == "after")
            if histogram is None:
                continue
            label = "before pruning" if when == "before" else f"after pruning and retraining, round {round_}"
            figure = histogram_figure(*histogram, f"{name}\n{label}")
            for logger in loggers:
                _log_figure(logger, f"prune/weights/{name}/{when}", figure, trainer.global_step, suffix)

    def _mlflow_table(self, logger: Logger) -> bool:
        """Whether MLflow can take the table artifact: its ``log_table`` needs pandas (``mlflow-skinny`` has none)."""
        if not isinstance(logger, MLFlowLogger):
            return False
        if self._can_tabulate is None:
            self._can_tabulate = importlib.util.find_spec("pandas") is not None
            if not self._can_tabulate:
                rank_zero_info(
                    "lightning-prune: pandas is not installed, so MLflow gets each prune table as the Markdown "
                    "artifact prune/table_round<r>.md only, not the table artifact prune_rounds.json (pip install "
                    "pandas)."
                )
        return self._can_tabulate

    def _figure_loggers(self, trainer: pl.Trainer) -> list[Logger]:
        """The loggers that take figures, if figures are on, this is rank zero, and matplotlib is there."""
        if not self.settings.figures or not trainer.is_global_zero:
            return []
        loggers = _of_kind(trainer, _FIGURE_LOGGERS)
        if loggers and self._can_draw is None:
            self._can_draw = importlib.util.find_spec("matplotlib") is not None
            if not self._can_draw:
                rank_zero_info(
                    "lightning-prune: matplotlib is not installed, so no figures go to the loggers "
                    "(pip install matplotlib, or set `logging.figures: false`)."
                )
        return loggers if self._can_draw else []


def _of_kind(trainer: pl.Trainer, kinds: tuple[type[Logger], ...]) -> list[Logger]:
    return [logger for logger in trainer.loggers if isinstance(logger, kinds)]


def _log_table(
    logger: Logger, rows: list[dict[str, Any]], text: str, round_: int, step: int, *, mlflow_table: bool
) -> None:
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text("prune/table", text, global_step=step)
    elif isinstance(logger, MLFlowLogger):
        if mlflow_table:
            data = {column: [row[column] for row in rows] for column in COLUMNS}
            logger.experiment.log_table(logger.run_id, data=data, artifact_file="prune_rounds.json")
        logger.experiment.log_text(logger.run_id, text, f"prune/table_round{round_}.md")
    elif isinstance(logger, WandbLogger):
        cells = [[row[column] for column in COLUMNS] for row in rows]
        logger.log_table("prune/table", columns=list(COLUMNS), data=cells, step=step)
    elif isinstance(logger, CSVLogger):
        path = Path(logger.log_dir) / ROUND_TABLE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            if new:
                writer.writeheader()
            writer.writerows(rows)


def _log_figure(logger: Logger, tag: str, figure: Figure, step: int, suffix: str) -> None:
    """Send ``figure`` under ``tag``; MLflow keeps it as the artifact ``<tag><suffix>.png``."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_figure(tag, figure, global_step=step, close=False)
    elif isinstance(logger, MLFlowLogger):
        artifact = re.sub(r"[^\w./-]", "_", f"{tag}{suffix}.png")
        logger.experiment.log_figure(logger.run_id, figure, artifact)
    elif isinstance(logger, WandbLogger):
        logger.log_image(tag, [_image(figure)], step=step)


def weight_histogram(weight: Tensor, survivors: bool = False) -> tuple[Tensor, Tensor] | None:
    """``(counts, edges)`` of ``weight`` in :data:`BINS` bins symmetric around zero, on CPU.

    Args:
        weight: The tensor (on any device; binned there).
        survivors: Leave the exact zeros (the pruned weights) out.

    Returns:
        The counts and the ``BINS + 1`` edges, or ``None`` if no value is left.

    Example::

        >>> counts, edges = weight_histogram(torch.tensor([-1.0, 0.0, 0.5, 1.0]), survivors=True)
        >>> int(counts.sum()), edges[0].item(), edges[-1].item()
        (3, -1.0, 1.0)
    """
    values = weight.flatten().float()
    if survivors:
        values = values[values != 0]
    if values.numel() == 0:
        return None
    bound = float(values.abs().max()) or 1.0
    counts = torch.histc(values, bins=BINS, min=-bound, max=bound).cpu()
    return counts, torch.linspace(-bound, bound, BINS + 1)


def histogram_figure(counts: Tensor, edges: Tensor, title: str) -> Figure:
    """A histogram of weights from :func:`weight_histogram`, drawn off-screen (Agg)."""
    figure = _figure(6.0, 3.5)
    axes = figure.add_subplot()
    axes.stairs(counts.numpy(), edges.numpy(), fill=True)
    axes.set_title(f"{title} ({int(counts.sum()):,} weights)", fontsize=10)
    axes.set(xlabel="weight value", ylabel="count")
    figure.tight_layout()
    return figure


def remaining_share_figure(stats: Sequence[LayerStats], title: str) -> Figure:
    """A horizontal bar per parameter: the share of its weights left, in percent, drawn off-screen (Agg)."""
    figure = _figure(7.0, 1.2 + 0.3 * len(stats))
    axes = figure.add_subplot()
    names = [s.name for s in stats][::-1]
    shares = [s.remaining_pct for s in stats][::-1]
    bars = axes.barh(names, shares)
    axes.bar_label(bars, labels=[f"{p:.1f}%" for p in shares], padding=2)
    axes.set_title(title, fontsize=10)
    axes.set(xlabel="weights left (%)", xlim=(0, 110))
    figure.tight_layout()
    return figure


def _figure(width: float, height: float) -> Figure:
    """A matplotlib figure outside pyplot (no backend chosen, nothing global kept); it renders with Agg."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100)


def _image(figure: Figure) -> PIL.Image.Image:
    """The figure rendered as an RGB PIL image (what ``wandb.Image`` takes; Pillow comes with matplotlib)."""
    from PIL import Image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return Image.open(buffer).convert("RGB")
