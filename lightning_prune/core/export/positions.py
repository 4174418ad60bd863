"""Position codes: where the surviving entries of a flat bool mask are, in as few bytes as possible.

* ``bitmap``: one bit per weight;
* ``gap8`` / ``gap4``: gaps as bytes / nibbles; a code ``0`` means "skip 255 (15) positions" and
  carries no value, so long gaps cost one extra code and no filler value;
* ``rice``: gaps Golomb-Rice coded with the best parameter ``k``;
* ``full``: every weight alive, no positions.

The smaller of the two sets (alive or pruned positions) is coded, and the ``bitmap``/``gap8``
bytes are also tried deflated. :func:`encode_positions` picks the smallest code;
:func:`check_positions` checks a description read from a file without allocating, and
:func:`decode_positions` decodes it a chunk at a time, raising
:class:`~lightning_prune.core.export.container.DefectError` on bad bits.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from lightning_prune.core.export.container import DefectError, bytes_tensor, inflate, is_int, show, tensor_bytes

__all__ = ["check_positions", "code_name", "decode_positions", "encode_positions", "position_sizes"]

_MAX_RICE_K = 24
_CHUNK = 2**16  # codes (bits of a bitmap or unary part: bytes) decoded at a time
_POSITION_KEYS = {
    "full": frozenset({"code"}),
    "bitmap": frozenset({"code"}),
    "gap8": frozenset({"code", "of", "codes"}),
    "gap4": frozenset({"code", "of", "codes"}),
    "rice": frozenset({"code", "of", "k", "unary"}),
}
_DEFLATABLE = ("bitmap", "gap8")
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
# Gap and Rice codes
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
        raise DefectError("the gap codes end with a filler code")
    end, marked = 0, 0
    for start in range(0, codes.numel(), _CHUNK):
        chunk = codes[start : start + _CHUNK]
        ends = chunk.to(torch.int64).masked_fill_(chunk == 0, top).cumsum_(0).add_(end - 1)
        end = int(ends[-1]) + 1
        if end > keep.numel():
            raise DefectError(f"the index points past the end of the tensor ({end - 1} >= {keep.numel()})")
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
            raise DefectError(f"the unary part holds more than the {count} codes expected")
        if not m:
            continue
        gaps = ((torch.diff(zeros, prepend=torch.tensor([last_zero])) - 1) << k) + 1
        if k:
            low = 8 * unary + done * k
            bits = _unpack_bits(data[low // 8 : (low + m * k + 7) // 8])[low % 8 : low % 8 + m * k]
            gaps += (bits.view(m, k) * weights).sum(1)
        if last + int(gaps.sum()) >= keep.numel():
            raise DefectError(f"the index points past the end of the tensor ({keep.numel()} entries)")
        positions = gaps.cumsum_(0).add_(last)
        keep[positions] = True
        last, last_zero, done = int(positions[-1]), int(zeros[-1]), done + m
    if 8 * unary - last_zero - 1 >= 8:
        raise DefectError("the unary part is padded with 8 or more bits")
    spare = -count * k % 8
    if done == count and spare and int(data[-1]) & ((1 << spare) - 1):
        raise DefectError("the remainder bits are padded with set bits")
    return done


# ---------------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------------


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
            packed = zlib.compress(tensor_bytes(blob), 9)
            if len(packed) < blob.numel():
                out.append(({**desc, "deflate": blob.numel()}, bytes_tensor(packed)))
    return out


def encode_positions(keep: Tensor) -> tuple[dict[str, Any], Tensor]:
    """The smallest position code of a flat bool mask: its description (JSON-ready) and its bytes.

    Example::

        >>> keep = torch.zeros(1000, dtype=torch.bool)
        >>> keep[::10] = True
        >>> desc, data = encode_positions(keep)
        >>> desc, data.numel()
        ({'code': 'gap8', 'of': 'alive', 'codes': 100, 'deflate': 100}, 12)
    """
    options = _candidates(keep)
    return min(options, key=lambda item: item[1].numel())


def code_name(desc: Mapping[str, Any]) -> str:
    """How reports name a position code: ``"rice(k=3)"``, ``"gap8/pruned"``, ``"bitmap+deflate"``.

    Example::

        >>> code_name({"code": "rice", "of": "pruned", "k": 3, "unary": 10})
        'rice(k=3)/pruned'
    """
    name = str(desc.get("code"))
    if desc.get("code") == "rice":
        name += f"(k={desc['k']})"
    if desc.get("of") == "pruned":
        name += "/pruned"
    return name + ("+deflate" if "deflate" in desc else "")


def position_sizes(keep: Tensor) -> dict[str, int]:
    """Bytes each position code takes for this mask (:func:`encode_positions` and so the sparse file use the smallest).

    Example::

        >>> keep = torch.zeros(1000, dtype=torch.bool)
        >>> keep[::10] = True
        >>> position_sizes(keep)  # a regular pattern: deflate finds it
        {'bitmap': 125, 'gap8': 100, 'gap4': 50, 'rice(k=2)': 63, 'bitmap+deflate': 16, 'gap8+deflate': 12}
    """
    flat = keep.detach().to("cpu").reshape(-1).bool()
    return {code_name(desc): blob.numel() for desc, blob in _candidates(flat)}


# ---------------------------------------------------------------------------------------------------------------------
# Checking and decoding
# ---------------------------------------------------------------------------------------------------------------------


def _index_size(desc: Mapping[str, Any], numel: int, alive: int) -> int:
    """Bytes the (inflated) index of a position description must have; checks its fields, allocates nothing."""
    code = desc["code"]
    if code == "full":
        if alive != numel:
            raise DefectError(f"code 'full' needs every entry alive, {alive} of {numel} are")
        return 0
    if code == "bitmap":
        return (numel + 7) // 8
    if desc["of"] not in ("alive", "pruned"):
        raise DefectError(f"unknown position set {show(desc['of'])} (expected 'alive' or 'pruned')")
    count = alive if desc["of"] == "alive" else numel - alive
    if code == "rice":
        k, unary = desc["k"], desc["unary"]
        if not is_int(k) or not 0 <= k <= _MAX_RICE_K:
            raise DefectError(f"Rice parameter k={show(k)} is not an int in [0, {_MAX_RICE_K}]")
        # the unary part holds one zero per code and one one per unit of quotient: sum(q) <= numel - count
        if not is_int(unary) or not (count + 7) // 8 <= unary <= (numel + 7) // 8:
            raise DefectError(f"unary length {show(unary)} outside [{(count + 7) // 8}, {(numel + 7) // 8}] bytes")
        return unary + (count * k + 7) // 8
    codes = desc["codes"]
    if not is_int(codes) or not count <= codes <= numel:  # one code per position, each advancing >= 1
        raise DefectError(f"code count {show(codes)} outside [{count}, {numel}]")
    return codes if code == "gap8" else (codes + 1) // 2


def check_positions(desc: Any, index: Tensor, numel: int, alive: int) -> None:
    """Check a position description read from a file against its stored index and the counts; allocates nothing.

    Raises:
        DefectError: Naming the first problem.

    Example::

        >>> check_positions({"code": "bitmap"}, torch.zeros(3, dtype=torch.uint8), 20, 0)
        >>> check_positions({"code": "bitmap"}, torch.zeros(2, dtype=torch.uint8), 20, 0)
        Traceback (most recent call last):
        ...
        lightning_prune.core.export.container.DefectError: the index has 2 bytes, 3 expected
    """
    code = desc.get("code") if isinstance(desc, dict) else None
    if not isinstance(code, str) or code not in _POSITION_KEYS:
        raise DefectError(f"unknown position code {show(code)} (expected full, bitmap, gap8, gap4 or rice)")
    keys = _POSITION_KEYS[code] | ({"deflate"} if code in _DEFLATABLE and "deflate" in desc else set())
    if set(desc) != keys:
        raise DefectError(f"position code {code!r} has the fields {show(sorted(desc))}, expected {sorted(keys)}")
    if index.dtype != torch.uint8 or index.dim() != 1:
        raise DefectError(f"the index must be 1-D uint8, got {list(index.shape)} {index.dtype}")
    size = _index_size(desc, numel, alive)
    if "deflate" in desc and (not is_int(desc["deflate"]) or desc["deflate"] != size):
        raise DefectError(f"the index inflates to {show(desc['deflate'])} bytes, {size} expected")
    if "deflate" not in desc and index.numel() != size:
        raise DefectError(f"the index has {index.numel()} bytes, {size} expected")


def _bitmap(data: Tensor, numel: int, alive: int) -> Tensor:
    keep = torch.empty(8 * data.numel(), dtype=torch.bool)
    for start in range(0, data.numel(), _CHUNK):
        keep[8 * start : 8 * (start + _CHUNK)] = _unpack_bits(data[start : start + _CHUNK])
    if keep[numel:].any():
        raise DefectError("the bitmap has bits set past the end of the tensor")
    keep = keep[:numel]
    if int(keep.sum()) != alive:
        raise DefectError(f"the bitmap marks {int(keep.sum())} entries alive, {alive} expected")
    return keep


def decode_positions(desc: Mapping[str, Any], data: Tensor, numel: int, alive: int) -> Tensor:
    """The flat bool mask of a description checked by :func:`check_positions`; raises on bad bits.

    Temporaries stay within a few MiB (``_CHUNK``), besides the inflated index and the mask.

    Raises:
        DefectError: If the bits do not mark exactly the counted positions within the tensor.

    Example::

        >>> keep = torch.tensor([True, False, False, True, False])
        >>> desc, data = encode_positions(keep)
        >>> decode_positions(desc, data, 5, 2)
        tensor([ True, False, False,  True, False])
    """
    code = desc["code"]
    if code == "full":
        return torch.ones(numel, dtype=torch.bool)
    if "deflate" in desc:
        data = bytes_tensor(inflate(tensor_bytes(data), desc["deflate"], "index"))
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
            raise DefectError("the pad nibble of the gap4 codes is set")
        marked = _gap_marks(nibbles[: desc["codes"]], 15, keep)
    if marked != count:
        raise DefectError(f"the index marks {marked} positions, {count} expected")
    return keep if desc["of"] == "alive" else keep.logical_not_()
