"""Shrunk checkpoints: the state dict and the layer shapes of a model after dead-unit removal, in a sealed file."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.export.container import (
    DefectError,
    FileKind,
    SparseFormatError,
    cpu_copies,
    fail,
    is_int,
    read_sealed,
    show,
    strict_json,
    write_sealed,
)
from lightning_prune.core.structure.surgery import resized_modules, shapes, swap_modules

__all__ = ["load_shrunk", "save_shrunk"]

_FORMAT = "lightning_prune.shrunk"
_VERSION = "2"
_SHRUNK = FileKind(
    _FORMAT, _VERSION, frozenset({"format", "version", "sha256", "shapes"}), "Shrunk checkpoint", "save_shrunk"
)


def save_shrunk(model: nn.Module, path: str | PathLike[str]) -> None:
    """Save the state dict and the layer shapes to a safetensors file (no pickle).

    The metadata holds ``{"format", "version", "sha256", "shapes"}``: the shapes of :func:`shapes`
    as JSON and a SHA-256 of the whole file (see :mod:`lightning_prune.core.export.container`),
    format version ``"2"``. Tied parameters are stored once per name.

    Example::

        >>> import tempfile, os
        >>> net = nn.Sequential(nn.Linear(4, 1), nn.ReLU(), nn.Linear(1, 2))
        >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
        >>> save_shrunk(net, path)
        >>> fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> load_shrunk(fresh, path)
        ['0', '2']
        >>> torch.equal(fresh[0].weight, net[0].weight)
        True
    """
    metadata = {"format": _FORMAT, "version": _VERSION, "shapes": json.dumps(shapes(model))}
    write_sealed(path, cpu_copies(model.state_dict()), metadata)


def load_shrunk(model: nn.Module, path: str | PathLike[str]) -> list[str]:
    """Resize a freshly built model to the shapes saved by :func:`save_shrunk`, then load the weights.

    The file is verified first (its SHA-256, then its layout and shape record against the tensors
    in it); the layers the record asks for are planned on the ``meta`` device and checked against
    the file's tensors before any is built. Keys, shapes and dtypes are checked against the file
    before anything is loaded (``strict=True``); on any problem the model is left as it was.

    Args:
        model: The network as its constructor builds it (or already shrunk the same way).
        path: A file written by :func:`save_shrunk` (format version ``"2"``; files of version
            ``"1"`` cannot be verified and are refused: save them again).

    Returns:
        Names of the modules that were resized.

    Raises:
        SparseFormatError: If the file is corrupt, truncated, inconsistent, not a shrunk checkpoint
            or of another version (a ``ValueError``; names the file and the problem).
        ValueError: If the file does not fit the model (names the first missing/unexpected key,
            mismatched shape or dtype, or the recorded module the model lacks).

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
        >>> save_shrunk(nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 1)), path)
        >>> fresh = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 1))
        >>> load_shrunk(fresh, path), fresh[2]
        (['0', '2'], Linear(in_features=2, out_features=1, bias=True))
    """
    metadata, tensors, file_bytes = read_sealed(path, _SHRUNK)
    record = _record(path, metadata["shapes"], file_bytes)
    try:
        _check_planned(model, path, record, tensors)
        new = resized_modules(model, record)
    except SparseFormatError:
        raise
    except ValueError as err:
        raise ValueError(f"{str(path)!r} does not fit the model: {err} Nothing was loaded.") from err
    old = swap_modules(model, new)
    problem = _misfit(model.state_dict(), tensors)
    if problem is not None:
        swap_modules(model, old)
        raise ValueError(f"{str(path)!r} does not fit the model: {problem}. Nothing was loaded.")
    model.load_state_dict(tensors, strict=True)
    return list(new)


def _record(path: str | PathLike[str], text: str, file_bytes: int) -> dict[str, list[int]]:
    """The shape record of a shrunk checkpoint: ``{module name: 1 to 4 positive ints}``.

    A recorded layer has at most as many entries as the file has bytes (its weight is in the file).
    """
    try:
        record = strict_json(text, "the 'shapes' metadata")
        if not isinstance(record, dict):
            raise DefectError(f"the 'shapes' metadata must be a JSON object, got {show(record)}")
        for name, shape in record.items():
            if not isinstance(shape, list) or not 1 <= len(shape) <= 4 or not all(is_int(s) and s > 0 for s in shape):
                raise DefectError(f"the recorded shape of {show(name)} is {show(shape)}, not 1 to 4 positive ints")
            if math.prod(shape) > file_bytes:
                raise DefectError(f"the recorded shape of {show(name)}, {shape}, is larger than the file")
    except DefectError as err:
        raise fail(path, str(err), _SHRUNK.label) from err
    return record


def _check_planned(
    model: nn.Module, path: str | PathLike[str], record: Mapping[str, Any], tensors: Mapping[str, Tensor]
) -> None:
    """Build the layers the record asks for on the meta device and check their tensors against the file's.

    Nothing is allocated, and afterwards the real layers take no more than the tensors in the file:
    a record cannot make the resize build layers larger than what the file holds.
    """
    for name, module in resized_modules(model, record, device=torch.device("meta")).items():
        for key, value in module.state_dict().items():
            full = f"{name}.{key}"
            if full not in tensors:
                raise ValueError(f"the file lacks {full!r}.")
            if tensors[full].shape != value.shape:
                problem = (
                    f"the shape record gives {name!r} as {record[name]}, but {full!r} is {list(tensors[full].shape)}"
                )
                raise fail(path, problem, _SHRUNK.label)


def _misfit(expected: Mapping[str, Tensor], tensors: Mapping[str, Tensor]) -> str | None:
    """The first key, shape or dtype of the (resized) model that the file's tensors do not match."""
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        return f"the file lacks {missing[0]!r}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    if unexpected:
        return f"the file has {unexpected[0]!r}, which the model does not" + (
            f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        )
    for key, own in expected.items():
        if tensors[key].shape != own.shape:
            return f"{key!r} has shape {list(tensors[key].shape)} in the file and {list(own.shape)} in the model"
        if tensors[key].dtype != own.dtype:
            return f"{key!r} is {tensors[key].dtype} in the file and {own.dtype} in the model"
    return None
