import pytest
import torch
from torch import nn

from lightning_prune.core import native
from lightning_prune.core.masks import enforce, mask_gradients, mask_weights, multiplier, zero_optimizer_state


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a float32 tensor, for bit-identity checks (NaN- and -0.0-proof)."""
    return t.detach().contiguous().view(torch.int32)


def _random_keep(shape, seed=0, p=0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) > p


# ---------------------------------------------------------------------------------------------------------------------
# multiplier
# ---------------------------------------------------------------------------------------------------------------------


def test_multiplier_values_and_dtype():
    mult = multiplier(torch.tensor([[True, False], [False, True]]))
    assert mult.dtype == torch.uint8
    assert mult.tolist() == [[1, 0], [0, 1]]


def test_multiplier_is_zero_copy_view():
    keep = torch.tensor([True, False, True, True])
    mult = multiplier(keep)
    assert mult.data_ptr() == keep.data_ptr()
    assert mult.untyped_storage().data_ptr() == keep.untyped_storage().data_ptr()
    keep[0] = False  # a mask shrunk in place is seen through its multiplier
    assert mult.tolist() == [0, 0, 1, 1]


def test_multiplier_of_non_contiguous_mask_is_a_view():
    keep = torch.tensor([[True, False, True], [False, True, False]]).t()
    mult = multiplier(keep)
    assert mult.data_ptr() == keep.data_ptr()
    assert mult.stride() == keep.stride()
    assert torch.equal(mult.bool(), keep)


# ---------------------------------------------------------------------------------------------------------------------
# enforce
# ---------------------------------------------------------------------------------------------------------------------


@pytest.fixture(params=["torch", "native"])
def kernel(request, monkeypatch):
    """Each mask kernel in turn (the compiled one skipped where it cannot be built)."""
    if request.param == "native" and native.mask_kernel() != "native":
        pytest.skip(f"the compiled mask kernel is {native.native_status()}")
    monkeypatch.setattr(native, "_choice", request.param)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_enforce_writes_exact_zeros_over_nan_and_inf_and_keeps_alive_bits(dtype, kernel):
    t = torch.tensor([float("nan"), float("inf"), -float("inf"), -3.0, float("nan"), -2.0], dtype=dtype)
    keep = torch.tensor([False, False, False, False, True, True])
    before = t.clone()
    enforce(t, multiplier(keep))
    assert t.dtype == dtype
    assert (t[~keep] == 0).all() and not torch.signbit(t[~keep]).any()  # +0.0, not -0.0 or NaN
    int_view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    assert torch.equal(t[keep].view(int_view), before[keep].view(int_view))  # NaN bits included


def test_enforce_on_a_non_contiguous_view_and_a_non_float_tensor(kernel):
    w = torch.randn(3, 4)
    keep = torch.rand(3, 4) > 0.5
    expected = w * keep
    enforce(w.t(), multiplier(keep.t()))
    assert torch.equal(w, expected)
    counts = torch.tensor([3, 4, 5])
    enforce(counts, multiplier(torch.tensor([True, False, True])))
    assert counts.tolist() == [3, 0, 5]


# ---------------------------------------------------------------------------------------------------------------------
# mask_weights
# ---------------------------------------------------------------------------------------------------------------------


def test_mask_weights_zeroes_pruned_and_keeps_others_bit_identical():
    torch.manual_seed(0)
    w = torch.randn(6, 7)
    keep = _random_keep(w.shape)
    before = w.clone()
    mask_weights([(w, multiplier(keep))])
    assert (w[~keep] == 0).all()
    assert torch.equal(_bits(w)[keep], _bits(before)[keep])
    assert w.dtype == torch.float32


def test_mask_weights_several_pairs_in_place_on_parameters():
    torch.manual_seed(1)
    layer = nn.Linear(5, 4)
    w, b = layer.weight, layer.bias
    w_ptr, b_ptr = w.data_ptr(), b.data_ptr()
    kw, kb = _random_keep(w.shape, 1), _random_keep(b.shape, 2, p=0.3)
    w_before, b_before = w.detach().clone(), b.detach().clone()
    mask_weights([(w, multiplier(kw)), (b, multiplier(kb))])
    assert w.data_ptr() == w_ptr and b.data_ptr() == b_ptr  # in place, same storage
    assert isinstance(layer.weight, nn.Parameter) and layer.weight.requires_grad
    assert layer.weight.grad_fn is None  # no autograd history recorded
    assert (w[~kw] == 0).all() and (b[~kb] == 0).all()
    assert torch.equal(_bits(w)[kw], _bits(w_before)[kw])
    assert torch.equal(_bits(b)[kb], _bits(b_before)[kb])


def test_mask_weights_all_true_mask_changes_nothing():
    w = torch.randn(3, 3)
    before = w.clone()
    mask_weights([(w, multiplier(torch.ones(3, 3, dtype=torch.bool)))])
    assert torch.equal(_bits(w), _bits(before))


def test_mask_weights_empty_iterable_is_noop():
    mask_weights([])
    mask_weights(iter(()))


def test_mask_weights_float64_parameter():
    w = torch.tensor([1.5, -2.5, 3.5], dtype=torch.float64)
    mask_weights([(w, multiplier(torch.tensor([False, True, False])))])
    assert w.dtype == torch.float64
    assert w.tolist() == [0.0, -2.5, 0.0]


# ---------------------------------------------------------------------------------------------------------------------
# mask_gradients
# ---------------------------------------------------------------------------------------------------------------------


def test_mask_gradients_zeroes_pruned_grads_only():
    torch.manual_seed(2)
    w = nn.Parameter(torch.randn(4, 5))
    (w**3).sum().backward()
    keep = _random_keep(w.shape, 3)
    w_before, g_before = w.detach().clone(), w.grad.clone()
    mask_gradients([(w, multiplier(keep))])
    assert (w.grad[~keep] == 0).all()
    assert torch.equal(_bits(w.grad)[keep], _bits(g_before)[keep])
    assert torch.equal(_bits(w), _bits(w_before))  # the weights themselves untouched


def test_mask_gradients_skips_parameters_without_grad():
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(3))
    (a * 2).sum().backward()
    mask_gradients(
        [(b, multiplier(torch.tensor([False, False, True]))), (a, multiplier(torch.tensor([True, False, True])))]
    )
    assert b.grad is None
    assert a.grad.tolist() == [2.0, 0.0, 2.0]


# ---------------------------------------------------------------------------------------------------------------------
# zero_optimizer_state
# ---------------------------------------------------------------------------------------------------------------------


def _step(optimizer: torch.optim.Optimizer, params, n: int = 2) -> None:
    for i in range(n):
        optimizer.zero_grad()
        for p in params:
            p.grad = torch.linspace(0.5, 1.5, p.numel()).view_as(p) * (i + 1)
        optimizer.step()


def test_zero_optimizer_state_sgd_momentum():
    w = nn.Parameter(torch.randn(3, 4))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    _step(opt, [w])
    buf = opt.state[w]["momentum_buffer"]
    assert (buf != 0).all()
    before = buf.clone()
    keep = _random_keep(w.shape, 4)
    assert zero_optimizer_state(opt, {w: keep}) == 1
    assert opt.state[w]["momentum_buffer"] is buf  # in place
    assert (buf[~keep] == 0).all()
    assert torch.equal(_bits(buf)[keep], _bits(before)[keep])


@pytest.mark.parametrize(
    ("make", "keys"),
    [
        (lambda ps: torch.optim.Adam(ps, lr=0.01), ("exp_avg", "exp_avg_sq")),
        (lambda ps: torch.optim.AdamW(ps, lr=0.01), ("exp_avg", "exp_avg_sq")),
        (lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True), ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")),
    ],
)
def test_zero_optimizer_state_adam_moments_leave_step_alone(make, keys):
    w = nn.Parameter(torch.randn(4, 3))
    opt = make([w])
    _step(opt, [w], n=3)
    state = opt.state[w]
    step_before = state["step"].clone() if isinstance(state["step"], torch.Tensor) else state["step"]
    before = {k: state[k].clone() for k in keys}
    for k in keys:
        assert (state[k] != 0).all()
    keep = _random_keep(w.shape, 5)
    assert zero_optimizer_state(opt, {w: keep}) == len(keys)
    for k in keys:
        assert (state[k][~keep] == 0).all()
        assert torch.equal(_bits(state[k])[keep], _bits(before[k])[keep])
    if isinstance(step_before, torch.Tensor):
        assert torch.equal(state["step"], step_before)
    else:
        assert state["step"] == step_before
    assert float(state["step"]) == 3.0


def test_zero_optimizer_state_ignores_params_not_in_optimizer_and_without_state():
    held = nn.Parameter(torch.randn(2, 3))
    stateless = nn.Parameter(torch.randn(2, 3))
    foreign = nn.Parameter(torch.randn(2, 3))
    opt = torch.optim.SGD([held, stateless], lr=0.1, momentum=0.9)
    opt.zero_grad()
    held.grad = torch.ones_like(held)
    opt.step()  # `stateless` has no grad: no momentum buffer
    keep = torch.tensor([[True, False, True], [False, True, False]])
    count = zero_optimizer_state(opt, {foreign: keep, stateless: keep, held: keep})
    assert count == 1
    assert foreign not in opt.state
    assert opt.state[held]["momentum_buffer"].tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]


def test_zero_optimizer_state_sgd_without_momentum_has_nothing_to_mask():
    w = nn.Parameter(torch.randn(2, 2))
    opt = torch.optim.SGD([w], lr=0.1)
    _step(opt, [w])
    assert zero_optimizer_state(opt, {w: torch.zeros(2, 2, dtype=torch.bool)}) == 0


def test_zero_optimizer_state_several_params_and_groups():
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2))
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b], "lr": 0.1}])
    _step(opt, [a, b])
    ka, kb = torch.tensor([False, True, True]), torch.tensor([[True, False], [False, False]])
    assert zero_optimizer_state(opt, {a: ka, b: kb}) == 4
    for p, k in ((a, ka), (b, kb)):
        for key in ("exp_avg", "exp_avg_sq"):
            assert (opt.state[p][key][~k] == 0).all()
            assert (opt.state[p][key][k] != 0).all()


def test_zero_optimizer_state_empty_masks():
    w = nn.Parameter(torch.randn(2))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    _step(opt, [w])
    assert zero_optimizer_state(opt, {}) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_chunked_enforce_gives_the_bits_of_one_multiply(monkeypatch, dtype):
    import lightning_prune.core.masks as masks

    g = torch.Generator().manual_seed(0)
    t = torch.randn(10_007, generator=g).to(dtype)
    t[::97] = float("nan")
    t[::89] = float("inf")
    keep = torch.rand(10_007, generator=g) > 0.7
    expected = t.clone()
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    expected.view(bits).mul_(keep.view(torch.uint8))
    monkeypatch.setattr(masks, "CHUNK", 1000)  # 11 chunks, the last one short
    monkeypatch.setattr(native, "_choice", "torch")
    enforce(t, multiplier(keep))
    assert torch.equal(t.view(bits), expected.view(bits))


def test_enforce_on_a_large_non_contiguous_view_falls_back_to_one_multiply(monkeypatch):
    import lightning_prune.core.masks as masks

    monkeypatch.setattr(masks, "CHUNK", 10)
    monkeypatch.setattr(native, "_choice", "torch")
    w = torch.randn(40, 30)
    keep = torch.rand(40, 30) > 0.5
    expected = w * keep
    enforce(w.t(), multiplier(keep.t()))
    assert torch.equal(w, expected)
