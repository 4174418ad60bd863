"""An optional compiled mask kernel: a few lines of C, built on first use with the system's C compiler.

PyTorch's CPU multiply of an integer tensor by a ``uint8`` one converts the mask element by element
without vectorizing, 3-15x slower than reading and writing the tensor once. This module builds a loop
that multiplies a tensor's bits by the mask in place (what :func:`lightning_prune.core.masks.enforce`
computes, bit for bit), vectorized by the compiler: about 1.2x that floor (``docs/benchmarks.md``,
"Mask cost with the compiled kernel"). It needs no PyTorch headers, no ninja and no Python build step:
``cc -O3 -shared`` compiles it in a fraction of a second, ``ctypes`` loads it, and the library is cached
(``~/.cache/lightning_prune``, or ``$LIGHTNING_PRUNE_CACHE_DIR``). It runs on the calling thread, so with
several torch threads large tensors stay with PyTorch's multiply, which splits them (:data:`SERIAL_LIMIT`).

Which kernel masks CPU tensors is process-wide: ``"auto"`` (the default) uses the compiled one when it
builds and passes its self-test and PyTorch's otherwise; ``"native"`` requires it (and raises when it
cannot be built, saying why); ``"torch"`` never builds it. Set it with :func:`set_mask_kernel` or the
environment variable ``LIGHTNING_PRUNE_MASK_KERNEL``. Both give identical bits.

Example::

    >>> set_mask_kernel("torch")
    >>> mask_kernel()
    'torch'
    >>> set_mask_kernel("auto")
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SERIAL_LIMIT",
    "MaskKernel",
    "enforce_native",
    "fallback_reason",
    "mask_kernel",
    "native_status",
    "set_mask_kernel",
]

log = logging.getLogger(__name__)

MaskKernel = Literal["auto", "native", "torch"]
"""The choices of :func:`set_mask_kernel`."""
_KERNELS: tuple[str, ...] = ("auto", "native", "torch")

SERIAL_LIMIT = 1 << 20
"""With more than one torch thread, tensors of more elements than this are left to PyTorch's multiply,
which splits them over its threads. The compiled kernel runs on the calling thread only: threads of its
own would compete with PyTorch's workers, which spin for a while after each parallel op, and measured
no faster than one (``docs/benchmarks.md``, "Mask cost with the compiled kernel")."""

SOURCE = r"""
#include <stdint.h>

#if defined(__x86_64__) && defined(__ELF__) && defined(__GNUC__) && !defined(LP_NO_CLONES)
#define LP_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LP_CLONES
#endif

#define LP_KERNEL(name, T)                                                        \
    LP_CLONES static void name(T *restrict data, const uint8_t *restrict keep,    \
                               int64_t n) {                                       \
        for (int64_t i = 0; i < n; ++i) data[i] *= (T)keep[i];                    \
    }
LP_KERNEL(lp_mask16, uint16_t)
LP_KERNEL(lp_mask32, uint32_t)
LP_KERNEL(lp_mask64, uint64_t)

int lp_enforce(void *data, const void *keep, int64_t n, int width) {
    if (width == 2) lp_mask16((uint16_t *)data, (const uint8_t *)keep, n);
    else if (width == 4) lp_mask32((uint32_t *)data, (const uint8_t *)keep, n);
    else if (width == 8) lp_mask64((uint64_t *)data, (const uint8_t *)keep, n);
    else return -1;
    return 0;
}
"""
"""The kernel: ``data[i] *= keep[i]`` on unsigned integers of the tensor's width (2, 4 or 8 bytes)."""

_WIDTHS: dict[torch.dtype, int] = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}

_Kernel = Callable[[int, int, int, int], int]
"""``lp_enforce(data, keep, n, width)``."""

_choice: str = "auto"
_function: _Kernel | None = None
_status: str | None = None


def _cache_dir() -> Path:
    configured = os.environ.get("LIGHTNING_PRUNE_CACHE_DIR")
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home folder to be found
            return _temporary_dir()
    return Path(base) / "lightning_prune"


def _temporary_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"lightning_prune-{os.getuid()}"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build(compiler: str, directory: Path) -> Path:
    """Compile :data:`SOURCE` into ``directory`` (atomically: parallel processes may race) and return the library."""
    flags = ["-O3", "-shared", "-fPIC"]
    key = hashlib.sha256("\0".join([SOURCE, compiler, *flags, platform.machine(), sys.platform]).encode()).hexdigest()
    library = directory / f"mask_kernel-{key[:16]}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as work:
        source = Path(work) / "mask_kernel.c"
        source.write_text(SOURCE)
        built = Path(work) / library.name
        errors = ""
        for extra in ([], ["-DLP_NO_CLONES"]):
            result = subprocess.run(
                [compiler, *flags, *extra, str(source), "-o", str(built)],
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if result.returncode == 0:
                os.replace(built, library)
                return library
            errors = (result.stderr or result.stdout).strip()[-400:]
        raise RuntimeError(f"{compiler} failed: {errors}")


def _self_test(function: _Kernel) -> None:
    generator = torch.Generator().manual_seed(0)
    for dtype in _WIDTHS:
        values = torch.randn(1000, generator=generator).to(dtype)
        values[::7] = float("nan")
        keep = torch.rand(1000, generator=generator) < 0.5
        bits = values.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[_WIDTHS[dtype]])
        expected = bits * keep.view(torch.uint8)
        function(bits.data_ptr(), keep.data_ptr(), bits.numel(), _WIDTHS[dtype])
        if not torch.equal(bits, expected):
            raise RuntimeError(f"its self-test gave other bits than PyTorch's multiply for {dtype}")


def _load() -> _Kernel | None:
    """The compiled kernel, built and loaded once per process; ``None`` if it cannot be (``_status`` says why)."""
    global _function, _status
    if _function is not None or _status is not None:
        return _function
    try:
        if sys.platform == "win32":
            raise RuntimeError("it is built on Linux and macOS only")
        compiler = _compiler()
        if compiler is None:
            raise RuntimeError("no C compiler was found (set CC, or install cc, gcc or clang)")
        try:
            library = _build(compiler, _cache_dir())
        except OSError:
            library = _build(compiler, _temporary_dir())
        loaded = ctypes.CDLL(str(library)).lp_enforce
        loaded.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
        loaded.restype = ctypes.c_int
        function: _Kernel = loaded
        _self_test(function)
    except (OSError, RuntimeError, subprocess.SubprocessError) as error:
        _status = f"unavailable: {error}"
        log.info("lightning-prune: the compiled mask kernel is %s; masking with PyTorch's multiply.", _status)
        return None
    _function, _status = function, f"loaded from {library}"
    return _function


def set_mask_kernel(kernel: MaskKernel) -> None:
    """Choose the kernel that masks CPU tensors for this process: ``"auto"``, ``"native"`` or ``"torch"``.

    Raises:
        ValueError: If ``kernel`` is none of those.
        RuntimeError: If ``kernel`` is ``"native"`` and the compiled kernel cannot be built or loaded.

    Example::

        >>> set_mask_kernel("torch"); mask_kernel()
        'torch'
        >>> set_mask_kernel("auto")
    """
    global _choice
    if kernel not in _KERNELS:
        raise ValueError(f"The mask kernel must be one of {', '.join(map(repr, _KERNELS))}, got {kernel!r}.")
    if kernel == "native" and _load() is None:
        raise RuntimeError(f"The compiled mask kernel was requested, but it is {_status}.")
    _choice = kernel


def mask_kernel() -> Literal["native", "torch"]:
    """The kernel that masks CPU tensors now: ``"native"`` or ``"torch"`` (``"auto"`` resolved, building if needed).

    Example::

        >>> mask_kernel() in ("native", "torch")
        True
    """
    return "native" if _active() is not None else "torch"


def native_status() -> str:
    """Whether the compiled kernel was loaded (and from where) or why not; ``"not built"`` before first use.

    Example::

        >>> isinstance(native_status(), str)
        True
    """
    return _status or "not built"


def fallback_reason() -> str | None:
    """Why CPU tensors are masked by PyTorch's multiply under ``"auto"``; ``None`` if they are not, or by choice.

    Example::

        >>> set_mask_kernel("torch"); fallback_reason() is None
        True
        >>> set_mask_kernel("auto")
    """
    if _choice != "auto" or _active() is not None:
        return None
    return _status


def _active() -> _Kernel | None:
    if _choice == "torch":
        return None
    function = _load()
    if function is None and _choice == "native":
        raise RuntimeError(f"The compiled mask kernel was requested, but it is {_status}.")
    return function


def enforce_native(tensor: Tensor, mult: Tensor) -> bool:
    """Mask ``tensor`` in place with the compiled kernel, if it applies; ``True`` if it did.

    It applies to contiguous floating-point CPU tensors of 2, 4 or 8 bytes with a contiguous ``uint8``
    multiplier of as many elements, of at most :data:`SERIAL_LIMIT` elements unless torch runs one thread,
    outside ``torch.compile`` tracing, when the kernel chosen by :func:`set_mask_kernel` is the compiled
    one. Otherwise nothing is touched.

    Example::

        >>> t = torch.tensor([1.0, float("nan"), 3.0])
        >>> done = enforce_native(t, torch.tensor([True, False, True]).view(torch.uint8))
        >>> t.tolist() if done else [1.0, 0.0, 3.0]
        [1.0, 0.0, 3.0]
    """
    width = _WIDTHS.get(tensor.dtype)
    if (
        width is None
        or tensor.device.type != "cpu"
        or mult.device.type != "cpu"
        or mult.dtype != torch.uint8
        or mult.numel() != tensor.numel()
        or not (tensor.is_contiguous() and mult.is_contiguous())
        or (tensor.numel() > SERIAL_LIMIT and torch.get_num_threads() > 1)
        or _is_compiling()
    ):
        return False
    function = _active()
    if function is None:
        return False
    n = tensor.numel()
    function(tensor.data_ptr(), mult.data_ptr(), n, width)
    _increment_version(tensor)
    return True


def _increment_version(tensor: Tensor) -> None:
    """Count the write as an in-place op would, so autograd still detects a saved tensor changed under it."""
    increment = getattr(torch.autograd.graph, "increment_version", None)
    if increment is not None:
        increment(tensor)
    else:  # older torch: an in-place op on an empty view bumps the version the view shares
        tensor.view(-1)[:0].add_(0)


def _is_compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    check = getattr(compiler, "is_compiling", None)
    return bool(check()) if callable(check) else False


_env = os.environ.get("LIGHTNING_PRUNE_MASK_KERNEL")
if _env is not None:
    if _env not in _KERNELS:
        raise ValueError(f"LIGHTNING_PRUNE_MASK_KERNEL must be one of {', '.join(map(repr, _KERNELS))}, got {_env!r}.")
    _choice = _env
