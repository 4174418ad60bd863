import pytest
import torch
from torch import nn

from lightning_prune.core.selection import (
    DEFAULT_LAYER_TYPES,
    dense_tensors,
    resolve_per_layer,
    resolve_per_target,
    select_layers,
    select_parameters,
    select_targets,
)


class Net(nn.Module):
    """Every kind of module the selection has to tell apart, in a known module order."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3, bias=False))
        self.c1 = nn.Conv1d(2, 2, 3)
        self.c3 = nn.Conv3d(1, 1, 2)
        self.norm = nn.LayerNorm(4)
        self.emb = nn.Embedding(10, 4)
        self.up = nn.ConvTranspose2d(2, 2, 2)
        self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))


DEFAULT = ["features.0", "features.3", "c1", "c3", "up", "classifier.1", "classifier.3"]
CANDIDATES = ["features.0", "features.3", "c1", "c3", "emb", "up", "classifier.1", "classifier.3"]


# ---------------------------------------------------------------------------------------------------------------------
# select_layers
# ---------------------------------------------------------------------------------------------------------------------


def test_default_types_are_linear_and_convs():
    assert set(DEFAULT_LAYER_TYPES) == {
        nn.Linear,
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    }


def test_default_selects_linear_and_convs_in_module_order():
    assert select_layers(Net()) == DEFAULT


def test_default_skips_norms_and_embeddings():
    selected = select_layers(Net())
    for skipped in ("features.1", "norm", "emb"):
        assert skipped not in selected


def test_default_selects_subclasses_of_default_types():
    class MyLinear(nn.Linear):
        pass

    net = nn.Sequential(MyLinear(3, 3), nn.ReLU(), nn.Linear(3, 1))
    assert select_layers(net) == ["0", "2"]


def test_default_selects_root_module():
    assert select_layers(nn.Linear(3, 2)) == [""]


def test_default_without_prunable_layers_raises_and_lists_candidates():
    net = nn.Sequential(nn.Embedding(5, 3), nn.LayerNorm(3))
    with pytest.raises(
        ValueError, match=r"no Linear, Conv, ConvTranspose, MultiheadAttention or RNN weight.*'0.weight'"
    ):
        select_layers(net)


def test_default_without_any_weight_says_none():
    with pytest.raises(ValueError, match=r"no Linear, Conv, .* candidates: '1.weight', '1.bias'\."):
        select_layers(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))
    with pytest.raises(ValueError, match=r"no Linear, Conv, .* candidates: none\."):
        select_layers(nn.Sequential(nn.ReLU()))


def test_glob_pattern_selects_matching_modules():
    assert select_layers(Net(), ["features.*"]) == ["features.0", "features.3"]
    assert select_layers(Net(), ["classifier.?"]) == ["classifier.1", "classifier.3"]
    assert select_layers(Net(), ["c[13]"]) == ["c1", "c3"]


def test_star_selects_every_candidate_with_a_matrix_weight():
    assert select_layers(Net(), ["*"]) == CANDIDATES


def test_exact_names():
    assert select_layers(Net(), ["c3"]) == ["c3"]
    assert select_layers(Net(), ["emb"]) == ["emb"]  # non-default types can be chosen by name
    assert select_layers(Net(), ["up", "features.3"]) == ["features.3", "up"]


def test_result_is_in_module_order_and_deduplicated():
    assert select_layers(Net(), ["classifier.*", "c1", "features.0", "features.*"]) == [
        "features.0",
        "features.3",
        "c1",
        "classifier.1",
        "classifier.3",
    ]


def test_patterns_are_case_sensitive():
    with pytest.raises(ValueError, match=r"Pattern 'Classifier\.\*'"):
        select_layers(Net(), ["Classifier.*"])


@pytest.mark.parametrize("pattern", ["nope", "features.1", "norm", "features", "classifier.0"])
def test_pattern_matching_nothing_raises_and_lists_candidates(pattern):
    with pytest.raises(ValueError, match=rf"Pattern '{pattern}' in `layers` matches no module with weights") as info:
        select_layers(Net(), ["c1", pattern])
    message = str(info.value)
    for name in CANDIDATES:
        assert repr(f"{name}.weight") in message


def test_error_preview_is_truncated_for_many_candidates():
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(ValueError, match=r"'11.weight', \.\.\. \(18 more\)") as info:
        select_layers(net, ["x"])
    assert "'12.weight'" not in str(info.value)


def test_empty_layer_list_raises():
    # select_layers documents "ValueError: ... or nothing is selected"; an empty list selects nothing.
    with pytest.raises(ValueError, match="layers"):
        select_layers(Net(), [])


def test_single_string_is_not_split_into_characters():
    # `layers="c1"` is a str, itself a Sequence[str]: it must be rejected, never iterated as "c" and "1".
    with pytest.raises(ValueError, match="non-empty list of glob patterns, got 'c1'"):
        select_layers(Net(), "c1")


# ---------------------------------------------------------------------------------------------------------------------
# select_parameters
# ---------------------------------------------------------------------------------------------------------------------


def test_select_parameters_default_weights_only():
    assert select_parameters(Net()) == {f"{layer}.weight": layer for layer in DEFAULT}


def test_select_parameters_names_exist_in_model():
    net = Net()
    params = dict(net.named_parameters())
    for name in select_parameters(Net(), ["*"], include_bias=True):
        assert name in params


def test_select_parameters_include_bias_after_each_weight():
    selected = select_parameters(Net(), ["features.*", "classifier.3"], include_bias=True)
    # features.3 has no bias: only its weight appears.
    assert list(selected.items()) == [
        ("features.0.weight", "features.0"),
        ("features.0.bias", "features.0"),
        ("features.3.weight", "features.3"),
        ("classifier.3.weight", "classifier.3"),
        ("classifier.3.bias", "classifier.3"),
    ]


def test_select_parameters_root_module_has_no_prefix():
    assert select_parameters(nn.Linear(3, 2)) == {"weight": ""}
    assert select_parameters(nn.Linear(3, 2), include_bias=True) == {"weight": "", "bias": ""}


def test_select_parameters_propagates_pattern_errors():
    with pytest.raises(ValueError, match="Pattern 'nope'"):
        select_parameters(Net(), ["nope"], include_bias=True)


# ---------------------------------------------------------------------------------------------------------------------
# resolve_per_layer
# ---------------------------------------------------------------------------------------------------------------------

LAYERS = ["conv1", "conv2", "fc1", "fc2"]


def test_resolve_number_applies_to_every_layer_as_float():
    resolved = resolve_per_layer(1, LAYERS, name="quality")
    assert resolved == dict.fromkeys(LAYERS, 1.0)
    assert all(type(v) is float for v in resolved.values())
    assert list(resolved) == LAYERS


def test_resolve_mapping_with_default():
    assert resolve_per_layer({"conv*": 0.5, "*": 1.2}, LAYERS, name="quality") == {
        "conv1": 0.5,
        "conv2": 0.5,
        "fc1": 1.2,
        "fc2": 1.2,
    }


def test_resolve_exact_name_beats_patterns_wherever_it_is():
    value = {"*": 1.0, "conv*": 2.0, "conv2": 3.0}
    assert resolve_per_layer(value, LAYERS, name="quality") == {"conv1": 1.0, "conv2": 3.0, "fc1": 1.0, "fc2": 1.0}


def test_resolve_first_matching_pattern_wins():
    assert resolve_per_layer({"fc*": 0.1, "*1": 0.2, "*": 0.3}, LAYERS, name="q") == {
        "conv1": 0.2,
        "conv2": 0.3,
        "fc1": 0.1,
        "fc2": 0.1,
    }
    assert resolve_per_layer({"*1": 0.2, "fc*": 0.1, "*": 0.3}, LAYERS, name="q")["fc1"] == 0.2


def test_resolve_default_star_only():
    assert resolve_per_layer({"*": 0.7}, LAYERS, name="q") == dict.fromkeys(LAYERS, 0.7)


def test_resolve_unmatched_layer_raises():
    with pytest.raises(ValueError, match=r"Layer 'fc1' matches no pattern in `quality`.*default entry \"\*\""):
        resolve_per_layer({"conv*": 0.5, "fc2": 1.0}, LAYERS, name="quality")


def test_resolve_empty_mapping_raises_for_first_layer():
    with pytest.raises(ValueError, match=r"Layer 'conv1' matches no pattern in `amount`"):
        resolve_per_layer({}, LAYERS, name="amount")


def test_resolve_unused_pattern_raises_and_lists_layers():
    with pytest.raises(ValueError, match=r"Pattern 'bn\*' in `amount` matches none of the pruned layers") as info:
        resolve_per_layer({"bn*": 0.5, "*": 0.1}, LAYERS, name="amount")
    for layer in LAYERS:
        assert repr(layer) in str(info.value)


def test_resolve_unused_exact_name_raises():
    with pytest.raises(ValueError, match=r"Pattern 'fc3' in `quality`"):
        resolve_per_layer({"fc3": 1.0, "*": 1.0}, LAYERS, name="quality")


# ---------------------------------------------------------------------------------------------------------------------
# targets: attention, recurrent, transposed, parametrized, tied, parameter patterns
# ---------------------------------------------------------------------------------------------------------------------


class Block(nn.Module):
    """A transformer-ish block: embedding, attention, recurrent layer, norm, head tied to the embedding."""

    def __init__(self, tied: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.rnn = nn.LSTM(8, 6, num_layers=2)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(8, 11, bias=False)
        if tied:
            self.head.weight = self.emb.weight


def names(targets):
    return [t.name for t in targets]


def test_attention_in_proj_is_three_row_blocks_and_out_proj_a_linear():
    targets = select_targets(nn.MultiheadAttention(8, 2))
    assert names(targets) == ["in_proj_weight:q", "in_proj_weight:k", "in_proj_weight:v", "out_proj.weight"]
    assert [t.rows for t in targets] == [(0, 8), (8, 16), (16, 24), None]
    assert {t.param for t in targets[:3]} == {"in_proj_weight"}
    assert {t.layer for t in targets[:3]} == {""} and targets[3].layer == "out_proj"


def test_attention_rows_are_views_of_the_parameter():
    attn = nn.MultiheadAttention(8, 2)
    _, k, _, _ = select_targets(attn)
    assert torch.equal(k.weight(attn), attn.in_proj_weight[8:16])
    assert k.weight(attn).data_ptr() == attn.in_proj_weight[8:].data_ptr()


def test_attention_with_other_key_and_value_sizes_has_separate_projections():
    attn = nn.MultiheadAttention(8, 2, kdim=5, vdim=3)
    targets = select_targets(attn)
    assert names(targets) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    assert all(t.rows is None and t.param == t.name for t in targets)


def test_recurrent_layers_prune_input_and_hidden_weights_not_biases():
    for cls in (nn.RNN, nn.LSTM, nn.GRU):
        rnn = cls(4, 3, num_layers=2, bidirectional=True)
        got = names(select_targets(rnn))
        assert got == [n for n, _ in rnn.named_parameters() if n.startswith("weight_")]
        assert "weight_hh_l1_reverse" in got


def test_lstm_with_projection_prunes_its_projection_too():
    assert "weight_hr_l0" in names(select_targets(nn.LSTM(4, 6, proj_size=2)))


def test_block_default_targets_skip_embedding_and_norm():
    got = names(select_targets(Block(tied=False)))
    assert got[:4] == [
        "attn.in_proj_weight:q",
        "attn.in_proj_weight:k",
        "attn.in_proj_weight:v",
        "attn.out_proj.weight",
    ]
    assert got[4:] == ["rnn.weight_ih_l0", "rnn.weight_hh_l0", "rnn.weight_ih_l1", "rnn.weight_hh_l1", "head.weight"]


def test_include_bias_adds_biases_of_whole_weights_only():
    got = names(select_targets(nn.MultiheadAttention(4, 1), include_bias=True))
    assert got == ["in_proj_weight:q", "in_proj_weight:k", "in_proj_weight:v", "out_proj.weight", "out_proj.bias"]


def test_tied_weight_is_one_target_under_its_first_name():
    block = Block(tied=True)
    assert names(select_targets(block)).count("head.weight") == 1  # the Linear's weight, embedding or not
    assert names(select_targets(block, ["emb", "head"])) == ["emb.weight"]
    assert select_parameters(block, ["head"]) == {"head.weight": "head"}


def test_patterns_can_name_parameters_and_opt_in_embeddings_and_norms():
    block = Block(tied=False)
    assert names(select_targets(block, ["rnn.weight_hh_*"])) == ["rnn.weight_hh_l0", "rnn.weight_hh_l1"]
    assert names(select_targets(block, ["emb"])) == ["emb.weight"]
    assert names(select_targets(block, ["ln.weight"])) == ["ln.weight"]
    assert names(select_targets(block, ["attn.in_proj_weight:v"])) == ["attn.in_proj_weight:v"]
    assert names(select_targets(block, ["attn.in_proj_weight"])) == [
        "attn.in_proj_weight:q",
        "attn.in_proj_weight:k",
        "attn.in_proj_weight:v",
    ]


def test_norm_module_pattern_points_to_its_parameters():
    with pytest.raises(
        ValueError,
        match=r"Pattern 'ln' in `layers` .* It matches 'ln': name their parameters \('ln.weight', 'ln.bias'\)",
    ):
        select_targets(Block(), ["ln"])


def test_weight_norm_is_pruned_through_original1():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    (target,) = select_targets(layer)
    assert (target.name, target.param, target.value) == ("weight", "parametrizations.weight.original1", "weight")
    assert torch.equal(target.weight(layer), layer.weight)
    assert select_parameters(layer) == {"parametrizations.weight.original1": ""}


def test_spectral_norm_is_pruned_through_original():
    net = nn.Sequential(nn.utils.parametrizations.spectral_norm(nn.Linear(4, 3)))
    (target,) = select_targets(net)
    assert (target.name, target.param) == ("0.weight", "0.parametrizations.weight.original")


def test_zero_under_weight_norm_is_zero_in_the_effective_weight():
    layer = nn.utils.parametrizations.weight_norm(nn.Linear(4, 3))
    (target,) = select_targets(layer)
    with torch.no_grad():
        layer.get_parameter(target.param)[0, :2] = 0
    assert torch.count_nonzero(layer.weight[0, :2]) == 0


def test_a_weight_normed_rnn_weight_is_pruned_through_original1_in_its_place():
    rnn = nn.LSTM(3, 4, num_layers=2)
    nn.utils.parametrizations.weight_norm(rnn, "weight_ih_l1")
    targets = select_targets(rnn)
    assert names(targets) == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    assert (targets[2].param, targets[2].value) == ("parametrizations.weight_ih_l1.original1", "weight_ih_l1")
    with torch.no_grad():
        rnn.get_parameter(targets[2].param)[0, :2] = 0
    assert torch.count_nonzero(rnn.weight_ih_l1[0, :2]) == 0
    nn.utils.parametrize.register_parametrization(rnn, "weight_hh_l0", nn.Identity())
    with pytest.raises(ValueError, match=r"Layer '' has its `weight_hh_l0` parametrized by \['Identity'\]"):
        select_targets(rnn)


def test_other_parametrizations_are_refused_naming_the_layer():
    net = nn.Sequential(nn.Linear(3, 3), nn.utils.parametrizations.orthogonal(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match=r"Layer '1' has its `weight` parametrized by \['_Orthogonal'\]"):
        select_targets(net)
    assert names(select_targets(net, ["0"])) == ["0.weight"]  # leaving it out works


def test_user_parametrization_is_refused():
    class Scale(nn.Module):
        def forward(self, w):
            return 2 * w

    layer = nn.Linear(3, 3)
    torch.nn.utils.parametrize.register_parametrization(layer, "weight", Scale())
    with pytest.raises(ValueError, match=r"parametrized by \['Scale'\]; only weight_norm and spectral_norm"):
        select_targets(layer)


def test_select_layers_and_parameters_follow_targets():
    block = Block(tied=False)
    assert select_layers(block) == ["attn", "attn.out_proj", "rnn", "head"]
    assert list(select_parameters(block))[:2] == ["attn.in_proj_weight", "attn.out_proj.weight"]


# ---------------------------------------------------------------------------------------------------------------------
# dense_tensors, resolve_per_target
# ---------------------------------------------------------------------------------------------------------------------


def test_dense_tensors_lists_large_unpruned_matrices_largest_first():
    block = Block(tied=False)
    found = dense_tensors(block, select_targets(block))
    assert [name for name, _, _ in found] == ["emb.weight"]
    total = sum(p.numel() for p in block.parameters())
    assert found[0][1] == 88 and found[0][2] == pytest.approx(88 / total)
    assert dense_tensors(block, select_targets(block, ["*", "emb"])) == []


def test_dense_tensors_share_threshold():
    net = nn.Sequential(nn.Embedding(2, 2), nn.Linear(2, 1000))
    assert dense_tensors(net, select_targets(net)) == []  # 4 of ~3004 entries < 1%
    assert [n for n, _, _ in dense_tensors(net, select_targets(net), share=0.001)] == ["0.weight"]


def test_resolve_per_target_exact_target_then_layer_then_pattern():
    layer_of = {"a:q": "a", "a:k": "a", "a:v": "a", "fc.weight": "fc"}
    assert resolve_per_target({"a:v": 0.5, "a": 1.0, "*": 2.0}, layer_of, name="quality") == {
        "a:q": 1.0,
        "a:k": 1.0,
        "a:v": 0.5,
        "fc.weight": 2.0,
    }
    assert resolve_per_target({"*:k": 3.0, "*": 1.0}, layer_of, name="quality")["a:k"] == 3.0


def test_resolve_per_target_errors_name_the_entry():
    with pytest.raises(ValueError, match=r"Pattern 'b' in `quality` matches none of the pruned layers: 'a'"):
        resolve_per_target({"b": 1.0, "*": 1.0}, {"a:q": "a"}, name="quality")
    with pytest.raises(ValueError, match=r"Layer 'fc' matches no pattern in `quality`"):
        resolve_per_target({"a": 1.0}, {"a:q": "a", "fc.weight": "fc"}, name="quality")
