"""The sparse file: masked tensors as surviving values plus positions, the rest dense, in a sealed safetensors file.

Unmasked tensors are stored under their own names, masked ones as ``<name>::values`` and
``<name>::index``; the metadata holds the format, the version (``"2"``), the SHA-256 of the sealed
container and, as JSON, per tensor its shape, dtype and encodings (``"entries"``).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.export.container import (
    DefectError,
    FileKind,
    check_dims,
    cpu_copies,
    fail,
    is_int,
    num,
    read_sealed,
    show,
    strict_json,
    write_sealed,
)
from lightning_prune.core.export.positions import check_positions, code_name, decode_positions, encode_positions
from lightning_prune.core.export.values import check_values, decode_values, encode_values
from lightning_prune.core.masks import check_mask

__all__ = [
    "FORMAT",
    "VERSION",
    "SparseSizeReport",
    "TensorSize",
    "export_sparse",
    "load_sparse",
    "load_sparse_into",
    "sparse_size_report",
]

FORMAT = "lightning_prune.sparse"
VERSION = "2"
_SEP = "::"
_MIN_LIMIT = 2**28  # max_bytes by default: 64 x the file size, at least 256 MiB
_EXPANSION = 64

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_ENTRY_KEYS = {
    "dense": frozenset({"kind", "dtype", "shape"}),
    "sparse": frozenset({"kind", "dtype", "shape", "alive", "positions", "values"}),
}
_SPARSE = FileKind(
    FORMAT, VERSION, frozenset({"format", "version", "sha256", "entries"}), "Sparse file", "export_sparse"
)


# ---------------------------------------------------------------------------------------------------------------------
# Size report
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSize:
    """Storage of one tensor in a sparse file.

    Attributes:
        name: State-dict key.
        shape: Tensor shape.
        dtype: Tensor dtype name.
        encoding: ``"dense"``, or ``"<position code> | <value codec>"``.
        numel: Entries of the dense tensor.
        alive: Entries stored (all for dense tensors).
        dense_bytes: Bytes of the dense tensor in its dtype (4 per entry for fp32).
        values_bytes: Bytes of the surviving values in their dtype, uncompressed.
        index_bytes: Bytes of the position code.
        stored_bytes: Bytes in the file for this tensor (values as stored plus index), header excluded.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    numel: int
    alive: int
    dense_bytes: int
    values_bytes: int
    index_bytes: int
    stored_bytes: int

    @property
    def index_overhead(self) -> float:
        """Position bytes over surviving-value bytes (Han et al.'s "15.6% overhead")."""
        return self.index_bytes / self.values_bytes if self.values_bytes else 0.0


@dataclass(frozen=True)
class SparseSizeReport:
    """Bytes of a sparse file against the dense tensors and the surviving values.

    Attributes:
        path: The file.
        file_bytes: Size of the file (header included).
        tensors: One :class:`TensorSize` per state-dict entry, in file order.
    """

    path: str
    file_bytes: int
    tensors: tuple[TensorSize, ...]

    @property
    def dense_bytes(self) -> int:
        """Bytes of all tensors stored dense."""
        return sum(t.dense_bytes for t in self.tensors)

    @property
    def values_bytes(self) -> int:
        """Bytes of the surviving values (all entries of unmasked tensors), uncompressed."""
        return sum(t.values_bytes for t in self.tensors)

    @property
    def index_bytes(self) -> int:
        """Bytes of all position codes."""
        return sum(t.index_bytes for t in self.tensors)

    @property
    def ratio(self) -> float:
        """File bytes over surviving-value bytes: ``1.0`` would be the values alone."""
        return self.file_bytes / self.values_bytes if self.values_bytes else float("inf")

    @property
    def compression(self) -> float:
        """Dense bytes over file bytes."""
        return self.dense_bytes / self.file_bytes if self.file_bytes else 0.0

    def __str__(self) -> str:
        header = ("tensor", "shape", "alive", "encoding", "dense B", "values B", "index B", "stored B", "index %")
        rows = [
            (
                t.name,
                " x ".join(map(str, t.shape)),
                f"{100.0 * t.alive / t.numel if t.numel else 100.0:.1f}%",
                t.encoding,
                str(t.dense_bytes),
                str(t.values_bytes),
                str(t.index_bytes),
                str(t.stored_bytes),
                f"{100 * t.index_overhead:.1f}%",
            )
            for t in self.tensors
        ]
        total = (
            "file",
            "",
            "",
            f"{self.compression:.1f}x smaller than dense",
            str(self.dense_bytes),
            str(self.values_bytes),
            str(self.index_bytes),
            str(self.file_bytes),
            f"{self.ratio:.3f}x values",
        )
        widths = [max(len(r[i]) for r in (header, *rows, total)) for i in range(len(header))]

        def line(cells: tuple[str, ...]) -> str:
            return "  ".join(
                c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(header), rule, *map(line, rows), rule, line(total)])


# ---------------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------------


def _state_of(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return dict(model_or_state_dict.state_dict())
    if isinstance(model_or_state_dict, Mapping):
        return dict(model_or_state_dict)
    raise TypeError(f"Expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}.")


def _entry(name: str, value: Tensor, keep: Tensor | None, compress: bool, tensors: dict[str, Tensor]) -> dict[str, Any]:
    """The metadata entry of one tensor; what it stores goes into ``tensors``."""
    if value.dtype not in _NAMES:
        raise ValueError(f"Tensor {name!r} has dtype {value.dtype}; supported: {sorted(_DTYPES)}.")
    if _SEP in name:
        raise ValueError(f"Tensor name {name!r} contains {_SEP!r}, which the sparse format reserves.")
    entry: dict[str, Any] = {"dtype": _NAMES[value.dtype], "shape": list(value.shape)}
    if keep is None:
        entry["kind"] = "dense"
        tensors[name] = value
        return entry
    keep = keep.detach().to("cpu").reshape(-1)
    positions, index = encode_positions(keep)
    values_desc, stored = encode_values(value.reshape(-1)[keep], compress)
    entry.update(kind="sparse", alive=int(keep.sum()), positions=positions, values=values_desc)
    tensors[f"{name}{_SEP}values"] = stored.contiguous()
    tensors[f"{name}{_SEP}index"] = index.contiguous()
    return entry


def export_sparse(
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    masks: Mapping[str, Tensor],
    path: str | PathLike[str],
    *,
    compress_values: bool = True,
) -> SparseSizeReport:
    """Write the masked tensors as surviving values plus positions, everything else dense.

    Args:
        model_or_state_dict: The network, or its state dict.
        masks: ``{name: bool mask}`` (``True`` = alive) for the tensors to store sparse; entries
            outside a mask are dropped (they load as zero).
        path: Output file (safetensors).
        compress_values: Deflate the values' byte planes where that saves space (lossless). With
            ``False`` the values are stored raw in their dtype.

    Returns:
        The size report of the written file.

    Raises:
        ValueError: If a mask names no tensor of the state dict, is not bool, or has another shape.

    Example::

        >>> import tempfile, os
        >>> net = nn.Linear(300, 100)
        >>> keep = torch.rand(100, 300, generator=torch.Generator().manual_seed(0)) < 0.08
        >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
        >>> report = export_sparse(net, {"weight": keep}, path)
        >>> state, masks = load_sparse(path)
        >>> torch.equal(state["weight"], net.weight.detach() * keep), torch.equal(masks["weight"], keep)
        (True, True)
        >>> report.compression > 8
        True
    """
    state = _state_of(model_or_state_dict)
    for name, keep in masks.items():
        if name not in state:
            raise ValueError(f"`masks` names {name!r}, which is not in the state dict (keys: {list(state)[:8]}...).")
        check_mask(name, keep, state[name].shape)
    tensors: dict[str, Tensor] = {}
    entries = {
        name: _entry(name, value, masks.get(name), compress_values, tensors)
        for name, value in cpu_copies(state).items()
    }
    metadata = {"format": FORMAT, "version": VERSION, "entries": json.dumps(entries, separators=(",", ":"))}
    write_sealed(path, tensors, metadata)
    return sparse_size_report(path)


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    """A checked entry of a sparse file (``positions``/``values`` are ``None`` for a dense tensor)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    alive: int
    positions: Mapping[str, Any] | None = None
    values: Mapping[str, Any] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def cost(self) -> int:
        """Bytes the decoded tensor takes, with its mask."""
        return self.numel * (self.dtype.itemsize + (self.positions is not None))


def _stored(tensors: Mapping[str, Tensor], key: str) -> Tensor:
    if key not in tensors:
        raise DefectError(f"its tensor {key!r} is missing")
    return tensors[key]


def _check_entry(name: str, entry: Any, tensors: Mapping[str, Tensor]) -> _Entry:
    """Check one entry against the stored tensors: every count and size, before anything is decoded."""
    if _SEP in name:
        raise DefectError(f"the name contains {_SEP!r}, which the format reserves")
    if not isinstance(entry, dict):
        raise DefectError(f"must be an object, got {show(entry)}")
    kind = entry.get("kind")
    keys = _ENTRY_KEYS.get(kind) if isinstance(kind, str) else None
    if keys is None:
        raise DefectError(f"unknown kind {show(kind)} (expected 'dense' or 'sparse')")
    if set(entry) != keys:
        raise DefectError(f"the fields are {show(sorted(entry))}, expected {sorted(keys)}")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise DefectError(f"unknown dtype {show(entry['dtype'])}")
    shape = check_dims(entry["shape"])
    numel = math.prod(shape)
    if numel >= 2**62:  # beyond any memory; keeps every count below in int64 and printable
        raise DefectError(f"shape {show(list(shape))} has {num(numel)} entries")
    if kind == "dense":
        value = _stored(tensors, name)
        if value.dtype != dtype or tuple(value.shape) != shape:
            raise DefectError(f"stored as {list(value.shape)} {value.dtype}, the entry says {list(shape)} {dtype}")
        return _Entry(name, dtype, shape, numel)
    alive = entry["alive"]
    if not is_int(alive) or not 0 <= alive <= numel:
        raise DefectError(f"alive count {show(alive)} outside [0, {num(numel)}]")
    check_positions(entry["positions"], _stored(tensors, f"{name}{_SEP}index"), numel, alive)
    check_values(entry["values"], _stored(tensors, f"{name}{_SEP}values"), dtype, alive)
    return _Entry(name, dtype, shape, alive, entry["positions"], entry["values"])


def _open(path: str | PathLike[str]) -> tuple[list[_Entry], dict[str, Tensor], int]:
    """Checked entries, stored tensors and file size of a sparse file (raises :class:`SparseFormatError`)."""
    metadata, tensors, size = read_sealed(path, _SPARSE)
    try:
        raw = strict_json(metadata["entries"], "the 'entries' metadata")
        if not isinstance(raw, dict):
            raise DefectError(f"the 'entries' metadata must map tensor names to objects, got {show(raw)}")
        entries, used = [], set()
        for name, entry in raw.items():
            try:
                entries.append(_check_entry(name, entry, tensors))
            except DefectError as err:
                raise DefectError(f"entry {show(name)}: {err}") from err
            used.update({name} if entries[-1].positions is None else {f"{name}{_SEP}values", f"{name}{_SEP}index"})
        extra = sorted(set(tensors) - used)
        if extra:
            raise DefectError(f"tensor {show(extra[0])} is not described by the metadata")
    except DefectError as err:
        raise fail(path, str(err)) from err
    return entries, tensors, size


def _limit(max_bytes: int | None, file_bytes: int) -> int:
    if max_bytes is None:
        return max(_MIN_LIMIT, _EXPANSION * file_bytes)
    if not is_int(max_bytes) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}.")
    return max_bytes


def _decode_all(entries: list[_Entry], tensors: Mapping[str, Tensor], limit: int, rule: str) -> dict[str, Any]:
    """``{name: (tensor, mask or None)}``, once the entries' total size is known to fit ``limit``."""
    need = sum(entry.cost for entry in entries)
    if need > limit:
        raise DefectError(
            f"decoding needs {num(need)} bytes (tensors and masks), more than the limit of {num(limit)} bytes "
            f"({rule}); a very sparse file can expand that much: if you trust it, pass max_bytes={need} or more"
        )
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    for entry in entries:
        if entry.positions is None or entry.values is None:
            out[entry.name] = (tensors[entry.name], None)
            continue
        try:
            keep = decode_positions(entry.positions, tensors[f"{entry.name}{_SEP}index"], entry.numel, entry.alive)
            values = decode_values(entry.values, tensors[f"{entry.name}{_SEP}values"], entry.dtype, entry.alive)
        except DefectError as err:
            raise DefectError(f"entry {show(entry.name)}: {err}") from err
        dense = torch.zeros(entry.numel, dtype=entry.dtype)
        dense.masked_scatter_(keep, values)
        out[entry.name] = (dense.view(entry.shape), keep.view(entry.shape))
    return out


def load_sparse(
    path: str | PathLike[str], *, max_bytes: int | None = None
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Read a file of :func:`export_sparse`: dense tensors (pruned entries zero) and the masks.

    The file is read once. Its SHA-256 (over the whole file) is checked first, then every name,
    type, count and size in its header against the bytes present, then the decoded size against
    ``max_bytes``, and only then is anything decoded; every entry is decoded and checked before
    anything is returned.

    Args:
        path: The file.
        max_bytes: The most bytes the returned tensors and masks may take, checked on the header
            before anything is decoded. ``None``: 64 x the file size, at least 256 MiB, which loads
            fp32 files down to about 2% density at any size and any file that decodes to less than
            256 MiB. A trusted file that is sparser loads with a larger value (the error says how
            large). Peak memory is at most about twice the file plus twice this.

    Returns:
        ``(state_dict, masks)`` on the CPU; ``masks`` holds the sparse entries only.

    Raises:
        SparseFormatError: If the file is truncated, corrupt, inconsistent, of another format or of
            format version ``"1"``, or decodes to more than ``max_bytes`` (names the file and the
            problem). Nothing else for any content of the file; ``OSError`` if it cannot be read.

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> w = torch.tensor([[0.5, -2.0], [3.0, 0.1]])
        >>> _ = export_sparse({"w": w}, {"w": w.abs() > 1}, path)
        >>> state, masks = load_sparse(path)
        >>> state["w"], masks["w"]
        (tensor([[ 0., -2.],
                [ 3.,  0.]]), tensor([[False,  True],
                [ True, False]]))
    """
    rule = "the default: 64 x the file size, at least 256 MiB" if max_bytes is None else "max_bytes"
    _limit(max_bytes, 0)  # a bad argument fails before the file is read
    entries, tensors, size = _open(path)
    try:
        decoded = _decode_all(entries, tensors, _limit(max_bytes, size), rule)
    except DefectError as err:
        raise fail(path, str(err)) from err
    state = {name: value for name, (value, _) in decoded.items()}
    return state, {name: keep for name, (_, keep) in decoded.items() if keep is not None}


def load_sparse_into(model: nn.Module, path: str | PathLike[str], *, max_bytes: int | None = None) -> dict[str, Tensor]:
    """Load a sparse file into ``model`` (strict); nothing is loaded unless every key and shape fits.

    Args:
        model: The network.
        path: A file of :func:`export_sparse`.
        max_bytes: See :func:`load_sparse`.

    Returns:
        The masks, each on its parameter's device (hand them to the pruner).

    Raises:
        SparseFormatError: If the file is corrupt.
        ValueError: If a key is missing or unexpected, or a shape differs (names the tensor and
            both shapes).

    Example::

        >>> import tempfile, os
        >>> net = nn.Linear(8, 4)
        >>> keep = net.weight.abs() > 0.2
        >>> path = os.path.join(tempfile.mkdtemp(), "net.safetensors")
        >>> _ = export_sparse(net, {"weight": keep}, path)
        >>> fresh = nn.Linear(8, 4)
        >>> masks = load_sparse_into(fresh, path)
        >>> torch.equal(fresh.weight, net.weight * keep)
        True
    """
    state, masks = load_sparse(path, max_bytes=max_bytes)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{os.fspath(path)!r} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}. "
            f"Nothing was loaded."
        )
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(
                f"Parameter {key!r} has shape {tuple(own[key].shape)} in the model and {tuple(value.shape)} in "
                f"{os.fspath(path)!r}. Nothing was loaded (a shrunk model? resize it first, see structure.resize_to)."
            )
    model.load_state_dict(state, strict=True)
    return {name: keep.to(own[name].device) for name, keep in masks.items()}


def sparse_size_report(path: str | PathLike[str]) -> SparseSizeReport:
    """Per-tensor and total bytes of a sparse file against dense and surviving-value bytes.

    The file is verified as by :func:`load_sparse`, but nothing is decoded.

    Example::

        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "w.safetensors")
        >>> w = torch.randn(100, 100)
        >>> _ = export_sparse({"w": w, "b": torch.zeros(100)}, {"w": w.abs() > 1.75}, path)
        >>> report = sparse_size_report(path)
        >>> [t.encoding.split(" |")[0] for t in report.tensors]
        ['rice(k=3)', 'dense']
        >>> report.dense_bytes
        40400
    """
    entries, tensors, size = _open(path)
    rows = []
    for e in entries:
        item, dtype = e.dtype.itemsize, _NAMES[e.dtype]
        if e.positions is None or e.values is None:
            dense = e.numel * item
            rows.append(TensorSize(e.name, e.shape, dtype, "dense", e.numel, e.numel, dense, dense, 0, dense))
            continue
        stored = tensors[f"{e.name}{_SEP}values"]
        index = tensors[f"{e.name}{_SEP}index"].numel()
        encoding = f"{code_name(e.positions)} | {e.values['codec']}"
        stored_bytes = stored.numel() * stored.element_size() + index
        rows.append(
            TensorSize(
                e.name, e.shape, dtype, encoding, e.numel, e.alive, e.numel * item, e.alive * item, index, stored_bytes
            )
        )
    return SparseSizeReport(os.fspath(path), size, tuple(rows))
