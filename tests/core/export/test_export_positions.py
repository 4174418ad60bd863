"""Position codes: every code round-trips, across chunk boundaries, and the smallest is chosen."""

import json

import pytest
import torch
from export_cases import (
    _gen,
    masks,
)
from hypothesis import given, settings

from lightning_prune.core.export import export_sparse, position_sizes, positions
from lightning_prune.core.export.positions import _candidates, decode_positions


def test_chosen_code_is_the_smallest(tmp_path):
    for density in (0.01, 0.08, 0.3, 0.7, 0.97):
        keep = torch.rand(120, 200, generator=_gen(int(density * 100))) < density
        report = export_sparse({"w": torch.randn(120, 200)}, {"w": keep}, tmp_path / "s.safetensors")
        assert report.tensors[0].index_bytes == min(position_sizes(keep).values())


@settings(max_examples=150, deadline=None)
@given(keep=masks())
def test_every_position_code_round_trips(keep):
    n, alive = keep.numel(), int(keep.sum())
    for desc, blob in _candidates(keep):
        decoded = decode_positions(json.loads(json.dumps(desc)), blob, n, alive)
        assert torch.equal(decoded, keep), desc


@pytest.mark.parametrize("chunk", [8, 16, 2**16])
def test_position_codes_decode_across_chunk_boundaries(monkeypatch, chunk):
    monkeypatch.setattr(positions, "_CHUNK", chunk)  # the decoders work a chunk at a time
    gen = _gen(chunk)
    for numel, density in ((3000, 0.01), (3000, 0.3), (20_000, 0.5), (5000, 0.97), (70_000, 0.004), (600, 0.0)):
        keep = torch.rand(numel, generator=gen) < density
        keep[-1] = density > 0.5
        for desc, blob in _candidates(keep):
            decoded = decode_positions(json.loads(json.dumps(desc)), blob, numel, int(keep.sum()))
            assert torch.equal(decoded, keep), (numel, density, desc)
