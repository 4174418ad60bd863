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

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from lightning_prune.callback import PruneRetrainCallback
from lightning_prune.checkpoint import read_checkpoint

__all__ = ["PhaseCheckpoint", "PhaseResult", "fit_rounds"]

MakeTrainer = Callable[[int, list[Callback]], pl.Trainer]


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


def _trainer_maker(
    callback: PruneRetrainCallback | None,
    trainer_kwargs: Mapping[str, Any] | None,
    trainer_factory: MakeTrainer | None,
) -> tuple[MakeTrainer, PruneRetrainCallback]:
    """How each phase's trainer is built, and the callback its phases run."""
    if trainer_factory is not None:
        if trainer_kwargs is not None or callback is None:
            raise ValueError("With `trainer_factory`, pass `callback` and no `trainer_kwargs`.")
        return trainer_factory, callback
    kwargs = dict(trainer_kwargs or {})
    for key in ("max_epochs", "min_epochs", "max_steps"):
        if kwargs.get(key) not in (None, -1):
            raise ValueError(f"fit_rounds sets the length of each phase (dense_epochs, rounds' epochs); drop `{key}`.")
        kwargs.pop(key, None)
    shared = list(kwargs.pop("callbacks", None) or [])
    found = _find_callback(shared, callback)

    def make_trainer(max_epochs: int, extra: list[Callback]) -> pl.Trainer:
        return pl.Trainer(**kwargs, max_epochs=max_epochs, callbacks=[*shared, found, *extra])

    return make_trainer, found


@dataclass
class _Run:
    """What every phase of one :func:`fit_rounds` call shares."""

    make_trainer: MakeTrainer
    model: pl.LightningModule
    callback: PruneRetrainCallback
    directory: Path
    resume: bool
    fit_kwargs: dict[str, Any]

    @property
    def stopped_file(self) -> Path:
        return self.directory / "stopped.txt"

    def load(self, path: Path) -> None:
        """Take the model and the callback's state from a phase's checkpoint."""
        checkpoint = read_checkpoint(path)
        self.model.load_state_dict(checkpoint["state_dict"])
        if self.callback.masks_from_checkpoint(checkpoint, self.model, str(path)) is None:
            raise ValueError(f"{path} holds no state of {self.callback.state_key}; was it written by fit_rounds?")

    def validate(self) -> dict[str, Any]:
        """The metrics of one validation run: the guard's dense baseline when no dense phase ran here."""
        trainer = self.make_trainer(1, [])
        kwargs = {"datamodule": self.fit_kwargs["datamodule"]} if "datamodule" in self.fit_kwargs else {}
        if "val_dataloaders" in self.fit_kwargs:
            kwargs["dataloaders"] = self.fit_kwargs["val_dataloaders"]
        trainer.validate(self.model, verbose=False, **kwargs)
        return dict(trainer.callback_metrics)

    def fit(self, name: str, index: int | None, epochs: int) -> tuple[pl.Trainer, dict[str, float]]:
        """One phase's fit (resumed from its ``last.ckpt`` if there is one); its trainer and scalar metrics."""
        last = self.directory / name / "last.ckpt"
        trainer = self.make_trainer(
            epochs, [PhaseCheckpoint(dirpath=self.directory / name, save_last=True, save_top_k=0)]
        )
        if self.callback not in trainer.callbacks:  # type: ignore[attr-defined]
            raise ValueError("The trainer of a phase must hold the PruneRetrainCallback among its callbacks.")
        self.callback.fit_round(index)
        rank_zero_info(f"lightning-prune: {name} ({epochs} epochs)")
        trainer.fit(self.model, ckpt_path=last if self.resume and last.exists() else None, **self.fit_kwargs)
        trainer.strategy.barrier("fit_rounds")
        if not self.callback.is_bound_to(self.model):  # the fit ran in spawned processes (ddp_spawn)
            self.load(last)
        return trainer, {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    def result(self, name: str, epochs: int, metrics: dict[str, float], rejected: bool = False) -> PhaseResult:
        remaining, total = self.callback.progress()
        return PhaseResult(name, epochs, self.directory / f"{name}.ckpt", remaining, total, metrics, rejected=rejected)


def _copy_checkpoint(source: Path, target: Path) -> None:
    """Copy a checkpoint: a file, or the folder of a sharded one (``ModelParallelStrategy``), replacing ``target``."""
    if target.is_dir():
        shutil.rmtree(target)
    if source.is_dir():
        shutil.copytree(source, target)
    else:
        shutil.copyfile(source, target)


def _run_phase(run: _Run, name: str, index: int | None, epochs: int) -> PhaseResult:
    """Fit one phase until the guard keeps it (retrying it as the guard says); the phase's result."""
    callback = run.callback
    if index is not None and callback.has_guard:
        if callback.needs_guard_baseline:
            callback.set_guard_baseline(run.validate())
        callback.take_guard_snapshot(run.model)
    while True:
        trainer, metrics = run.fit(name, index, epochs)
        if index is None and callback.has_guard:
            callback.set_guard_baseline(metrics)
        verdict = callback.judge_round(run.model, index, metrics) if index is not None and callback.has_guard else None
        if verdict is None or verdict.action == "keep":
            if trainer.is_global_zero:
                _copy_checkpoint(run.directory / name / "last.ckpt", run.directory / f"{name}.ckpt")
            trainer.strategy.barrier("fit_rounds")
            return run.result(name, epochs, metrics)
        if trainer.is_global_zero:
            shutil.rmtree(run.directory / name, ignore_errors=True)
        if verdict.action == "stop" and trainer.is_global_zero:
            run.stopped_file.write_text(f"the accuracy guard stopped the schedule at {name}: {verdict.reason}\n")
        trainer.strategy.barrier("fit_rounds")
        if verdict.action == "stop":
            return run.result(name, epochs, metrics, rejected=True)


def _phases(callback: PruneRetrainCallback, dense_epochs: int) -> list[tuple[str, int | None, int]]:
    """``(name, round index or None, epochs)`` of every phase."""
    if isinstance(dense_epochs, bool) or not isinstance(dense_epochs, int) or dense_epochs < 0:
        raise ValueError(f"`dense_epochs` must be an integer >= 0, got {dense_epochs!r}.")
    rounds = callback.schedule.rounds
    missing = [i for i, r in enumerate(rounds) if r.epochs is None]
    if missing:
        raise ValueError(f"rounds[{missing[0]}] has no `epochs`; each round run as its own fit needs them.")
    phases: list[tuple[str, int | None, int]] = [("dense", None, dense_epochs)] if dense_epochs else []
    return phases + [(f"round-{k + 1}", k, r.epochs or 0) for k, r in enumerate(rounds)]


def fit_rounds(
    model: pl.LightningModule,
    callback: PruneRetrainCallback | None = None,
    *,
    trainer_kwargs: Mapping[str, Any] | None = None,
    trainer_factory: MakeTrainer | None = None,
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

        from lightning_prune import PruneRetrainCallback, Retraining, fit_rounds

        prune = PruneRetrainCallback(
            retrain=Retraining(lr_scale=0.1),
            rounds=[{"level": 0.8, "epochs": 3}, {"level": 1.2, "epochs": 3}, {"level": 1.5, "epochs": 5}],
        )
        results = fit_rounds(model, prune, datamodule=dm, dense_epochs=10, trainer_kwargs={"accelerator": "cpu"})
        print(results[-1].compression)
    """
    # Over 60 lines only by its docstring: the body is short.
    make_trainer, callback = _trainer_maker(callback, trainer_kwargs, trainer_factory)
    phases = _phases(callback, dense_epochs)
    fit_kwargs: dict[str, Any] = {"datamodule": datamodule} if datamodule is not None else {}
    if train_dataloaders is not None:
        fit_kwargs["train_dataloaders"] = train_dataloaders
    if val_dataloaders is not None:
        fit_kwargs["val_dataloaders"] = val_dataloaders
    run = _Run(make_trainer, model, callback, Path(checkpoint_dir), resume, fit_kwargs)
    finished = max(
        (i for i, (name, _, _) in enumerate(phases) if (run.directory / f"{name}.ckpt").exists()), default=-1
    )
    if not resume:
        finished = -1
        run.stopped_file.unlink(missing_ok=True)
    elif finished >= 0:
        run.load(run.directory / f"{phases[finished][0]}.ckpt")
    if run.stopped_file.exists():  # the guard stopped the schedule in an earlier run: no round runs again
        callback.schedule.stop()
    results: list[PhaseResult] = []
    for i, (name, index, epochs) in enumerate(phases):
        end = run.directory / f"{name}.ckpt"
        if i <= finished or run.stopped_file.exists():
            why = f"finished before ({end})" if i <= finished else run.stopped_file.read_text().strip()
            rank_zero_info(f"lightning-prune: {name} skipped: {why}")
            results.append(PhaseResult(name, epochs, end, 0, 0, skipped=True))
            continue
        results.append(_run_phase(run, name, index, epochs))
    for result in results:
        if not result.skipped:
            shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()) if not k.startswith("prune/"))
            rank_zero_info(
                f"lightning-prune: {result.name}: {result.remaining}/{result.total} weights "
                f"({result.compression:.1f}x fewer); {shown}"
            )
    return results
