"""Models, masks and file edits shared by the export tests."""

import json
import struct

import torch
from hypothesis import strategies as st
from torch import nn

from lightning_prune.core.export import export_sparse
from lightning_prune.core.export.container import seal


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bit pattern, so -0.0/+0.0 and NaN payloads count."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.detach().contiguous().view(view)


def _masked(w: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype))


def _topk_mask(w: torch.Tensor, density: float) -> torch.Tensor:
    k = round(density * w.numel())
    threshold = w.abs().flatten().kthvalue(w.numel() - k).values
    return w.abs() > threshold


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 6, 5)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(6 * 24 * 24, 50)
        self.fc2 = nn.Linear(50, 10)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(torch.relu(self.bn(self.conv(x))).flatten(1))))


def _net_and_masks(seed: int = 0):
    torch.manual_seed(seed)
    net = Net()
    with torch.no_grad():
        net.bn.running_mean.normal_()
        net.bn.num_batches_tracked.fill_(7)
    masks = {
        "conv.weight": torch.rand(6, 1, 5, 5, generator=_gen(seed)) < 0.66,
        "fc1.weight": _topk_mask(net.fc1.weight.detach(), 0.08),
        "fc2.weight": torch.rand(10, 50, generator=_gen(seed + 1)) < 0.2,
        "fc2.bias": torch.rand(10, generator=_gen(seed + 2)) < 0.5,
    }
    return net, masks


@st.composite
def masks(draw):
    numel = draw(st.integers(1, 4000))
    kind = draw(st.sampled_from(["random", "far", "all", "none", "runs"]))
    gen = _gen(draw(st.integers(0, 2**31 - 1)))
    if kind == "all":
        return torch.ones(numel, dtype=torch.bool)
    if kind == "none":
        return torch.zeros(numel, dtype=torch.bool)
    if kind == "far":  # gaps longer than 255 and 15: fillers needed
        keep = torch.zeros(numel, dtype=torch.bool)
        keep[torch.randint(0, numel, (draw(st.integers(1, 4)),), generator=gen)] = True
        return keep
    if kind == "runs":
        run = draw(st.integers(1, 600))
        return (torch.arange(numel) // run) % 2 == 0
    return torch.rand(numel, generator=gen) < draw(st.floats(0.0, 1.0))


def _exported(tmp_path):
    net, masks = _net_and_masks()
    path = tmp_path / "net.safetensors"
    export_sparse(net, masks, path)
    return path, path.read_bytes()


def _header(data: bytes) -> tuple[int, dict]:
    size = struct.unpack("<Q", data[:8])[0]
    return size, json.loads(data[8 : 8 + size])


def _rebuilt(data: bytes, entries=None, header=None, reseal: bool = True) -> bytes:
    """Edit the entries JSON and/or the safetensors header, rebuild the file, and re-seal its checksum."""
    size, head = _header(data)
    if entries is not None:
        parsed = json.loads(head["__metadata__"]["entries"])
        entries(parsed)
        head["__metadata__"]["entries"] = json.dumps(parsed, separators=(",", ":"))
    if header is not None:
        header(head)
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    out = struct.pack("<Q", len(text)) + text + data[8 + size :]
    return seal(out) if reseal else out


def _replace_once(data: bytes, old: bytes, new: bytes) -> bytes:
    assert data.count(old) == 1 and len(old) == len(new)
    return data.replace(old, new)


def _fc_file(tmp_path):
    w = torch.randn(300, 784, generator=_gen(0))
    keep = torch.rand(300, 784, generator=_gen(1)) < 0.08
    path = tmp_path / "fc.safetensors"
    export_sparse({"fc.weight": w, "fc.bias": torch.randn(300)}, {"fc.weight": keep}, path)
    return path, path.read_bytes()


def _raw_header(data: bytes, edit) -> bytes:
    """Edit the header *text* (for JSON that json.dumps cannot write), fix the length, re-seal."""
    size = struct.unpack("<Q", data[:8])[0]
    text = edit(data[8 : 8 + size].rstrip(b" "))
    text += b" " * (-len(text) % 8)
    return seal(struct.pack("<Q", len(text)) + text + data[8 + size :])
