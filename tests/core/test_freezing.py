import pytest
import torch
from torch import nn

from lightning_prune.core.freezing import Freezer, trainable_parameters


class ConvNet(nn.Module):
    """Conv features (with BatchNorm) then a classifier, like the nets Han et al. retrain layer by layer."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4, affine=False),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


FEATURES = ["features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias", "features.3.weight"]
FEATURES += ["features.3.bias"]
CLASSIFIER = ["classifier.0.weight", "classifier.0.bias", "classifier.1.weight", "classifier.1.bias"]
CLASSIFIER += ["classifier.3.weight", "classifier.3.bias"]


def _batch(n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 5, 5, generator=g), torch.randint(0, 2, (n,), generator=g)


def _grad_leaves(t: torch.Tensor) -> set[int]:
    """Identities of the leaf tensors the autograd graph of ``t`` accumulates gradients into."""
    leaves, stack, seen = set(), [t.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if hasattr(fn, "variable"):
            leaves.add(id(fn.variable))
        stack.extend(next_fn for next_fn, _ in fn.next_functions)
    return leaves


# ---------------------------------------------------------------------------------------------------------------------
# trainable_parameters
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["classifier", "classifier.*", "classif*", "c*"])
def test_module_pattern_and_its_children_glob_cover_the_same(pattern):
    assert trainable_parameters(ConvNet(), [pattern]) == CLASSIFIER


def test_pattern_covers_weight_and_bias_of_a_leaf_module():
    net = nn.Sequential()
    net.add_module("fc1", nn.Linear(2, 3))
    net.add_module("fc2", nn.Linear(3, 1))
    assert trainable_parameters(net, ["fc1"]) == ["fc1.weight", "fc1.bias"]


def test_any_pattern_any_prefix_in_model_order():
    net = ConvNet()
    assert trainable_parameters(net, ["classifier.3", "features.0"]) == [
        "features.0.weight",
        "features.0.bias",
        "classifier.3.weight",
        "classifier.3.bias",
    ]


def test_pattern_is_matched_against_whole_prefixes_not_substrings():
    net = nn.Sequential()
    net.add_module("fc1", nn.Linear(2, 3))
    net.add_module("fc10", nn.Linear(3, 1))
    assert trainable_parameters(net, ["fc1"]) == ["fc1.weight", "fc1.bias"]


def test_star_covers_everything_including_root_parameters():
    class WithScale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.fc = nn.Linear(2, 2)

    assert trainable_parameters(WithScale(), ["*"]) == ["scale", "fc.weight", "fc.bias"]
    assert trainable_parameters(WithScale(), ["fc"]) == ["fc.weight", "fc.bias"]


def test_user_frozen_parameters_are_not_trainable():
    net = ConvNet()
    net.classifier[0].bias.requires_grad_(False)
    assert "classifier.0.bias" not in trainable_parameters(net, ["classifier"])


def test_tied_parameter_trains_if_any_of_its_names_is_covered():
    net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False))
    net[1].weight = net[0].weight
    assert trainable_parameters(net, ["1"]) == ["0.weight"]


def test_shared_module_is_covered_through_any_of_its_names():
    shared = nn.Linear(3, 3)
    net = nn.Sequential()
    net.add_module("a", shared)
    net.add_module("b", nn.Linear(3, 3))
    net.add_module("c", shared)
    assert trainable_parameters(net, ["c"]) == ["a.weight", "a.bias"]


def test_pattern_matching_no_module_raises_and_lists_modules():
    with pytest.raises(ValueError, match=r"Pattern 'fc9' in `train_only` matches no module.*'features'.*'classifier'"):
        trainable_parameters(ConvNet(), ["classifier", "fc9"])


def test_parameter_name_as_pattern_raises():
    with pytest.raises(ValueError, match=r"'classifier\.0\.weight' .*matches no module"):
        trainable_parameters(ConvNet(), ["classifier.0.weight"])


def test_pattern_covering_only_parameter_free_modules_raises():
    with pytest.raises(ValueError, match=r"patterns \['features\.2'\] leave no parameter trainable.*no parameter"):
        trainable_parameters(ConvNet(), ["features.2"])


def test_pattern_covering_only_user_frozen_parameters_raises():
    net = ConvNet()
    net.classifier[3].requires_grad_(False)
    with pytest.raises(ValueError, match=r"leave no parameter trainable.*2 parameter.*none of which requires grad"):
        trainable_parameters(net, ["classifier.3"])


def test_empty_train_only_raises():
    with pytest.raises(ValueError, match=r"`train_only` is empty"):
        trainable_parameters(ConvNet(), [])


def test_bare_string_raises_type_error():
    with pytest.raises(TypeError, match=r"got the string 'classifier'.*\['classifier'\]"):
        trainable_parameters(ConvNet(), "classifier")


def test_non_string_pattern_raises_type_error():
    with pytest.raises(TypeError, match=r"glob patterns \(str\), got 3 of type int"):
        trainable_parameters(ConvNet(), [3])


# ---------------------------------------------------------------------------------------------------------------------
# Freezer: requires_grad
# ---------------------------------------------------------------------------------------------------------------------


def test_freeze_sets_requires_grad_outside_train_only():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    assert freezer.frozen == FEATURES
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    assert grads == {**dict.fromkeys(FEATURES, False), **dict.fromkeys(CLASSIFIER, True)}


def test_thaw_restores_requires_grad_and_forgets():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    freezer.thaw()
    assert all(p.requires_grad for p in net.parameters())
    assert freezer.frozen == []
    assert freezer.frozen_norms == []


def test_user_frozen_parameters_stay_frozen_after_thaw():
    net = ConvNet()
    net.features[0].weight.requires_grad_(False)
    net.classifier[0].bias.requires_grad_(False)
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    assert "features.0.weight" not in freezer.frozen
    freezer.thaw()
    assert not net.features[0].weight.requires_grad
    assert not net.classifier[0].bias.requires_grad
    assert sum(not p.requires_grad for p in net.parameters()) == 2


def test_thaw_without_freeze_does_nothing():
    net = ConvNet()
    Freezer().thaw()
    assert all(p.requires_grad for p in net.parameters())


def test_freeze_twice_thaws_first():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    freezer.freeze(net, ["features"])
    assert freezer.frozen == CLASSIFIER
    assert all(p.requires_grad for p in net.features.parameters())
    assert freezer.frozen_norms == ["classifier.1"]
    assert net.features[1].training
    freezer.thaw()
    assert all(p.requires_grad for p in net.parameters())
    assert all(m.training for m in net.modules())


def test_freeze_twice_on_different_models_releases_the_first():
    first, second = ConvNet(), ConvNet()
    freezer = Freezer()
    freezer.freeze(first, ["classifier"])
    freezer.freeze(second, ["classifier"])
    assert all(p.requires_grad for p in first.parameters())
    assert all(m.training for m in first.modules())
    freezer.thaw()
    assert all(p.requires_grad for p in second.parameters())


def test_refreezing_the_frozen_part_is_allowed():
    """Parameters frozen by the freezer itself count as trainable when validating the next freeze."""
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    freezer.freeze(net, ["features.0"])
    assert not net.classifier[0].weight.requires_grad
    assert net.features[0].weight.requires_grad


def test_rejected_freeze_changes_nothing():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    with pytest.raises(ValueError, match=r"'nope' in `train_only` matches no module"):
        freezer.freeze(net, ["nope"])
    assert freezer.frozen == FEATURES
    assert not net.features[0].weight.requires_grad
    assert not net.features[1].training


def test_tied_parameter_is_not_frozen_if_trained_through_another_name():
    net = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 5, bias=False), nn.Linear(5, 2))
    net[1].weight = net[0].weight
    freezer = Freezer()
    freezer.freeze(net, ["1"])
    assert freezer.frozen == ["2.weight", "2.bias"]
    assert net[0].weight.requires_grad


# ---------------------------------------------------------------------------------------------------------------------
# Freezer: BatchNorm statistics
# ---------------------------------------------------------------------------------------------------------------------


def test_frozen_part_batchnorm_goes_to_eval_including_non_affine():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    assert freezer.frozen_norms == ["features.1", "features.4"]
    assert not net.features[1].training
    assert not net.features[4].training
    assert net.classifier[1].training
    assert net.training and net.features.training  # only the BatchNorm modules themselves


def test_frozen_batchnorm_running_stats_do_not_move_but_trained_ones_do():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    frozen_mean = net.features[1].running_mean.clone()
    trained_mean = net.classifier[1].running_mean.clone()
    net(_batch()[0])
    assert torch.equal(net.features[1].running_mean, frozen_mean)
    assert not torch.equal(net.classifier[1].running_mean, trained_mean)


def test_shared_batchnorm_covered_through_its_second_name_keeps_training():
    norm = nn.BatchNorm1d(3, affine=False)
    net = nn.Sequential()
    net.add_module("fc", nn.Linear(3, 3))
    net.add_module("norm", norm)
    net.add_module("head", nn.Sequential(norm, nn.Linear(3, 1)))
    freezer = Freezer()
    freezer.freeze(net, ["head"])
    assert freezer.frozen_norms == []
    assert norm.training


def test_freeze_bn_stats_false_leaves_modes():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"], freeze_bn_stats=False)
    assert freezer.frozen_norms == []
    assert all(m.training for m in net.modules())


def test_non_affine_batchnorm_inside_train_only_keeps_training():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["features.4", "classifier"])
    assert freezer.frozen_norms == ["features.1"]
    assert net.features[4].training


def test_batchnorm_inside_train_only_with_user_frozen_params_keeps_training():
    net = ConvNet()
    net.classifier[1].requires_grad_(False)
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    assert "classifier.1" not in freezer.frozen_norms
    assert net.classifier[1].training


def test_reapply_after_model_train():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    net.train()
    assert net.features[1].training
    freezer.reapply()
    assert not net.features[1].training
    assert not net.features[4].training
    assert net.classifier[1].training


def test_thaw_restores_each_batchnorm_mode_as_it_was_at_freeze():
    net = ConvNet()
    net.features[4].eval()  # the user's choice, kept through freeze/reapply/thaw
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    assert freezer.frozen_norms == ["features.1", "features.4"]
    net.train()
    freezer.reapply()
    freezer.thaw()
    assert net.features[1].training
    assert not net.features[4].training


def test_thaw_restores_batchnorm_train_mode_after_model_eval():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    net.eval()
    freezer.thaw()
    assert net.features[1].training
    assert not net.classifier[1].training  # modules outside the frozen part are not the freezer's business


def test_sync_and_initialized_lazy_batchnorm_are_batchnorm():
    net = nn.Sequential(nn.Linear(3, 3), nn.SyncBatchNorm(3), nn.LazyBatchNorm1d(), nn.Linear(3, 1))
    net[2](torch.randn(4, 3))  # materialize the lazy parameters
    freezer = Freezer()
    freezer.freeze(net, ["3"])
    assert freezer.frozen_norms == ["1", "2"]
    assert freezer.frozen == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]


def test_uninitialized_lazy_parameter_to_freeze_raises_and_changes_nothing():
    net = nn.Sequential(nn.LazyLinear(3), nn.Linear(3, 1))
    with pytest.raises(ValueError, match=r"'0\.weight', '0\.bias' to be frozen are not initialized yet"):
        Freezer().freeze(net, ["1"])
    assert net[1].weight.requires_grad


def test_uninitialized_lazy_parameter_may_train():
    net = nn.Sequential(nn.Linear(3, 3), nn.LazyLinear(1))
    freezer = Freezer()
    freezer.freeze(net, ["1"])
    assert freezer.frozen == ["0.weight", "0.bias"]


# ---------------------------------------------------------------------------------------------------------------------
# Backpropagation stops at the frozen prefix
# ---------------------------------------------------------------------------------------------------------------------


def test_backward_leaves_frozen_features_without_grad():
    net = ConvNet()
    Freezer().freeze(net, ["classifier"])
    x, y = _batch()
    nn.functional.cross_entropy(net(x), y).backward()
    assert all(p.grad is None for p in net.features.parameters())
    assert all(p.grad is not None for p in net.classifier.parameters())


def test_autograd_graph_excludes_frozen_prefix():
    net = ConvNet()
    Freezer().freeze(net, ["classifier"])
    x, y = _batch()
    features = net.features(x)
    assert not features.requires_grad and features.grad_fn is None  # no graph is recorded through the prefix
    loss = nn.functional.cross_entropy(net.classifier(features), y)
    assert _grad_leaves(loss) == {id(p) for p in net.classifier.parameters()}


def test_autograd_graph_after_thaw_includes_everything():
    net = ConvNet()
    freezer = Freezer()
    freezer.freeze(net, ["classifier"])
    freezer.thaw()
    x, y = _batch()
    loss = nn.functional.cross_entropy(net(x), y)
    assert _grad_leaves(loss) == {id(p) for p in net.parameters()}


def test_optimizer_step_leaves_frozen_weights_unchanged():
    net = ConvNet()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    Freezer().freeze(net, ["classifier"])
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    x, y = _batch()
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    after = dict(net.named_parameters())
    assert all(torch.equal(after[n], before[n]) for n in FEATURES)
    assert not all(torch.equal(after[n], before[n]) for n in CLASSIFIER)
