"""Sparse files: bit-identical round trips, sizes, the entries' checks, memory limits, tied weights."""

import hashlib
import json
import os
import time

import pytest
import torch
from export_cases import (
    Net,
    _bits,
    _exported,
    _gen,
    _masked,
    _net_and_masks,
    _rebuilt,
    _topk_mask,
    masks,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

from lightning_prune.core.export import (
    SparseFormatError,
    export_sparse,
    load_sparse,
    load_sparse_into,
    sparse_file,
    sparse_size_report,
)


@pytest.mark.parametrize("compress", [True, False])
def test_round_trip_is_bit_identical(tmp_path, compress):
    net, masks = _net_and_masks()
    path = tmp_path / "net.safetensors"
    # pruned weights left nonzero on purpose: the file holds the *masked* tensor
    export_sparse(net, masks, path, compress_values=compress)
    state, loaded_masks = load_sparse(path)
    assert list(state) == list(net.state_dict())
    assert set(loaded_masks) == set(masks)
    for name, value in net.state_dict().items():
        want = _masked(value, masks[name]) if name in masks else value
        assert state[name].dtype == want.dtype
        assert torch.equal(state[name], want), name
        assert torch.equal(_bits(state[name]), _bits(want)), name
    for name, keep in masks.items():
        assert torch.equal(loaded_masks[name], keep)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_round_trip_other_dtypes(tmp_path, dtype):
    w = torch.randn(40, 70, generator=_gen(3)).to(dtype)
    keep = torch.rand(40, 70, generator=_gen(4)) < 0.1
    path = tmp_path / "w.safetensors"
    export_sparse({"w": w, "b": torch.arange(5)}, {"w": keep}, path)
    state, _ = load_sparse(path)
    assert state["w"].dtype == dtype
    assert torch.equal(_bits(state["w"]), _bits(_masked(w, keep)))
    assert torch.equal(state["b"], torch.arange(5))


def test_edge_masks_all_pruned_all_alive_and_empty(tmp_path):
    tensors = {
        "none": torch.randn(7, 9),
        "all": torch.randn(300),
        "empty": torch.randn(0, 4),
        "one": torch.randn(5000),
    }
    one = torch.zeros(5000, dtype=torch.bool)
    one[4999] = True  # one survivor after a gap of 5000
    masks = {
        "none": torch.zeros(7, 9, dtype=torch.bool),
        "all": torch.ones(300, dtype=torch.bool),
        "empty": torch.zeros(0, 4, dtype=torch.bool),
        "one": one,
    }
    path = tmp_path / "edge.safetensors"
    report = export_sparse(tensors, masks, path)
    state, loaded = load_sparse(path)
    for name, keep in masks.items():
        assert torch.equal(state[name], _masked(tensors[name], keep)), name
        assert torch.equal(loaded[name], keep), name
    encodings = {t.name: t.encoding for t in report.tensors}
    assert encodings["all"].startswith("full")
    assert report.tensors[0].index_bytes == 0  # all pruned: no positions at all


def test_load_into_model(tmp_path):
    net, masks = _net_and_masks()
    path = tmp_path / "net.safetensors"
    export_sparse(net, masks, path)
    fresh = Net()
    loaded = load_sparse_into(fresh, path)
    for name, value in net.state_dict().items():
        want = _masked(value, masks[name]) if name in masks else value
        assert torch.equal(fresh.state_dict()[name], want)
    assert set(loaded) == set(masks)


def test_shape_mismatch_names_parameter_and_shapes_and_loads_nothing(tmp_path):
    net, masks = _net_and_masks()
    path = tmp_path / "net.safetensors"
    export_sparse(net, masks, path)
    other = Net()
    other.fc2 = nn.Linear(50, 12)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"'fc2.weight' has shape \(12, 50\) in the model and \(10, 50\)"):
        load_sparse_into(other, path)
    for key, value in other.state_dict().items():
        assert torch.equal(value, before[key]), key
    extra = Net()
    extra.head = nn.Linear(10, 2)
    with pytest.raises(ValueError, match=r"missing.*head\.weight"):
        load_sparse_into(extra, path)


def test_bad_masks_are_rejected(tmp_path):
    w = {"w": torch.randn(3, 4)}
    with pytest.raises(ValueError, match="'v'"):
        export_sparse(w, {"v": torch.ones(3, 4, dtype=torch.bool)}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"'w' has shape \(4, 3\)"):
        export_sparse(w, {"w": torch.ones(4, 3, dtype=torch.bool)}, tmp_path / "x")
    with pytest.raises(ValueError, match="bool"):
        export_sparse(w, {"w": torch.ones(3, 4)}, tmp_path / "x")


def test_file_is_plain_safetensors_with_metadata(tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must not be used"))
    net, masks = _net_and_masks()
    path = tmp_path / "net.safetensors"
    export_sparse(net, masks, path)
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        keys = set(handle.keys())
    assert meta["format"] == "lightning_prune.sparse" and meta["version"] == "2"
    data = path.read_bytes()
    blank = data.replace(meta["sha256"].encode(), b"0" * 64)
    assert hashlib.sha256(blank).hexdigest() == meta["sha256"]  # the SHA-256 of the whole file, field blanked
    entries = json.loads(meta["entries"])
    assert entries["fc1.weight"]["kind"] == "sparse" and entries["fc1.bias"]["kind"] == "dense"
    assert entries["fc1.weight"]["shape"] == [50, 3456] and entries["fc1.weight"]["dtype"] == "float32"
    assert {"fc1.weight::values", "fc1.weight::index", "fc1.bias"} <= keys
    load_sparse(path)


def test_size_at_8_percent_random_mask(tmp_path):
    w = torch.randn(300, 784, generator=_gen(0)) * 0.05
    keep = torch.rand(300, 784, generator=_gen(1)) < 0.08
    values_bytes = int(keep.sum()) * 4
    report = export_sparse({"fc1.weight": w}, {"fc1.weight": keep}, tmp_path / "a.safetensors")
    assert report.file_bytes == os.path.getsize(tmp_path / "a.safetensors")
    assert report.values_bytes == values_bytes
    assert report.file_bytes <= 1.16 * values_bytes, str(report)
    # positions alone: Rice coding at the entropy bound of an i.i.d. 8% mask (15.7%), Han's figure 15.6%
    assert report.tensors[0].encoding.startswith("rice(k=3)")
    assert report.tensors[0].index_overhead < 0.16
    raw = export_sparse({"fc1.weight": w}, {"fc1.weight": keep}, tmp_path / "b.safetensors", compress_values=False)
    assert raw.tensors[0].encoding.endswith("raw")
    assert raw.ratio < 1.17  # raw values: 1 + 15.8% positions + the header
    print(f"\nuniform 8% mask, raw values: {raw.ratio:.4f}x; deflated value planes: {report.ratio:.4f}x")


def test_size_of_magnitude_pruned_and_structured_masks(tmp_path):
    gen = _gen(2)
    # magnitude pruning of random weights: survivors share a few exponents, their top bytes deflate well
    w = torch.randn(300, 784, generator=gen) * 0.05
    keep = _topk_mask(w, 0.08)
    uniform = export_sparse({"w": w}, {"w": keep}, tmp_path / "u.safetensors")
    assert uniform.ratio < 1.0
    # MNIST-like first layer: border pixels carry no signal, hidden units of uneven scale
    ii, jj = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    importance = torch.exp(-((ii - 13.5) ** 2 + (jj - 13.5) ** 2) / 72).flatten()
    w = torch.randn(300, 784, generator=gen) * importance * torch.exp(0.5 * torch.randn(300, 1, generator=gen))
    keep = _topk_mask(w, 0.08)
    real = export_sparse({"w": w}, {"w": keep}, tmp_path / "r.safetensors")
    raw = export_sparse({"w": w}, {"w": keep}, tmp_path / "rr.safetensors", compress_values=False)
    assert real.tensors[0].index_overhead < 0.15  # structure beats the i.i.d. bound
    assert raw.ratio < 1.16 and real.ratio < 1.0
    print(
        f"\nmagnitude-pruned 8%: {uniform.ratio:.4f}x; MNIST-like 8%: {real.ratio:.4f}x "
        f"(raw values {raw.ratio:.4f}x, positions {100 * real.tensors[0].index_overhead:.1f}%, "
        f"{real.tensors[0].encoding})"
    )


def test_size_report_text_and_totals(tmp_path):
    net, masks = _net_and_masks()
    path = tmp_path / "net.safetensors"
    report = export_sparse(net, masks, path)
    again = sparse_size_report(path)
    assert again == report
    dense = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    assert report.dense_bytes == dense
    assert report.compression > 5
    text = str(report)
    assert "fc1.weight" in text and "smaller than dense" in text


@settings(max_examples=30, deadline=None)
@given(keep=masks(), seed=st.integers(0, 1000))
def test_file_round_trip_on_random_masks(tmp_path_factory, keep, seed):
    w = torch.randn(keep.shape, generator=_gen(seed))
    path = tmp_path_factory.mktemp("h") / "w.safetensors"
    export_sparse({"w": w}, {"w": keep}, path)
    state, loaded = load_sparse(path)
    assert torch.equal(_bits(state["w"]), _bits(_masked(w, keep)))
    assert torch.equal(loaded["w"], keep)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda e: e["fc1.weight"].update(alive=e["fc1.weight"]["alive"] - 1), "'fc1.weight'"),
        (lambda e: e["fc1.weight"]["positions"].update(code="rics"), "unknown position code 'rics'"),
        (lambda e: e["fc1.weight"].update(shape=[50, 3455]), "'fc1.weight'"),
        (lambda e: e["fc1.weight"].update(dtype="float16"), "'fc1.weight'"),
        (lambda e: e["fc1.bias"].update(crc32=12345), "entry 'fc1.bias': the fields are"),
        (lambda e: e["conv.weight"].update(kind="weird"), "unknown kind 'weird'"),
        (lambda e: e.pop("fc2.bias"), "not described by the metadata"),
        (lambda e: e.update({"ghost": {"kind": "dense", "dtype": "float32", "shape": [2]}}), "'ghost'.*missing"),
        (lambda e: e["fc1.bias"].update(shape=[50.0]), "bad shape"),
        (lambda e: e["fc1.bias"].update(shape=[True] * 50), "bad shape"),
        (lambda e: e["fc1.weight"].update(alive="12"), "alive count '12'"),
        (lambda e: e["fc1.weight"]["positions"].update(k=-1), "Rice parameter"),
        (lambda e: e["fc1.weight"]["values"]["planes"].pop(), "4 byte planes expected"),
        (lambda e: e["fc1.weight"]["values"]["planes"][0].__setitem__(0, "lzma"), "byte planes"),
        (
            lambda e: e["fc1.weight"].update(shape=[10**40, 10**40]),
            rf"has about 2\*\*{(10**80).bit_length() - 1} entries",
        ),
    ],
)
def test_flipped_metadata_is_a_clear_error(tmp_path, edit, message):
    path, data = _exported(tmp_path)
    path.write_bytes(_rebuilt(data, entries=edit))
    with pytest.raises(SparseFormatError, match=message) as info:
        load_sparse(path)
    assert "net.safetensors" in str(info.value)


def test_huge_declared_shape_fails_fast_without_allocating(tmp_path):
    path = tmp_path / "empty.safetensors"
    export_sparse({"w": torch.randn(4, 4)}, {"w": torch.zeros(4, 4, dtype=torch.bool)}, path)
    # all pruned: no index bytes and no values, so nothing in the data bounds the shape
    crafted = _rebuilt(path.read_bytes(), entries=lambda e: e["w"].update(shape=[2**17, 2**17]))
    path.write_bytes(crafted)
    start = time.perf_counter()
    with pytest.raises(SparseFormatError, match=r"empty\.safetensors.*decoding needs 85,899,345,920 bytes.*max_bytes="):
        load_sparse(path)
    with pytest.raises(SparseFormatError, match="decoding needs"):
        load_sparse_into(nn.Linear(4, 4), path)
    assert time.perf_counter() - start < 1.0
    assert sparse_size_report(path).tensors[0].numel == 2**34  # the report decodes nothing


def test_very_sparse_files_load_by_default_and_the_limit_can_be_raised(tmp_path, monkeypatch):
    w = torch.randn(1000, 1000, generator=_gen(0))
    keep = torch.rand(1000, 1000, generator=_gen(1)) < 0.001  # 99.9% pruned
    path = tmp_path / "sparse.safetensors"
    report = export_sparse({"w": w}, {"w": keep}, path)
    assert report.dense_bytes > 500 * report.file_bytes
    state, masks = load_sparse(path)  # under the 256 MiB floor of the default limit
    assert torch.equal(masks["w"], keep) and torch.equal(state["w"], _masked(w, keep))
    need = 1000 * 1000 * 5
    limit = rf"needs {need:,} bytes.*limit of 1,000,000 bytes \(max_bytes\).*pass max_bytes={need} or more"
    with pytest.raises(SparseFormatError, match=limit):
        load_sparse(path, max_bytes=1_000_000)
    assert torch.equal(load_sparse(path, max_bytes=need)[1]["w"], keep)
    monkeypatch.setattr(sparse_file, "_MIN_LIMIT", 0)  # the default rule without its floor: 64 x the file size
    with pytest.raises(SparseFormatError, match=r"the default: 64 x the file size"):
        load_sparse(path)
    with pytest.raises(ValueError, match="max_bytes must be"):
        load_sparse(path, max_bytes=-1)


def test_shrunk_model_exports_sparse_and_loads_into_a_resized_fresh_model(tmp_path):
    from lightning_prune.core.structure import remove_dead_units, resize_to, shapes

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    masks = {f"{i}.weight": torch.rand(model[i].weight.shape) < d for i, d in ((0, 0.08), (2, 0.09), (4, 0.26))}
    masks["0.weight"][:20] = False
    with torch.no_grad():
        for name, keep in masks.items():
            model.get_parameter(name).mul_(keep)
    x = torch.randn(16, 784)
    report = remove_dead_units(model, x, masks)
    expected = model(x)
    path = tmp_path / "lenet300.safetensors"
    size = export_sparse(model, report.masks, path)
    fresh = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10)).eval()
    resize_to(fresh, shapes(model))
    loaded = load_sparse_into(fresh, path)
    assert torch.equal(fresh(x), expected)
    assert all(torch.equal(loaded[k], report.masks[k]) for k in loaded)
    assert size.compression > 10


def test_tied_weights_are_stored_under_each_name(tmp_path):
    net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    net[1].weight = net[0].weight
    keep = torch.rand(6, 6, generator=_gen(0)) < 0.5
    path = tmp_path / "tied.safetensors"
    export_sparse(net, {"1.bias": torch.ones(6, dtype=torch.bool)}, path)
    state, _ = load_sparse(path)
    assert torch.equal(state["0.weight"], state["1.weight"])
    export_sparse(net, {"0.weight": keep, "1.weight": keep}, path)
    state, masks = load_sparse(path)
    assert torch.equal(state["1.weight"], _masked(net[0].weight.detach(), keep))
    assert torch.equal(masks["0.weight"], keep)
