"""Sensitivity analysis of a LightningModule on its validation data (Han et al. 2015, Figure 5).

:func:`analyze` takes the validation batches of a datamodule (or given dataloaders), prunes each layer
alone at increasing levels with :func:`lightning_prune.core.sensitivity.sweep`, and returns the
:class:`~lightning_prune.core.sensitivity.SensitivityResult`: its table, the per-layer ``quality``
levels for the callback's criterion (``result.quality_yaml(0.005)``) and the
figure (``result.plot("sensitivity.png")``). Under DDP the layers are shared out among the processes
and every process returns the whole result.

Example::

    from lightning_prune.sensitivity import analyze

    result = analyze(model, datamodule=MNISTDataModule(), levels=[0.5, 1.0, 1.5, 2.0])
    print(result.table())
    result.write_quality("quality.yaml", tolerance=0.005)  # accuracy may drop by half a point per layer
    result.plot("sensitivity.png")
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info

from lightning_prune.core.criteria import Criterion
from lightning_prune.core.selection import select_layers
from lightning_prune.core.sensitivity import (
    DEFAULT_CACHE_BYTES,
    SensitivityResult,
    SensitivityRow,
    accuracy,
    load_quality,
    merge_results,
    plot,
    sweep,
    sweep_criterion,
    sweep_levels,
)
from lightning_prune.core.settings import Sensitivity

__all__ = [
    "SensitivityResult",
    "SensitivityRow",
    "accuracy",
    "analyze",
    "analyze_before_pruning",
    "default_batch_to_xy",
    "distributed_shard",
    "load_quality",
    "merge_results",
    "plot",
    "sweep",
    "validation_batches",
]


def default_batch_to_xy(batch: Any) -> tuple[Any, Any]:
    """``(x, y)`` of a batch that is a tuple or list ``(x, y, ...)``.

    Raises:
        TypeError: For any other batch, naming its type; pass ``batch_to_xy`` to :func:`analyze` then.

    Example::

        >>> default_batch_to_xy((1, 2, "extra"))
        (1, 2)
    """
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise TypeError(
        f"A validation batch is a {type(batch).__name__}, not an (inputs, targets, ...) tuple or list; pass "
        f"`batch_to_xy`, a function returning (inputs, targets) of a batch (e.g. lambda b: (b['image'], b['label']))."
    )


def _loaders(dataloaders: Any) -> list[Iterable[Any]]:
    if isinstance(dataloaders, (list, tuple)):
        return list(dataloaders)
    if isinstance(dataloaders, Mapping):
        return list(dataloaders.values())
    return [dataloaders]


def validation_batches(
    model: pl.LightningModule | None = None,
    datamodule: pl.LightningDataModule | None = None,
    dataloaders: Any = None,
) -> list[Iterable[Any]]:
    """The validation dataloaders :func:`analyze` reads.

    ``dataloaders`` (one loader, or a list or dict of them) when given; else the datamodule's
    ``val_dataloader()`` after ``prepare_data()`` and ``setup("validate")`` (and ``setup("fit")`` if
    the datamodule only loads its validation set for fitting); else the model's own
    ``val_dataloader()``.

    Raises:
        ValueError: If both or neither source is given and the model has no validation data.
    """
    if dataloaders is not None and datamodule is not None:
        raise ValueError("Pass either `datamodule` or `dataloaders` to the sensitivity analysis, not both.")
    if dataloaders is not None:
        return _loaders(dataloaders)
    if datamodule is not None:
        datamodule.prepare_data()
        datamodule.setup("validate")
        try:
            loaders = datamodule.val_dataloader()
        except Exception as first:
            datamodule.setup("fit")
            try:
                loaders = datamodule.val_dataloader()
            except Exception as err:
                raise ValueError(
                    f"{type(datamodule).__name__}.val_dataloader() failed after setup('validate') ({first!r}) and "
                    f"setup('fit') ({err!r}); the sensitivity analysis needs validation batches."
                ) from err
        return _loaders(loaders)
    if model is not None:
        try:
            return _loaders(model.val_dataloader())
        except Exception as err:
            raise ValueError(
                f"No validation data: pass `datamodule` (its val_dataloader() is used) or `dataloaders` to the "
                f"sensitivity analysis; {type(model).__name__}.val_dataloader() gave {type(err).__name__}."
            ) from err
    raise ValueError("No validation data: pass `datamodule` or `dataloaders` to the sensitivity analysis.")


def distributed_shard() -> tuple[int, int]:
    """``(rank, world_size)`` when torch.distributed runs with more than one process, else ``(0, 1)``.

    Example::

        >>> distributed_shard()
        (0, 1)
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pairs(loaders: list[Iterable[Any]], batch_to_xy: Callable[[Any], tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
    for loader in loaders:
        for batch in loader:
            yield tuple(batch_to_xy(batch))


def analyze(
    model: pl.LightningModule,
    datamodule: pl.LightningDataModule | None = None,
    dataloaders: Any = None,
    levels: Sequence[float] | None = None,
    layers: Sequence[str] | None = None,
    criterion: str | Criterion = "std",
    metric: Callable[[Any, Any], Any] | None = None,
    batch_to_xy: Callable[[Any], tuple[Any, Any]] | None = None,
    progress: bool = True,
    device: torch.device | str | None = None,
    higher_is_better: bool = True,
    cache_bytes: int | None = DEFAULT_CACHE_BYTES,
) -> SensitivityResult:
    """Prune each layer alone at increasing levels and measure the validation metric, without retraining.

    The model is evaluated in eval mode (BatchNorm uses its running statistics, dropout is off) and
    left exactly as it was: weights, buffers, every module's train/eval mode, its device. Every
    process of a DDP run (torch.distributed initialized with more than one process) takes every
    ``world_size``-th layer (rank ``r``: layers ``r, r + W, ...``) over the full validation data, and
    the rows are gathered, so every process returns the same, whole result and nothing is evaluated
    twice. The validation batches are read once and kept in memory.

    Args:
        model: The trained network; called as ``model(inputs)``.
        datamodule: Source of the validation batches (``val_dataloader()``, see :func:`validation_batches`).
        dataloaders: Validation dataloaders instead: one, or a list or dict of them (all batches are used).
        levels: Increasing levels; ``None``: the criterion's ``sweep_levels`` (``"std"``: qualities 0.25..2.5).
        layers: Glob patterns over module or parameter names, as for the callback; ``None``: every
            multiply-accumulate weight.
        criterion: The criterion whose levels are swept (an object, or a name): ``"std"`` (levels are Han's
            quality, threshold ``level * std(W)``), ``"fraction"`` (shares pruned), or your own.
        metric: ``metric(outputs, targets)``, the batch mean; ``None``: accuracy (argmax over dimension 1).
        batch_to_xy: Turns a batch into ``(inputs, targets)``; ``None``: the first two items of a tuple.
        progress: Show a progress bar over layers x levels (on rank 0).
        device: Where to evaluate; ``None``: where the model is.
        higher_is_better: ``False`` for a metric like a loss.
        cache_bytes: Memory for the activations kept per layer (see :func:`~lightning_prune.core.sensitivity.sweep`).

    Returns:
        The :class:`SensitivityResult` (baseline and one row per layer and level).

    Raises:
        ValueError: On bad levels, criterion or layers (before any evaluation), or no validation data.
    """
    # Over 60 lines only by its docstring: the body is short.
    rule = sweep_criterion(criterion)
    levels = sweep_levels(rule, levels)
    order = select_layers(model, layers)
    rank, world = distributed_shard()
    loaders = validation_batches(model, datamodule, dataloaders)
    pairs = _pairs(loaders, batch_to_xy or default_batch_to_xy)

    from tqdm.auto import tqdm

    mine = order[rank::world]
    with tqdm(total=len(mine) * len(levels), desc="sensitivity", unit="eval", disable=not progress or rank != 0) as bar:

        def step(layer: str, level: float, value: float) -> None:
            bar.set_postfix_str(f"{layer} @ {level:g}: {value:.4f}", refresh=False)
            bar.update(1)

        result = sweep(
            model,
            pairs,
            levels,
            layers=layers,
            criterion=rule,
            metric=metric or accuracy,
            higher_is_better=higher_is_better,
            device=device,
            progress=step,
            cache_bytes=cache_bytes,
            shard=(rank, world),
        )
    if world > 1:
        parts: list[Any] = [None] * world
        torch.distributed.all_gather_object(parts, result)
        result = merge_results(parts, order=order)
    return result


def analyze_before_pruning(
    trainer: pl.Trainer,
    model: pl.LightningModule,
    criterion: Criterion,
    layers: Sequence[str],
    settings: Sensitivity,
    verbose: bool,
) -> SensitivityResult:
    """The callback's sweep on the dense model, on the fit's validation data, printed when ``verbose``.

    Raises:
        ValueError: If the fit has no validation data.
    """
    datamodule = trainer.datamodule  # type: ignore[attr-defined]
    loaders = datamodule.val_dataloader() if datamodule is not None else trainer.val_dataloaders
    if not loaders:
        raise ValueError("`sensitivity` needs validation data (a val_dataloader) to measure on.")
    progress = verbose and trainer.is_global_zero
    result = analyze(model, dataloaders=loaders, levels=settings.levels, layers=layers, criterion=criterion,
                     progress=progress)  # fmt: skip
    if verbose:
        rank_zero_info(
            f"lightning-prune: sensitivity (accuracy without retraining, each layer pruned alone)\n"
            f"{result.table()}\n{result.quality_yaml(settings.tolerance, settings.relative)}"
        )
    return result
