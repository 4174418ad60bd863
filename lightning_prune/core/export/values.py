"""Value codecs: the surviving values of a masked tensor, raw or as deflated byte planes (lossless).

Values keep their dtype and bits. With ``"planes"`` their bytes are split into byte planes
(sign/exponent bytes apart from mantissa bytes) and each plane is deflated when that makes it
smaller: the exponents of magnitude-pruned weights (all above a threshold) are very repetitive.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_prune.core.export.container import DefectError, bytes_tensor, inflate, is_int, show, tensor_bytes

__all__ = ["check_values", "decode_values", "encode_values"]


def encode_values(values: Tensor, compress: bool) -> tuple[dict[str, Any], Tensor]:
    """Raw values, or their byte planes each deflated when smaller. Returns the description and what to store.

    Example::

        >>> desc, stored = encode_values(torch.full((1000,), 0.5), compress=True)
        >>> desc["codec"], stored.numel() < 100
        ('planes', True)
        >>> encode_values(torch.ones(3), compress=True)[0]
        {'codec': 'raw'}
    """
    size = values.element_size()
    if not compress or values.numel() < 64:
        return {"codec": "raw"}, values
    planes = values.contiguous().view(torch.uint8).view(-1, size).t()
    parts, desc = [], []
    for plane in planes:
        raw = tensor_bytes(plane)
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
    return {"codec": "planes", "planes": desc}, bytes_tensor(blob)


def _is_plane(plane: Any, count: int) -> bool:
    if not isinstance(plane, list) or len(plane) != 2 or not is_int(plane[1]):
        return False
    return (plane[0] == "raw" and plane[1] == count) or (plane[0] == "deflate" and plane[1] >= 0)


def check_values(desc: Any, stored: Tensor, dtype: torch.dtype, count: int) -> None:
    """Check a value description read from a file against the stored values and the alive count; allocates nothing.

    Raises:
        DefectError: Naming the first problem.

    Example::

        >>> check_values({"codec": "raw"}, torch.ones(3), torch.float32, 3)
        >>> check_values({"codec": "zip"}, torch.ones(3), torch.float32, 3)
        Traceback (most recent call last):
        ...
        lightning_prune.core.export.container.DefectError: unknown value codec 'zip' (expected 'raw' or 'planes')
    """
    codec = desc.get("codec") if isinstance(desc, dict) else None
    if codec == "raw":
        if set(desc) != {"codec"}:
            raise DefectError(f"value codec 'raw' has the fields {show(sorted(desc))}, expected ['codec']")
        if stored.dtype != dtype or tuple(stored.shape) != (count,):
            raise DefectError(
                f"the values are stored as {list(stored.shape)} {stored.dtype}, [{count}] {dtype} expected"
            )
        return
    if codec != "planes":
        raise DefectError(f"unknown value codec {show(codec)} (expected 'raw' or 'planes')")
    planes = desc.get("planes")
    if set(desc) != {"codec", "planes"} or not isinstance(planes, list) or len(planes) != dtype.itemsize:
        raise DefectError(f"the value codec lists {show(planes)}, {dtype.itemsize} byte planes expected")
    if not all(_is_plane(plane, count) for plane in planes):
        raise DefectError(f"the byte planes {show(planes)} must each be ['raw', {count}] or ['deflate', bytes]")
    total = sum(length for _, length in planes)
    if stored.dtype != torch.uint8 or stored.dim() != 1 or stored.numel() != total:
        raise DefectError(f"the values are stored as {list(stored.shape)} {stored.dtype}, [{total}] uint8 expected")


def decode_values(desc: Mapping[str, Any], stored: Tensor, dtype: torch.dtype, count: int) -> Tensor:
    """The values of a description checked by :func:`check_values`.

    Raises:
        DefectError: On a plane that does not inflate to ``count`` bytes, or bool bytes other than 0 and 1.

    Example::

        >>> values = torch.linspace(0, 1, 100)
        >>> desc, stored = encode_values(values, compress=True)
        >>> torch.equal(decode_values(desc, stored, torch.float32, 100), values)
        True
    """
    if desc["codec"] == "raw":
        return stored
    out, offset = torch.empty(count, dtype.itemsize, dtype=torch.uint8), 0
    for plane, (kind, length) in enumerate(desc["planes"]):
        chunk = stored[offset : offset + length]
        offset += length
        out[:, plane] = bytes_tensor(inflate(tensor_bytes(chunk), count, "byte plane")) if kind == "deflate" else chunk
    if dtype == torch.bool and bool((out > 1).any()):
        raise DefectError("bool values other than 0 and 1")
    return out.view(dtype).reshape(-1)
