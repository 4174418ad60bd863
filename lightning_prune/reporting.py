"""What the callback tells the user: the per-layer table at each prune, round summaries, logged metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_prune.core.native import fallback_reason
from lightning_prune.core.report import LayerStats, format_table
from lightning_prune.core.schedule import Round
from lightning_prune.core.structure import StructureReport

__all__ = ["log_progress", "log_prune", "prune_report", "round_summary", "shrink_summary"]


def prune_report(
    k: int, rounds: int, epoch: int, round_: Round, stats: Sequence[LayerStats], frozen: int, dropout: Any
) -> str:
    """The table of a prune (Table 2 of the paper) and the retraining settings in force.

    Args:
        k: The round's index.
        rounds: How many rounds there are.
        epoch: The epoch it prunes at.
        round_: The round as it runs.
        stats: The per-parameter stats after the prune.
        frozen: How many parameters are frozen for its retraining.
        dropout: The :class:`~lightning_prune.dropout.DropoutControl`, or ``None``.
    """
    where = f"round {k + 1}/{rounds}, start of epoch {epoch}"
    lines = [format_table(stats, title=f"lightning-prune: pruned ({where})")]
    retrain = [f"lr x{round_.lr_scale:g}"]
    if round_.weight_decay is not None:
        retrain.append(f"weight decay {round_.weight_decay:g}")
    if round_.l1:
        retrain.append(f"L1 {round_.l1:g}")
    if round_.train_only is not None:
        retrain.append(f"training only {round_.train_only} ({frozen} parameters frozen)")
    lines.append("retraining: " + ", ".join(retrain))
    if dropout is not None and dropout.adjuster.original:
        lines.extend(_dropout_line(dropout.adjuster))
    return "\n".join(lines)


def _dropout_line(adjuster: Any) -> list[str]:
    """``dropout (traced links, explicit for d1; none for d2): d1 0.5->0.3, d2 0.5->0.5``: rates of nonzero dropouts."""
    now = adjuster.current()
    rates = ", ".join(f"{n} {p:.3g}->{now[n]:.3g}" for n, p in adjuster.original.items() if p > 0)
    if not rates:
        return []
    where = f"{adjuster.source} links" + (", by call order" if adjuster.rule == "call order" else "")
    explicit = [n for n, s in adjuster.sources.items() if s == "explicit" and adjuster.original[n] > 0]
    if explicit:
        where += f", explicit for {', '.join(explicit)}"
    unlinked = [n for n, p in adjuster.original.items() if p > 0 and not adjuster.links.get(n)]
    if unlinked:
        where += f"; none for {', '.join(unlinked)}"
    return [f"dropout ({where}): {rates}"]


def round_summary(done: int, rounds: int, remaining_pct: float, metrics: Mapping[str, Any]) -> str:
    """One line at a round's end: how much remains, and the scalar metrics logged."""
    values = {k: float(v) for k, v in metrics.items() if not k.startswith("prune/") and v.numel() == 1}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())) or "no metrics logged"
    return (
        f"lightning-prune: end of round {done}/{rounds}: {remaining_pct:.2f}% of the selected weights remain; {shown}"
    )


def shrink_summary(report: StructureReport) -> str:
    """What removing dead units did: units removed per layer, parameters before and after, new shapes."""
    removed = ", ".join(f"{name} -{n}" for name, n in report.removed_units.items()) or "none"
    before, after = report.parameters_before, report.parameters_after
    return f"lightning-prune: removed dead units ({removed}); parameters {before} -> {after}\n{report}"


def log_prune(pl_module: pl.LightningModule, stats: Sequence[LayerStats]) -> None:
    """Log ``prune/remaining_pct/<parameter>``, ``prune/remaining/<parameter>`` and ``prune/threshold/<parameter>``.

    One of each per selected parameter; a parameter without a magnitude threshold (e.g. N:M) has no
    ``prune/threshold``. Counts are logged as floats (exact up to 2**24; the round table has them exact).
    """
    for s in stats:
        pl_module.log(f"prune/remaining_pct/{s.name}", s.remaining_pct, on_epoch=True, sync_dist=True)
        pl_module.log(f"prune/remaining/{s.name}", float(s.remaining), on_epoch=True, sync_dist=True)
        if s.threshold is not None:
            pl_module.log(f"prune/threshold/{s.name}", float(s.threshold), on_epoch=True, sync_dist=True)


def log_progress(pl_module: pl.LightningModule, sparsity: float, rounds_done: int) -> None:
    """Log ``prune/sparsity`` and ``prune/round``."""
    pl_module.log("prune/sparsity", sparsity, on_epoch=True, sync_dist=True)
    pl_module.log("prune/round", float(rounds_done), on_epoch=True, sync_dist=True)


def mask_kernel_notice(on_cpu: bool) -> str | None:
    """The line saying that masks on the CPU fall back to PyTorch's slower multiply, and why; ``None`` otherwise.

    Example::

        >>> mask_kernel_notice(on_cpu=False) is None
        True
    """
    reason = fallback_reason() if on_cpu else None
    if reason is None:
        return None
    return (
        f"lightning-prune: masks on the CPU use PyTorch's multiply, about 2-3x slower than the compiled kernel, "
        f"which is {reason} (docs: usage, 'The mask kernel')."
    )


def unpruned_notice(dense: Sequence[tuple[str, int, float]]) -> str | None:
    """The line naming large weight tensors left dense (:func:`~lightning_prune.core.selection.dense_tensors`).

    Example::

        >>> print(unpruned_notice([("emb.weight", 800, 0.5)]))
        lightning-prune: left dense (name them in `layers` to prune them): emb.weight (800 weights, 50.0% of the model)
    """
    if not dense:
        return None
    listed = ", ".join(f"{name} ({count:,} weights, {100 * share:.1f}% of the model)" for name, count, share in dense)
    return f"lightning-prune: left dense (name them in `layers` to prune them): {listed}"
