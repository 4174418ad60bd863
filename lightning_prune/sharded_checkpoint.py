"""Masks of sharded (FSDP2) parameters in Lightning checkpoints: sharded beside the weights, or whole.

Under ``ModelParallelStrategy`` Lightning writes a *sharded* checkpoint by default: a folder in which
``torch.distributed.checkpoint`` (DCP) stores the model's and optimizers' shards, each process its
own, while the rest of the checkpoint (the callbacks' states among it) is written by rank 0 alone. A
mask in the callback's state would then be rank 0's shard only. So the masks travel with the
weights: each process adds its mask shards to ``checkpoint["state_dict"]`` as ``DTensor`` s laid out
like their parameters, under :data:`MASK_PREFIX`, and the callback's state lists their names; on
resume each process reads its shards back with DCP. No process ever holds a whole mask.

A *full* checkpoint (``save_distributed_checkpoint=False``: one file, whole tensors) gets whole masks
in the callback's state, as under DDP, so that :func:`~lightning_prune.core.structure.remove_dead_units`
and ``lightning-prune export`` read it like any other; on resume each process keeps its rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from lightning_prune.core.pruner import Pruner
from lightning_prune.core.sharding import full_mask, local, sharded_like

__all__ = ["MASK_PREFIX", "load_sharded_masks", "save_masks"]

MASK_PREFIX = "_lightning_prune_masks."
"""Prefix of the mask entries a sharded checkpoint's ``state_dict`` holds beside the weights."""


def _distributed(trainer: pl.Trainer) -> bool:
    return bool(getattr(trainer.strategy, "_save_distributed_checkpoint", False))


def save_masks(trainer: pl.Trainer, pruner: Pruner, checkpoint: dict[str, Any], key: str) -> bool:
    """Put the masks of a sharded ``pruner`` in ``checkpoint``: as shards for DCP, or whole (every process calls it).

    The callback's state under ``key`` must already be in ``checkpoint["callbacks"]``.

    Returns:
        Whether the checkpoint is sharded (its weights are ``DTensor`` s, not CRC-checked).
    """
    state = checkpoint.get("callbacks", {}).get(key)
    if not isinstance(state, dict) or "pruner" not in state:
        return _distributed(trainer)
    masks = {name: pruner.masks[name] for name in pruner.masks}
    if _distributed(trainer):
        weights = checkpoint.setdefault("state_dict", {})
        for name, keep in masks.items():
            weights[MASK_PREFIX + name] = sharded_like(keep, pruner.parameter(name))
        state["pruner"] = {**state["pruner"], "masks": {}, "sharded_masks": list(masks)}
        return True
    state["pruner"] = {
        **state["pruner"],
        "masks": {name: full_mask(keep, pruner.parameter(name)) for name, keep in masks.items()},
    }
    return False


def load_sharded_masks(trainer: pl.Trainer, pruner: Pruner, checkpoint: Mapping[str, Any], key: str) -> None:
    """Read this process's mask shards of a sharded checkpoint into the callback's state under ``key``.

    Nothing happens for a checkpoint without sharded masks (a full one, or one from a single device).

    Raises:
        ValueError: If the checkpoint's state names a parameter the pruner does not prune.
    """
    state = checkpoint.get("callbacks", {}).get(key)
    names = state.get("pruner", {}).get("sharded_masks") if isinstance(state, Mapping) else None
    if not names:
        return
    from torch.distributed.checkpoint.state_dict_loader import load

    unknown = [name for name in names if name not in pruner.layer_of]
    if unknown:
        raise ValueError(
            f"The sharded checkpoint holds a mask for {unknown[0]!r}, which is not among the pruned parameters "
            f"{list(pruner.layer_of)}. Was it made with other `layers`?"
        )
    buffers = {}
    for name in names:
        param = pruner.parameter(name)
        shard = torch.zeros(local(param).shape, dtype=torch.bool, device=local(param).device)
        buffers[MASK_PREFIX + name] = sharded_like(shard, param)
    load({"state_dict": buffers}, checkpoint_id=trainer.ckpt_path)
    state["pruner"]["masks"] = {name: local(buffers[MASK_PREFIX + name]) for name in names}
