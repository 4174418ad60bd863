"""The sealed safetensors container of this library's files: a SHA-256 of the whole file, verified first.

Sparse files (:func:`~lightning_prune.core.export.export_sparse`) and shrunk checkpoints
(:func:`~lightning_prune.core.structure.save_shrunk`) are plain safetensors files whose string
metadata also holds ``"sha256"``: the digest of the whole file computed with that field's 64 hex
digits set to ``0``. :func:`read_sealed` checks, in this order, the header length, the digest, the
header JSON (strict: no duplicate keys, no ``NaN``/``Infinity``), the tensor layout (the tensors
tile the data section exactly) and the format, version and metadata keys of a :class:`FileKind`.
Any problem is a :class:`DefectError`, which :func:`fail` turns into a :class:`SparseFormatError`
naming the file.

Also here, for the decoders of untrusted bytes: the raw bytes of tensors (:func:`tensor_bytes`,
:func:`bytes_tensor`) and a bounded :func:`inflate`.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import math
import os
import re
import reprlib
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, TypeGuard

import torch
from torch import Tensor

__all__ = [
    "DefectError",
    "FileKind",
    "SparseFormatError",
    "bytes_tensor",
    "check_dims",
    "cpu_copies",
    "fail",
    "inflate",
    "is_int",
    "num",
    "read_sealed",
    "seal",
    "show",
    "strict_json",
    "tensor_bytes",
    "write_sealed",
]

_MAX_DIMS = 64
_DIGEST_KEY = "sha256"
_BLANK = b"0" * 64
_DIGEST_FIELD = re.compile(rb'"sha256":"([0-9a-f]{64})"')  # a raw quote never occurs inside a JSON string
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


class SparseFormatError(ValueError):
    """A file of this library that is corrupt, truncated or inconsistent (the message names the file and the problem).

    Raised by :func:`~lightning_prune.core.export.load_sparse` and friends, and by
    :func:`~lightning_prune.core.structure.load_shrunk`.
    """


class DefectError(Exception):
    """A problem found in a file; :func:`fail` turns it into a :class:`SparseFormatError` naming the file."""


@dataclass(frozen=True)
class FileKind:
    """A file format of this library: its name, version and metadata keys, and how messages call it.

    Attributes:
        format: The ``"format"`` metadata value.
        version: The ``"version"`` metadata value this code reads.
        keys: Every metadata key a file of this kind holds (``"sha256"`` included).
        label: How messages name such a file (``"Sparse file"``).
        writer: The function that writes it, for hints (``"export_sparse"``).
    """

    format: str
    version: str
    keys: frozenset[str]
    label: str
    writer: str


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 60
_REPR.maxlevel = 3


def show(value: Any) -> str:
    """A short repr for messages: crafted metadata can hold long strings and lists, or deep nesting.

    Example::

        >>> show(list(range(100)))
        '[0, 1, 2, 3, 4, 5, ...]'
    """
    return _REPR.repr(value)


def num(n: int) -> str:
    """An int for messages; a huge one as a power of two.

    Example::

        >>> num(1234567), num(10**40)
        ('1,234,567', 'about 2**132')
    """
    return f"{n:,}" if n < 10**30 else f"about 2**{n.bit_length() - 1}"


def is_int(value: Any) -> TypeGuard[int]:
    """Whether ``value`` is an ``int`` and not a ``bool`` (JSON ``true`` is not a count).

    Example::

        >>> is_int(3), is_int(True), is_int(3.0)
        (True, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


def fail(path: str | PathLike[str], problem: str, label: str = "Sparse file") -> SparseFormatError:
    """The :class:`SparseFormatError` to raise for ``problem`` in the file ``path``.

    Example::

        >>> str(fail("w.safetensors", "checksum mismatch"))
        "Sparse file 'w.safetensors': checksum mismatch"
    """
    return SparseFormatError(f"{label} {os.fspath(path)!r}: {problem}")


def check_dims(value: Any) -> tuple[int, ...]:
    """A shape read from a file: a list of at most 64 non-negative ints, else :class:`DefectError`.

    Example::

        >>> check_dims([3, 4])
        (3, 4)
    """
    if not isinstance(value, list) or len(value) > _MAX_DIMS or not all(is_int(s) and s >= 0 for s in value):
        raise DefectError(f"bad shape {show(value)} (a list of at most {_MAX_DIMS} non-negative ints expected)")
    return tuple(value)


# ---------------------------------------------------------------------------------------------------------------------
# Bytes
# ---------------------------------------------------------------------------------------------------------------------


def tensor_bytes(t: Tensor) -> bytes:
    r"""The raw bytes of a tensor (native byte order), without numpy.

    Example::

        >>> tensor_bytes(torch.tensor([1, 2], dtype=torch.uint8))
        b'\x01\x02'
    """
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return ctypes.string_at(flat.data_ptr(), flat.numel() * flat.element_size())


def bytes_tensor(data: bytes | memoryview) -> Tensor:
    r"""A uint8 tensor holding a copy of ``data``.

    Example::

        >>> bytes_tensor(b"\x01\x02")
        tensor([1, 2], dtype=torch.uint8)
    """
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def inflate(blob: bytes, size: int, what: str) -> bytes:
    """Inflate a zlib stream that must give exactly ``size`` bytes; at most ``size + 1`` are ever produced.

    Raises:
        DefectError: If the stream is corrupt or does not inflate to exactly ``size`` bytes.

    Example::

        >>> inflate(zlib.compress(bytes(1000)), 1000, "index") == bytes(1000)
        True
    """
    stream = zlib.decompressobj()
    try:
        out = stream.decompress(blob, size + 1)
    except zlib.error as err:
        raise DefectError(f"the deflated {what} is corrupt ({err})") from err
    if len(out) != size or not stream.eof or stream.unused_data:
        raise DefectError(f"the deflated {what} does not inflate to exactly {size} bytes")
    return out


def cpu_copies(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor detached, on the CPU and contiguous, tensors sharing storage (tied weights) cloned apart.

    safetensors refuses tensors that share memory: every name is stored on its own.

    Example::

        >>> w = torch.ones(2)
        >>> out = cpu_copies({"a": w, "b": w})
        >>> out["a"].data_ptr() != out["b"].data_ptr()
        True
    """
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in state.items():
        value = value.detach().to("cpu").contiguous()
        if value.numel() and value.untyped_storage().data_ptr() in seen:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Strict JSON
# ---------------------------------------------------------------------------------------------------------------------


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DefectError(f"duplicate key {show(key)}")
        out[key] = value
    return out


def _constant(token: str) -> Any:
    raise DefectError(f"non-finite number {token}")


def strict_json(text: str | bytes, what: str) -> Any:
    """Parse JSON that has no duplicate keys and no ``NaN``/``Infinity``; any failure raises :class:`DefectError`.

    Example::

        >>> strict_json('{"a": [1, 2]}', "the header")
        {'a': [1, 2]}
        >>> strict_json('{"a": 1, "a": 2}', "the header")
        Traceback (most recent call last):
        ...
        lightning_prune.core.export.container.DefectError: the header: duplicate key 'a'
    """
    try:
        return json.loads(
            text.decode("utf-8") if isinstance(text, bytes) else text,
            object_pairs_hook=_unique,
            parse_constant=_constant,
        )
    except DefectError as err:
        raise DefectError(f"{what}: {err}") from err
    except (ValueError, RecursionError, MemoryError) as err:  # bad syntax or UTF-8, ints over 4300 digits, nesting
        raise DefectError(f"{what} is not valid JSON ({type(err).__name__}: {show(str(err))})") from err


# ---------------------------------------------------------------------------------------------------------------------
# Sealing and writing
# ---------------------------------------------------------------------------------------------------------------------


def _digest_at(data: bytes) -> int | None:
    """Offset of the hex digits of the only digest field in the header, ``None`` if there is not exactly one."""
    if len(data) < 8:
        raise DefectError(f"truncated: {len(data)} bytes, fewer than the 8 of the header length")
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        raise DefectError(f"truncated or corrupt: the header length says {num(size)} bytes, {len(data) - 8} follow")
    found = list(_DIGEST_FIELD.finditer(data, 8, 8 + size))
    return found[0].start(1) if len(found) == 1 else None


def _digest(data: bytes, at: int) -> str:
    """SHA-256 of the file with the 64 digits at ``at`` read as ``0``."""
    view = memoryview(data)
    digest = hashlib.sha256(view[:at])
    digest.update(_BLANK)
    digest.update(view[at + 64 :])
    return digest.hexdigest()


def seal(data: bytes) -> bytes:
    """Fill in the digest field of safetensors bytes (also used by the tests to re-seal crafted files).

    Raises:
        ValueError: If the header has no digest field, or more than one.
        DefectError: If ``data`` is shorter than its header length says.

    Example::

        >>> from safetensors.torch import save
        >>> blank = save({"w": torch.ones(2)}, metadata={"sha256": "0" * 64})
        >>> sealed = seal(blank)
        >>> len(sealed) == len(blank) and sealed != blank
        True
    """
    at = _digest_at(data)
    if at is None:
        raise ValueError("the header has no digest field, or more than one")
    return data[:at] + _digest(data, at).encode() + data[at + 64 :]


def write_sealed(path: str | PathLike[str], tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> None:
    """Write a safetensors file whose metadata also holds the SHA-256 of the whole file.

    Example::

        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> kind = FileKind("demo", "2", frozenset({"format", "version", "sha256"}), "Demo file", "write_sealed")
        >>> write_sealed(path, {"w": torch.ones(2)}, {"format": "demo", "version": "2"})
        >>> read_sealed(path, kind)[1]
        {'w': tensor([1., 1.])}
    """
    from safetensors.torch import save

    Path(path).write_bytes(seal(save(dict(tensors), metadata={**metadata, _DIGEST_KEY: _BLANK.decode()})))


# ---------------------------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------------------------


def _wrong_kind(metadata: Mapping[str, Any], kind: FileKind) -> str | None:
    """Why the format or version is not ``kind``'s, or ``None``."""
    fmt, version = metadata.get("format"), metadata.get("version")
    if fmt != kind.format:
        return (
            f"not a {kind.label.lower()}: metadata format is {show(fmt)}, expected {kind.format!r} "
            f"(write it with {kind.writer}())"
        )
    if version == "1":
        return (
            f"format version '1': such files carry no checksum of their header, so they cannot be verified; "
            f"this code reads version {kind.version!r}: write the file again with {kind.writer}() from the model "
            f"or its checkpoint"
        )
    if version != kind.version:
        return f"format version {show(version)}; this code reads version {kind.version!r}"
    return None


def _unsealed(data: bytes, kind: FileKind) -> str:
    """Why a file without exactly one digest field is refused: another format or version, or corruption."""
    size = int.from_bytes(data[:8], "little")
    try:
        header = strict_json(data[8 : 8 + size], "the safetensors header")
    except DefectError as err:
        return f"not a readable safetensors file ({err})"
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    wrong = _wrong_kind(metadata if isinstance(metadata, dict) else {}, kind)
    return wrong or "the checksum field of the header is missing or damaged: the file is corrupt"


def _tensor_info(name: str, info: Any) -> tuple[str, torch.dtype, tuple[int, ...], int, int]:
    """``(name, dtype, shape, begin, end)`` of a header entry; its byte span must fit its shape and dtype."""
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise DefectError(f"tensor {show(name)}: the header entry must hold exactly dtype, shape and data_offsets")
    dtype = _ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise DefectError(f"tensor {show(name)}: unsupported dtype {show(info['dtype'])}")
    shape = check_dims(info["shape"])
    span = info["data_offsets"]
    if not isinstance(span, list) or len(span) != 2 or not all(is_int(o) for o in span) or not 0 <= span[0] <= span[1]:
        raise DefectError(f"tensor {show(name)}: bad data_offsets {show(span)}")
    if span[1] - span[0] != math.prod(shape) * dtype.itemsize:
        raise DefectError(
            f"tensor {show(name)}: {list(shape)} {dtype} does not take the {span[1] - span[0]} bytes of its offsets"
        )
    return name, dtype, shape, span[0], span[1]


def _header(data: bytes) -> tuple[dict[str, str], list[tuple[str, torch.dtype, tuple[int, ...], int, int]]]:
    """The metadata and the tensor layout; the tensors must tile the data section exactly."""
    size = int.from_bytes(data[:8], "little")
    header = strict_json(data[8 : 8 + size], "the header")
    metadata = header.pop("__metadata__", None) if isinstance(header, dict) else None
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise DefectError("the header must be a JSON object with a '__metadata__' object of strings")
    layout = sorted((_tensor_info(name, info) for name, info in header.items()), key=lambda t: (t[3], t[4]))
    end = 0
    for name, _, _, begin, stop in layout:
        if begin != end:
            raise DefectError(
                f"tensor {show(name)} starts at byte {begin} of the data, {end} expected (a gap or an overlap)"
            )
        end = stop
    if end != len(data) - 8 - size:
        raise DefectError(f"the tensors take {end} bytes, the data section has {len(data) - 8 - size}")
    return metadata, layout


def _verified(data: bytes, kind: FileKind) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Metadata and tensors of sealed bytes, checked in order: header length, digest, layout, kind."""
    at = _digest_at(data)
    if at is None:
        raise DefectError(_unsealed(data, kind))
    if _digest(data, at) != data[at : at + 64].decode():
        raise DefectError(
            "checksum mismatch: the SHA-256 of the file is not the one in its header; the file is corrupt"
        )
    try:
        metadata, layout = _header(data)
    except DefectError as err:
        raise DefectError(f"not a readable safetensors file ({err})") from err
    wrong = _wrong_kind(metadata, kind)
    if wrong is not None:
        raise DefectError(wrong)
    if set(metadata) != kind.keys or metadata[_DIGEST_KEY] != data[at : at + 64].decode():
        raise DefectError(f"the metadata holds {show(sorted(metadata))}, expected {sorted(kind.keys)}")
    start, tensors = 8 + int.from_bytes(data[:8], "little"), {}
    for name, dtype, shape, begin, end in layout:
        raw = bytes_tensor(memoryview(data)[start + begin : start + end])
        if dtype == torch.bool and bool((raw > 1).any()):
            raise DefectError(f"tensor {show(name)}: bool bytes other than 0 and 1")
        tensors[name] = raw.view(dtype).view(shape)
    return metadata, tensors


def read_sealed(path: str | PathLike[str], kind: FileKind) -> tuple[dict[str, str], dict[str, Tensor], int]:
    """Metadata, tensors and file size of a sealed file, verified in this order: header length, digest, layout.

    Raises:
        SparseFormatError: On any problem (names the file). ``OSError`` (a missing file) passes through.

    Example::

        >>> import tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "t.safetensors")
        >>> kind = FileKind("demo", "2", frozenset({"format", "version", "sha256"}), "Demo file", "write_sealed")
        >>> write_sealed(path, {}, {"format": "other", "version": "2"})
        >>> read_sealed(path, kind)
        Traceback (most recent call last):
        ...
        lightning_prune.core.export.container.SparseFormatError: Demo file '...': not a demo file: ...
    """
    data = Path(path).read_bytes()
    try:
        metadata, tensors = _verified(data, kind)
    except DefectError as err:
        raise fail(path, str(err), kind.label) from err
    return metadata, tensors, len(data)
