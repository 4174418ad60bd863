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
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_prune.callback import PruneRetrainCallback


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
        skipped: Whether it had finished before and was skipped on resume.
    """

    name: str
    epochs: int
    checkpoint: Path
    remaining: int
    total: int
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False

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
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    state = checkpoint.get("callbacks", {}).get(callback.state_key)
    if state is None:
        raise ValueError(f"{path} holds no state of {callback.state_key}; was it written by fit_rounds?")
    callback.restore(model, state)


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

    results: list[PhaseResult] = []
    for i, (name, index, epochs) in enumerate(phases):
        end = directory / f"{name}.ckpt"
        if i <= finished:
            rank_zero_info(f"lightning-prune: {name} finished before ({end}); skipped.")
            results.append(PhaseResult(name, epochs, end, 0, 0, skipped=True))
            continue
        last = directory / name / "last.ckpt"
        saver = PhaseCheckpoint(dirpath=directory / name, save_last=True, save_top_k=0)
        trainer = make_trainer(epochs, [saver])
        if callback not in trainer.callbacks:
            raise ValueError("The trainer of a phase must hold the PruneRetrainCallback among its callbacks.")
        callback.fit_round(index)
        rank_zero_info(f"lightning-prune: {name} ({epochs} epochs)")
        fit_kwargs = {"datamodule": datamodule} if datamodule is not None else {}
        if train_dataloaders is not None:
            fit_kwargs["train_dataloaders"] = train_dataloaders
        if val_dataloaders is not None:
            fit_kwargs["val_dataloaders"] = val_dataloaders
        trainer.fit(model, ckpt_path=last if resume and last.exists() else None, **fit_kwargs)
        if trainer.is_global_zero:
            shutil.copyfile(last, end)
        trainer.strategy.barrier("fit_rounds")
        if callback.pruner is None or callback.pruner.model is not model:
            # The fit ran in spawned processes (ddp_spawn): take its outcome from the phase's checkpoint.
            _load_phase(end, model, callback)
        assert callback.pruner is not None
        stats = callback.pruner.stats()
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        results.append(
            PhaseResult(name, epochs, end, sum(s.remaining for s in stats), sum(s.weights for s in stats), metrics)
        )
    for result in results:
        if result.skipped:
            continue
        shown = ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.metrics.items()) if not k.startswith("prune/"))
        rank_zero_info(
            f"lightning-prune: {result.name}: {result.remaining}/{result.total} weights "
            f"({result.compression:.1f}x fewer); {shown}"
        )
    return results
