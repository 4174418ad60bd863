"""Reading Lightning checkpoints safely, and checksums that tell when a checkpoint's weights or masks changed.

A Lightning checkpoint has no checksum of its own (its zip entries' CRCs are not checked when it is
read): a flipped bit in a weight loads silently. :class:`~lightning_prune.PruneRetrainCallback` therefore
stores, in its own checkpoint state, a CRC-32 of every tensor of the checkpoint's ``state_dict`` and of
every mask (:func:`checksums`), and checks them (:func:`verify_checksums`) when it resumes from the
checkpoint and when ``lightning-prune export`` reads it. A CRC detects corruption, not tampering.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch

__all__ = [
    "STATE_VERSION",
    "CheckpointError",
    "checksums",
    "read_checkpoint",
    "record_checksums",
    "tensor_crc",
    "upgrade_state",
    "verify_checksums",
    "verify_recorded",
]

STATE_VERSION = 3
"""Version of :class:`~lightning_prune.PruneRetrainCallback`'s checkpoint state (see :func:`upgrade_state`)."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or is not a Lightning checkpoint (the message names the file and why)."""


def read_checkpoint(path: str | PathLike[str]) -> dict[str, Any]:
    """Load a Lightning checkpoint on the CPU with ``weights_only=True`` (no arbitrary pickles) and check its layout.

    Returns:
        The checkpoint: a ``state_dict`` of tensors, and a ``callbacks`` mapping (empty if it had none).

    Raises:
        FileNotFoundError: If there is no such file.
        CheckpointError: If the file is not a readable checkpoint (truncated, corrupt, not a zip or pickle
            file), or lacks a ``state_dict`` of tensors or has a ``callbacks`` entry that is not a mapping.

    Example::

        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "bad.ckpt")
        >>> _ = open(path, "wb").write(b"not a checkpoint")
        >>> read_checkpoint(path)
        Traceback (most recent call last):
        ...
        lightning_prune.checkpoint.CheckpointError: Checkpoint '...bad.ckpt': not a readable PyTorch checkpoint ...
    """
    name = os.fspath(path)
    if not os.path.isfile(name):
        raise FileNotFoundError(f"No checkpoint at {name!r}.")
    try:
        saved = torch.load(name, map_location="cpu", weights_only=True)
    except Exception as err:  # torch.load raises many types for a damaged file (RuntimeError, UnpicklingError, ...)
        raise CheckpointError(
            f"Checkpoint {name!r}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})".replace("\n", " ")
        ) from err
    state = saved.get("state_dict") if isinstance(saved, Mapping) else None
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CheckpointError(f"Checkpoint {name!r}: no `state_dict` of tensors (not a Lightning checkpoint?).")
    callbacks = saved.get("callbacks", {})
    if not isinstance(callbacks, Mapping):
        raise CheckpointError(f"Checkpoint {name!r}: its `callbacks` entry is a {type(callbacks).__name__}.")
    return {**saved, "callbacks": dict(callbacks)}


def tensor_crc(tensor: torch.Tensor) -> int:
    """CRC-32 of a tensor's dtype, shape and bytes.

    Example::

        >>> tensor_crc(torch.zeros(3)) == tensor_crc(torch.zeros(3)) != tensor_crc(torch.zeros(3, dtype=torch.int32))
        True
    """
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    crc = zlib.crc32(f"{flat.dtype}{list(tensor.shape)}".encode())
    return zlib.crc32(flat.view(torch.uint8).numpy().data, crc) if flat.numel() else crc


def checksums(tensors: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{name: tensor_crc}`` of every tensor in ``tensors``."""
    return {name: tensor_crc(value) for name, value in tensors.items() if isinstance(value, torch.Tensor)}


def record_checksums(checkpoint: dict[str, Any], key: str) -> None:
    """Add CRCs of ``checkpoint``'s ``state_dict`` and of the masks to the callback state under ``key``."""
    state = checkpoint.get("callbacks", {}).get(key)
    if isinstance(state, dict) and "pruner" in state:
        masks = state["pruner"].get("masks", {})
        state["checksums"] = {"state_dict": checksums(checkpoint.get("state_dict", {})), "masks": checksums(masks)}


def verify_recorded(checkpoint: Mapping[str, Any], key: str, path: str | PathLike[str]) -> None:
    """:func:`verify_checksums` for the callback state under ``key`` (nothing to check if there is none)."""
    state = checkpoint.get("callbacks", {}).get(key)
    if isinstance(state, Mapping):
        verify_checksums(checkpoint, state, path)


def verify_checksums(checkpoint: Mapping[str, Any], state: Mapping[str, Any], path: str | PathLike[str]) -> None:
    """Check the checkpoint's weights and the state's masks against the CRCs the state recorded when it was saved.

    A state without recorded CRCs (written before they were added) passes. A tensor the checkpoint no
    longer holds is not checked (a module may drop entries from its checkpoints; loading it reports those).

    Raises:
        CheckpointError: If a recorded CRC is malformed or a tensor's CRC differs, naming the tensor.
    """
    recorded = state.get("checksums")
    if recorded is None:
        return
    parts = {"state_dict": checkpoint.get("state_dict", {}), "masks": state.get("pruner", {}).get("masks", {})}
    if not isinstance(recorded, Mapping) or not all(isinstance(recorded.get(k, {}), Mapping) for k in parts):
        raise CheckpointError(f"Checkpoint {os.fspath(path)!r}: its recorded checksums are malformed.")
    for part, tensors in parts.items():
        for name, crc in recorded.get(part, {}).items():
            value = tensors.get(name)
            if isinstance(value, torch.Tensor) and tensor_crc(value) != crc:
                what = "weights" if part == "state_dict" else "mask"
                raise CheckpointError(
                    f"Checkpoint {os.fspath(path)!r}: the {what} of {name!r} changed since the checkpoint was written "
                    f"(CRC-32 mismatch): the file is corrupt."
                )


def upgrade_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpointed state of :class:`~lightning_prune.PruneRetrainCallback` in the current layout.

    Version 3 keeps each owner's state under its own key: ``pruner``, ``schedule``, ``phase``,
    ``dropout``, ``guard``, ``sensitivity`` (and ``checksums``). Version 2 (one flat mapping) and
    version 1 (``done_epochs``, one prune per round) are upgraded.

    Raises:
        ValueError: If the state is not a mapping, its version is not a known one (a newer release wrote
            it, say), or its masks are not a mapping of parameter names to tensors.

    Example::

        >>> upgrade_state({"version": 1, "pruner": {}, "done_epochs": [4, 8]})["schedule"]["done"]
        [0, 1]
    """
    if not isinstance(state, Mapping):
        raise ValueError(f"The checkpointed PruneRetrainCallback state must be a mapping, got {type(state).__name__}.")
    version = state.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= STATE_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > STATE_VERSION
        raise ValueError(
            f"The checkpointed PruneRetrainCallback state has version {version!r}; this lightning-prune reads "
            f"versions 1 to {STATE_VERSION}"
            + (" (a newer lightning-prune wrote it: upgrade to load it)." if newer else ".")
        )
    upgraded = dict(state)
    if version == 1:
        upgraded["done_rounds"] = list(range(len(upgraded.pop("done_epochs", []) or [])))
    if version < 3:
        upgraded = _flat_to_owners(upgraded)
    pruner = upgraded.get("pruner", {})
    if not isinstance(pruner, Mapping) or not isinstance(pruner.get("masks", {}), Mapping):
        raise ValueError(
            f"The checkpointed PruneRetrainCallback state holds no mapping of masks (pruner: {type(pruner).__name__})."
        )
    return upgraded


def _flat_to_owners(s: Mapping[str, Any]) -> dict[str, Any]:
    """Version 2's flat state in version 3's layout."""
    defaults = s.get("defaults") or {}
    default_level = None
    if s.get("sensitivity") is not None:
        default_level = defaults.get("amount") if defaults.get("criterion") == "fraction" else defaults.get("quality")
    snapshot = s.get("snapshot")
    if isinstance(snapshot, Mapping):
        inner = snapshot.get("callback", {})
        rollback = {"pruner": inner.get("pruner", {}), "done": inner.get("done_rounds", []),
                    "dropout": _dropout(inner)}  # fmt: skip
        snapshot = {"model": snapshot.get("model", {}), "state": rollback}
    upgraded = {
        "version": STATE_VERSION,
        "pruner": s.get("pruner", {}),
        "schedule": {
            "done": s.get("done_rounds", []),
            "skipped": s.get("skipped_rounds", []),
            "scales": s.get("round_scales", {}),
            "stopped": s.get("stopped", False),
            "decisions": s.get("decisions", []),
            "default_level": default_level,
        },
        "phase": {
            "lr_scale": s.get("lr_scale_in_force", 1.0),
            "original_weight_decay": s.get("original_weight_decay", []),
        },
        "dropout": _dropout(s),
        "guard": {"baseline": s.get("guard_baseline"), "snapshot": snapshot},
        "sensitivity": s.get("sensitivity"),
    }
    if "checksums" in s:
        upgraded["checksums"] = s["checksums"]
    return upgraded


def _dropout(s: Mapping[str, Any]) -> dict[str, Any] | None:
    dropout = s.get("dropout")
    return None if not isinstance(dropout, Mapping) else {**dropout, "traced": bool(s.get("traced", False))}
