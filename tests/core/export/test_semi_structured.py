import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_prune import NM
from lightning_prune.core.criteria import nm_mask
from lightning_prune.core.export import SemiStructuredReport, semi_structured_problems, to_semi_structured
from lightning_prune.core.pruner import Pruner

needs_sparse_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0),
    reason="needs a CUDA GPU of compute capability 8.0 or later",
)


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


def pruned_mlp() -> tuple[nn.Sequential, dict[str, torch.Tensor]]:
    net = mlp()
    pruner = Pruner(net, ["0", "2"])
    pruner.prune(NM())
    return net, pruner.masks


def test_conversion_refuses_on_a_machine_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    net, masks = pruned_mlp()
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"to_semi_structured needs CUDA: .* torch\.cuda\.is_available\(\) is False"):
        to_semi_structured(net, masks)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_problems_of_a_2_4_pruned_model_on_cpu_are_device_and_dtype_only():
    net, masks = pruned_mlp()
    problems = semi_structured_problems(net, masks)
    assert list(problems) == ["0", "2"]  # the layers with a mask; "4" was not pruned
    assert problems["0"] == [
        "on cpu: needs a CUDA device",
        "dtype float32: needs float16, bfloat16 or int8 (model.half())",
    ]
    half = semi_structured_problems(net.half(), masks)
    assert half == {"0": ["on cpu: needs a CUDA device"], "2": ["on cpu: needs a CUDA device"]}


def test_problems_name_the_pattern_and_the_shape():
    net, masks = pruned_mlp()
    problems = semi_structured_problems(net.half(), masks, layers=["*"])
    assert problems["4"] == [
        "on cpu: needs a CUDA device",
        "shape (10, 64): both sides must be multiples of (16, 16), at least one",
        "not 2:4: 160 group(s) of 4 inputs hold more than 2 non-zeros (up to 4); prune with NM()",
    ]
    dense = semi_structured_problems(mlp(), layers=["2"])
    assert dense["2"][-1] == "not 2:4: 2048 group(s) of 4 inputs hold more than 2 non-zeros (up to 4); prune with NM()"


def test_entries_outside_the_mask_count_as_zero():
    net = mlp().half()
    keep = nm_mask(net[0].weight, 2, 4)  # the weights themselves stay dense: the mask decides
    assert semi_structured_problems(net, {"0.weight": keep}) == {"0": ["on cpu: needs a CUDA device"]}
    assert "not 2:4" in semi_structured_problems(net, {"0.weight": torch.ones_like(keep)})["0"][-1]


def test_other_modules_and_unmatched_patterns():
    class Mine(nn.Linear):
        pass

    net = nn.Sequential(Mine(64, 64)).half()
    assert semi_structured_problems(net)["0"][0] == "a Mine, not an nn.Linear"
    with pytest.raises(ValueError, match=r"Pattern 'conv\*' in `layers` matches no nn\.Linear module; they are \['0'"):
        semi_structured_problems(net, layers=["conv*"])
    with pytest.raises(ValueError, match=r"`layers` must be None or a non-empty list of glob patterns, got '0'"):
        semi_structured_problems(net, layers="0")


def test_strict_refusal_names_every_layer_and_converts_nothing(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine, the model left on the CPU
    net, masks = pruned_mlp()
    weights = [net[0].weight, net[2].weight]
    refused = (
        r"2 of 2 candidate layer\(s\) cannot be semi-structured \(nothing was converted; strict=False converts the "
        r"others\):\n  0: on cpu: needs a CUDA device; dtype float32: .*\n  2: on cpu: needs a CUDA device; dtype"
    )
    with pytest.raises(ValueError, match=refused):
        to_semi_structured(net, masks)
    assert net[0].weight is weights[0] and net[2].weight is weights[1]
    report = to_semi_structured(net, masks, strict=False)
    assert report == SemiStructuredReport([], {"0": report.refused["0"], "2": report.refused["2"]})
    assert report.refused["0"].startswith("on cpu: needs a CUDA device")
    with pytest.raises(ValueError, match=r"No candidate layer: the model has no nn\.Linear module"):
        to_semi_structured(nn.Sequential(nn.ReLU()))


@needs_sparse_gpu
def test_on_a_gpu_2_4_layers_convert_and_compute_the_same():
    net, masks = pruned_mlp()
    net = net.cuda().half().eval()
    x = torch.randn(64, 64, device="cuda", dtype=torch.float16)
    with torch.inference_mode():
        before = net(x)
    report = to_semi_structured(net, masks)
    assert report.converted == ["0", "2"]
    assert isinstance(net[0].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.inference_mode():
        assert torch.allclose(net(x), before, atol=2e-2, rtol=2e-2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_the_benchmark_exits_with_a_clear_message_without_cuda():
    script = Path(__file__).resolve().parents[3] / "benchmarks" / "semi_structured.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "needs a CUDA GPU (compute capability 8.0 or later" in done.stderr and "Nothing was measured." in done.stderr
