"""The ``lightning-prune`` command: ``LightningCLI`` with the prune-retrain subcommands.

Subcommands: ``fit``, ``validate``, ``test``, ``predict`` (as in any ``LightningCLI``), ``rounds``
(dense training, then each prune-retrain round as its own fit), ``sensitivity`` (each layer pruned
alone at increasing levels; suggests per-layer qualities) and ``export`` (a pruned checkpoint to the
compact sparse format, optionally with dead units removed). The model and data classes come
from the config (``model.class_path``, ``data.class_path``); the callback goes under
``trainer.callbacks``. Run ``lightning-prune --help`` or ``lightning-prune rounds --help``.

Example::

    lightning-prune fit --config examples/configs/lenet300_quick.yaml
    lightning-prune rounds --config examples/configs/lenet300.yaml --dense_epochs 10
    lightning-prune sensitivity --config examples/configs/lenet5.yaml --checkpoint dense.ckpt --tolerance 0.005
    lightning-prune export --config examples/configs/lenet300.yaml --checkpoint last.ckpt --shrink true
    lightning-prune fit --config cfg.yaml --trainer.devices=2 --trainer.strategy=ddp --trainer.accelerator=cpu
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch.cli import ArgsType, LightningCLI

from lightning_prune.callback import PruneRetrainCallback
from lightning_prune.trainer import PruneTrainer

__all__ = ["PruneCLI", "main"]


class PruneCLI(LightningCLI):
    """``LightningCLI`` with ``PruneTrainer`` and its ``rounds`` subcommand.

    Model and data are given by class path in the config unless classes are passed here; the saved
    ``config.yaml`` is overwritten by later phases of ``rounds`` rather than refused.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", PruneTrainer)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        super().__init__(*args, **kwargs)

    def before_instantiate_classes(self) -> None:
        """Check every ``PruneRetrainCallback`` entry's values, reporting a bad one with its config path."""
        config = self.config.get(str(self.subcommand), self.config)
        entries = config.get("trainer", {}).get("callbacks") or []
        for index, entry in enumerate(entries if isinstance(entries, list) else [entries]):
            class_path = getattr(entry, "class_path", None)
            if class_path is None:
                continue
            module, _, name = class_path.rpartition(".")
            cls = getattr(importlib.import_module(module), name, None)
            if not (isinstance(cls, type) and issubclass(cls, PruneRetrainCallback)):
                continue
            init_args = entry.get("init_args") or {}
            try:
                cls(**(init_args.as_dict() if isinstance(init_args, Namespace) else dict(init_args)))
            except ValueError as err:
                self._parser(self.subcommand).error(f"trainer.callbacks[{index}] ({class_path}): {err}")

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """The usual subcommands plus ``rounds``, ``sensitivity`` and ``export``, and the arguments each skips."""
        return {
            **LightningCLI.subcommands(),
            "rounds": {"model", "datamodule", "train_dataloaders", "val_dataloaders"},
            "sensitivity": {"model", "datamodule"},
            "export": {"model", "datamodule"},
        }


def main(args: ArgsType = None) -> None:
    """Entry point of the ``lightning-prune`` console script.

    Under ``ddp`` the process group Lightning opened is destroyed before returning: left to the
    interpreter's exit, the gloo teardown can abort a finished run (exit code -6,
    pytorch/pytorch#190489).

    Args:
        args: Command-line arguments (``None``: ``sys.argv``), or a dict/list as ``LightningCLI`` takes.
    """
    try:
        PruneCLI(args=args)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
