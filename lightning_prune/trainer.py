"""``PruneTrainer``: a ``Trainer`` that can also run prune-retrain rounds, each as its own fit."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from lightning_prune.callback import PruneRetrainCallback
from lightning_prune.checkpoint import CheckpointError, read_checkpoint
from lightning_prune.core.export import SparseSizeReport, export_sparse
from lightning_prune.core.selection import select_parameters
from lightning_prune.core.structure import remove_dead_units, save_shrunk
from lightning_prune.fit_checks import example_input
from lightning_prune.rounds import PhaseResult, fit_rounds
from lightning_prune.sensitivity import SensitivityResult, analyze

__all__ = ["PruneTrainer"]


class PruneTrainer(pl.Trainer):
    """A :class:`~lightning.pytorch.Trainer` with a :meth:`rounds` method, for ``lightning-prune rounds``.

    It takes exactly the ``Trainer``'s arguments and remembers them, so that :meth:`rounds` can build
    one trainer like it per phase (with that phase's ``max_epochs``).

    Example::

        trainer = PruneTrainer(accelerator="cpu", callbacks=[PruneRetrainCallback(rounds=[...])])
        trainer.rounds(model, datamodule=dm, dense_epochs=10)
    """

    callbacks: list[Callback]

    def __init__(self, **kwargs: Any) -> None:
        self.init_kwargs = dict(kwargs)
        super().__init__(**kwargs)

    def rounds(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        train_dataloaders: Any = None,
        val_dataloaders: Any = None,
        dense_epochs: int = 0,
        checkpoint_dir: str = "prune_rounds",
        resume: bool = True,
    ) -> list[PhaseResult]:
        """Train dense for ``dense_epochs``, then run each prune-retrain round as its own fit.

        Args:
            model: The LightningModule.
            datamodule: Passed to each ``fit``.
            train_dataloaders: Passed to each ``fit``.
            val_dataloaders: Passed to each ``fit``.
            dense_epochs: Dense epochs before the first round (0: the model comes trained).
            checkpoint_dir: Where phase checkpoints go (``dense.ckpt``, ``round-1.ckpt``, ...).
            resume: Continue from the checkpoints in ``checkpoint_dir`` (``False``: start over).

        Returns:
            One :class:`~lightning_prune.rounds.PhaseResult` per phase.

        Raises:
            ValueError: If the trainer's callbacks hold no (or several) ``PruneRetrainCallback``.
        """
        callback = self._prune_callback()
        if callback is None:
            raise ValueError(
                "`rounds` needs a PruneRetrainCallback in the trainer's callbacks. "
                "Add one under `trainer.callbacks` (class_path: lightning_prune.PruneRetrainCallback)."
            )
        return fit_rounds(
            model,
            callback,
            trainer_factory=self._phase_trainer,
            datamodule=datamodule,
            train_dataloaders=train_dataloaders,
            val_dataloaders=val_dataloaders,
            dense_epochs=dense_epochs,
            checkpoint_dir=Path(checkpoint_dir),
            resume=resume,
        )

    def sensitivity(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        checkpoint: str | None = None,
        levels: list[float] | None = None,
        criterion: Literal["std", "fraction"] = "std",
        layers: list[str] | None = None,
        tolerance: float = 0.005,
        relative: bool = False,
        output_dir: str = "sensitivity",
    ) -> SensitivityResult:
        """Prune each layer alone at increasing levels, measure validation accuracy, suggest per-layer levels.

        Writes ``sensitivity.csv``, ``sensitivity.json``, ``sensitivity.png`` (the paper's Figure 5) and
        ``quality.yaml`` (levels for the criterion, e.g. ``Std(quality="quality.yaml")``) to ``output_dir``.

        Args:
            model: The (trained, dense) LightningModule.
            datamodule: Gives the validation data.
            checkpoint: Load the model's weights from this checkpoint first.
            levels: Quality levels (``"std"``) or shares pruned (``"fraction"``); ``None``: the defaults.
            criterion: ``"std"`` (Han's quality) or ``"fraction"``.
            layers: Glob patterns of the layers to analyze (``None``: every Linear/Conv).
            tolerance: Largest accuracy drop allowed per layer when choosing its level.
            relative: Whether ``tolerance`` is a share of the dense accuracy.
            output_dir: Where the files go.

        Returns:
            The sweep's result.
        """
        if checkpoint is not None:
            _load_weights(model, read_checkpoint(checkpoint), checkpoint)
        result = analyze(model, datamodule=datamodule, levels=levels, layers=layers, criterion=criterion)
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        result.to_csv(out / "sensitivity.csv")
        result.to_json(out / "sensitivity.json")
        result.plot(out / "sensitivity.png")
        result.write_quality(out / "quality.yaml", tolerance, relative)
        rank_zero_info(f"{result.table()}\n{result.quality_yaml(tolerance, relative)}wrote {out}/")
        return result

    def export(
        self,
        model: pl.LightningModule,
        checkpoint: str,
        output: str = "model.sparse.safetensors",
        shrink: bool = False,
        shrunk_output: str | None = None,
        datamodule: pl.LightningDataModule | None = None,
    ) -> SparseSizeReport:
        """Export a pruned checkpoint compactly: surviving values and their positions, in safetensors.

        Args:
            model: The LightningModule the checkpoint belongs to.
            checkpoint: A checkpoint written while ``PruneRetrainCallback`` ran. The masks are read from the
                state of the trainer's ``PruneRetrainCallback`` in it and checked against the model; without
                such a callback or state, the zeros of every Linear/Conv weight are the masks.
            output: The compact file to write.
            shrink: First remove dead units (needs ``example_input_array`` on the module).
            shrunk_output: With ``shrink``, also save the shrunk dense model there (``save_shrunk``).
            datamodule: Unused; accepted so ``export`` takes the same config as ``fit``.

        Returns:
            The file's size report (bytes vs dense fp32 and vs the surviving values).

        Raises:
            CheckpointError: If the checkpoint cannot be read or does not fit the model.
            ValueError: If the callback's state in it is from a newer version, or a mask is missing or mangled;
                with ``shrink``, if ``example_input_array`` is missing or a dict.
        """
        example = example_input(model, "`shrink`") if shrink else None
        saved = read_checkpoint(checkpoint)
        _load_weights(model, saved, checkpoint)
        callback = self._prune_callback()
        masks = callback.masks_from_checkpoint(saved, model, checkpoint) if callback is not None else None
        if masks is None:
            masks = {name: model.get_parameter(name) != 0 for name in select_parameters(model)}
        if example is not None:
            report = remove_dead_units(model, example, masks=masks)
            masks = report.masks or masks
            rank_zero_info(f"lightning-prune: removed dead units\n{report}")
            if shrunk_output is not None:
                save_shrunk(model, shrunk_output)
        size = export_sparse(model, masks, output)
        rank_zero_info(f"lightning-prune: wrote {output}\n{size}")
        return size

    def _prune_callback(self) -> PruneRetrainCallback | None:
        found = [c for c in self.callbacks if isinstance(c, PruneRetrainCallback)]
        if len(found) > 1:
            raise ValueError(f"The trainer has {len(found)} PruneRetrainCallback callbacks; give it one.")
        return found[0] if found else None

    def _phase_trainer(self, max_epochs: int, extra: list[Callback]) -> PruneTrainer:
        callbacks = self.init_kwargs.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, list) else [callbacks]
        kwargs = {**self.init_kwargs, "max_epochs": max_epochs, "callbacks": [*callbacks, *extra]}
        kwargs.pop("max_steps", None)
        return type(self)(**kwargs)


def _load_weights(model: pl.LightningModule, saved: dict[str, Any], path: str) -> None:
    try:
        model.load_state_dict(saved["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"Checkpoint {path!r} does not fit {type(model).__name__}: {err}") from err
