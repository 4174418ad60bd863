"""The sealed container: checksum first, strict JSON, header layout, format and version."""

import json
import struct
import time

import pytest
import torch
from export_cases import Net, _exported, _fc_file, _header, _raw_header, _rebuilt, _replace_once

from lightning_prune.core.export import SparseFormatError, export_sparse, load_sparse, load_sparse_into
from lightning_prune.core.export.container import seal


@pytest.mark.parametrize("where", ["length", "header", "data-start", "data-middle", "last-byte"])
def test_truncated_file_is_a_clear_error(tmp_path, where):
    path, data = _exported(tmp_path)
    size, _ = _header(data)
    end = {
        "length": 4,
        "header": 8 + size // 2,
        "data-start": 8 + size + 10,
        "data-middle": (8 + size + len(data)) // 2,
        "last-byte": len(data) - 1,
    }[where]
    path.write_bytes(data[:end])
    with pytest.raises(SparseFormatError, match=r"net\.safetensors"):
        load_sparse(path)
    fresh = Net()
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(SparseFormatError):
        load_sparse_into(fresh, path)
    assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())


def test_broken_header_json_and_flipped_data_bytes(tmp_path):
    path, data = _exported(tmp_path)
    size, _ = _header(data)
    broken = bytearray(data)
    broken[8] = ord("[")
    path.write_bytes(bytes(broken))
    with pytest.raises(SparseFormatError, match="checksum mismatch"):
        load_sparse(path)
    path.write_bytes(seal(bytes(broken)))
    with pytest.raises(SparseFormatError, match="not a readable safetensors file"):
        load_sparse(path)
    flipped = bytearray(data)
    flipped[8 + size + 100] ^= 0x10
    path.write_bytes(bytes(flipped))
    with pytest.raises(SparseFormatError, match="checksum mismatch"):
        load_sparse(path)
    path.write_bytes(_rebuilt(data, header=lambda h: h["__metadata__"].update(version="9")))
    with pytest.raises(SparseFormatError, match="version '9'"):
        load_sparse(path)


def test_version_1_files_are_refused_with_a_hint(tmp_path):
    path, data = _exported(tmp_path)

    def to_v1(header):
        header["__metadata__"].update(version="1")
        del header["__metadata__"]["sha256"]

    path.write_bytes(_rebuilt(data, header=to_v1, reseal=False))
    with pytest.raises(SparseFormatError, match=r"version '1'.*cannot be verified.*export_sparse\(\)"):
        load_sparse(path)


# The three cases of the issue: each loaded (or escaped as another exception) before format version 2.


def test_one_flipped_bit_in_a_shape_is_detected(tmp_path):
    path, data = _fc_file(tmp_path)
    flipped = _replace_once(data, b"[300,784]", b"[300,785]")  # '4' -> '5': one bit
    assert sum(bin(a ^ b).count("1") for a, b in zip(data, flipped, strict=True)) == 1
    path.write_bytes(flipped)
    with pytest.raises(SparseFormatError, match=r"fc\.safetensors.*checksum mismatch"):
        load_sparse(path)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (rb"\"dtype\":\"float32\",\"shape\":[300,784]", rb"\"dtype\":\"int32\",  \"shape\":[300,784]"),
        (b"[300,784]", b"[784,300]"),
    ],
    ids=["float32-to-int32", "transposed"],
)
def test_edited_dtype_or_transposed_shape_is_detected(tmp_path, old, new):
    path, data = _fc_file(tmp_path)
    path.write_bytes(_replace_once(data, old, new))
    with pytest.raises(SparseFormatError, match="checksum mismatch"):
        load_sparse(path)


def test_every_single_bit_flip_of_the_header_is_detected(tmp_path):
    path, data = _fc_file(tmp_path)
    size, _ = _header(data)
    for bit in range(0, (8 + size) * 8, 7):
        flipped = bytearray(data)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        with pytest.raises(SparseFormatError, match=r"fc\.safetensors"):
            load_sparse(path)


@pytest.mark.parametrize("token", ["Infinity", "-Infinity", "NaN", "1e999", "1" * 5000, "7.0", "true", '"7"', "[7]"])
@pytest.mark.parametrize("field", ["k", "unary", "alive"])
def test_non_finite_huge_and_mistyped_numbers_are_format_errors(tmp_path, token, field):
    path, data = _fc_file(tmp_path)
    old = rf"\"{field}\":".encode()
    assert data.count(old) == 1

    def edit(text):
        start = text.index(old) + len(old)
        end = min(text.index(c, start) for c in (b",", b"}"))
        return text[:start] + token.encode().replace(b'"', b'\\"') + text[end:]

    path.write_bytes(_raw_header(data, edit))
    with pytest.raises(SparseFormatError, match=r"fc\.safetensors': (entry 'fc\.weight'|the 'entries' metadata)"):
        load_sparse(path)


@pytest.mark.parametrize("where", ["entries", "header"])
def test_deeply_nested_json_is_a_format_error(tmp_path, where):
    path, data = _fc_file(tmp_path)
    if where == "entries":
        nested = "[" * 100_000 + "]" * 100_000
        path.write_bytes(_rebuilt(data, header=lambda h: h["__metadata__"].update(entries=nested)))
    else:
        path.write_bytes(_raw_header(data, lambda t: b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"," + t[1:]))
    with pytest.raises(SparseFormatError, match=r"fc\.safetensors.*not valid JSON \(RecursionError"):
        load_sparse(path)


def test_duplicate_keys_are_format_errors(tmp_path):
    path, data = _fc_file(tmp_path)
    path.write_bytes(_raw_header(data, lambda t: t.replace(b'{"dtype":"F32"', b'{"dtype":"F32","dtype":"F32"', 1)))
    with pytest.raises(SparseFormatError, match="duplicate key 'dtype'"):
        load_sparse(path)
    path.write_bytes(_raw_header(data, lambda t: t.replace(rb"\"kind\":", rb"\"kind\":\"dense\",\"kind\":", 1)))
    with pytest.raises(SparseFormatError, match="'entries' metadata: duplicate key 'kind'"):
        load_sparse(path)


def test_bool_bytes_other_than_0_and_1_are_refused(tmp_path):
    path = tmp_path / "b.safetensors"
    export_sparse({"flags": torch.tensor([True, False, True])}, {}, path)
    data = path.read_bytes()
    assert data.endswith(b"\x01\x00\x01")
    path.write_bytes(seal(data[:-1] + b"\x02"))
    with pytest.raises(SparseFormatError, match="bool bytes other than 0 and 1"):
        load_sparse(path)


def test_deflate_bomb_is_bounded_by_the_declared_size(tmp_path):
    import zlib

    path, data = _fc_file(tmp_path)
    bomb = zlib.compress(bytes(2**24), 9)  # 16 MiB of zeros in 16 KiB
    size, head = _header(data)
    begin, end = head["fc.weight::index"]["data_offsets"]
    for info in head.values():
        if "data_offsets" in info and info["data_offsets"][0] >= end:
            info["data_offsets"] = [o + len(bomb) - (end - begin) for o in info["data_offsets"]]
    head["fc.weight::index"].update(shape=[len(bomb)], data_offsets=[begin, begin + len(bomb)])
    entries = json.loads(head["__metadata__"]["entries"])
    entries["fc.weight"]["positions"] = {"code": "bitmap", "deflate": (300 * 784 + 7) // 8}
    head["__metadata__"]["entries"] = json.dumps(entries)
    text = json.dumps(head, separators=(",", ":")).encode()
    body = data[8 + size :]
    path.write_bytes(seal(struct.pack("<Q", len(text)) + text + body[:begin] + bomb + body[end:]))
    start = time.perf_counter()
    with pytest.raises(SparseFormatError, match="does not inflate to exactly 29400 bytes"):
        load_sparse(path)
    assert time.perf_counter() - start < 1.0


def test_other_safetensors_file_is_rejected(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(SparseFormatError, match="format is None"):
        load_sparse(tmp_path / "plain.safetensors")
