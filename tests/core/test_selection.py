import pytest
from torch import nn

from lightning_prune.core.selection import DEFAULT_LAYER_TYPES, resolve_per_layer, select_layers, select_parameters


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


DEFAULT = ["features.0", "features.3", "c1", "c3", "classifier.1", "classifier.3"]
CANDIDATES = ["features.0", "features.3", "c1", "c3", "emb", "up", "classifier.1", "classifier.3"]


# ---------------------------------------------------------------------------------------------------------------------
# select_layers
# ---------------------------------------------------------------------------------------------------------------------


def test_default_types_are_linear_and_convs():
    assert set(DEFAULT_LAYER_TYPES) == {nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d}


def test_default_selects_linear_and_convs_in_module_order():
    assert select_layers(Net()) == DEFAULT


def test_default_skips_norms_embeddings_and_transposed_convs():
    selected = select_layers(Net())
    for skipped in ("features.1", "norm", "emb", "up"):
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
    with pytest.raises(ValueError, match=r"no Linear or Conv1d/2d/3d layer.*'0'"):
        select_layers(net)


def test_default_without_any_weight_says_none():
    with pytest.raises(ValueError, match=r"no Linear or Conv1d/2d/3d.*: none\."):
        select_layers(nn.Sequential(nn.ReLU(), nn.BatchNorm1d(3)))


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
    with pytest.raises(ValueError, match=rf"Pattern '{pattern}' in `layers` matches no module") as info:
        select_layers(Net(), ["c1", pattern])
    message = str(info.value)
    for name in CANDIDATES:
        assert repr(name) in message


def test_error_preview_is_truncated_for_many_candidates():
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(ValueError, match=r"'11', \.\.\. \(3 more\)") as info:
        select_layers(net, ["x"])
    assert "'12'" not in str(info.value)


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
