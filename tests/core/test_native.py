"""The compiled mask kernel: the same bits as PyTorch's multiply, its fallbacks, its choice and its cache."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_prune.core import native
from lightning_prune.core.masks import enforce, multiplier

BITS = {2: torch.int16, 4: torch.int32, 8: torch.int64}
needs_compiler = pytest.mark.skipif(native._compiler() is None, reason="no C compiler on this machine")


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process state where the kernel was never built, with its cache in a temporary folder."""
    monkeypatch.setattr(native, "_choice", "auto")
    monkeypatch.setattr(native, "_function", None)
    monkeypatch.setattr(native, "_status", None)
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path


def _expected(t: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return t.view(BITS[t.element_size()]) * keep.view(torch.uint8)


@needs_compiler
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 3000),
    dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    density=st.floats(0, 1),
    seed=st.integers(0, 2**16),
)
def test_the_compiled_kernel_gives_the_bits_of_the_integer_multiply(n, dtype, density, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g).to(dtype)
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0], dtype=dtype)
    if n:
        picks = torch.randint(0, n, (n // 5,), generator=g)
        t[picks] = specials[torch.randint(0, 4, (picks.numel(),), generator=g)]
    keep = torch.rand(n, generator=g) < density
    expected = _expected(t, keep)
    function = native._load()
    assert function is not None, native.native_status()
    assert function(t.data_ptr(), keep.data_ptr(), n, t.element_size()) == 0
    assert torch.equal(t.view(BITS[t.element_size()]), expected)


@needs_compiler
@pytest.mark.parametrize(("threads", "n", "compiled"), [(1, 10_007, True), (3, 1000, True), (3, 10_007, False)])
def test_with_several_torch_threads_large_tensors_stay_with_pytorch(fresh, monkeypatch, threads, n, compiled):
    monkeypatch.setattr(native, "SERIAL_LIMIT", 5000)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t = torch.randn(n)
        t[::13] = float("nan")
        keep = torch.rand(n) > 0.6
        expected = _expected(t, keep)
        assert native.enforce_native(t.clone(), multiplier(keep)) is compiled
        enforce(t, multiplier(keep))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(t.view(torch.int32), expected)


@needs_compiler
def test_the_kernel_is_built_once_into_the_cache_and_reused(fresh):
    assert native.native_status() == "not built"
    assert native.mask_kernel() == "native"
    built = list((fresh / "cache").glob("mask_kernel-*.so"))
    assert len(built) == 1 and native.native_status() == f"loaded from {built[0]}"
    mtime = built[0].stat().st_mtime_ns
    native._function, native._status = None, None
    assert native.mask_kernel() == "native"
    assert built[0].stat().st_mtime_ns == mtime  # loaded, not rebuilt
    assert list((fresh / "cache").iterdir()) == built  # no temporary left behind


@needs_compiler
def test_an_unwritable_cache_falls_back_to_the_temporary_folder(fresh, monkeypatch):
    blocker = fresh / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(fresh / "tmp"))
    assert native.mask_kernel() == "native"
    assert str(fresh / "tmp") in native.native_status()


def test_without_a_compiler_auto_masks_with_torch_and_says_why(fresh, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    t, keep = torch.tensor([1.0, float("nan"), 3.0]), torch.tensor([True, False, True])
    enforce(t, multiplier(keep))
    assert t.tolist() == [1.0, 0.0, 3.0]
    assert native.mask_kernel() == "torch"
    assert native.native_status() == "unavailable: no C compiler was found (set CC, or install cc, gcc or clang)"
    with pytest.raises(RuntimeError, match="requested, but it is unavailable: no C compiler was found"):
        native.set_mask_kernel("native")


def test_a_failing_compiler_is_reported_with_its_output(fresh, monkeypatch):
    script = fresh / "bad-cc"
    script.write_text("#!/bin/sh\necho 'cc: fatal error: out of cheese' >&2\nexit 1\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("CC", str(script))
    assert native.mask_kernel() == "torch"
    assert "failed: cc: fatal error: out of cheese" in native.native_status()


@needs_compiler
def test_a_kernel_failing_its_self_test_is_not_used(fresh, monkeypatch):
    monkeypatch.setattr(native, "SOURCE", native.SOURCE.replace("data[i] *= (T)keep[i];", "data[i] += (T)keep[i];"))
    assert native.mask_kernel() == "torch"
    assert "self-test gave other bits than PyTorch's multiply" in native.native_status()


def test_a_native_choice_that_cannot_be_met_raises_at_first_use(fresh, monkeypatch):
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setattr(native, "_choice", "native")  # as LIGHTNING_PRUNE_MASK_KERNEL=native sets it
    with pytest.raises(RuntimeError, match="The compiled mask kernel was requested, but it is unavailable"):
        enforce(torch.ones(3), multiplier(torch.tensor([True, False, True])))


def test_torch_never_builds_the_kernel(fresh, monkeypatch):
    monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("built"))
    native.set_mask_kernel("torch")
    t = torch.tensor([1.0, 2.0])
    enforce(t, multiplier(torch.tensor([False, True])))
    assert t.tolist() == [0.0, 2.0] and native.mask_kernel() == "torch" and native.native_status() == "not built"


def test_set_mask_kernel_refuses_an_unknown_kernel():
    with pytest.raises(ValueError, match=r"one of 'auto', 'native', 'torch', got 'fast'"):
        native.set_mask_kernel("fast")  # type: ignore[arg-type]


@needs_compiler
@pytest.mark.parametrize(
    "case",
    ["non-contiguous", "integer", "numel", "bool multiplier"],
)
def test_enforce_native_leaves_what_it_does_not_handle_to_torch(fresh, case):
    t, mult = torch.randn(4, 6), multiplier(torch.rand(4, 6) > 0.5)
    if case == "non-contiguous":
        t, mult = t.t(), mult.t()
    elif case == "integer":
        t = torch.arange(24).view(4, 6)
    elif case == "numel":
        mult = mult[:3]
    else:
        mult = mult.bool()
    before = t.clone()
    assert native.enforce_native(t, mult) is False
    assert torch.equal(t, before)


@pytest.mark.parametrize(("value", "expected"), [("torch", "torch"), ("auto", None)])
def test_the_environment_variable_chooses_the_kernel(value, expected, tmp_path):
    code = "from lightning_prune.core import native; print(native._choice, native.mask_kernel())"
    env = {**os.environ, "LIGHTNING_PRUNE_MASK_KERNEL": value, "LIGHTNING_PRUNE_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    choice, active = out.split()
    assert choice == value
    assert active == (expected or ("native" if native._compiler() else "torch"))


def test_the_environment_variable_refuses_an_unknown_kernel(tmp_path):
    env = {**os.environ, "LIGHTNING_PRUNE_MASK_KERNEL": "fast"}
    run = subprocess.run([sys.executable, "-c", "import lightning_prune"], env=env, capture_output=True, text=True)
    assert run.returncode != 0
    assert "LIGHTNING_PRUNE_MASK_KERNEL must be one of 'auto', 'native', 'torch', got 'fast'" in run.stderr


@needs_compiler
@pytest.mark.parametrize("api", [True, False])
def test_a_compiled_write_is_counted_like_an_in_place_op(fresh, monkeypatch, api):
    if not api:
        monkeypatch.delattr(torch.autograd.graph, "increment_version")
    w = torch.randn(8, requires_grad=True)
    x = w * 1.0
    loss = (x * x).sum()  # saves x for the backward pass
    version = x._version
    with torch.no_grad():
        enforce(x, multiplier(torch.rand(8) > 0.5))
    assert native.mask_kernel() == "native"
    assert x._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@needs_compiler
def test_without_a_home_folder_the_kernel_is_cached_in_the_temporary_folder(fresh, monkeypatch):
    monkeypatch.delenv("LIGHTNING_PRUNE_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setattr(native.Path, "home", lambda: (_ for _ in ()).throw(RuntimeError("no home")))
    monkeypatch.setattr(native.tempfile, "gettempdir", lambda: str(fresh / "tmp"))
    assert native.mask_kernel() == "native"
    assert native.native_status().startswith(f"loaded from {fresh / 'tmp'}")


def test_the_cache_folder_follows_xdg_cache_home(monkeypatch, tmp_path):
    monkeypatch.delenv("LIGHTNING_PRUNE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native._cache_dir() == tmp_path / "lightning_prune"
