"""core/dropout.py: the layers a dropout's output reaches (data flow), static links, rates and counts."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from lightning_prune.core.dropout import (
    DropoutAdjuster,
    ForwardTrace,
    adjusted_rate,
    is_weight_name,
    layer_counts,
    link,
    rnn_dropouts,
    weight_layers,
)
from lightning_prune.core.pruner import Pruner
from lightning_prune.zoo import LeNet5, LeNet300100


def trace(model: nn.Module, *inputs: torch.Tensor) -> ForwardTrace:
    with ForwardTrace(model, weight_layers(model)) as seen:
        model(*inputs)
    return seen


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


# ----------------------------------------------------------------------------------------------- models
class RNNNet(nn.Module):
    """embedding -> drop -> LSTM -> decoder: the dropout drops the LSTM's inputs, not the decoder's."""

    def __init__(self, packed: bool = False):
        super().__init__()
        self.packed = packed
        self.emb = nn.Embedding(10, 6)
        self.drop = nn.Dropout(0.5)
        self.rnn = nn.LSTM(6, 8, batch_first=True)
        self.decoder = nn.Linear(8, 10)

    def forward(self, x):
        h = self.drop(self.emb(x))
        if self.packed:
            h = pack_padded_sequence(h, torch.tensor([x.shape[1]] * x.shape[0]), batch_first=True)
            return self.decoder(self.rnn(h)[1][0][-1])
        return self.decoder(self.rnn(h)[0])


class PosEncoding(nn.Module):
    def __init__(self, dim: int, p: float):
        super().__init__()
        self.dropout = nn.Dropout(p)
        self.register_buffer("pe", torch.randn(1, 16, dim))

    def forward(self, x):
        return self.dropout(x + self.pe[:, : x.size(1)])


class TinyTransformer(nn.Module):
    """As Lightning's demo: the positional encoding is registered (and its dropout runs) next to the embedding."""

    def __init__(self, norm_first: bool = False):
        super().__init__()
        self.pos_encoder = PosEncoding(8, 0.2)
        self.embedding = nn.Embedding(11, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.decoder = nn.Linear(8, 11)

    def forward(self, x):
        return self.decoder(self.encoder(self.pos_encoder(self.embedding(x) * math.sqrt(8))))


class Shapes(nn.Module):
    """The dropout's output reaches ``fc`` through a view, a transpose, GELU, a slice and ``* 2``."""

    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.drop(x).view(-1, 4, 2).transpose(1, 2).contiguous()
        return self.fc(nn.functional.gelu(h)[:, :, :4] * 2)


class Combined(nn.Module):
    """A residual add, a concatenation and a product with a tensor: each stops the dropout's label."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)
        self.wide = nn.Linear(8, 3)

    def forward(self, x):
        h = self.drop(x)
        if self.how == "add":
            return self.fc(x + h)
        if self.how == "cat":
            return self.wide(torch.cat([x, h], dim=1))
        return self.fc(h * torch.ones(4))


class TwoHeads(nn.Module):
    """One dropout feeding two layers (after a ReLU), and a dropout whose input is also used elsewhere."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.drop = nn.Dropout(p)
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 5)
        self.side = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.drop(x))
        return self.a(h).sum() + self.b(h).sum() + self.side(x).sum()


# ----------------------------------------------------------------------------------------------- names
def test_weight_names_and_layers_cover_rnn_and_attention_but_not_embeddings_or_norms():
    assert [is_weight_name(n) for n in ["weight", "q_proj_weight", "rnn.weight_ih_l0_reverse", "rnn.bias_ih_l0"]] == [
        True,
        True,
        True,
        False,
    ]
    model = RNNNet()
    assert weight_layers(model) == ["rnn", "decoder"]
    assert weight_layers(TinyTransformer()) == [
        "encoder.layers.0.self_attn",
        "encoder.layers.0.self_attn.out_proj",
        "encoder.layers.0.linear1",
        "encoder.layers.0.linear2",
        "decoder",
    ]


def test_layer_counts_sum_every_weight_of_a_layer_and_skip_biases():
    masks = {
        "rnn.weight_ih_l0": torch.tensor([[True, True, False]]),
        "rnn.weight_hh_l0": torch.tensor([[True, False], [False, False]]),
        "rnn.bias_ih_l0": torch.tensor([False]),
        "attn.in_proj_weight": torch.tensor([[True], [False]]),
        "attn.out_proj.weight": torch.tensor([[True]]),
        "ln.weight": torch.tensor([True, False]),  # a scale, not connections
        "fc.weight": torch.tensor([[True, False]]),
    }
    layer_of = {"attn.out_proj.weight": "attn.out_proj", "fc.weight": "fc", "ln.weight": "ln"}
    layer_of |= {n: n.split(".")[0] for n in masks if n.startswith(("rnn", "attn.in"))}
    assert layer_counts(masks, layer_of) == {"rnn": (3, 7), "attn": (1, 2), "attn.out_proj": (1, 1), "fc": (1, 2)}


def test_the_pruners_layer_names_are_the_linked_ones():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.rnn = nn.LSTM(4, 4, batch_first=True)
            self.fc = nn.utils.parametrizations.weight_norm(nn.Linear(4, 2))

        def forward(self, x):
            h = self.drop(x)
            return self.fc(self.drop(self.attn(h, h, h)[0] + self.rnn(h)[0]))

    model = Net()
    seen = trace(model, torch.randn(2, 3, 4))
    assert seen.links == {"drop": ["attn", "rnn", "fc"]}
    pruner = Pruner(model)
    masks = {name: torch.ones_like(pruner.parameter(name), dtype=torch.bool) for name in pruner.layer_of}
    counts = layer_counts(masks, pruner.layer_of)
    assert {"attn", "attn.out_proj", "rnn", "fc"} <= set(counts)
    assert counts["attn"] == (48, 48) and counts["rnn"] == (128, 128) and counts["fc"] == (8, 8)


# ----------------------------------------------------------------------------------------------- data flow
def test_a_dropout_in_front_of_an_lstm_links_to_the_lstm_not_the_decoder():
    seen = trace(RNNNet(), torch.randint(0, 10, (2, 4)))
    assert seen.links == {"drop": ["rnn"]} and seen.failed is None
    assert seen.order == ["drop", "rnn", "decoder"]
    assert trace(RNNNet(packed=True), torch.randint(0, 10, (2, 4))).links == {"drop": ["rnn"]}  # a PackedSequence


@pytest.mark.parametrize("norm_first", [False, True])
def test_the_positional_encoding_dropout_links_to_the_attention_block_not_the_embedding(norm_first):
    model = TinyTransformer(norm_first)
    assert link(["embedding", "pos_encoder.dropout", "encoder.layers.0.self_attn"], ["pos_encoder.dropout"], [
        "embedding", "encoder.layers.0.self_attn"
    ])["pos_encoder.dropout"] == ["encoder.layers.0.self_attn"]  # fmt: skip
    seen = trace(model, torch.randint(0, 11, (2, 5)))
    assert seen.links == {
        "pos_encoder.dropout": ["encoder.layers.0.self_attn"],  # the block, not its out_proj (fed by the attention)
        "encoder.layers.0.dropout": ["encoder.layers.0.linear2"],  # FFN: linear1 -> ReLU -> dropout -> linear2
        "encoder.layers.0.dropout1": [],  # residual branches: added to the input first
        "encoder.layers.0.dropout2": [],
    }


def test_attention_inputs_given_by_keyword_link_too():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.3)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

        def forward(self, x, memory):
            return self.attn(x, key=self.drop(memory), value=self.drop(memory))[0]

    assert trace(Cross(), torch.randn(2, 3, 4), torch.randn(2, 5, 4)).links == {"drop": ["attn"]}


def test_the_label_passes_through_reshapes_activations_slices_and_scalars():
    assert trace(Shapes(), torch.randn(2, 8)).links == {"drop": ["fc"]}


def test_spatial_dropout_reaches_the_next_conv_through_pooling_and_normalization():
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Dropout2d(0.2), nn.MaxPool2d(2), nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1))
    assert trace(net.train(), torch.randn(2, 1, 8, 8)).links == {"1": ["4"]}


@pytest.mark.parametrize(("how", "call_order"), [("add", "fc"), ("cat", "wide"), ("mul", "fc")])
def test_combining_with_another_tensor_stops_the_label(how, call_order):
    seen = trace(Combined(how), torch.randn(2, 4))
    assert seen.links == {"drop": []}
    assert link(seen.order, ["drop"], ["fc", "wide"]) == {"drop": [call_order]}  # call order would link it


def test_a_dropout_feeding_two_layers_links_both_and_its_input_stays_unlabelled():
    for p in (0.5, 0.0):  # with p = 0 the dropout returns its input itself: ``side`` must not be linked
        seen = trace(TwoHeads(p), torch.randn(2, 4))
        assert seen.links == {"drop": ["a", "b"]}
    model = TwoHeads().eval()  # eval mode: the same
    assert trace(model, torch.randn(2, 4)).links == {"drop": ["a", "b"]}


def test_chained_dropouts_both_link_to_the_layer():
    net = nn.Sequential(nn.Dropout(0.5), nn.Dropout(0.1), nn.Linear(4, 2))
    assert trace(net, torch.randn(2, 4)).links == {"0": ["2"], "1": ["2"]}


def test_a_reused_dropout_links_every_layer_it_feeds():
    class Reused(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.fc1 = nn.Linear(4, 4)
            self.fc2 = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc2(self.drop(torch.relu(self.fc1(self.drop(x)))))

    assert trace(Reused(), torch.randn(2, 4)).links == {"drop": ["fc1", "fc2"]}


def test_the_trace_changes_no_output_and_leaves_nothing_behind():
    for model, x in [(TwoHeads(0.0), torch.randn(2, 4)), (TinyTransformer().eval(), torch.randint(0, 11, (2, 5)))]:
        expected = model(x)
        with ForwardTrace(model, weight_layers(model)) as seen:
            got = model(x)
            assert hooks(model) > 0
        assert torch.equal(got, expected) and hooks(model) == 0 and not seen._labels
        seen.close()  # idempotent


def test_functional_dropout_outside_a_module_is_counted_not_linked():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(0.5)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(nn.functional.dropout(self.drop(x), 0.3, self.training))

    seen = trace(Functional(), torch.randn(2, 4))
    assert seen.functional_dropout == 1 and seen.links == {"drop": ["fc"]}  # F.dropout passes the label on


def test_a_failure_of_the_bookkeeping_is_recorded_and_the_forward_goes_on(monkeypatch):
    def broken(*_):
        raise RuntimeError("odd tensor")

    monkeypatch.setattr(ForwardTrace, "_pass_on", broken)
    model = Shapes()
    seen = trace(model, torch.randn(2, 8))
    assert seen.failed == "RuntimeError: odd tensor" and seen.links == {"drop": []}
    assert seen.order == ["drop", "fc"] and hooks(model) == 0


# ----------------------------------------------------------------------------------------------- adjuster
def test_lenet_links_and_rates_are_those_of_the_paper_static_and_traced():
    counts = {"fc1": (30_000, 235_200), "fc2": (2_700, 30_000), "fc3": (250, 1_000)}
    for net, expected in [
        (LeNet300100(dropout=0.2), {"drop1": ["fc2"], "drop2": ["fc3"]}),
        (LeNet5(dropout=0.5), {"drop1": ["fc2"]}),
    ]:
        adjuster = DropoutAdjuster(net)
        assert adjuster.links == expected and adjuster.rule == "registration order"
        static = adjuster.rates(counts)
        seen = trace(net.train(), torch.zeros(2, 1, 28, 28))
        assert seen.links == expected
        adjuster.use_flow(seen.links)
        assert adjuster.links == expected and adjuster.source == "traced" and adjuster.rule == "data flow"
        assert adjuster.rates(counts) == static
        layer = expected["drop1"][0]
        assert static["drop1"] == net.drop1.p * math.sqrt(counts[layer][0] / counts[layer][1])
    for net in (LeNet300100(), LeNet5()):  # dropout 0 by default: still linked, rate stays 0
        assert trace(net.train(), torch.zeros(2, 1, 28, 28)).links["drop1"] == ["fc2"]


def test_static_links_follow_registration_order_and_skip_embeddings():
    adjuster = DropoutAdjuster(TinyTransformer())
    assert adjuster.links["pos_encoder.dropout"] == ["encoder.layers.0.self_attn"]
    assert adjuster.source == "static" and adjuster.sources["pos_encoder.dropout"] == "static"


def test_rates_sum_the_counts_of_every_linked_layer_and_skip_layers_not_pruned():
    model = TwoHeads()
    adjuster = DropoutAdjuster(model)
    adjuster.use_flow(trace(model, torch.randn(2, 4)).links)
    assert adjuster.rates({"a": (3, 12), "b": (5, 20)}) == {"drop": pytest.approx(0.5 * math.sqrt(8 / 32))}
    assert adjuster.rates({"a": (3, 12), "side": (1, 8)}) == {"drop": pytest.approx(0.25)}
    assert adjuster.apply({"side": (1, 8)}) == {"drop": 0.5}  # its layers are not pruned: it keeps its rate
    assert adjusted_rate(0.5, 0, 0) == 0.5


def test_explicit_links_win_over_traced_ones_and_say_so():
    model = RNNNet()
    adjuster = DropoutAdjuster(model, {"drop": "decoder"})
    adjuster.use_flow(trace(model, torch.randint(0, 10, (2, 4))).links)
    assert adjuster.links == {"drop": ["decoder"]} and adjuster.sources == {"drop": "explicit"}
    adjuster = DropoutAdjuster(model, {"drop": "rnn"})  # an LSTM is a layer with weights
    assert adjuster.links == {"drop": ["rnn"]}
    with pytest.raises(ValueError, match=r"'emb' is not a module with weights\. Accepted: \['rnn', 'decoder'\]"):
        DropoutAdjuster(model, {"drop": "emb"})


def test_unlinked_dropouts_say_why():
    model = Combined("add")
    adjuster = DropoutAdjuster(model)
    seen = trace(model, torch.randn(2, 4))
    adjuster.use_flow(seen.links)
    assert adjuster.unlinked(seen.order) == {
        "drop": "combined with another tensor before a layer takes it (call order: ['fc'])"
    }
    assert adjuster.unlinked([]) == {"drop": "it did not run in the traced batch"}
    zero = DropoutAdjuster(TwoHeads(0.0))
    zero.use_flow({})
    assert zero.unlinked([]) == {}  # a rate of 0 stays 0 anyway


def test_state_round_trips_and_an_old_traced_state_was_by_call_order():
    model = RNNNet()
    adjuster = DropoutAdjuster(model)
    adjuster.use_flow({"drop": ["rnn"]})
    adjuster.apply({"rnn": (1, 4)})
    state = adjuster.state_dict()
    assert state == {
        "original": {"drop": 0.5},
        "current": {"drop": 0.25},
        "links": {"drop": ["rnn"]},
        "source": "traced",
        "rule": "data flow",
    }
    fresh = DropoutAdjuster(RNNNet())
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    old = {k: v for k, v in state.items() if k != "rule"} | {"links": {"drop": ["decoder"]}}
    fresh.load_state_dict(old)
    assert fresh.rule == "call order" and fresh.links == {"drop": ["decoder"]}
    fresh.load_state_dict({"original": {"drop": 0.5}, "current": {"drop": 0.5}})  # no links: kept
    assert fresh.links == {"drop": ["decoder"]}


# ------------------------------------------------------------------------------ an RNN's inner dropout
class Stacked(nn.Module):
    """drop -> 3-layer bidirectional LSTM (inner dropout 0.4) -> 1-layer GRU (its dropout does nothing) -> head."""

    def __init__(self, inner: float = 0.4):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.rnn = nn.LSTM(4, 3, num_layers=3, dropout=inner, bidirectional=True, batch_first=True)
        self.gru = nn.GRU(6, 3, batch_first=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.drop(x))
        h, _ = self.gru(h)
        return self.head(h[:, -1])


def test_rnn_dropouts_are_the_inputs_of_layers_one_and_up_in_both_directions():
    assert rnn_dropouts(Stacked()) == {
        "rnn.dropout": ["rnn.weight_ih_l1", "rnn.weight_ih_l1_reverse", "rnn.weight_ih_l2", "rnn.weight_ih_l2_reverse"]
    }
    assert rnn_dropouts(Stacked(inner=0.0)) == {}
    deep = nn.GRU(2, 2, num_layers=11, dropout=0.1)
    assert rnn_dropouts(deep) == {"dropout": [f"weight_ih_l{k}" for k in range(1, 11)]}
    weighted = nn.Sequential(nn.RNN(2, 2, num_layers=2, dropout=0.2))
    nn.utils.parametrizations.weight_norm(weighted[0], "weight_ih_l1")
    inner = ["0.parametrizations.weight_ih_l1.original0", "0.parametrizations.weight_ih_l1.original1"]
    assert rnn_dropouts(weighted) == {"0.dropout": inner}
    pruner = Pruner(weighted)  # it prunes the direction, original1: the one counted
    pruner.prune("fraction", 0.5)
    remaining, total = pruner.parameter_counts()[inner[1]]  # 2 or 3 of 4: a weight-norm row keeps one
    assert DropoutAdjuster(weighted).apply(pruner.parameter_counts()) == {
        "0.dropout": pytest.approx(0.2 * (remaining / total) ** 0.5)
    }
    assert remaining < total


def test_an_rnns_inner_dropout_is_set_from_its_inner_inputs_whatever_the_trace():
    model = Stacked()
    adjuster = DropoutAdjuster(model)
    assert adjuster.original == {"drop": 0.5, "rnn.dropout": 0.4}
    assert adjuster.links["rnn.dropout"] == rnn_dropouts(model)["rnn.dropout"]
    assert adjuster.sources == {"drop": "static", "rnn.dropout": "inner"}
    adjuster.use_flow(trace(model, torch.randn(2, 5, 4)).links)
    assert adjuster.links == {"drop": ["rnn"], "rnn.dropout": rnn_dropouts(model)["rnn.dropout"]}
    inner = {name: (9, 36) for name in adjuster.links["rnn.dropout"]}  # a quarter of each remains
    rates = adjuster.apply({"rnn": (100, 400), "rnn.weight_hh_l1": (1, 9), **inner})
    assert rates == {"drop": pytest.approx(0.25), "rnn.dropout": pytest.approx(0.2)}
    assert model.rnn.dropout == pytest.approx(0.2) and model.drop.p == pytest.approx(0.25)
    assert adjuster.apply({}) == {"drop": 0.5, "rnn.dropout": 0.4}  # nothing pruned: the rates built with
    assert adjuster.unlinked([]) == {}  # an inner dropout runs with its RNN, whose own inputs it drops


def test_the_inner_dropout_changes_what_the_rnn_computes_in_training():
    model = Stacked().train()
    adjuster = DropoutAdjuster(model)
    x = torch.randn(2, 5, 4)
    adjuster.set({"drop": 0.0, "rnn.dropout": 0.0})
    torch.manual_seed(0)
    plain = model(x)
    torch.manual_seed(0)
    assert torch.equal(model(x), plain)
    adjuster.set({"rnn.dropout": 0.9})
    torch.manual_seed(0)
    assert not torch.equal(model(x), plain)


def test_an_rnns_inner_dropout_round_trips_in_the_state():
    model = Stacked()
    adjuster = DropoutAdjuster(model)
    adjuster.apply({name: (1, 4) for name in adjuster.links["rnn.dropout"]})
    state = adjuster.state_dict()
    assert state["current"] == {"drop": 0.5, "rnn.dropout": pytest.approx(0.2)}
    fresh_model = Stacked()
    fresh = DropoutAdjuster(fresh_model)
    fresh.load_state_dict(state)
    assert fresh_model.rnn.dropout == pytest.approx(0.2) and fresh.state_dict() == state
    fresh.load_state_dict({"original": {"drop": 0.5}, "current": {"drop": 0.3}})  # written before inner dropouts
    assert fresh.links["rnn.dropout"] == adjuster.links["rnn.dropout"] and fresh.original["rnn.dropout"] == 0.4


def test_an_rnns_inner_dropout_cannot_be_relinked_and_is_not_offered_as_a_module():
    with pytest.raises(ValueError, match=r"'rnn.dropout' is the dropout between an RNN's layers: .*cannot be relinked"):
        DropoutAdjuster(Stacked(), {"rnn.dropout": "head"})
    with pytest.raises(ValueError, match=r"'nope' is not a module of the model\. Dropout modules: \['drop'\]\.$"):
        DropoutAdjuster(Stacked(), {"nope": "head"})


def test_the_pruner_counts_an_rnns_inner_inputs_by_parameter():
    model = Stacked()
    pruner = Pruner(model, ["rnn"])
    pruner.prune("fraction", 0.75)
    counts = pruner.parameter_counts()
    assert counts["rnn.weight_ih_l1"] == (18, 72) and counts["rnn.weight_ih_l0"] == (12, 48)
    adjuster = DropoutAdjuster(model)
    rates = adjuster.apply({**pruner.layer_counts(), **counts})
    assert rates["rnn.dropout"] == pytest.approx(0.4 * math.sqrt(72 / 288))
