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
``<name>::values`` and ``<name>::index``; the metadata holds the format, the version (``"2"``), a
SHA-256 of the whole file (computed with that field's 64 hex digits set to ``0``) and, as JSON, per
tensor its shape, dtype and encodings. Loading reads the file once, checks the digest before it
parses anything, then checks every name, type, count and size against the bytes present before it
allocates, and decodes only what fits a memory limit tied to the file's size (``max_bytes``). Any
problem raises :class:`SparseFormatError`. Files of version ``"1"`` (no digest, so their header
cannot be verified) are refused: export them again. :func:`~lightning_prune.core.structure.save_shrunk`
writes the same sealed container.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import reprlib
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
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
VERSION = "2"
_SEP = "::"
_MAX_RICE_K = 24
_MAX_DIMS = 64
_CHUNK = 2**16  # codes (bits of a bitmap or unary part: bytes) decoded at a time
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
# safetensors' dtype names (little-endian data)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_ENTRY_KEYS = {
    "dense": frozenset({"kind", "dtype", "shape"}),
    "sparse": frozenset({"kind", "dtype", "shape", "alive", "positions", "values"}),
}
_POSITION_KEYS = {
    "full": frozenset({"code"}),
    "bitmap": frozenset({"code"}),
    "gap8": frozenset({"code", "of", "codes"}),
    "gap4": frozenset({"code", "of", "codes"}),
    "rice": frozenset({"code", "of", "k", "unary"}),
}
_DEFLATABLE = ("bitmap", "gap8")


class SparseFormatError(ValueError):
    """A file of this library that is corrupt, truncated or inconsistent (the message names the file and the problem).

    Raised by :func:`load_sparse` and friends, and by :func:`~lightning_prune.core.structure.load_shrunk`.
    """


class _DefectError(Exception):
    """A problem found in a file; :func:`_fail` turns it into a :class:`SparseFormatError` naming the file."""


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def _show(value: Any) -> str:
    """A short repr for messages: crafted metadata can hold long strings and lists, or deep nesting."""
    return _REPR.repr(value)


def _num(n: int) -> str:
    """An int for messages; a huge one as a power of two."""
    return f"{n:,}" if n < 10**30 else f"about 2**{n.bit_length() - 1}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------------------------------
# Bytes and bits
# ---------------------------------------------------------------------------------------------------------------------


def _bytes(t: Tensor) -> bytes:
    """The raw bytes of a tensor (native byte order), without numpy."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())


def _from_bytes(data: bytes | memoryview) -> Tensor:
    """A uint8 tensor holding a copy of ``data``."""
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


def _gap_marks(codes: Tensor, top: int, keep: Tensor) -> int:
    """Set the positions marked by gap codes in ``keep``, ``_CHUNK`` codes at a time; returns how many.

    The codes must not end with a filler. Each step is ``>= 1``, so the positions increase.
    """
    if codes.numel() and int(codes[-1]) == 0:
        raise _DefectError("the gap codes end with a filler code")
    end, marked = 0, 0
    for start in range(0, codes.numel(), _CHUNK):
        chunk = codes[start : start + _CHUNK]
        ends = chunk.to(torch.int64).masked_fill_(chunk == 0, top).cumsum_(0).add_(end - 1)
        end = int(ends[-1]) + 1
        if end > keep.numel():
            raise _DefectError(f"the index points past the end of the tensor ({end - 1} >= {keep.numel()})")
        positions = ends[chunk != 0]
        keep[positions] = True
        marked += positions.numel()
    return marked


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


def _rice_marks(data: Tensor, k: int, count: int, unary: int, keep: Tensor) -> int:
    """Set the positions of a Rice code in ``keep``, ``_CHUNK`` bits of its unary part at a time; returns how many.

    The sizes are checked by :func:`_index_size`; here the bits: ``count`` codes, no position past the
    end, padding of fewer than 8 bits (ones after the unary part, zeros after the remainders).
    """
    weights = 1 << torch.arange(k - 1, -1, -1)
    last_zero, last, done = -1, -1, 0
    for start in range(0, unary, _CHUNK // 8):
        zeros = (~_unpack_bits(data[start : min(unary, start + _CHUNK // 8)])).nonzero().flatten().add_(8 * start)
        m = zeros.numel()
        if done + m > count:
            raise _DefectError(f"the unary part holds more than the {count} codes expected")
        if not m:
            continue
        gaps = ((torch.diff(zeros, prepend=torch.tensor([last_zero])) - 1) << k) + 1
        if k:
            low = 8 * unary + done * k
            bits = _unpack_bits(data[low // 8 : (low + m * k + 7) // 8])[low % 8 : low % 8 + m * k]
            gaps += (bits.view(m, k) * weights).sum(1)
        if last + int(gaps.sum()) >= keep.numel():
            raise _DefectError(f"the index points past the end of the tensor ({keep.numel()} entries)")
        positions = gaps.cumsum_(0).add_(last)
        keep[positions] = True
        last, last_zero, done = int(positions[-1]), int(zeros[-1]), done + m
    if 8 * unary - last_zero - 1 >= 8:
        raise _DefectError("the unary part is padded with 8 or more bits")
    spare = -count * k % 8
    if done == count and spare and int(data[-1]) & ((1 << spare) - 1):
        raise _DefectError("the remainder bits are padded with set bits")
    return done


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


def _index_size(desc: Mapping[str, Any], numel: int, alive: int) -> int:
    """Bytes the (inflated) index of a position description must have; checks its fields, allocates nothing."""
    code = desc["code"]
    if code == "full":
        if alive != numel:
            raise _DefectError(f"code 'full' needs every entry alive, {alive} of {numel} are")
        return 0
    if code == "bitmap":
        return (numel + 7) // 8
    if desc["of"] not in ("alive", "pruned"):
        raise _DefectError(f"unknown position set {_show(desc['of'])} (expected 'alive' or 'pruned')")
    count = alive if desc["of"] == "alive" else numel - alive
    if code == "rice":
        k, unary = desc["k"], desc["unary"]
        if not _is_int(k) or not 0 <= k <= _MAX_RICE_K:
            raise _DefectError(f"Rice parameter k={_show(k)} is not an int in [0, {_MAX_RICE_K}]")
        # the unary part holds one zero per code and one one per unit of quotient: sum(q) <= numel - count
        if not _is_int(unary) or not (count + 7) // 8 <= unary <= (numel + 7) // 8:
            raise _DefectError(f"unary length {_show(unary)} outside [{(count + 7) // 8}, {(numel + 7) // 8}] bytes")
        return unary + (count * k + 7) // 8
    codes = desc["codes"]
    if not _is_int(codes) or not count <= codes <= numel:  # one code per position, each advancing >= 1
        raise _DefectError(f"code count {_show(codes)} outside [{count}, {numel}]")
    return codes if code == "gap8" else (codes + 1) // 2


def _check_positions(desc: Any, index: Tensor, numel: int, alive: int) -> None:
    """Check a position description against its stored index and the counts; allocates nothing."""
    code = desc.get("code") if isinstance(desc, dict) else None
    if not isinstance(code, str) or code not in _POSITION_KEYS:
        raise _DefectError(f"unknown position code {_show(code)} (expected full, bitmap, gap8, gap4 or rice)")
    keys = _POSITION_KEYS[code] | ({"deflate"} if code in _DEFLATABLE and "deflate" in desc else set())
    if set(desc) != keys:
        raise _DefectError(f"position code {code!r} has the fields {_show(sorted(desc))}, expected {sorted(keys)}")
    if index.dtype != torch.uint8 or index.dim() != 1:
        raise _DefectError(f"the index must be 1-D uint8, got {list(index.shape)} {index.dtype}")
    size = _index_size(desc, numel, alive)
    if "deflate" in desc and (not _is_int(desc["deflate"]) or desc["deflate"] != size):
        raise _DefectError(f"the index inflates to {_show(desc['deflate'])} bytes, {size} expected")
    if "deflate" not in desc and index.numel() != size:
        raise _DefectError(f"the index has {index.numel()} bytes, {size} expected")


def _inflate(blob: bytes, size: int, what: str) -> bytes:
    """Inflate a zlib stream that must give exactly ``size`` bytes; at most ``size + 1`` are ever produced."""
    stream = zlib.decompressobj()
    try:
        out = stream.decompress(blob, size + 1)
    except zlib.error as err:
        raise _DefectError(f"the deflated {what} is corrupt ({err})") from err
    if len(out) != size or not stream.eof or stream.unused_data:
        raise _DefectError(f"the deflated {what} does not inflate to exactly {size} bytes")
    return out


def _bitmap(data: Tensor, numel: int, alive: int) -> Tensor:
    keep = torch.empty(8 * data.numel(), dtype=torch.bool)
    for start in range(0, data.numel(), _CHUNK):
        keep[8 * start : 8 * (start + _CHUNK)] = _unpack_bits(data[start : start + _CHUNK])
    if keep[numel:].any():
        raise _DefectError("the bitmap has bits set past the end of the tensor")
    keep = keep[:numel]
    if int(keep.sum()) != alive:
        raise _DefectError(f"the bitmap marks {int(keep.sum())} entries alive, {alive} expected")
    return keep


def _decode_positions(desc: Mapping[str, Any], data: Tensor, numel: int, alive: int) -> Tensor:
    """The flat bool mask of a description checked by :func:`_check_positions`; raises on bad bits.

    Temporaries stay within a few MiB (``_CHUNK``), besides the inflated index and the mask.
    """
    code = desc["code"]
    if code == "full":
        return torch.ones(numel, dtype=torch.bool)
    if "deflate" in desc:
        data = _from_bytes(_inflate(_bytes(data), desc["deflate"], "index"))
    if code == "bitmap":
        return _bitmap(data, numel, alive)
    count = alive if desc["of"] == "alive" else numel - alive
    keep = torch.zeros(numel, dtype=torch.bool)
    if code == "rice":
        marked = _rice_marks(data, desc["k"], count, desc["unary"], keep)
    elif code == "gap8":
        marked = _gap_marks(data, 255, keep)
    else:
        nibbles = torch.stack([data >> 4, data & 15], 1).flatten()
        if desc["codes"] % 2 and int(nibbles[-1]):
            raise _DefectError("the pad nibble of the gap4 codes is set")
        marked = _gap_marks(nibbles[: desc["codes"]], 15, keep)
    if marked != count:
        raise _DefectError(f"the index marks {marked} positions, {count} expected")
    return keep if desc["of"] == "alive" else keep.logical_not_()


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


def _is_plane(plane: Any, count: int) -> bool:
    if not isinstance(plane, list) or len(plane) != 2 or not _is_int(plane[1]):
        return False
    return (plane[0] == "raw" and plane[1] == count) or (plane[0] == "deflate" and plane[1] >= 0)


def _check_values(desc: Any, stored: Tensor, dtype: torch.dtype, count: int) -> None:
    """Check a value description against the stored values and the alive count; allocates nothing."""
    codec = desc.get("codec") if isinstance(desc, dict) else None
    if codec == "raw":
        if set(desc) != {"codec"}:
            raise _DefectError(f"value codec 'raw' has the fields {_show(sorted(desc))}, expected ['codec']")
        if stored.dtype != dtype or tuple(stored.shape) != (count,):
            raise _DefectError(
                f"the values are stored as {list(stored.shape)} {stored.dtype}, [{count}] {dtype} expected"
            )
        return
    if codec != "planes":
        raise _DefectError(f"unknown value codec {_show(codec)} (expected 'raw' or 'planes')")
    planes = desc.get("planes")
    if set(desc) != {"codec", "planes"} or not isinstance(planes, list) or len(planes) != dtype.itemsize:
        raise _DefectError(f"the value codec lists {_show(planes)}, {dtype.itemsize} byte planes expected")
    if not all(_is_plane(plane, count) for plane in planes):
        raise _DefectError(f"the byte planes {_show(planes)} must each be ['raw', {count}] or ['deflate', bytes]")
    total = sum(length for _, length in planes)
    if stored.dtype != torch.uint8 or stored.dim() != 1 or stored.numel() != total:
        raise _DefectError(f"the values are stored as {list(stored.shape)} {stored.dtype}, [{total}] uint8 expected")


def _decode_values(desc: Mapping[str, Any], stored: Tensor, dtype: torch.dtype, count: int) -> Tensor:
    """The values of a description checked by :func:`_check_values`; raises ``_DefectError`` on a bad plane."""
    if desc["codec"] == "raw":
        return stored
    out, offset = torch.empty(count, dtype.itemsize, dtype=torch.uint8), 0
    for plane, (kind, length) in enumerate(desc["planes"]):
        chunk = stored[offset : offset + length]
        offset += length
        out[:, plane] = _from_bytes(_inflate(_bytes(chunk), count, "byte plane")) if kind == "deflate" else chunk
    if dtype == torch.bool and bool((out > 1).any()):
        raise _DefectError("bool values other than 0 and 1")
    return out.view(dtype).reshape(-1)


# ---------------------------------------------------------------------------------------------------------------------
# Sealed safetensors files: a SHA-256 of the whole file in the metadata, verified before anything is parsed
# ---------------------------------------------------------------------------------------------------------------------

_DIGEST_KEY = "sha256"
_BLANK = b"0" * 64
_DIGEST_FIELD = re.compile(rb'"sha256":"([0-9a-f]{64})"')  # a raw quote never occurs inside a JSON string


@dataclass(frozen=True)
class _Kind:
    """A file format of this library: its name, version and metadata keys, and how messages call it."""

    format: str
    version: str
    keys: frozenset[str]
    label: str
    writer: str


_SPARSE = _Kind(
    FORMAT, VERSION, frozenset({"format", "version", _DIGEST_KEY, "entries"}), "Sparse file", "export_sparse"
)


def _fail(path: str | PathLike[str], problem: str, label: str = "Sparse file") -> SparseFormatError:
    return SparseFormatError(f"{label} {os.fspath(path)!r}: {problem}")


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DefectError(f"duplicate key {_show(key)}")
        out[key] = value
    return out


def _constant(token: str) -> Any:
    raise _DefectError(f"non-finite number {token}")


def _strict_json(text: str | bytes, what: str) -> Any:
    """Parse JSON that has no duplicate keys and no ``NaN``/``Infinity``; any failure raises ``_DefectError``."""
    try:
        return json.loads(
            text.decode("utf-8") if isinstance(text, bytes) else text,
            object_pairs_hook=_unique,
            parse_constant=_constant,
        )
    except _DefectError as err:
        raise _DefectError(f"{what}: {err}") from err
    except (ValueError, RecursionError, MemoryError) as err:  # bad syntax or UTF-8, ints over 4300 digits, nesting
        raise _DefectError(f"{what} is not valid JSON ({type(err).__name__}: {_show(str(err))})") from err


def _digest_at(data: bytes) -> int | None:
    """Offset of the hex digits of the only digest field in the header, ``None`` if there is not exactly one."""
    if len(data) < 8:
        raise _DefectError(f"truncated: {len(data)} bytes, fewer than the 8 of the header length")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise _DefectError(f"truncated or corrupt: the header length says {_num(size)} bytes, {len(data) - 8} follow")
    found = list(_DIGEST_FIELD.finditer(data, 8, 8 + size))
    return found[0].start(1) if len(found) == 1 else None


def _digest(data: bytes, at: int) -> str:
    """SHA-256 of the file with the 64 digits at ``at`` read as ``0``."""
    view = memoryview(data)
    digest = hashlib.sha256(view[:at])
    digest.update(_BLANK)
    digest.update(view[at + 64 :])
    return digest.hexdigest()


def _seal(data: bytes) -> bytes:
    """Fill in the digest field of safetensors bytes (also used by the tests to re-seal crafted files)."""
    at = _digest_at(data)
    if at is None:
        raise ValueError("the header has no digest field, or more than one")
    return data[:at] + _digest(data, at).encode() + data[at + 64 :]


def _write_sealed(path: str | PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file whose metadata also holds the SHA-256 of the whole file."""
    from safetensors.torch import save

    Path(path).write_bytes(_seal(save(dict(tensors), metadata={**metadata, _DIGEST_KEY: _BLANK.decode()})))


def _wrong_kind(metadata: Mapping[str, Any], kind: _Kind) -> str | None:
    """Why the format or version is not ``kind``'s, or ``None``."""
    fmt, version = metadata.get("format"), metadata.get("version")
    if fmt != kind.format:
        return (
            f"not a {kind.label.lower()}: metadata format is {_show(fmt)}, expected {kind.format!r} "
            f"(write it with {kind.writer}())"
        )
    if version == "1":
        return (
            f"format version '1': such files carry no checksum of their header, so they cannot be verified; "
            f"this code reads version {kind.version!r}: write the file again with {kind.writer}() from the model "
            f"or its checkpoint"
        )
    if version != kind.version:
        return f"format version {_show(version)}; this code reads version {kind.version!r}"
    return None


def _unsealed(data: bytes, kind: _Kind) -> str:
    """Why a file without exactly one digest field is refused: another format or version, or corruption."""
    size = int.from_bytes(data[:8], "little")
    try:
        header = _strict_json(data[8 : 8 + size], "the safetensors header")
    except _DefectError as err:
        return f"not a readable safetensors file ({err})"
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    wrong = _wrong_kind(metadata if isinstance(metadata, dict) else {}, kind)
    return wrong or "the checksum field of the header is missing or damaged: the file is corrupt"


def _tensor_info(name: str, info: Any) -> tuple[str, torch.dtype, tuple[int, ...], int, int]:
    """``(name, dtype, shape, begin, end)`` of a header entry; its byte span must fit its shape and dtype."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise _DefectError(f"tensor {_show(name)}: the header entry must hold exactly dtype, shape and data_offsets")
    dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise _DefectError(f"tensor {_show(name)}: unsupported dtype {_show(info['dtype'])}")
    shape = _dims(info["shape"])
    span = info["data_offsets"]
    if not isinstance(span, list) or len(span) != 2 or not all(_is_int(o) for o in span) or not 0 <= span[0] <= span[1]:
        raise _DefectError(f"tensor {_show(name)}: bad data_offsets {_show(span)}")
    if span[1] - span[0] != math.prod(shape) * dtype.itemsize:
        raise _DefectError(
            f"tensor {_show(name)}: {list(shape)} {dtype} does not take the {span[1] - span[0]} bytes of its offsets"
        )
    return name, dtype, shape, span[0], span[1]


def _dims(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_DIMS or not all(_is_int(s) and s >= 0 for s in value):
        raise _DefectError(f"bad shape {_show(value)} (a list of at most {_MAX_DIMS} non-negative ints expected)")
    return tuple(value)


def _header(data: bytes) -> tuple[dict[str, str], list[tuple[str, torch.dtype, tuple[int, ...], int, int]]]:
    """The metadata and the tensor layout; the tensors must tile the data section exactly."""
    size = int.from_bytes(data[:8], "little")
    header = _strict_json(data[8 : 8 + size], "the header")
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _DefectError("the header must be a JSON object with a '__metadata__' object of strings")
    layout = sorted((_tensor_info(name, info) for name, info in header.items()), key=lambda t: (t[3], t[4]))
    end = 0
    for name, _, _, begin, stop in layout:
        if begin != end:
            raise _DefectError(
                f"tensor {_show(name)} starts at byte {begin} of the data, {end} expected (a gap or an overlap)"
            )
        end = stop
    if end != len(data) - 8 - size:
        raise _DefectError(f"the tensors take {end} bytes, the data section has {len(data) - 8 - size}")
    return metadata, layout


def _read_sealed(path: str | PathLike[str], kind: _Kind) -> tuple[dict[str, str], dict[str, Tensor], int]:
    """Metadata, tensors and file size of a sealed file, verified in this order: header length, digest, layout.

    Raises:
        SparseFormatError: On any problem (names the file). ``OSError`` (a missing file) passes through.
    """
    data = Path(path).read_bytes()
    try:
        at = _digest_at(data)
        if at is None:
            raise _DefectError(_unsealed(data, kind))
        if _digest(data, at) != data[at : at + 64].decode():
            raise _DefectError(
                "checksum mismatch: the SHA-256 of the file is not the one in its header; the file is corrupt"
            )
        try:
            metadata, layout = _header(data)
        except _DefectError as err:
            raise _DefectError(f"not a readable safetensors file ({err})") from err
        wrong = _wrong_kind(metadata, kind)
        if wrong is not None:
            raise _DefectError(wrong)
        if set(metadata) != kind.keys or metadata[_DIGEST_KEY] != data[at : at + 64].decode():
            raise _DefectError(f"the metadata holds {_show(sorted(metadata))}, expected {sorted(kind.keys)}")
        start, tensors = 8 + int.from_bytes(data[:8], "little"), {}
        for name, dtype, shape, begin, end in layout:
            raw = _from_bytes(memoryview(data)[start + begin : start + end])
            if dtype == torch.bool and bool((raw > 1).any()):
                raise _DefectError(f"tensor {_show(name)}: bool bytes other than 0 and 1")
            tensors[name] = raw.view(dtype).view(shape)
    except _DefectError as err:
        raise _fail(path, str(err), kind.label) from err
    return metadata, tensors, len(data)


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
            tensors[name] = value
        else:
            keep = masks[name].detach().to("cpu").reshape(-1)
            positions, index = _encode_positions(keep)
            values_desc, stored = _encode_values(value.reshape(-1)[keep], compress_values)
            entry.update(kind="sparse", alive=int(keep.sum()), positions=positions, values=values_desc)
            tensors[f"{name}{_SEP}values"] = stored.contiguous()
            tensors[f"{name}{_SEP}index"] = index.contiguous()
        entries[name] = entry
    metadata = {"format": FORMAT, "version": VERSION, "entries": json.dumps(entries, separators=(",", ":"))}
    _write_sealed(path, tensors, metadata)
    return sparse_size_report(path)


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
        raise _DefectError(f"its tensor {key!r} is missing")
    return tensors[key]


def _check_entry(name: str, entry: Any, tensors: Mapping[str, Tensor]) -> _Entry:
    """Check one entry against the stored tensors: every count and size, before anything is decoded."""
    if _SEP in name:
        raise _DefectError(f"the name contains {_SEP!r}, which the format reserves")
    if not isinstance(entry, dict):
        raise _DefectError(f"must be an object, got {_show(entry)}")
    kind = entry.get("kind")
    keys = _ENTRY_KEYS.get(kind) if isinstance(kind, str) else None
    if keys is None:
        raise _DefectError(f"unknown kind {_show(kind)} (expected 'dense' or 'sparse')")
    if set(entry) != keys:
        raise _DefectError(f"the fields are {_show(sorted(entry))}, expected {sorted(keys)}")
    dtype = _DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise _DefectError(f"unknown dtype {_show(entry['dtype'])}")
    shape = _dims(entry["shape"])
    numel = math.prod(shape)
    if numel >= 2**62:  # beyond any memory; keeps every count below in int64 and printable
        raise _DefectError(f"shape {_show(list(shape))} has {_num(numel)} entries")
    if kind == "dense":
        value = _stored(tensors, name)
        if value.dtype != dtype or tuple(value.shape) != shape:
            raise _DefectError(f"stored as {list(value.shape)} {value.dtype}, the entry says {list(shape)} {dtype}")
        return _Entry(name, dtype, shape, numel)
    alive = entry["alive"]
    if not _is_int(alive) or not 0 <= alive <= numel:
        raise _DefectError(f"alive count {_show(alive)} outside [0, {_num(numel)}]")
    _check_positions(entry["positions"], _stored(tensors, f"{name}{_SEP}index"), numel, alive)
    _check_values(entry["values"], _stored(tensors, f"{name}{_SEP}values"), dtype, alive)
    return _Entry(name, dtype, shape, alive, entry["positions"], entry["values"])


def _open(path: str | PathLike[str]) -> tuple[list[_Entry], dict[str, Tensor], int]:
    """Checked entries, stored tensors and file size of a sparse file (raises :class:`SparseFormatError`)."""
    metadata, tensors, size = _read_sealed(path, _SPARSE)
    try:
        raw = _strict_json(metadata["entries"], "the 'entries' metadata")
        if not isinstance(raw, dict):
            raise _DefectError(f"the 'entries' metadata must map tensor names to objects, got {_show(raw)}")
        entries, used = [], set()
        for name, entry in raw.items():
            try:
                entries.append(_check_entry(name, entry, tensors))
            except _DefectError as err:
                raise _DefectError(f"entry {_show(name)}: {err}") from err
            used.update({name} if entries[-1].positions is None else {f"{name}{_SEP}values", f"{name}{_SEP}index"})
        extra = sorted(set(tensors) - used)
        if extra:
            raise _DefectError(f"tensor {_show(extra[0])} is not described by the metadata")
    except _DefectError as err:
        raise _fail(path, str(err)) from err
    return entries, tensors, size


def _limit(max_bytes: int | None, file_bytes: int) -> int:
    if max_bytes is None:
        return max(_MIN_LIMIT, _EXPANSION * file_bytes)
    if not _is_int(max_bytes) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int or None, got {max_bytes!r}.")
    return max_bytes


def _decode_all(entries: list[_Entry], tensors: Mapping[str, Tensor], limit: int, rule: str) -> dict[str, Any]:
    """``{name: (tensor, mask or None)}``, once the entries' total size is known to fit ``limit``."""
    need = sum(entry.cost for entry in entries)
    if need > limit:
        raise _DefectError(
            f"decoding needs {_num(need)} bytes (tensors and masks), more than the limit of {_num(limit)} bytes "
            f"({rule}); a very sparse file can expand that much: if you trust it, pass max_bytes={need} or more"
        )
    out = {}
    for entry in entries:
        if entry.positions is None or entry.values is None:
            out[entry.name] = (tensors[entry.name], None)
            continue
        try:
            keep = _decode_positions(entry.positions, tensors[f"{entry.name}{_SEP}index"], entry.numel, entry.alive)
            values = _decode_values(entry.values, tensors[f"{entry.name}{_SEP}values"], entry.dtype, entry.alive)
        except _DefectError as err:
            raise _DefectError(f"entry {_show(entry.name)}: {err}") from err
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
    """
    rule = "the default: 64 x the file size, at least 256 MiB" if max_bytes is None else "max_bytes"
    _limit(max_bytes, 0)  # a bad argument fails before the file is read
    entries, tensors, size = _open(path)
    try:
        decoded = _decode_all(entries, tensors, _limit(max_bytes, size), rule)
    except _DefectError as err:
        raise _fail(path, str(err)) from err
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
        encoding = f"{_code_name(e.positions)} | {e.values['codec']}"
        stored_bytes = stored.numel() * stored.element_size() + index
        rows.append(
            TensorSize(
                e.name, e.shape, dtype, encoding, e.numel, e.alive, e.numel * item, e.alive * item, index, stored_bytes
            )
        )
    return SparseSizeReport(os.fspath(path), size, tuple(rows))


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
