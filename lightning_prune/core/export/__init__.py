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

The package by job: :mod:`~lightning_prune.core.export.container` (the sealed safetensors container,
shared with shrunk checkpoints), :mod:`~lightning_prune.core.export.positions` (position codes),
:mod:`~lightning_prune.core.export.values` (value codecs), :mod:`~lightning_prune.core.export.sparse_file`
(writing, loading and measuring sparse files), :mod:`~lightning_prune.core.export.inference` (CSR layers)
and :mod:`~lightning_prune.core.export.semi_structured` (2:4 ``Linear`` layers for sparse tensor cores).
"""

from lightning_prune.core.export.container import SparseFormatError
from lightning_prune.core.export.inference import SparseLinear, to_sparse_linear
from lightning_prune.core.export.positions import position_sizes
from lightning_prune.core.export.semi_structured import (
    SEMI_STRUCTURED_DTYPES,
    SemiStructuredReport,
    semi_structured_problems,
    to_semi_structured,
)
from lightning_prune.core.export.sparse_file import (
    FORMAT,
    VERSION,
    SparseSizeReport,
    TensorSize,
    export_sparse,
    load_sparse,
    load_sparse_into,
    sparse_size_report,
)

__all__ = [
    "FORMAT",
    "SEMI_STRUCTURED_DTYPES",
    "VERSION",
    "SemiStructuredReport",
    "SparseFormatError",
    "SparseLinear",
    "SparseSizeReport",
    "TensorSize",
    "export_sparse",
    "load_sparse",
    "load_sparse_into",
    "position_sizes",
    "semi_structured_problems",
    "sparse_size_report",
    "to_semi_structured",
    "to_sparse_linear",
]
