"""Shrunk checkpoints: saved without pickle, verified before anything is built or loaded."""

import json
import struct
import time

import pytest
import torch
from safetensors import safe_open
from structure_cases import LeNet5Modules, _apply, _assert_untouched, _random_masks, _randomize, _snapshot
from torch import nn

from lightning_prune.core.export import SparseFormatError
from lightning_prune.core.export.container import seal
from lightning_prune.core.structure import (
    load_shrunk,
    remove_dead_units,
    save_shrunk,
    shapes,
)


def test_save_and_load_shrunk_into_a_fresh_model(tmp_path, monkeypatch):
    model = _randomize(LeNet5Modules()).eval()
    masks = _random_masks(model, 0.2, seed=9)
    masks["features.3.weight"][[1, 2, 3]] = False
    masks["classifier.4.weight"][:, [0, 1]] = False
    _apply(model, masks)
    x = torch.randn(4, 1, 28, 28)
    remove_dead_units(model, x, masks)
    expected = model(x)
    path = tmp_path / "shrunk.safetensors"

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    save_shrunk(model, path)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        assert meta["format"] == "lightning_prune.shrunk"
        assert set(handle.keys()) == set(model.state_dict())
    fresh = LeNet5Modules().eval()
    resized = load_shrunk(fresh, path)
    assert set(resized) == {n for n, s in shapes(model).items() if s != shapes(LeNet5Modules())[n]}
    assert shapes(fresh) == shapes(model)
    assert torch.equal(fresh(x), expected)


def test_load_shrunk_mismatch_leaves_model_untouched(tmp_path):
    small = nn.Sequential(nn.Linear(4, 2), nn.ReLU(), nn.Linear(2, 3))
    path = tmp_path / "m.safetensors"
    save_shrunk(small, path)
    other = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 1))
    snap = _snapshot(other)
    with pytest.raises(ValueError, match=r"lacks '4\.weight'"):
        load_shrunk(other, path)
    _assert_untouched(other, snap)
    with pytest.raises(ValueError, match="not a shrunk checkpoint"):
        from safetensors.torch import save_file

        save_file({"a": torch.ones(1)}, str(tmp_path / "plain.safetensors"))
        load_shrunk(small, tmp_path / "plain.safetensors")


def _shrunk_pair(tmp_path):
    """A small model saved shrunk, its file bytes, and a fresh full-size model with its snapshot."""
    small = nn.Sequential(nn.Linear(4, 2), nn.BatchNorm1d(2), nn.ReLU(), nn.Linear(2, 3))
    path = tmp_path / "m.safetensors"
    save_shrunk(small, path)
    fresh = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    return path, path.read_bytes(), fresh, _snapshot(fresh)


def _resealed(data: bytes, edit) -> bytes:
    """Edit the parsed safetensors header, rebuild the file and re-compute its checksum."""
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    edit(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return seal(struct.pack("<Q", len(text)) + text + data[8 + size :])


def _record_edit(change):
    def edit(header):
        record = json.loads(header["__metadata__"]["shapes"])
        change(record)
        header["__metadata__"]["shapes"] = json.dumps(record)

    return edit


def test_load_shrunk_verifies_the_file_first(tmp_path):
    path, data, fresh, snap = _shrunk_pair(tmp_path)
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 4  # in the header: a shape digit, a name or the JSON
    path.write_bytes(bytes(flipped))
    with pytest.raises(SparseFormatError, match=r"Shrunk checkpoint '.*m\.safetensors': checksum mismatch"):
        load_shrunk(fresh, path)
    path.write_bytes(data[: len(data) - 3])
    with pytest.raises(SparseFormatError, match="checksum mismatch"):
        load_shrunk(fresh, path)

    def to_v1(header):
        header["__metadata__"].update(version="1")
        del header["__metadata__"]["sha256"]

    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + size])
    to_v1(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])
    with pytest.raises(SparseFormatError, match=r"version '1'.*cannot be verified.*save_shrunk\(\)"):
        load_shrunk(fresh, path)
    _assert_untouched(fresh, snap)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r.update({"3": [2**20, 2**20]}), "larger than the file"),
        (lambda r: r.update({"3": [3, 200]}), r"gives '3' as \[3, 200\], but '3\.weight' is \[3, 2\]"),
        (lambda r: r.update({"0": [4, 2]}), r"gives '0' as \[4, 2\], but '0\.weight' is \[2, 4\]"),
        (lambda r: r.update({"1": [7]}), r"gives '1' as \[7\], but '1\.weight' is \[2\]"),
        (lambda r: r.update({"0": [2, 4.0]}), "not 1 to 4 positive ints"),
        (lambda r: r.update({"0": [True, 4]}), "not 1 to 4 positive ints"),
        (lambda r: r.update({"0": [-2, 4]}), "not 1 to 4 positive ints"),
        (lambda r: r.update({"0": "[2, 4]"}), "not 1 to 4 positive ints"),
    ],
)
def test_load_shrunk_checks_the_record_against_the_file_before_building(tmp_path, change, message):
    path, data, fresh, snap = _shrunk_pair(tmp_path)
    path.write_bytes(_resealed(data, _record_edit(change)))
    start = time.perf_counter()
    with pytest.raises(SparseFormatError, match=message) as info:
        load_shrunk(fresh, path)
    assert time.perf_counter() - start < 1.0 and "m.safetensors" in str(info.value)
    _assert_untouched(fresh, snap)


@pytest.mark.parametrize(
    ("edit", "error", "message"),
    [
        (lambda h: h["__metadata__"].update(shapes="[" * 50_000 + "]" * 50_000), SparseFormatError, "RecursionError"),
        (lambda h: h["__metadata__"].update(shapes='{"0": Infinity}'), SparseFormatError, "non-finite number"),
        (lambda h: h["__metadata__"].update(shapes="[]"), SparseFormatError, "must be a JSON object"),
        (lambda h: h["__metadata__"].update(shapes='{"0": [2, 4], "0": [2, 4]}'), SparseFormatError, "duplicate"),
        (lambda h: h["__metadata__"].update(format="lightning_prune.sparse"), ValueError, "not a shrunk checkpoint"),
        (lambda h: h["__metadata__"].update(extra="1"), SparseFormatError, "the metadata holds"),
        (lambda h: h.update({"3.weight": {**h["3.weight"], "dtype": "I32"}}), ValueError, "does not fit.*int32"),
        (lambda h: h.update({"3.weight": {**h["3.weight"], "shape": [2, 3]}}), SparseFormatError, "is \\[2, 3\\]"),
        (_record_edit(lambda r: r.update({"9": [2]})), ValueError, "does not fit.*module '9'"),
        (_record_edit(lambda r: r.pop("0")), ValueError, "does not fit.*'0.weight' has shape"),
    ],
)
def test_load_shrunk_malformed_or_misfit_files_leave_the_model_untouched(tmp_path, edit, error, message):
    path, data, fresh, snap = _shrunk_pair(tmp_path)
    path.write_bytes(_resealed(data, edit))
    with pytest.raises(error, match=message) as info:
        load_shrunk(fresh, path)
    assert "m.safetensors" in str(info.value)
    _assert_untouched(fresh, snap)
