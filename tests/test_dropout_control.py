"""DropoutControl: dropout rates adjusted after each prune, with the links traced once in the first batch
(unit tests, then real ``Trainer.fit`` runs: an LSTM, Lightning's demo Transformer, layers fed through a ReLU)."""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.demos import Transformer
from torch import nn
from toy_models import make_trainer, toy_loader

from lightning_prune import PruneRetrainCallback, Retraining, Std
from lightning_prune.core.dropout import ForwardTrace
from lightning_prune.core.pruner import Pruner
from lightning_prune.core.schedule import Round
from lightning_prune.dropout import DropoutControl
from lightning_prune.reporting import prune_report

ONE_PROCESS = SimpleNamespace(world_size=1)


class OddOrder(nn.Module):
    """Registers its dropout first; forward runs fc1 -> drop -> fc2 (``F.dropout`` too if ``functional``)."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.functional = functional
        self.drop = nn.Dropout(0.4)
        self.fc1 = nn.Linear(12, 32)
        self.fc2 = nn.Linear(32, 3)

    def forward(self, x):
        h = self.drop(torch.relu(self.fc1(x)))
        if self.functional:
            h = nn.functional.dropout(h, 0.3, self.training)
        return self.fc2(h)


def hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_links_are_traced_once_from_the_forward_order():
    model = OddOrder()
    control = DropoutControl(model, None)
    assert control.adjuster.links == {"drop": ["fc1"]} and control.adjuster.source == "static" and not control.traced
    control.begin_trace()
    control.begin_trace()  # a second call in the same batch does nothing
    model(torch.randn(2, 12))
    assert control.end_trace(ONE_PROCESS)
    assert control.traced and hooks(model) == 0
    assert control.adjuster.links == {"drop": ["fc2"]} and control.adjuster.source == "traced"
    control.begin_trace()  # traced already: the next batches are not traced
    model(torch.randn(2, 12))
    assert not control.end_trace(ONE_PROCESS) and hooks(model) == 0


def test_explicit_links_win_over_traced_ones():
    model = OddOrder()
    control = DropoutControl(model, {"drop": "fc1"})
    control.begin_trace()
    model(torch.randn(2, 12))
    control.end_trace(ONE_PROCESS)
    assert control.adjuster.links == {"drop": ["fc1"]}


def test_functional_dropout_is_warned_about():
    model = OddOrder(functional=True)
    control = DropoutControl(model, None)
    control.begin_trace()
    model(torch.randn(2, 12))
    with pytest.warns(UserWarning, match=r"calls dropout functionally .*1 call\(s\) in one step"):
        control.end_trace(ONE_PROCESS)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        control.begin_trace()
        model(torch.randn(2, 12))
        control.end_trace(ONE_PROCESS)  # once: no trace, no warning


def test_close_inside_the_traced_batch_removes_the_hooks():
    model = OddOrder()
    control = DropoutControl(model, None)
    control.begin_trace()
    assert hooks(model) > 0
    control.close()
    assert hooks(model) == 0 and not control.traced and not control.end_trace(ONE_PROCESS)
    control.close()  # idempotent


def test_rates_follow_the_formula_and_the_state_round_trips():
    model = OddOrder()
    control = DropoutControl(model, None)
    control.begin_trace()
    model(torch.randn(2, 12))
    control.end_trace(ONE_PROCESS)
    rates = control.apply({"fc1": (100, 384), "fc2": (24, 96)})
    assert rates == {"drop": pytest.approx(0.4 * math.sqrt(24 / 96))} and model.drop.p == rates["drop"]
    state = control.state_dict()
    assert state == {
        "original": {"drop": 0.4},
        "current": {"drop": rates["drop"]},
        "links": {"drop": ["fc2"]},
        "source": "traced",
        "rule": "data flow",
        "traced": True,
    }
    fresh_model = OddOrder()
    fresh = DropoutControl(fresh_model, None)
    fresh.load_state_dict(state)
    assert fresh.traced and fresh_model.drop.p == rates["drop"]
    assert fresh.adjuster.links == {"drop": ["fc2"]} and fresh.adjuster.original == {"drop": 0.4}
    fresh.begin_trace()  # restored as traced: not traced again
    assert hooks(fresh_model) == 0
    assert fresh.apply({"fc2": (96, 96)}) == {"drop": 0.4}  # the original rate is the base, not the current one


def test_links_follow_the_data_flow_and_the_unlinked_are_named_once(caplog):
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 12)
            self.drop = nn.Dropout(0.4)
            self.skip = nn.Dropout(0.3)
            self.idle = nn.Dropout(0.2)
            self.fc2 = nn.Linear(12, 3)

        def forward(self, x):
            h = torch.relu(self.fc1(x))
            return self.fc2(self.drop(h).view(-1, 12) + self.skip(h))

    model = Residual()
    control = DropoutControl(model, None)
    control.begin_trace()
    model(torch.randn(2, 12))
    with caplog.at_level("INFO"):
        assert control.end_trace(ONE_PROCESS)
    assert control.adjuster.links == {"drop": [], "idle": [], "skip": []}  # both are added before fc2 takes them
    assert caplog.text.count("linked to no layer and keep their rates") == 1
    assert "'drop': combined with another tensor before a layer takes it (call order: ['fc2'])" in caplog.text
    assert "'idle': it did not run in the traced batch" in caplog.text
    assert control.apply({"fc1": (1, 144), "fc2": (1, 36)}) == {"drop": 0.4, "skip": 0.3, "idle": 0.2}


def test_links_are_rank_zeros_under_ddp():
    model = OddOrder()
    control = DropoutControl(model, None)
    sent = []

    def broadcast(obj, src):
        sent.append((obj, src))
        return {"order": ["drop", "fc1"], "links": {"drop": ["fc1"]}, "failed": None}  # what rank zero saw

    control.begin_trace()
    model(torch.randn(2, 12))
    assert control.end_trace(SimpleNamespace(world_size=2, strategy=SimpleNamespace(broadcast=broadcast)))
    assert sent[0][0]["links"] == {"drop": ["fc2"]} and sent[0][1] == 0  # this rank's own trace, sent to rank zero
    assert control.adjuster.links == {"drop": ["fc1"]}


def test_a_trace_that_fails_falls_back_to_call_order_and_says_why(monkeypatch):
    def broken(*_):
        raise RuntimeError("odd tensor")

    monkeypatch.setattr(ForwardTrace, "_pass_on", broken)
    model = OddOrder()
    control = DropoutControl(model, None)
    control.begin_trace()
    model(torch.randn(2, 12))
    with pytest.warns(UserWarning, match=r"could not follow the dropouts' outputs .*\(RuntimeError: odd tensor\)"):
        assert control.end_trace(ONE_PROCESS)
    assert control.adjuster.links == {"drop": ["fc2"]} and control.adjuster.rule == "call order" and control.traced


def test_a_trace_that_sees_nothing_keeps_the_static_links():
    model = OddOrder()
    control = DropoutControl(model, None)
    control.begin_trace()  # the batch never runs the model
    with pytest.warns(UserWarning, match=r"saw none of the model's dropout or weight modules run"):
        assert not control.end_trace(ONE_PROCESS)
    assert control.adjuster.links == {"drop": ["fc1"]} and control.adjuster.source == "static" and control.traced


def test_a_trace_that_sees_nothing_says_nothing_when_only_an_rnns_inner_dropout_is_adjusted():
    control = DropoutControl(nn.Sequential(nn.LSTM(4, 4, num_layers=2, dropout=0.3)), None)
    control.begin_trace()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not control.end_trace(ONE_PROCESS)  # its link is the LSTM's structure, not the trace's
    assert control.adjuster.links == {"0.dropout": ["0.weight_ih_l1"]}


def test_links_restored_from_a_call_order_checkpoint_are_traced_again():
    model = OddOrder()
    control = DropoutControl(model, None)
    control.load_state_dict(
        {"original": {"drop": 0.4}, "current": {"drop": 0.3}, "links": {"drop": ["fc1"]}, "source": "traced",
         "traced": True}
    )  # fmt: skip
    assert not control.traced and control.adjuster.rule == "call order" and model.drop.p == 0.3
    control.begin_trace()
    model(torch.randn(2, 12))
    assert control.end_trace(ONE_PROCESS) and control.adjuster.links == {"drop": ["fc2"]}


def test_the_report_says_where_links_come_from():
    model = OddOrder()
    model.other = nn.Dropout(0.2)
    control = DropoutControl(model, {"drop": "fc1"})
    control.begin_trace()
    model(torch.randn(2, 12))
    control.end_trace(ONE_PROCESS)
    control.apply({"fc1": (96, 384), "fc2": (24, 96)})
    line = prune_report(0, 1, 1, Round().resolve(Std(), Retraining(), None), [], 0, control).splitlines()[-1]
    assert line == "dropout (traced links, explicit for drop; none for other): drop 0.4->0.2, other 0.2->0.2"


# ----------------------------------------------------------------------------------------------- in a fit
class Fit(pl.LightningModule):
    """Wraps a network for ``Trainer.fit`` on ``toy_loader`` data (12 features, 3 classes) or token sequences."""

    def __init__(self, net: nn.Module, tokens: bool = False):
        super().__init__()
        self.net, self.tokens = net, tokens

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.tokens:
            return nn.functional.nll_loss(self.net(x, y), y.flatten())
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def token_loader(vocab: int = 11, n: int = 16) -> torch.utils.data.DataLoader:
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (n, 6), generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data, data.roll(1, 1)), batch_size=8)


def remaining(prune: PruneRetrainCallback, *names: str) -> tuple[int, int]:
    masks = [prune.pruner.masks[n] for n in names]
    return sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)


def prunable(model: nn.Module, pattern: str) -> bool:
    """Whether the selection can prune ``pattern`` (an LSTM or attention block: not yet everywhere)."""
    try:
        return bool(Pruner(model, [pattern]).layer_of)
    except ValueError:
        return False


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.rnn = nn.LSTM(4, 8, batch_first=True)
        self.decoder = nn.Linear(8, 3)

    def forward(self, x):
        return self.decoder(self.rnn(self.drop(x.view(-1, 3, 4)))[0][:, -1])


def test_a_dropout_in_front_of_an_lstm_keeps_its_rate_when_only_the_decoder_is_pruned(tmp_path):
    torch.manual_seed(0)
    model = Fit(LSTMNet())
    prune = PruneRetrainCallback(layers=["net.decoder"], criterion=Std(quality=1.0), prune_epochs=[1], verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=2).fit(model, toy_loader())
    assert prune.dropout.adjuster.links == {"net.drop": ["net.rnn"]}  # not the decoder after it
    assert remaining(prune, "net.decoder.weight")[0] < 24
    assert model.net.drop.p == 0.5


def test_a_dropout_in_front_of_a_pruned_lstm_follows_all_its_weights(tmp_path):
    torch.manual_seed(0)
    model = Fit(LSTMNet())
    if not prunable(model, "net.rnn"):
        pytest.skip("the selection cannot prune an LSTM yet")
    prune = PruneRetrainCallback(layers=["net.rnn"], criterion=Std(quality=1.0), prune_epochs=[1], verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=2).fit(model, toy_loader())
    kept, total = remaining(prune, "net.rnn.weight_ih_l0", "net.rnn.weight_hh_l0")
    assert model.net.drop.p == pytest.approx(0.5 * math.sqrt(kept / total)) and kept < total


def test_the_demo_transformers_positional_dropout_links_to_the_attention_not_the_embedding(tmp_path, caplog):
    torch.manual_seed(0)
    model = Fit(Transformer(vocab_size=11, ninp=8, nhead=2, nhid=16, nlayers=1, dropout=0.2), tokens=True)
    linear = ["*linear*", "*out_proj", "net.decoder"]  # Linear modules only: the attention's in_proj stays dense
    prune = PruneRetrainCallback(layers=linear, criterion=Std(quality=1.0), prune_epochs=[1])
    with caplog.at_level("INFO"):
        make_trainer(tmp_path, [prune], max_epochs=2).fit(model, token_loader())
    links = prune.dropout.adjuster.links
    enc, dec = "net.transformer.encoder.layers.0", "net.transformer.decoder.layers.0"
    assert links["net.pos_encoder.dropout"] == [f"{enc}.self_attn", f"{dec}.self_attn"]  # source and target
    assert links[f"{enc}.dropout"] == [f"{enc}.linear2"] and links[f"{dec}.dropout"] == [f"{dec}.linear2"]
    residual = [f"{layer}.dropout{i}" for layer in (enc, dec) for i in (1, 2)] + [f"{dec}.dropout3"]
    assert all(links[name] == [] for name in residual)  # added to their block's input first
    assert f"{enc}.self_attn.out_proj.weight" in prune.pruner.masks  # pruned, but it takes the attention's output
    assert model.net.pos_encoder.dropout.p == 0.2  # its attention blocks' in_proj is not pruned: rate kept
    kept, total = remaining(prune, f"{enc}.linear2.weight")
    assert model.net.transformer.encoder.layers[0].dropout.p == pytest.approx(0.2 * math.sqrt(kept / total))
    assert kept < total and "linked to no layer and keep their rates" in caplog.text
    assert "dropout (traced links; none for" in caplog.text


def test_a_pruned_attention_block_lowers_the_positional_dropout(tmp_path):
    torch.manual_seed(0)
    model = Fit(Transformer(vocab_size=11, ninp=8, nhead=2, nhid=16, nlayers=1, dropout=0.2), tokens=True)
    if not prunable(model, "*.self_attn"):
        pytest.skip("the selection cannot prune an attention block's in_proj_weight yet")
    prune = PruneRetrainCallback(layers=["*.self_attn"], criterion=Std(quality=1.0), prune_epochs=[1], verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=2).fit(model, token_loader())
    names = [n for n in prune.pruner.masks if n.endswith("self_attn.in_proj_weight")]
    kept, total = remaining(prune, *names)
    assert len(names) == 2 and model.net.pos_encoder.dropout.p == pytest.approx(0.2 * math.sqrt(kept / total))


def test_a_dropout_through_a_relu_into_two_layers_uses_their_summed_counts(tmp_path):
    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(12, 16)
            self.drop = nn.Dropout(0.5)
            self.a = nn.Linear(16, 3)
            self.b = nn.Linear(16, 3)

        def forward(self, x):
            h = torch.relu(self.drop(self.fc1(x)).view(-1, 4, 4).flatten(1))
            return self.a(h) + self.b(h)

    torch.manual_seed(0)
    model = Fit(Heads())
    prune = PruneRetrainCallback(criterion=Std(quality={"net.a": 0.5, "*": 1.5}), prune_epochs=[1], verbose=False)
    make_trainer(tmp_path, [prune], max_epochs=2).fit(model, toy_loader())
    assert prune.dropout.adjuster.links == {"net.drop": ["net.a", "net.b"]}
    kept, total = remaining(prune, "net.a.weight", "net.b.weight")
    assert model.net.drop.p == pytest.approx(0.5 * math.sqrt(kept / total)) and kept < total
