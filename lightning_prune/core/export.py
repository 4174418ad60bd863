"""Compact storage of pruned weights: surviving values plus relative positions, in a safetensors file.

Han et al. (2015) store a pruned layer as its surviving values plus the *relative index* of each one
(the gap to the previous survivor) in a few bits, quoting about 15.6% overhead on the values (5 bits
per index for FC layers, 8 for conv). Here every masked tensor gets the smallest of these position
codes, measured on its actual mask:

* ``bitmap``: one bit per weight (best only between roughly 35% and 65% density);
* ``gap8`` / ``gap4``: gaps as bytes / nibbles; a code ``0`` means "skip 255 (15) positions" and
  carries no value, so long gaps cost one extra code and no filler value (Han stores a zero value);
* ``rice``: gaps Golomb-Rice coded with the best parameter ``k`` (the optimal prefix code for the
  geometric gaps of a random mask: 5.05 bits per survivor at 8% density, against an entropy bound of
  5.03; Han's 5-bit code needs about 5.4 once fillers are counted);
* ``full``: every weight alive, no positions.

The smaller of the two sets (alive or pruned positions) is coded, and the ``bitmap``/``gap8``
bytes are also tried deflated (:mod:`zlib`), which pays off on structured masks (dead input
pixels, dead rows). Values keep their dtype and bits; their bytes are split into byte planes
(sign/exponent bytes apart from mantissa bytes), and each plane is deflated when that makes it
smaller: the exponents of magnitude-pruned weights (all above a threshold) are very repetitive.
This is lossless: loading gives the masked tensors back bit for bit.

Position codes alone cannot beat the entropy of the mask: for a uniformly random 8% mask that is
15.7% of the fp32 values, so "file <= 1.16 x surviving fp32 bytes" is out of reach with raw values
once the file header is counted; the byte-plane deflate of the values is what brings the file below
the values' raw size (:func:`sparse_size_report` shows both parts).

The file is plain safetensors (no pickle): unmasked tensors under their own names, masked ones as
``<name>::values`` and ``<name>::index``; the metadata (format, version, and per tensor its shape,
dtype, encodings and a CRC-32) is JSON. Any inconsistency raises :class:`SparseFormatError`.
"""

from __future__ import annotations

import ctypes
import json
import os
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.core.masks import check_mask

__all__ = [
    "SparseFormatError",
    "SparseLinear",
    "SparseSizeReport",
    "TensorSize",
    "export_sparse",
    "load_sparse",
    "load_sparse_into",
    "position_sizes",
    "sparse_size_report",
    "to_sparse_linear",
]

FORMAT = "lightning_prune.sparse"
VERSION = "1"
_SEP = "::"
_MAX_RICE_K = 24
_MAX_NUMEL = 2**40

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


class SparseFormatError(ValueError):
    """A sparse file that is corrupt, truncated or inconsistent (the message names the file and the problem)."""


# ---------------------------------------------------------------------------------------------------------------------
# Bytes and bits
# ---------------------------------------------------------------------------------------------------------------------


def _bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor (native byte order), without numpy."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())


def _from_bytes(data: bytes) -> Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def _pack_bits(bits: Tensor, pad: bool = False) -> Tensor:
    """Pack a 1-D bool tensor into bytes, most significant bit first; the last byte padded with ``pad``."""
    n = bits.numel()
    if n % 8:
        bits = torch.cat([bits, torch.full((8 - n % 8,), pad, dtype=torch.bool)])
    b = bits.view(-1, 8).to(torch.uint8)
    out = b[:, 0] << 7
    for i in range(1, 8):
        out |= b[:, i] << (7 - i)
    return out


def _unpack_bits(data: Tensor) -> Tensor:
    return ((data.unsqueeze(1) >> _SHIFTS) & 1).flatten().bool()


# ---------------------------------------------------------------------------------------------------------------------
# Position codes
# ---------------------------------------------------------------------------------------------------------------------


def _gaps(positions: Tensor) -> Tensor:
    """Distances from each position to the previous one (the first to ``-1``): all ``>= 1``."""
    return torch.diff(positions, prepend=torch.tensor([-1], dtype=torch.int64))


def _gap_codes(gaps: Tensor, top: int) -> Tensor:
    """Codes ``1..top`` advance and mark a position; a code ``0`` advances ``top`` and marks nothing."""
    fillers = (gaps - 1) // top
    ends = torch.cumsum(fillers + 1, 0) - 1
    codes = torch.zeros(int(ends[-1]) + 1 if len(ends) else 0, dtype=torch.uint8)
    codes[ends] = (gaps - fillers * top).to(torch.uint8)
    return codes


def _gap_positions(codes: Tensor, top: int) -> Tensor:
    codes = codes.to(torch.int64)
    steps = torch.where(codes == 0, top, codes)
    return (torch.cumsum(steps, 0) - 1)[codes != 0]


def _rice_size(gaps: Tensor, k: int) -> int:
    n = gaps.numel()
    return (int(((gaps - 1) >> k).sum()) + n + 7) // 8 + (n * k + 7) // 8


def _rice_best_k(gaps: Tensor) -> int:
    if gaps.numel() == 0:
        return 0
    sizes = [_rice_size(gaps, k) for k in range(_MAX_RICE_K + 1)]
    return min(range(len(sizes)), key=sizes.__getitem__)


def _rice_encode(gaps: Tensor, k: int) -> tuple[Tensor, int]:
    """Golomb-Rice code of ``gaps - 1``: a unary stream of quotients, then ``k``-bit remainders.

    Returns the bytes and the length of the unary part in bytes.
    """
    v = gaps - 1
    q = v >> k
    ones = torch.ones(int(q.sum()) + q.numel(), dtype=torch.bool)
    ones[torch.cumsum(q + 1, 0) - 1] = False  # each quotient: q ones, then a zero
    unary = _pack_bits(ones, pad=True)
    if k == 0 or v.numel() == 0:
        return unary, unary.numel()
    shifts = torch.arange(k - 1, -1, -1, dtype=torch.int64)
    rest = _pack_bits(((v.unsqueeze(1) >> shifts) & 1).flatten().bool())
    return torch.cat([unary, rest]), unary.numel()


def _rice_decode(data: Tensor, k: int, count: int, unary_bytes: int) -> Tensor:
    if unary_bytes > data.numel():
        raise ValueError(f"the unary part ({unary_bytes} bytes) is longer than the index ({data.numel()} bytes)")
    zeros = (~_unpack_bits(data[:unary_bytes])).nonzero().flatten()
    if zeros.numel() != count:
        raise ValueError(f"the unary part holds {zeros.numel()} codes, {count} expected")
    q = torch.diff(zeros, prepend=torch.tensor([-1], dtype=torch.int64)) - 1
    rest_bytes = (count * k + 7) // 8
    if data.numel() != unary_bytes + rest_bytes:
        raise ValueError(f"the index has {data.numel()} bytes, {unary_bytes + rest_bytes} expected")
    if k:
        bits = _unpack_bits(data[unary_bytes:])[: count * k].view(count, k).to(torch.int64)
        r = (bits << torch.arange(k - 1, -1, -1, dtype=torch.int64)).sum(1)
    else:
        r = torch.zeros(count, dtype=torch.int64)
    return torch.cumsum((q << k) + r + 1, 0) - 1


def _candidates(keep: Tensor) -> list[tuple[dict[str, Any], Tensor]]:
    """Every position code of a flat bool mask: ``(description, bytes)``."""
    n, alive = keep.numel(), int(keep.sum())
    if alive == n:
        return [({"code": "full"}, torch.empty(0, dtype=torch.uint8))]
    of = "alive" if alive <= n - alive else "pruned"
    chosen = keep if of == "alive" else ~keep
    gaps = _gaps(chosen.nonzero().flatten())
    out: list[tuple[dict[str, Any], Tensor]] = [({"code": "bitmap"}, _pack_bits(keep))]
    gap8 = _gap_codes(gaps, 255)
    out.append(({"code": "gap8", "of": of, "codes": gap8.numel()}, gap8))
    nibbles = _gap_codes(gaps, 15)
    count = nibbles.numel()
    if count % 2:
        nibbles = torch.cat([nibbles, torch.zeros(1, dtype=torch.uint8)])
    out.append(({"code": "gap4", "of": of, "codes": count}, nibbles[0::2] * 16 + nibbles[1::2]))
    k = _rice_best_k(gaps)
    data, unary = _rice_encode(gaps, k)
    out.append(({"code": "rice", "of": of, "k": k, "unary": unary}, data))
    for desc, blob in list(out[:2]):
        if blob.numel() > 64:
            packed = zlib.compress(_bytes(blob), 9)
            if len(packed) < blob.numel():
                out.append(({**desc, "deflate": blob.numel()}, _from_bytes(packed)))
    return out


def _encode_positions(keep: Tensor) -> tuple[dict[str, Any], Tensor]:
    options = _candidates(keep)
    return min(options, key=lambda item: item[1].numel())


def _decode_positions(desc: Mapping[str, Any], data: Tensor, numel: int, alive: int) -> Tensor:
    """The flat bool mask described by ``desc``; raises ``ValueError`` on any inconsistency."""
    code = desc.get("code")
    if "deflate" in desc:
        raw = zlib.decompress(_bytes(data))
        if len(raw) != desc["deflate"]:
            raise ValueError(f"the inflated index has {len(raw)} bytes, {desc['deflate']} expected")
        data = _from_bytes(raw)
    if code == "full":
        if alive != numel or data.numel():
            raise ValueError("code 'full' needs every entry alive and no index bytes")
        return torch.ones(numel, dtype=torch.bool)
    if code == "bitmap":
        if data.numel() != (numel + 7) // 8:
            raise ValueError(f"the bitmap has {data.numel()} bytes, {(numel + 7) // 8} expected")
        bits = _unpack_bits(data)
        if bits[numel:].any():
            raise ValueError("the bitmap has bits set past the end of the tensor")
        keep = bits[:numel]
        if int(keep.sum()) != alive:
            raise ValueError(f"the bitmap marks {int(keep.sum())} entries alive, {alive} expected")
        return keep
    of = desc.get("of")
    if of not in ("alive", "pruned"):
        raise ValueError(f"unknown position set {of!r} (expected 'alive' or 'pruned')")
    count = alive if of == "alive" else numel - alive
    if code in ("gap8", "gap4"):
        codes = int(desc["codes"])
        if code == "gap8":
            if data.numel() != codes:
                raise ValueError(f"the index has {data.numel()} bytes, {codes} expected")
            positions = _gap_positions(data, 255)
        else:
            if data.numel() != (codes + 1) // 2:
                raise ValueError(f"the index has {data.numel()} bytes, {(codes + 1) // 2} expected")
            nibbles = torch.stack([data >> 4, data & 15], 1).flatten()[:codes]
            positions = _gap_positions(nibbles, 15)
    elif code == "rice":
        k = int(desc["k"])
        if not 0 <= k <= _MAX_RICE_K:
            raise ValueError(f"Rice parameter k={k} out of range [0, {_MAX_RICE_K}]")
        positions = _rice_decode(data, k, count, int(desc["unary"]))
    else:
        raise ValueError(f"unknown position code {code!r} (expected full, bitmap, gap8, gap4 or rice)")
    if positions.numel() != count:
        raise ValueError(f"the index marks {positions.numel()} positions, {count} expected")
    if count and int(positions[-1]) >= numel:
        raise ValueError(f"the index points past the end of the tensor ({int(positions[-1])} >= {numel})")
    keep = torch.zeros(numel, dtype=torch.bool)
    keep[positions] = True
    return keep if of == "alive" else ~keep


def _code_name(desc: Mapping[str, Any]) -> str:
    name = str(desc.get("code"))
    if desc.get("code") == "rice":
        name += f"(k={desc['k']})"
    if desc.get("of") == "pruned":
        name += "/pruned"
    return name + ("+deflate" if "deflate" in desc else "")


def position_sizes(keep: Tensor) -> dict[str, int]:
    """Bytes each position code takes for this mask (the smallest one is what :func:`export_sparse` stores).

    Example::

        >>> keep = torch.zeros(1000, dtype=torch.bool)
        >>> keep[::10] = True
        >>> position_sizes(keep)  # a regular pattern: deflate finds it
        {'bitmap': 125, 'gap8': 100, 'gap4': 50, 'rice(k=2)': 63, 'bitmap+deflate': 16, 'gap8+deflate': 12}
    """
    flat = keep.detach().to("cpu").reshape(-1).bool()
    return {_code_name(desc): blob.numel() for desc, blob in _candidates(flat)}


# ---------------------------------------------------------------------------------------------------------------------
# Value codes
# ---------------------------------------------------------------------------------------------------------------------


def _encode_values(values: Tensor, compress: bool) -> tuple[dict[str, Any], Tensor]:
    """Raw values, or their byte planes each deflated when smaller. Returns the description and what to store."""
    size = values.element_size()
    if not compress or values.numel() < 64:
        return {"codec": "raw"}, values
    planes = values.contiguous().view(torch.uint8).view(-1, size).t()
    parts, desc = [], []
    for plane in planes:
        raw = _bytes(plane)
        packed = zlib.compress(raw, 9)
        if len(packed) < len(raw):
            parts.append(packed)
            desc.append(["deflate", len(packed)])
        else:
            parts.append(raw)
            desc.append(["raw", len(raw)])
    blob = b"".join(parts)
    if len(blob) >= values.numel() * size:
        return {"codec": "raw"}, values
    return {"codec": "planes", "planes": desc}, _from_bytes(blob)


def _decode_values(desc: Mapping[str, Any], stored: Tensor, dtype: torch.dtype, count: int) -> Tensor:
    codec = desc.get("codec")
    if codec == "raw":
        if stored.dtype != dtype or stored.numel() != count:
            raise ValueError(f"the values are {stored.numel()} x {stored.dtype}, {count} x {dtype} expected")
        return stored.reshape(-1)
    if codec != "planes":
        raise ValueError(f"unknown value codec {codec!r} (expected 'raw' or 'planes')")
    size = torch.empty(0, dtype=dtype).element_size()
    planes_desc = desc.get("planes")
    if not isinstance(planes_desc, list) or len(planes_desc) != size:
        raise ValueError(f"the value codec lists {planes_desc!r}, {size} byte planes expected")
    blob = _bytes(stored)
    if stored.dtype != torch.uint8 or len(blob) != sum(int(n) for _, n in planes_desc):
        raise ValueError(f"the values blob has {len(blob)} bytes, {sum(int(n) for _, n in planes_desc)} expected")
    planes, offset = [], 0
    for kind, length in planes_desc:
        chunk = blob[offset : offset + int(length)]
        offset += int(length)
        if kind == "deflate":
            chunk = zlib.decompress(chunk)
        elif kind != "raw":
            raise ValueError(f"unknown plane codec {kind!r}")
        if len(chunk) != count:
            raise ValueError(f"a byte plane has {len(chunk)} bytes, {count} expected")
        planes.append(_from_bytes(chunk))
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.stack(planes, 1).contiguous().view(dtype).reshape(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Export and load
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
        line = lambda cells: "  ".join(  # noqa: E731
            c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()
        rule = "  ".join("-" * w for w in widths)
        return "\n".join([line(header), rule, *map(line, rows), rule, line(total)])


def _state_of(model_or_state_dict: nn.Module | Mapping[str, Tensor]) -> dict[str, Tensor]:
    if isinstance(model_or_state_dict, nn.Module):
        return dict(model_or_state_dict.state_dict())
    if isinstance(model_or_state_dict, Mapping):
        return dict(model_or_state_dict)
    raise TypeError(f"Expected an nn.Module or a state dict, got {type(model_or_state_dict).__name__}.")


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
    from safetensors.torch import save_file

    state = _state_of(model_or_state_dict)
    for name, keep in masks.items():
        if name not in state:
            raise ValueError(f"`masks` names {name!r}, which is not in the state dict (keys: {list(state)[:8]}...).")
        check_mask(name, keep, state[name].shape)
    tensors: dict[str, Tensor] = {}
    entries: dict[str, dict[str, Any]] = {}
    storages: set[int] = set()
    for name, value in state.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in storages:
            value = value.clone()  # tied or overlapping tensors: safetensors stores each name on its own
        storages.add(value.untyped_storage().data_ptr())
        if value.dtype not in _NAMES:
            raise ValueError(f"Tensor {name!r} has dtype {value.dtype}; supported: {sorted(_DTYPES)}.")
        if _SEP in name:
            raise ValueError(f"Tensor name {name!r} contains {_SEP!r}, which the sparse format reserves.")
        entry: dict[str, Any] = {"dtype": _NAMES[value.dtype], "shape": list(value.shape)}
        if name not in masks:
            entry["kind"] = "dense"
            entry["crc32"] = zlib.crc32(_bytes(value))
            tensors[name] = value
        else:
            keep = masks[name].detach().to("cpu").reshape(-1)
            positions, index = _encode_positions(keep)
            values_desc, stored = _encode_values(value.reshape(-1)[keep], compress_values)
            entry.update(kind="sparse", alive=int(keep.sum()), positions=positions, values=values_desc)
            entry["crc32"] = zlib.crc32(_bytes(index), zlib.crc32(_bytes(stored)))
            tensors[f"{name}{_SEP}values"] = stored.contiguous()
            tensors[f"{name}{_SEP}index"] = index.contiguous()
        entries[name] = entry
    metadata = {"format": FORMAT, "version": VERSION, "entries": json.dumps(entries, separators=(",", ":"))}
    save_file(tensors, str(path), metadata=metadata)
    return sparse_size_report(path)


def _fail(path: str | PathLike[str], problem: str) -> SparseFormatError:
    return SparseFormatError(f"Sparse file {os.fspath(path)!r}: {problem}")


def _read(path: str | PathLike[str]) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """Entries and stored tensors, after checking the header (raises :class:`SparseFormatError`)."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    except FileNotFoundError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or malformed files
        raise _fail(path, f"not a readable safetensors file ({type(err).__name__}: {err})") from err
    if metadata.get("format") != FORMAT:
        raise _fail(path, f"metadata format is {metadata.get('format')!r}, expected {FORMAT!r}")
    if metadata.get("version") != VERSION:
        raise _fail(path, f"format version {metadata.get('version')!r}; this code reads version {VERSION!r}")
    try:
        entries = json.loads(metadata.get("entries", ""))
    except json.JSONDecodeError as err:
        raise _fail(path, f"the 'entries' metadata is not valid JSON ({err})") from err
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise _fail(path, "the 'entries' metadata must map tensor names to objects")
    return entries, tensors


def _shape(entry: Mapping[str, Any]) -> tuple[int, ...]:
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"bad shape {shape!r}")
    return tuple(shape)


def _decode_entry(name: str, entry: Mapping[str, Any], tensors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    dtype = _DTYPES.get(entry.get("dtype"))  # type: ignore[arg-type]
    if dtype is None:
        raise ValueError(f"unknown dtype {entry.get('dtype')!r}")
    shape = _shape(entry)
    numel = 1
    for s in shape:
        numel *= s
    if numel > _MAX_NUMEL:
        raise ValueError(f"shape {list(shape)} has {numel} entries, more than the {_MAX_NUMEL} this reader accepts")
    kind = entry.get("kind")
    if kind == "dense":
        if name not in tensors:
            raise ValueError("its tensor is missing")
        value = tensors[name]
        if value.dtype != dtype or tuple(value.shape) != shape:
            raise ValueError(f"stored as {tuple(value.shape)} {value.dtype}, metadata says {shape} {dtype}")
        if zlib.crc32(_bytes(value)) != entry.get("crc32"):
            raise ValueError("CRC-32 mismatch: the data is corrupt")
        return value, None
    if kind != "sparse":
        raise ValueError(f"unknown kind {kind!r} (expected 'dense' or 'sparse')")
    stored, index = tensors.get(f"{name}{_SEP}values"), tensors.get(f"{name}{_SEP}index")
    if stored is None or index is None:
        raise ValueError(f"{name}{_SEP}values or {name}{_SEP}index is missing")
    if index.dtype != torch.uint8 or index.dim() != 1:
        raise ValueError(f"the index must be 1-D uint8, got {tuple(index.shape)} {index.dtype}")
    if zlib.crc32(_bytes(index), zlib.crc32(_bytes(stored))) != entry.get("crc32"):
        raise ValueError("CRC-32 mismatch: the data is corrupt")
    alive = entry.get("alive")
    if not isinstance(alive, int) or not 0 <= alive <= numel:
        raise ValueError(f"alive count {alive!r} outside [0, {numel}]")
    positions = entry.get("positions")
    values_desc = entry.get("values")
    if not isinstance(positions, dict) or not isinstance(values_desc, dict):
        raise ValueError("'positions' and 'values' must be objects")
    keep = _decode_positions(positions, index, numel, alive)
    values = _decode_values(values_desc, stored, dtype, alive)
    dense = torch.zeros(numel, dtype=dtype)
    dense[keep] = values
    return dense.view(shape), keep.view(shape)


def load_sparse(path: str | PathLike[str]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Read a file of :func:`export_sparse`: dense tensors (pruned entries zero) and the masks.

    Every entry is decoded and checked (CRC-32, counts, bounds) before anything is returned.

    Returns:
        ``(state_dict, masks)`` on the CPU; ``masks`` holds the sparse entries only.

    Raises:
        SparseFormatError: If the file is truncated, corrupt or inconsistent (names the file and
            the problem).
    """
    entries, tensors = _read(path)
    state: dict[str, Tensor] = {}
    masks: dict[str, Tensor] = {}
    used: set[str] = set()
    for name, entry in entries.items():
        try:
            value, keep = _decode_entry(name, entry, tensors)
        except (ValueError, TypeError, KeyError, RuntimeError, IndexError, zlib.error) as err:
            raise _fail(path, f"entry {name!r}: {err}") from err
        state[name] = value
        if keep is None:
            used.add(name)
        else:
            masks[name] = keep
            used.update({f"{name}{_SEP}values", f"{name}{_SEP}index"})
    extra = sorted(set(tensors) - used)
    if extra:
        raise _fail(path, f"tensor {extra[0]!r} is not described by the metadata")
    return state, masks


def load_sparse_into(model: nn.Module, path: str | PathLike[str]) -> dict[str, Tensor]:
    """Load a sparse file into ``model`` (strict); nothing is loaded unless every key and shape fits.

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
    state, masks = load_sparse(path)
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
    entries, tensors = _read(path)
    rows = []
    for name, entry in entries.items():
        try:
            dtype = _DTYPES[entry["dtype"]]
            shape = _shape(entry)
        except (KeyError, ValueError) as err:
            raise _fail(path, f"entry {name!r}: {err}") from err
        item = torch.empty(0, dtype=dtype).element_size()
        numel = 1
        for s in shape:
            numel *= s
        if entry.get("kind") == "dense":
            size = numel * item
            rows.append(TensorSize(name, shape, entry["dtype"], "dense", numel, numel, size, size, 0, size))
            continue
        stored = tensors.get(f"{name}{_SEP}values")
        index = tensors.get(f"{name}{_SEP}index")
        if stored is None or index is None:
            raise _fail(path, f"entry {name!r}: its values or index tensor is missing")
        alive = int(entry.get("alive", 0))
        stored_bytes = stored.numel() * stored.element_size()
        encoding = f"{_code_name(entry.get('positions', {}))} | {entry.get('values', {}).get('codec')}"
        rows.append(
            TensorSize(
                name,
                shape,
                entry["dtype"],
                encoding,
                numel,
                alive,
                numel * item,
                alive * item,
                index.numel(),
                stored_bytes + index.numel(),
            )
        )
    return SparseSizeReport(os.fspath(path), os.path.getsize(path), tuple(rows))


# ---------------------------------------------------------------------------------------------------------------------
# Sparse inference
# ---------------------------------------------------------------------------------------------------------------------


class SparseLinear(nn.Module):
    """Inference-only ``Linear`` with a CSR weight: ``y = x W^T + b`` through :func:`torch.sparse.addmm`.

    Args:
        weight: Dense ``(out, in)`` weight; its zeros are dropped.
        bias: Optional ``(out,)`` bias.

    Example::

        >>> w = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
        >>> SparseLinear(w, torch.tensor([0.5, 0.0]))(torch.tensor([[1.0, 3.0]]))
        tensor([[6.5000, 1.0000]])
    """

    def __init__(self, weight: Tensor, bias: Tensor | None = None):
        super().__init__()
        self.in_features = weight.shape[1]
        self.out_features = weight.shape[0]
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
            self.register_buffer("weight", weight.detach().to_sparse_csr())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        """Apply the layer to the last dimension of ``x``."""
        flat = x.reshape(-1, self.in_features).t()
        if self.bias is None:
            out = torch.sparse.mm(self.weight, flat)
        else:
            out = torch.sparse.addmm(self.bias.unsqueeze(1).expand(-1, flat.shape[1]), self.weight, flat)
        return out.t().reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        """Sizes and the number of stored weights."""
        nnz = self.weight._nnz()
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={nnz}"


def to_sparse_linear(
    model: nn.Module, masks: Mapping[str, Tensor] | None = None, *, max_density: float = 0.5
) -> list[str]:
    """Replace pruned ``nn.Linear`` layers by :class:`SparseLinear`, in place, for inference.

    Args:
        model: The network.
        masks: ``{parameter_name: bool mask}``: the layers whose ``weight`` has a mask are converted
            (entries outside the mask dropped). ``None``: every ``nn.Linear`` whose share of nonzero
            weights is at most ``max_density``.
        max_density: Density limit when ``masks`` is ``None`` (sparse kernels lose to dense ones
            well below 50% density on most hardware).

    Returns:
        Names of the replaced layers.

    Example::

        >>> net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
        >>> keep = torch.rand(3, 4) < 0.3
        >>> to_sparse_linear(net, {"0.weight": keep})
        ['0']
    """
    replace: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or not name:
            continue
        key = f"{name}.weight"
        with torch.no_grad():
            weight = module.weight.detach()
            if masks is not None:
                if key not in masks:
                    continue
                weight = torch.where(masks[key].to(weight.device), weight, torch.zeros_like(weight))
            elif weight.count_nonzero() > max_density * weight.numel():
                continue
        replace[name] = SparseLinear(weight, module.bias)
    for name, layer in replace.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return list(replace)
