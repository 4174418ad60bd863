import pytest
import torch
from torch import nn
from toy_models import DriftSGD

import lightning_prune.core.enforcement as enforcement
from lightning_prune.core.enforcement import ZERO_PRESERVING, Enforcer
from lightning_prune.core.masks import multiplier


def make_net(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def half(param: torch.Tensor) -> torch.Tensor:
    """Keep the larger half of ``param``'s magnitudes."""
    flat = param.detach().abs().flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[flat.topk(flat.numel() // 2).indices] = True
    return keep.view_as(param)


def setup(masked=("0.weight", "2.weight")):
    net = make_net()
    masks = {name: half(net.get_parameter(name)) for name in masked}
    return net, masks, Enforcer(masks, net.get_parameter)


def backward(net: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    net(torch.randn(5, 6, generator=g)).pow(2).sum().backward()


def assert_zero_at_pruned(net, masks, what="weight") -> None:
    for name, keep in masks.items():
        tensor = net.get_parameter(name) if what == "weight" else net.get_parameter(name).grad
        assert (tensor.detach()[~keep] == 0).all(), name


def test_docstring_example():
    net = nn.Linear(4, 2)
    masks = {"weight": net.weight.abs() > 0.3}
    enforcer = Enforcer(masks, net.get_parameter)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    enforcer.attach(opt)
    enforcer.apply()
    net(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert bool((net.weight[~masks["weight"]] == 0).all())


def test_zero_preserving_optimizers():
    assert torch.optim.SGD in ZERO_PRESERVING and torch.optim.AdamW in ZERO_PRESERVING
    assert DriftSGD not in ZERO_PRESERVING  # exact types: a subclass is not trusted
    assert torch.optim.LBFGS not in ZERO_PRESERVING


# ---------------------------------------------------------------------------------------------------------------------
# pairs, invalidate, apply, zero_state
# ---------------------------------------------------------------------------------------------------------------------


def test_pairs_of_all_masks_and_per_optimizer():
    net, masks, enforcer = setup()
    pairs = enforcer.pairs()
    assert [p for p, _ in pairs] == [net[0].weight, net[2].weight]
    for (_, mult), keep in zip(pairs, masks.values(), strict=True):
        assert mult.dtype == torch.uint8 and torch.equal(mult, multiplier(keep))
    only_first = torch.optim.SGD(net[0].parameters(), lr=0.1)
    assert [p for p, _ in enforcer.pairs(only_first)] == [net[0].weight]
    assert enforcer.pairs(torch.optim.SGD([net[0].bias], lr=0.1)) == []


def test_pairs_skip_masks_without_a_pruned_entry():
    net = make_net()
    masks = {"0.weight": torch.ones(8, 6, dtype=torch.bool), "2.weight": half(net[2].weight)}
    assert [p for p, _ in Enforcer(masks, net.get_parameter).pairs()] == [net[2].weight]


def test_pairs_are_cached_until_invalidated():
    net, masks, enforcer = setup(["0.weight"])
    first = enforcer.pairs()
    assert enforcer.pairs() is first
    masks["2.weight"] = half(net[2].weight)  # the owner changes the shared dict...
    assert enforcer.pairs() is first  # ...and the cache does not know
    enforcer.invalidate()  # until told
    assert [p for p, _ in enforcer.pairs()] == [net[0].weight, net[2].weight]


def test_apply_zeroes_pruned_weights_only():
    net, masks, enforcer = setup()
    before = {n: net.get_parameter(n).detach().clone() for n in masks}
    bias = net[0].bias.detach().clone()
    enforcer.apply()
    assert_zero_at_pruned(net, masks)
    for name, keep in masks.items():
        assert torch.equal(net.get_parameter(name).detach()[keep], before[name][keep])
    assert torch.equal(net[0].bias, bias)


def test_zero_state_of_all_or_named_masks():
    net, masks, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    enforcer.attach(optimizer)
    backward(net)
    optimizer.step()  # momentum at the alive entries
    for keep in masks.values():
        keep[tuple(keep.nonzero()[0].tolist())] = False  # the owner prunes one more entry, in place
    enforcer.invalidate()
    buffer = {n: optimizer.state[net.get_parameter(n)]["momentum_buffer"] for n in masks}
    assert all((buffer[n][~k] != 0).any() for n, k in masks.items())
    enforcer.zero_state(["2.weight"])
    assert (buffer["2.weight"][~masks["2.weight"]] == 0).all()
    assert (buffer["0.weight"][~masks["0.weight"]] != 0).any()
    enforcer.zero_state()
    assert (buffer["0.weight"][~masks["0.weight"]] == 0).all()
    assert (buffer["0.weight"][masks["0.weight"]] != 0).any()


# ---------------------------------------------------------------------------------------------------------------------
# attach, detach
# ---------------------------------------------------------------------------------------------------------------------


def test_attach_zeroes_existing_state_and_masks_every_step():
    net, masks, enforcer = setup()
    optimizer = torch.optim.Adam(net.parameters(), lr=0.05)
    backward(net)
    optimizer.step()
    enforcer.apply()
    enforcer.attach(optimizer)
    assert enforcer.optimizers == [optimizer]
    for name, keep in masks.items():
        state = optimizer.state[net.get_parameter(name)]
        assert (state["exp_avg"][~keep] == 0).all() and (state["exp_avg_sq"][~keep] == 0).all()
    for seed in range(3):
        optimizer.zero_grad()
        backward(net, seed)
        optimizer.step()
        assert_zero_at_pruned(net, masks)
        assert_zero_at_pruned(net, masks, "grad")


def test_attach_is_idempotent_and_detach_removes_every_hook():
    net, masks, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    enforcer.apply()
    enforcer.attach(optimizer)
    enforcer.attach(optimizer)
    assert enforcer.optimizers == [optimizer]
    assert len(optimizer._optimizer_step_pre_hooks) == 1
    enforcer.detach()
    assert enforcer.optimizers == [] and len(optimizer._optimizer_step_pre_hooks) == 0
    backward(net)
    optimizer.step()
    assert any((net.get_parameter(n).detach()[~k] != 0).any() for n, k in masks.items())


def test_attach_refuses_an_unknown_remask_and_leaves_no_hook():
    net, _, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^`remask` must be 'auto' or 'always', got 'never'\.$"):
        enforcer.attach(optimizer, remask="never")  # type: ignore[arg-type]
    assert enforcer.optimizers == [] and len(optimizer._optimizer_step_pre_hooks) == 0


def _write_outside(net, masks) -> None:
    with torch.no_grad():
        for name, keep in masks.items():
            net.get_parameter(name).masked_fill_(~keep, 1.0)  # e.g. a weight copy from elsewhere


@pytest.mark.parametrize(
    ("make", "remask", "remasked"),
    [
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "auto", False),  # zero-preserving: no post-step pass
        (lambda ps: torch.optim.SGD(ps, lr=0.1), "always", True),
        (lambda ps: DriftSGD(ps, lr=0.1), "auto", True),
    ],
)
def test_post_step_remask_only_where_needed(make, remask, remasked):
    net, masks, enforcer = setup()
    optimizer = make(net.parameters())
    enforcer.attach(optimizer, remask=remask)
    assert len(optimizer._optimizer_step_post_hooks) == int(remasked)
    _write_outside(net, masks)
    backward(net)
    optimizer.step()
    pruned = [net.get_parameter(n).detach()[~k] for n, k in masks.items()]
    if remasked:
        assert all((p == 0).all() for p in pruned)
    else:
        assert all((p == 1.0).all() for p in pruned)  # gradient masked: the step left them as they were


def test_hooks_of_one_optimizer_touch_only_its_parameters():
    net, masks, enforcer = setup()
    first, second = torch.optim.SGD(net[0].parameters(), lr=0.1), torch.optim.SGD(net[2].parameters(), lr=0.1)
    enforcer.attach(first)
    backward(net)
    first.step()
    assert (net[0].weight.grad[~masks["0.weight"]] == 0).all()
    assert (net[2].weight.grad[~masks["2.weight"]] != 0).any()
    enforcer.attach(second)
    assert enforcer.optimizers == [first, second]
    second.step()
    assert (net[2].weight.grad[~masks["2.weight"]] == 0).all()


# ---------------------------------------------------------------------------------------------------------------------
# the closure: masking after it returns
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_keyword", [False, True])
def test_masking_happens_after_the_closure_returns(as_keyword):
    net, masks, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    enforcer.apply()
    enforcer.attach(optimizer)
    seen = {}

    def closure():
        optimizer.zero_grad()
        loss = net(torch.randn(5, 6)).pow(2).sum()
        loss.backward()
        seen["grad"] = net[2].weight.grad.clone()  # inside the closure: not yet masked
        return loss

    loss = optimizer.step(closure=closure) if as_keyword else optimizer.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0  # the closure's loss comes back
    assert (seen["grad"][~masks["2.weight"]] != 0).any()
    assert_zero_at_pruned(net, masks, "grad")
    assert_zero_at_pruned(net, masks)


def test_gradient_clipping_inside_the_closure_sees_unmasked_gradients_unless_masked_early():
    net, masks, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    enforcer.attach(optimizer)
    norms = []

    def closure(early):
        optimizer.zero_grad()
        backward(net)
        if early:
            enforcer.mask_gradients(optimizer)
        norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), 1e9)))
        return None

    optimizer.step(lambda: closure(False))
    optimizer.step(lambda: closure(True))
    assert norms[1] < norms[0]  # the early mask took the pruned gradients out of the norm
    assert_zero_at_pruned(net, masks, "grad")


def test_a_step_after_an_early_mask_checks_instead_of_masking_again(monkeypatch):
    calls = []
    real = enforcement.mask_gradients
    monkeypatch.setattr(enforcement, "mask_gradients", lambda pairs: (calls.append(len(pairs)), real(pairs)))
    net, masks, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    enforcer.attach(optimizer)
    backward(net)
    optimizer.step()  # no early mask: one pass at the step
    assert calls == [2]
    calls.clear()
    optimizer.zero_grad()
    backward(net)
    enforcer.mask_gradients(optimizer)
    optimizer.step()  # still masked: no second pass
    assert calls == [2]
    calls.clear()
    optimizer.zero_grad()
    backward(net)
    enforcer.mask_gradients(optimizer)
    with torch.no_grad():
        for p in net.parameters():
            p.grad.add_(1.0)  # rewritten after the early mask
    optimizer.step()
    assert calls == [2, 2]
    assert_zero_at_pruned(net, masks, "grad")


def test_mask_gradients_of_an_unattached_optimizer_does_not_arm_the_check():
    net, masks, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    backward(net)
    enforcer.mask_gradients(optimizer)
    assert_zero_at_pruned(net, masks, "grad")
    enforcer.attach(optimizer)
    optimizer.zero_grad()
    backward(net, 1)
    optimizer.step()  # fresh gradients: masked at the step
    assert_zero_at_pruned(net, masks, "grad")


def test_mask_gradients_without_optimizer_masks_all():
    net, masks, enforcer = setup()
    backward(net)
    bias = net[0].bias.grad.clone()
    enforcer.mask_gradients()
    assert_zero_at_pruned(net, masks, "grad")
    assert torch.equal(net[0].bias.grad, bias)


# ---------------------------------------------------------------------------------------------------------------------
# still_masked
# ---------------------------------------------------------------------------------------------------------------------


def test_still_masked():
    net, masks, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    assert enforcer.still_masked(optimizer)  # no gradients at all
    backward(net)
    assert not enforcer.still_masked(optimizer)
    enforcer.mask_gradients(optimizer)
    assert enforcer.still_masked(optimizer)
    first_pruned = (~masks["2.weight"]).nonzero()[0].tolist()
    net[2].weight.grad[tuple(first_pruned)] = float("nan")
    assert not enforcer.still_masked(optimizer)


def test_still_masked_with_some_gradients_missing():
    net, _, enforcer = setup()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net[2].weight.grad = torch.zeros_like(net[2].weight)
    assert enforcer.still_masked(optimizer)  # 0.weight has no gradient: skipped
    net[2].weight.grad.fill_(1.0)
    assert not enforcer.still_masked(optimizer)


def test_still_masked_follows_invalidate():
    net, masks, enforcer = setup(["2.weight"])
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    net[0].weight.grad = torch.ones_like(net[0].weight)
    net[2].weight.grad = torch.zeros_like(net[2].weight)
    assert enforcer.still_masked(optimizer)
    masks["0.weight"] = half(net[0].weight)
    enforcer.invalidate()
    assert not enforcer.still_masked(optimizer)  # the new mask's pruned gradient is 1
