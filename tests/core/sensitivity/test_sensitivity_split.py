"""The torch.fx split at a layer: what the cut holds, and which cut values are copied."""

from __future__ import annotations

import torch
from sensitivity_cases import (
    Skip,
)

from lightning_prune.core.sensitivity.split import GraphSplit


def test_split_caches_the_skip_connection_and_copies_values_written_in_place():
    traced = torch.fx.symbolic_trace(Skip().eval())
    split = GraphSplit(traced, {"fc1"})
    inputs = [n.name for n in split.suffix.graph.nodes if n.op == "placeholder"]
    assert len(inputs) == 1 and split.clone == []  # h feeds both fc1 and the residual add
    assert [n.target for n in split.prefix.graph.nodes if n.op == "call_module"] == ["fc0"]
    split = GraphSplit(torch.fx.symbolic_trace(Skip("add_").eval()), {"fc2"})
    assert len(split.clone) == 1  # h is written into after fc2: copied for each level
    split = GraphSplit(torch.fx.symbolic_trace(Skip("view").eval()), {"fc1"})
    assert split.clone == [0]
