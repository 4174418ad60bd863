"""Prune-retrain rounds as ``Trainer.fit`` cycles: a fresh trainer, optimizer and LR schedule each round.

:func:`fit_rounds` runs an optional dense fit, then one fit per round of a
:class:`~lightning_prune.PruneRetrainCallback`. Each fit prunes at its first epoch and retrains for
the round's ``epochs``, with the optimizers and schedulers the module's ``configure_optimizers``
builds afresh (so each round's learning-rate schedule starts over, at the round's ``lr_scale``). A
checkpoint closes every phase (``<checkpoint_dir>/dense.ckpt``, ``round-1.ckpt``, ...), and each
phase keeps a ``last.ckpt`` of its own while it runs: a run stopped anywhere resumes where it was,
after the last finished round or inside the interrupted one, with masks, dropout rates and the round
counter intact.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_prune.callback import PruneRetrainCallback
from lightning_prune.checkpoint import read_checkpoint


@dataclass
class PhaseResult:
    """What one fit of :func:`fit_rounds` ended with.

    Attributes:
        name: ``"dense"`` or ``"round-<n>"``.
        epochs: Epochs the phase trains.
        checkpoint: The checkpoint written at its end.
        remaining: Connections alive in the selected layers.
        total: Connections of the selected layers when dense.
        metrics: Scalar ``trainer.callback_metrics`` at its end (empty if the phase was skipped on resume).
        skipped: Whether it had finished before and was skipped on resume (or after the guard stopped).
        rejected: Whether the accuracy guard rolled it back (``remaining`` is then after the rollback).
    """

    name: str
    epochs: int
    checkpoint: Path
    remaining: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    rejected: bool = False

    @property
    def compression(self) -> float:
        """``total / remaining``."""
        return self.total / self.remaining if self.remaining else float("inf")


class PhaseCheckpoint(ModelCheckpoint):
    """The ``last.ckpt`` of a phase of :func:`fit_rounds`.

    A class of its own, so that its checkpoint state key differs from the trainer's default ``ModelCheckpoint``.
    """


def _find_callback(callbacks: list[Any], callback: PruneRetrainCallback | None) -> PruneRetrainCallback:
    found = [c for c in callbacks if isinstance(c, PruneRetrainCallback)]
    if callback is not None:
        if found:
            raise ValueError("Pass the PruneRetrainCallback either as `callback` or in trainer `callbacks`, not both.")
        return callback
    if len(found) != 1:
        raise ValueError(
            f"fit_rounds needs exactly one PruneRetrainCallback (as `callback` or in `trainer_kwargs['callbacks']`); "
            f"found {len(found)}."
        )
    callbacks.remove(found[0])
    return found[0]


def _load_phase(path: Path, model: pl.LightningModule, callback: PruneRetrainCallback) -> None:
    checkpoint = read_checkpoint(path)
    model.load_state_dict(checkpoint["state_dict"])
    if callback.masks_from_checkpoint(checkpoint, model, str(path)) is None:
        raise ValueError(f"{path} holds no state of {callback.state_key}; was it written by fit_rounds?")


def _validate(
    make_trainer: Callable[[int, list[Callback]], pl.Trainer], model: pl.LightningModule, fit_kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The metrics of one validation run: the guard's dense baseline when no dense phase ran here."""
    trainer = make_trainer(1, [])
    kwargs = {"datamodule": fit_kwargs["datamodule"]} if "datamodule" in fit_kwargs else {}
    if "val_dataloaders" in fit_kwargs:
        kwargs["dataloaders"] = fit_kwargs["val_dataloaders"]
    trainer.validate(model, verbose=False, **kwargs)
    return dict(trainer.callback_metrics)


def _run_phase(
    make_trainer: Callable[[int, list[Callback]], pl.Trainer],
    model: pl.LightningModule,
    callback: PruneRetrainCallback,
    directory: Path,
    name: str,
    index: int | None,
    epochs: int,
    resume: bool,
    fit_kwargs: dict[str, Any],
) -> tuple[pl.Trainer, dict[str, float]]:
    last = directory / name / "last.ckpt"
    saver = PhaseCheckpoint(dirpath=directory / name, save_last=True, save_top_k=0)
    trainer = make_trainer(epochs, [saver])
    if callback not in trainer.callbacks:
        raise ValueError("The trainer of a phase must hold the PruneRetrainCallback among its callbacks.")
    callback.fit_round(index, callback.round_scales.get(index, 1.0) if index is not None else 1.0)
    rank_zero_info(f"lightning-prune: {name} ({epochs} epochs)")
    trainer.fit(model, ckpt_path=last if resume and last.exists() else None, **fit_kwargs)
    trainer.strategy.barrier("fit_rounds")
    if callback.pruner is None or callback.pruner.model is not model:
        # The fit ran in spawned processes (ddp_spawn): take its outcome from the phase's checkpoint.
        _load_phase(last, model, callback)
    return trainer, {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}


def _roll_back(model: pl.LightningModule, callback: PruneRetrainCallback, snapshot: tuple[dict, dict]) -> None:
    decisions, scales = list(callback.decisions), dict(callback.round_scales)
    model.load_state_dict(snapshot[0])
    callback.restore(model, snapshot[1])
    callback.decisions, callback.round_scales = decisions, scales


def _result(
    name: str, epochs: int, end: Path, callback: PruneRetrainCallback, metrics: dict[str, float]
) -> PhaseResult:
    assert callback.pruner is not None
    stats = callback.pruner.stats()
    return PhaseResult(name, epochs, end, sum(s.remaining for s in stats), sum(s.weights for s in stats), metrics)


def fit_rounds(
    model: pl.LightningModule,
    callback: PruneRetrainCallback | None = None,
    *,
    trainer_kwargs: Mapping[str, Any] | None = None,
    trainer_factory: Callable[[int, list[Callback]], pl.Trainer] | None = None,
    datamodule: pl.LightningDataModule | None = None,
    train_dataloaders: Any = None,
    val_dataloaders: Any = None,
    dense_epochs: int = 0,
    checkpoint_dir: str | Path = "prune_rounds",
    resume: bool = True,
) -> list[PhaseResult]:
    """Run dense training (optional) and each prune-retrain round as its own ``Trainer.fit``.

    Args:
        model: The LightningModule; trained in place.
        callback: The callback whose ``rounds`` (each with ``epochs``) are run. ``None``: the one in
            ``trainer_kwargs["callbacks"]``.
        trainer_kwargs: Keyword arguments of every phase's ``Trainer`` (all but ``max_epochs``, which
            each phase sets). Callbacks listed here are shared by all phases.
        trainer_factory: Instead of ``trainer_kwargs``: ``factory(max_epochs, extra_callbacks)`` returns
            the trainer of a phase, with ``callback`` and ``extra_callbacks`` among its callbacks
            (:meth:`lightning_prune.PruneTrainer.rounds` uses this).
        datamodule: Passed to ``fit``; or give ``train_dataloaders`` / ``val_dataloaders``.
        train_dataloaders: Passed to ``fit``.
        val_dataloaders: Passed to ``fit``.
        dense_epochs: Epochs of dense training before the first round (0: the model comes trained).
        checkpoint_dir: Where phase checkpoints go.
        resume: Continue from the checkpoints in ``checkpoint_dir``: finished phases are skipped, an
            interrupted one resumes from its ``last.ckpt``. ``False`` starts over (and overwrites).

    Returns:
        One :class:`PhaseResult` per phase.

    Raises:
        ValueError: On a round without ``epochs``, ``max_epochs`` in ``trainer_kwargs``, a negative
            ``dense_epochs``, or no (or several) callbacks.

    Example::

        from lightning_prune import PruneRetrainCallback, fit_rounds

        prune = PruneRetrainCallback(
            retrain_lr_scale=0.1,
            rounds=[{"quality": 0.8, "epochs": 3}, {"quality": 1.2, "epochs": 3}, {"quality": 1.5, "epochs": 5}],
        )
        results = fit_rounds(model, prune, datamodule=dm, dense_epochs=10, trainer_kwargs={"accelerator": "cpu"})
        print(results[-1].compression)
    """
    if isinstance(dense_epochs, bool) or not isinstance(dense_epochs, int) or dense_epochs < 0:
        raise ValueError(f"`dense_epochs` must be an integer >= 0, got {dense_epochs!r}.")
    if trainer_factory is not None:
        if trainer_kwargs is not None or callback is None:
            raise ValueError("With `trainer_factory`, pass `callback` and no `trainer_kwargs`.")
        make_trainer = trainer_factory
    else:
        kwargs = dict(trainer_kwargs or {})
        for key in ("max_epochs", "min_epochs", "max_steps"):
            if kwargs.get(key) not in (None, -1):
                raise ValueError(
                    f"fit_rounds sets the length of each phase (dense_epochs, rounds' epochs); drop `{key}`."
                )
            kwargs.pop(key, None)
        shared = list(kwargs.pop("callbacks", None) or [])
        callback = _find_callback(shared, callback)

        def make_trainer(max_epochs: int, extra: list[Callback]) -> pl.Trainer:
            return pl.Trainer(**kwargs, max_epochs=max_epochs, callbacks=[*shared, callback, *extra])

    missing = [i for i, r in enumerate(callback.rounds) if r.epochs is None]
    if missing:
        raise ValueError(f"rounds[{missing[0]}] has no `epochs`; each round run as its own fit needs them.")
    phases: list[tuple[str, int | None, int]] = [("dense", None, dense_epochs)] if dense_epochs else []
    phases += [(f"round-{k + 1}", k, r.epochs or 0) for k, r in enumerate(callback.rounds)]
    directory = Path(checkpoint_dir)

    finished = -1
    if resume:
        finished = max(
            (i for i, (name, _, _) in enumerate(phases) if (directory / f"{name}.ckpt").exists()), default=-1
        )
        if finished >= 0:
            _load_phase(directory / f"{phases[finished][0]}.ckpt", model, callback)

    fit_kwargs: dict[str, Any] = {"datamodule": datamodule} if datamodule is not None else {}
    if train_dataloaders is not None:
        fit_kwargs["train_dataloaders"] = train_dataloaders
    if val_dataloaders is not None:
        fit_kwargs["val_dataloaders"] = val_dataloaders
    guard = callback.guard
    stopped_file = directory / "stopped.txt"
    if not resume:
        stopped_file.unlink(missing_ok=True)
    halted = stopped_file.exists()
    callback.stopped = callback.stopped or halted
    results: list[PhaseResult] = []
    for i, (name, index, epochs) in enumerate(phases):
        end = directory / f"{name}.ckpt"
        if i <= finished:
            rank_zero_info(f"lightning-prune: {name} finished before ({end}); skipped.")
            results.append(PhaseResult(name, epochs, end, 0, 0, skipped=True))
            continue
        if halted:
            rank_zero_info(f"lightning-prune: {name} skipped: {stopped_file.read_text().strip()}")
            results.append(PhaseResult(name, epochs, end, 0, 0, skipped=True))
            continue
        snapshot = None
        if guard is not None and index is not None:
            if guard.baseline is None:
                guard.baseline = guard.value(_validate(make_trainer, model, fit_kwargs))
            callback.bind(model)
            weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            snapshot = (weights, copy.deepcopy(callback.state_dict()))
        while True:
            trainer, metrics = _run_phase(
                make_trainer, model, callback, directory, name, index, epochs, resume, fit_kwargs
            )
            if guard is not None and index is None:
                guard.baseline = guard.value(metrics)
            reason = guard.verdict(metrics) if guard is not None and index is not None else None
            if reason is None:
                if snapshot is not None and index is not None:
                    callback.record_decision("kept", index, f"{guard.monitor} within tolerance")
                if trainer.is_global_zero:
                    shutil.copyfile(directory / name / "last.ckpt", end)
                trainer.strategy.barrier("fit_rounds")
                results.append(_result(name, epochs, end, callback, metrics))
                break
            assert snapshot is not None and index is not None and guard is not None
            _roll_back(model, callback, snapshot)
            if trainer.is_global_zero:
                shutil.rmtree(directory / name, ignore_errors=True)
            tries = sum(1 for d in callback.decisions if d["round"] == index and d["decision"] == "rolled back")
            if guard.action == "retry" and tries < guard.retries:
                callback.record_decision("rolled back", index, reason + "; retrying it gentler")
                callback.round_scales[index] = callback.round_scales.get(index, 1.0) * guard.retry_scale
                trainer.strategy.barrier("fit_rounds")
                continue
            callback.record_decision("rolled back", index, reason + "; the schedule stops")
            callback.stopped = True
            if trainer.is_global_zero:
                stopped_file.write_text(f"the accuracy guard stopped the schedule at {name}: {reason}\n")
            trainer.strategy.barrier("fit_rounds")
            results.append(dataclasses.replace(_result(name, epochs, end, callback, metrics), rejected=True))
            halted = True
            break
    for result in results:
        if result.skipped:
            continue
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()) if not k.startswith("prune/"))
        rank_zero_info(
            f"lightning-prune: {result.name}: {result.remaining}/{result.total} weights "
            f"({result.compression:.1f}x fewer); {shown}"
        )
    return results
