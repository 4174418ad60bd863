"""Fuzzing the two sealed file formats: every mutant raises the promised error or loads consistently.

Run by hand with more mutants: ``python tests/core/export/test_sparse_fuzz.py 50000 [seed]``.
"""

import collections
import json
import random
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from lightning_prune.core.export import SparseFormatError, export_sparse, load_sparse
from lightning_prune.core.export.container import _ST_DTYPES, seal
from lightning_prune.core.export.positions import code_name
from lightning_prune.core.export.sparse_file import _DTYPES
from lightning_prune.core.structure import load_shrunk, resize_to, save_shrunk

SPARSE_MUTANTS = 5000
SHRUNK_MUTANTS = 1000
_EXPANSION = 64  # the fuzz loads with max_bytes = 64 x the file size: the default rule without its 256 MiB floor
_RSS_SLACK = 16 * 2**20


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(view)


# ---------------------------------------------------------------------------------------------------------------------
# Base files: every position code, both value codecs, dense and sparse entries of several dtypes
# ---------------------------------------------------------------------------------------------------------------------


def _gap_mask(top: int, count: int, seed: int) -> torch.Tensor:
    """Uniform gaps in [1, top]: gap8 (top 255) or gap4 (top 15) beats Rice on them."""
    positions = torch.cumsum(torch.randint(1, top + 1, (count,), generator=_gen(seed)), 0) - 1
    keep = torch.zeros(int(positions[-1]) + 7, dtype=torch.bool)
    keep[positions] = True
    return keep


def _masks() -> dict[str, torch.Tensor]:
    row = torch.rand(1, 64, generator=_gen(5)) < 0.5
    return {
        "full": torch.ones(8, 40, dtype=torch.bool),
        "bitmap": torch.rand(16, 40, generator=_gen(1)) < 0.5,
        "rice": torch.rand(30, 50, generator=_gen(2)) < 0.08,
        "rice_pruned": torch.rand(30, 50, generator=_gen(3)) < 0.92,
        "gap8": _gap_mask(255, 100, 4),
        "gap8_pruned": ~_gap_mask(255, 20, 6),
        "gap4": _gap_mask(15, 300, 7),
        "gap4_pruned": ~_gap_mask(15, 300, 8),
        "gap8_deflate": torch.arange(1000) % 10 == 0,
        "bitmap_deflate": row.expand(40, 64).contiguous(),
        "far": torch.arange(5000) == 4999,
        "none": torch.zeros(7, 9, dtype=torch.bool),
        "empty": torch.zeros(0, 4, dtype=torch.bool),
    }


def _base_files(folder: Path) -> list[bytes]:
    masks = _masks()
    state = {name: torch.randn(keep.shape, generator=_gen(i)) * 0.05 for i, (name, keep) in enumerate(masks.items())}
    # the dense masks hold many values: small dtypes keep the files small (and cover more dtypes)
    state["gap8_pruned"] = torch.randint(-128, 128, masks["gap8_pruned"].shape, generator=_gen(30), dtype=torch.int8)
    state["gap4_pruned"] = torch.randint(-999, 999, masks["gap4_pruned"].shape, generator=_gen(31), dtype=torch.int16)
    state["rice_pruned"] = torch.randint(0, 256, masks["rice_pruned"].shape, generator=_gen(32), dtype=torch.uint8)
    state["bitmap_deflate"] = state["bitmap_deflate"].bfloat16()
    state["full"] = state["full"].double()
    state["half"] = torch.randn(20, 30, generator=_gen(20)).half()
    masks["half"] = torch.rand(20, 30, generator=_gen(21)) < 0.3
    state["flags"] = torch.rand(300, generator=_gen(22)) < 0.5
    masks["flags"] = torch.rand(300, generator=_gen(23)) < 0.4
    state.update(bias=torch.randn(40), steps=torch.tensor(7), dense_half=torch.randn(3, 5).half())
    state.update(dense_flags=torch.tensor([True, False, True]), nothing=torch.empty(0))
    files = []
    for i, compress in enumerate((True, False)):
        path = folder / f"base{i}.safetensors"
        export_sparse(state, masks, path, compress_values=compress)
        files.append(path.read_bytes())
    small = folder / "small.safetensors"
    export_sparse(
        {"w": torch.randn(6, 7), "b": torch.randn(6)}, {"w": torch.rand(6, 7, generator=_gen(9)) < 0.3}, small
    )
    files.append(small.read_bytes())
    return files


def _encodings(data: bytes) -> set[str]:
    _, head = _split(data)
    entries = json.loads(head["__metadata__"]["entries"])
    out = set()
    for entry in entries.values():
        if entry["kind"] == "sparse":
            out.add(code_name(entry["positions"]))
            out.add(entry["values"]["codec"])
            out.update(f"plane:{kind}" for kind, _ in entry["values"].get("planes", []))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------------------------------


def _split(data: bytes) -> tuple[int, dict]:
    size = struct.unpack("<Q", data[:8])[0]
    return size, json.loads(data[8 : 8 + size])


def _join(text: bytes, body: bytes) -> bytes:
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _reseal(data: bytes) -> bytes | None:
    try:
        return seal(data)
    except ValueError:  # the mutation broke the digest field itself: the mutant stays unsealed
        return None


def _random_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """A blind mutation, not re-sealed: the checksum must catch it."""
    kind = rng.choice(["flip", "flip-header", "overwrite", "truncate", "insert", "delete"])
    out = bytearray(data)
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    if kind in ("flip", "flip-header"):
        at = rng.randrange(header_end if kind == "flip-header" else len(out))
        out[at] ^= 1 << rng.randrange(8)
    elif kind == "overwrite":
        at = rng.randrange(len(out))
        out[at] = (out[at] + rng.randrange(1, 256)) % 256
    elif kind == "truncate":
        del out[rng.randrange(len(out)) :]
    elif kind == "insert":
        at = rng.randrange(len(out) + 1)
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    else:
        at = rng.randrange(len(out))
        del out[at : at + rng.randrange(1, 9)]
    return "blind-" + kind, bytes(out)


def _resealed_bytes(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    """A blind change of the header text or of the data, then a valid checksum: the parser and decoder must cope."""
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    out = bytearray(data)
    where = rng.choice(["header", "data"]) if header_end < len(out) else "header"
    digest = data.index(b'"sha256":"') + 10  # a change of the digest itself would be undone by re-sealing
    if where == "header":
        at = rng.choice([rng.randrange(8, digest), rng.randrange(digest + 64, header_end)])
    else:
        at = rng.randrange(header_end, len(out))
    if rng.random() < 0.5:
        out[at] ^= 1 << rng.randrange(8)
    else:
        out[at] = rng.choice(b'0123456789,:{}[]"\\-.eE ntfa')
    sealed = _reseal(bytes(out))
    return (f"resealed-{where}", sealed) if sealed is not None else (f"resealed-{where}-unsealable", bytes(out))


_TOKENS = ["Infinity", "-Infinity", "NaN", "1e999", "-0", "1" * 5000, "[" * 3000 + "]" * 3000]


def _bad_value(rng: random.Random, old):
    """A value of the wrong size, sign or type; ``("@token", t)`` stands for a raw JSON token."""
    choices = [-1, 0, 1, 2**17, 2**31, 2**62, 10**30, 1.5, 7.0, "7", True, False, None, [], [1], {}, ("@token",)]
    if isinstance(old, int) and not isinstance(old, bool):
        choices += [old + 1, old - 1, old * 2, old // 2] * 3
    if isinstance(old, list):
        choices += [old[::-1], [*old, 1], old[:-1], [2**17, 2**17], [old], [-1, *old[1:]]]
    if isinstance(old, str):
        choices += [old + "x", old.upper(), "", *_DTYPES, "full", "bitmap", "gap8", "gap4", "rice", "alive"]
        choices += ["pruned", "raw", "planes", "deflate", "dense", "sparse"]
    value = rng.choice(choices)
    return ("@token", rng.choice(_TOKENS)) if value == ("@token",) else value


def _leaves(node, path=()):
    """Every (path, value) inside a JSON value (dict keys and list indices)."""
    yield path, node
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        yield from _leaves(child, (*path, key))


def _set(node, path, value) -> None:
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _mutate_json(rng: random.Random, root: dict, tokens: list) -> str:
    """Change, delete or add one field somewhere in ``root`` (a dict); returns what was done."""
    paths = [p for p, _ in _leaves(root) if p]
    path = rng.choice(paths)
    parent = root
    for key in path[:-1]:
        parent = parent[key]
    action = rng.choice(["set", "set", "set", "delete", "add"])
    if action == "delete":
        del parent[path[-1]]
    elif action == "add" and isinstance(parent, dict):
        parent[rng.choice(["crc32", "extra", "deflate", "of", "k", "codes", "alive"])] = rng.choice([0, 1, "x"])
    else:
        value = _bad_value(rng, parent[path[-1]])
        if isinstance(value, tuple):
            tokens.append(value[1])
            value = f"@@{len(tokens) - 1}@@"
        _set(root, path, value)
    return action


def _entries_op(rng: random.Random, head: dict, entries: dict, tokens: list) -> str:
    """One targeted change of the entries (or, one time in three, of the safetensors header)."""
    if rng.random() < 1 / 3 or not entries:
        return _header_op(rng, head, tokens)
    names = list(entries)
    name = rng.choice(names)
    entry = entries[name] if isinstance(entries[name], dict) else {}
    shape = entry.get("shape") if isinstance(entry.get("shape"), list) else []
    positions = entry.get("positions") if isinstance(entry.get("positions"), dict) else {}
    values = entry.get("values") if isinstance(entry.get("values"), dict) else {}
    op = rng.choice(
        ["field"] * 4
        + ["shape-transposed", "shape-huge", "shape-plus-one", "dtype-same-size", "code-swap", "of-flip"]
        + ["deflate-toggle", "planes-permuted", "entry-renamed", "entry-removed", "entry-added", "entries-swapped"]
    )
    if op == "field":
        _mutate_json(rng, entries, tokens)
    elif op == "shape-transposed":
        entry["shape"] = shape[::-1]
    elif op == "shape-huge":
        entry["shape"] = [2**17, 2**17]
    elif op == "shape-plus-one" and shape and all(isinstance(s, int) for s in shape):
        shape[rng.randrange(len(shape))] += rng.choice([1, -1])
    elif op == "dtype-same-size" and entry.get("dtype") in _DTYPES:
        size = _DTYPES[entry["dtype"]].itemsize
        entry["dtype"] = rng.choice([n for n, d in _DTYPES.items() if d.itemsize == size])
    elif op == "code-swap" and positions:
        positions["code"] = rng.choice(["full", "bitmap", "gap8", "gap4", "rice"])
    elif op == "of-flip" and positions.get("of") in ("alive", "pruned"):
        positions["of"] = {"alive": "pruned", "pruned": "alive"}[positions["of"]]
    elif op == "deflate-toggle" and positions:
        if positions.pop("deflate", None) is None:
            positions["deflate"] = rng.choice([0, 1, 64, 10**9])
    elif op == "planes-permuted" and isinstance(values.get("planes"), list):
        rng.shuffle(values["planes"])
    elif op == "entry-renamed":
        entries[name + rng.choice(["x", "::values", ""])] = entries.pop(name)
    elif op == "entry-removed":
        del entries[name]
    elif op == "entry-added":
        entries[name + "_copy"] = json.loads(json.dumps(entries[name]))
    elif op == "entries-swapped" and len(names) > 1:
        other = rng.choice(names)
        entries[name], entries[other] = entries[other], entries[name]
    else:
        return _entries_op(rng, head, entries, tokens)
    return op


def _header_op(rng: random.Random, head: dict, tokens: list) -> str:
    """One targeted change of the safetensors header: a tensor's layout, or the metadata."""
    infos = [k for k in head if k != "__metadata__"]
    key = rng.choice(infos)
    op = rng.choice(["field", "shape-reversed", "dtype-same-size", "offsets-swapped", "renamed", "removed", "metadata"])
    if op == "field":
        _mutate_json(rng, {k: head[k] for k in infos}, tokens)
    elif op == "shape-reversed":
        head[key]["shape"] = head[key]["shape"][::-1] + rng.choice([[], [1]])
    elif op == "dtype-same-size":
        size = _ST_DTYPES[head[key]["dtype"]].itemsize
        head[key]["dtype"] = rng.choice([n for n, d in _ST_DTYPES.items() if d.itemsize == size])
    elif op == "offsets-swapped" and len(infos) > 1:
        a, b = rng.sample(infos, 2)
        head[a]["data_offsets"], head[b]["data_offsets"] = head[b]["data_offsets"], head[a]["data_offsets"]
    elif op == "renamed":
        head[key + rng.choice(["x", "::index", "::values", ".weight"])] = head.pop(key)
    elif op == "removed":
        del head[key]
    else:
        meta = head["__metadata__"]
        meta[rng.choice(["format", "version", "extra", "entries", "shapes"])] = rng.choice(
            ["1", "3", "lightning_prune.shrunk", "lightning_prune.sparse", "[]", "{}", "5", ""]
        )
        if rng.random() < 0.2:
            meta.pop(rng.choice(list(meta)))
    return "header-" + op


def _crafted(rng: random.Random, data: bytes, semantic) -> tuple[str, bytes]:
    """A semantic change of the header, written back as JSON text, then a valid checksum."""
    size, head = _split(data)
    body = data[8 + size :]
    meta_key = "entries" if "entries" in head["__metadata__"] else "shapes"
    inner = json.loads(head["__metadata__"][meta_key])
    tokens: list[str] = []
    op = semantic(rng, head, inner, tokens)
    meta = head.get("__metadata__")
    if isinstance(meta, dict) and meta.get(meta_key) == json.loads(data[8 : 8 + size])["__metadata__"][meta_key]:
        meta[meta_key] = json.dumps(inner, separators=(",", ":"))  # unless the operation replaced the text
    text = json.dumps(head, separators=(",", ":"))
    for i, token in enumerate(tokens):
        text = text.replace(f'\\"@@{i}@@\\"', token.replace('"', '\\"')).replace(f'"@@{i}@@"', token)
    if rng.random() < 0.05:  # a duplicate key, which json.dumps cannot write
        op += "+duplicate"
        at = text.index("{", 1) + 1
        end = text.index(",", at)
        text = text[:at] + text[at:end] + "," + text[at:]
    mutant = _reseal(_join(text.encode(), body))
    return ("crafted-" + op, mutant) if mutant is not None else ("crafted-unsealable", _join(text.encode(), body))


# ---------------------------------------------------------------------------------------------------------------------
# Running mutants
# ---------------------------------------------------------------------------------------------------------------------


class _PeakMemory:
    """Peak resident memory during a call, from Linux's VmHWM (reset through /proc/self/clear_refs)."""

    def __init__(self):
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.enabled = True
        except OSError:
            self.enabled = False
        self.worst = (0, 0, "")

    @staticmethod
    def _kib(field: str) -> int:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field))
        return int(line.split()[1]) * 1024

    def __enter__(self):
        if self.enabled:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = self._kib("VmRSS:")
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.growth = self._kib("VmHWM:") - self.start


def _check_loaded(data: bytes, state: dict, masks: dict) -> None:
    """A mutant that loads must give exactly what its (valid) header describes."""
    _, head = _split(data)
    entries = json.loads(head["__metadata__"]["entries"])
    assert list(state) == list(entries)
    assert set(masks) == {name for name, entry in entries.items() if entry["kind"] == "sparse"}
    for name, entry in entries.items():
        value = state[name]
        assert tuple(value.shape) == tuple(entry["shape"]) and value.dtype == _DTYPES[entry["dtype"]], name
        if entry["kind"] == "sparse":
            keep = masks[name]
            assert keep.dtype == torch.bool and keep.shape == value.shape
            assert int(keep.sum()) == entry["alive"]
            assert not _bits(value[~keep]).any(), name  # pruned entries are exactly +0


def _outcome(load, path: Path, data: bytes, memory: _PeakMemory) -> tuple[str, object]:
    path.write_bytes(data)
    try:
        with memory:
            result = load(path)
    except SparseFormatError as err:
        assert str(path) in str(err), str(err)
        outcome, result = "SparseFormatError", None
    except ValueError as err:
        if "does not fit the model" not in str(err):
            raise
        assert str(path) in str(err), str(err)
        outcome, result = "ValueError(does not fit)", None
    else:
        outcome = "loaded"
    if memory.enabled:
        assert memory.growth <= _EXPANSION * 16 * len(data) + _RSS_SLACK, (memory.growth, len(data))
        memory.worst = max(memory.worst, (memory.growth, len(data), outcome))
    return outcome, result


def fuzz_sparse(count: int, seed: int = 0, folder: Path | None = None) -> collections.Counter:
    """Load ``count`` mutants of the base files; returns the outcomes by kind of mutation and result."""
    folder = Path(folder or tempfile.mkdtemp())
    rng = random.Random(seed)
    bases = _base_files(folder)
    path = folder / "mutant.safetensors"
    memory = _PeakMemory()
    counts: collections.Counter = collections.Counter()

    def load(p):
        return load_sparse(p, max_bytes=_EXPANSION * p.stat().st_size)

    for _ in range(count):
        data = rng.choice(bases)
        family = rng.random()
        if family < 0.4:
            kind, mutant = _random_bytes(rng, data)
        elif family < 0.6:
            kind, mutant = _resealed_bytes(rng, data)
        else:
            kind, mutant = _crafted(rng, data, _entries_op)
        outcome, result = _outcome(load, path, mutant, memory)
        if outcome == "loaded":
            assert kind.startswith(("resealed", "crafted")) and not kind.endswith("unsealable"), kind
            _check_loaded(mutant, *result)
        counts[(kind.split("-")[0], outcome)] += 1
        counts[("mutation", kind, outcome)] += 1
    counts[("worst peak RSS growth (bytes, file bytes, outcome)", memory.worst)] = 1
    return counts


# ---------------------------------------------------------------------------------------------------------------------
# load_shrunk
# ---------------------------------------------------------------------------------------------------------------------


def _net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 6), nn.ReLU(), nn.Linear(6, 3)
    )


def _shrunk_file(folder: Path) -> bytes:
    torch.manual_seed(0)
    net = _net()
    resize_to(net, {"0": [2, 1, 3, 3], "1": [2], "4": [4, 32], "6": [3, 4]})
    with torch.no_grad():
        net[1].running_mean.normal_()
        net[1].num_batches_tracked.fill_(3)
    path = folder / "shrunk.safetensors"
    save_shrunk(net, path)
    return path.read_bytes()


def _record_op(rng: random.Random, head: dict, record: dict, tokens: list) -> str:
    """One targeted change of the shape record (or, one time in three, of the safetensors header)."""
    if rng.random() < 1 / 3 or not record:
        return _header_op(rng, head, tokens)
    op = rng.choice(["field", "field", "huge", "unknown", "root", "removed", "transposed"])
    name = rng.choice(list(record))
    if op == "field":
        _mutate_json(rng, record, tokens)
    elif op == "huge":
        record[rng.choice(["4", "6"])] = rng.choice([[2**20, 2**20], [4, 2**30], [2**40, 4]])
    elif op == "unknown":
        record[rng.choice(["9", "2", "3", "4.weight"])] = [2]
    elif op == "root":
        record[""] = [3, 4]
    elif op == "removed":
        del record[name]
    elif isinstance(record[name], list):
        record[name] = record[name][::-1]
    return op


def fuzz_shrunk(count: int, seed: int = 0, folder: Path | None = None) -> collections.Counter:
    """Load ``count`` mutants of a shrunk checkpoint into fresh models; the model must be unchanged on errors."""
    folder = Path(folder or tempfile.mkdtemp())
    rng = random.Random(seed)
    base = _shrunk_file(folder)
    path = folder / "mutant.safetensors"
    memory = _PeakMemory()
    counts: collections.Counter = collections.Counter()
    fresh = _net()
    for _ in range(count):
        family = rng.random()
        if family < 0.3:
            kind, mutant = _random_bytes(rng, base)
        elif family < 0.45:
            kind, mutant = _resealed_bytes(rng, base)
        else:
            kind, mutant = _crafted(rng, base, _record_op)
        before = {k: v.clone() for k, v in fresh.state_dict().items()}
        modules = list(fresh.modules())
        outcome, _ = _outcome(lambda p: load_shrunk(fresh, p), path, mutant, memory)  # noqa: B023
        if outcome == "loaded":
            assert kind.startswith(("resealed", "crafted")) and not kind.endswith("unsealable"), kind
            assert fresh(torch.randn(2, 1, 6, 6)).shape == (2, 3)
            fresh = _net()
        else:
            assert list(fresh.modules()) == modules
            assert all(torch.equal(v, before[k]) for k, v in fresh.state_dict().items())
        counts[(kind.split("-")[0], outcome)] += 1
        counts[("mutation", kind, outcome)] += 1
    counts[("worst peak RSS growth (bytes, file bytes, outcome)", memory.worst)] = 1
    return counts


def _summary(counts: collections.Counter) -> str:
    return "\n".join(f"  {key}: {n}" for key, n in sorted(counts.items(), key=str))


# ---------------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------------


def test_base_files_cover_every_code_and_codec(tmp_path):
    seen = set().union(*map(_encodings, _base_files(tmp_path)))
    codes = {"full", "bitmap", "gap8", "gap4", "rice(k=3)", "bitmap+deflate", "gap8+deflate", "raw", "planes"}
    assert codes | {"gap8/pruned", "gap4/pruned", "rice(k=3)/pruned", "plane:raw", "plane:deflate"} <= seen, seen
    for data in _base_files(tmp_path):  # and each loads within the fuzz's limit
        path = tmp_path / "x.safetensors"
        path.write_bytes(data)
        load_sparse(path, max_bytes=_EXPANSION * len(data))


def _families(counts: collections.Counter) -> dict[str, collections.Counter]:
    out: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for key, n in counts.items():
        if key[0] in ("blind", "resealed", "crafted"):
            out[key[0]][key[1]] += n
    return out


def test_fuzz_sparse_files(tmp_path):
    start = time.perf_counter()
    counts = fuzz_sparse(SPARSE_MUTANTS, seed=0, folder=tmp_path)
    print(f"\n{SPARSE_MUTANTS} sparse mutants in {time.perf_counter() - start:.1f} s:\n{_summary(counts)}")
    families = _families(counts)
    assert set(families["blind"]) == {"SparseFormatError"}  # the checksum catches every blind change
    assert set(families["resealed"]) | set(families["crafted"]) <= {"SparseFormatError", "loaded"}
    assert families["crafted"]["SparseFormatError"] > SPARSE_MUTANTS / 4
    assert sum(map(sum, [c.values() for c in families.values()])) == SPARSE_MUTANTS


def test_fuzz_shrunk_checkpoints(tmp_path):
    start = time.perf_counter()
    counts = fuzz_shrunk(SHRUNK_MUTANTS, seed=0, folder=tmp_path)
    print(f"\n{SHRUNK_MUTANTS} shrunk mutants in {time.perf_counter() - start:.1f} s:\n{_summary(counts)}")
    families = _families(counts)
    assert set(families["blind"]) == {"SparseFormatError"}
    assert families["crafted"]["ValueError(does not fit)"] > 0 and families["crafted"]["SparseFormatError"] > 0
    assert sum(map(sum, [c.values() for c in families.values()])) == SHRUNK_MUTANTS


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20_000
    seed = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    for fuzz, share in ((fuzz_sparse, 1), (fuzz_shrunk, 5)):
        start = time.perf_counter()
        result = fuzz(n // share, seed=seed)
        print(f"{fuzz.__name__}: {n // share} mutants, seed {seed}, {time.perf_counter() - start:.1f} s")
        print(_summary(result))
