"""benchmarks/mask_cost.py runs, compares what it says it compares, and keeps the variants bit-identical."""

from __future__ import annotations

from scripts import load_script


def test_mask_cost_script_runs_both_parts_quickly(capsys, monkeypatch):
    mask_cost = load_script("benchmarks/mask_cost.py", "mask_cost", monkeypatch)
    mask_cost.main(["--models", "lenet300", "--steps", "3", "--skip", "1", "--sizes", "1000", "3000",
                    "--micro-rounds", "2", "--micro-elements", "3000"])  # fmt: skip
    out = capsys.readouterr().out
    assert "| `enforce(g, mask), compiled kernel: what runs` | 1 | yes |" in out
    assert "| `enforce(g, mask), PyTorch kernel (1M-element chunks)` | 1 | yes |" in out
    for variant in ("plain", "lightning-prune", "lightning-prune, PyTorch kernel", "torch prune"):
        assert f"| {variant} |" in out
    assert "end with bit-identical weights: True" in out
