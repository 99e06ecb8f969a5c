"""WeightedFusion: EfficientDet fast / softmax / sum fusion (eq. 1-3)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dilconv.fusion
from dilconv import WeightedFusion

MODES = ("fast", "softmax", "sum")
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)


@settings(max_examples=20, deadline=None)
@given(num_inputs=st.integers(1, 4), shape=shapes, mode=st.sampled_from(MODES))
def test_output_has_the_input_shape_and_dtype(num_inputs, shape, mode):
    inputs = [torch.randn(shape) for _ in range(num_inputs)]
    out = WeightedFusion(num_inputs, mode=mode)(inputs)
    assert out.shape == shape
    assert out.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("num_inputs", [1, 2, 3])
def test_weight_is_one_per_input_and_initialised_to_one(mode, num_inputs):
    fuse = WeightedFusion(num_inputs, mode=mode)
    assert fuse.weight.shape == (num_inputs,)
    assert torch.equal(fuse.weight.detach(), torch.ones(num_inputs))
    with torch.no_grad():
        fuse.weight.uniform_(-3.0, 3.0)
    fuse.reset_parameters()
    assert torch.equal(fuse.weight.detach(), torch.ones(num_inputs))
    # "sum" keeps the key but as a buffer: a parameter without gradient would stop DDP.
    learned = [] if mode == "sum" else ["weight"]
    assert [name for name, _ in fuse.named_parameters()] == learned
    assert "weight" in fuse.state_dict()


@settings(max_examples=20, deadline=None)
@given(
    weights=st.lists(st.floats(-2.0, 5.0), min_size=1, max_size=4),
    eps=st.sampled_from([1e-4, 1e-2, 0.5]),
)
def test_fast_mode_is_eq3(weights, eps):
    fuse = WeightedFusion(len(weights), eps=eps)
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor(weights))
    inputs = [torch.randn(2, 3, 4, 5) for _ in weights]
    w = torch.tensor(weights).relu()
    expected = sum(wi * x for wi, x in zip(w, inputs, strict=True)) / (eps + w.sum())
    torch.testing.assert_close(fuse(inputs), expected)


def test_softmax_and_sum_modes():
    weights = torch.tensor([0.3, -1.0, 2.0])
    inputs = [torch.randn(2, 3, 4, 4) for _ in weights]
    softmax = WeightedFusion(3, mode="softmax")
    plain = WeightedFusion(3, mode="sum")
    with torch.no_grad():
        softmax.weight.copy_(weights)
        plain.weight.copy_(weights)
    p = weights.softmax(0)
    expected = sum(pi * x for pi, x in zip(p, inputs, strict=True))
    torch.testing.assert_close(softmax(inputs), expected)
    torch.testing.assert_close(plain(inputs), sum(inputs))


@settings(max_examples=20, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 10.0), min_size=2, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_fast_mode_output_is_a_convex_combination(weights, seed):
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(1, 4, 3, 3, generator=generator) for _ in weights]
    fuse = WeightedFusion(len(weights))
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor(weights))
    out = fuse(inputs)
    stacked = torch.stack(inputs)
    low, high = stacked.amin(0), stacked.amax(0)
    # eq. 3's eps shrinks the combination towards 0 by the factor S / (S + eps).
    slack = fuse.eps / sum(weights) * stacked.abs().amax(0) + 1e-6
    assert bool((out >= low - slack).all()) and bool((out <= high + slack).all())


@pytest.mark.parametrize("num_inputs", [2, 3])
def test_all_zero_weights_stay_finite_in_float16(num_inputs):
    fuse = WeightedFusion(num_inputs)
    with torch.no_grad():
        fuse.weight.zero_()
    inputs = [torch.randn(2, 4, 3, 3, dtype=torch.float16) * 1000 for _ in range(num_inputs)]
    out = fuse(inputs)
    assert out.dtype == torch.float16
    assert bool(torch.isfinite(out).all())
    assert not out.any()

    half = WeightedFusion(num_inputs, dtype=torch.float16)
    with torch.no_grad():
        half.weight.copy_(torch.tensor([0.0] * (num_inputs - 1) + [-5.0]))
    assert bool(torch.isfinite(half(inputs)).all())


@pytest.mark.parametrize("mode", MODES)
def test_finite_under_bfloat16_autocast(mode):
    conv = nn.Conv2d(4, 4, 3, padding=1)
    fuse = WeightedFusion(2, mode=mode)
    with torch.no_grad():
        fuse.weight.zero_()
    x = torch.randn(2, 4, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = conv(x)
        out = fuse([a, conv(a)])
    assert a.dtype == torch.bfloat16
    assert out.dtype == torch.bfloat16
    assert bool(torch.isfinite(out).all())


def test_mixed_dtypes_are_promoted():
    a = torch.randn(1, 2, 3, 3)
    b = torch.randn(1, 2, 3, 3, dtype=torch.bfloat16)
    assert WeightedFusion(2)([a, b]).dtype == torch.float32


@pytest.mark.parametrize("mode", ["fast", "softmax"])
def test_gradient_reaches_the_weights(mode):
    fuse = WeightedFusion(3, mode=mode)
    inputs = [torch.randn(2, 3, 4, 4) + i for i in range(3)]
    (fuse(inputs) ** 2).sum().backward()
    assert fuse.weight.grad is not None
    assert bool((fuse.weight.grad != 0).all())


def _straightforward(fuse, inputs):
    # Eq. 2 / eq. 3 as written, through plain autograd: the reference for the custom backward.
    # The factors are normalised in float32, as documented, then applied in the inputs' dtype.
    w = fuse.weight.float()
    factors = w.softmax(0) if fuse.mode == "softmax" else w.relu() / (w.relu().sum() + fuse.eps)
    return sum(f.double() * x for f, x in zip(factors, inputs, strict=True))


@pytest.fixture(params=["lean backward", "autograd"])
def backward_path(request, monkeypatch):
    # Small maps take plain autograd; a zero threshold sends them through the lean backward.
    if request.param == "lean backward":
        monkeypatch.setattr(dilconv.fusion, "_LEAN_BACKWARD_MIN_NUMEL", 0)
    return request.param


@pytest.mark.parametrize("mode", ["fast", "softmax"])
@pytest.mark.parametrize("layouts", ["contiguous", "channels_last", "mixed", "transposed"])
def test_gradients_match_the_straightforward_formula(mode, layouts, backward_path):
    torch.manual_seed(0)
    fuse = WeightedFusion(3, mode=mode).double()
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor([0.7, -0.2, 1.3]))  # one weight cut by the ReLU
    inputs = [torch.randn(2, 3, 4, 5, dtype=torch.float64) for _ in range(3)]
    if layouts in ("channels_last", "mixed"):
        inputs = [x.contiguous(memory_format=torch.channels_last) for x in inputs]
    if layouts == "mixed":
        inputs[1] = inputs[1].contiguous()
    if layouts == "transposed":
        inputs = [x.transpose(2, 3) for x in inputs]
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64)
    if layouts != "contiguous":
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    results = []
    for forward in (fuse, lambda xs: _straightforward(fuse, xs)):
        leaves = [x.detach().requires_grad_(i != 1) for i, x in enumerate(inputs)]
        fuse.weight.grad = None
        forward(leaves).backward(grad_out)
        results.append([fuse.weight.grad, leaves[0].grad, leaves[1].grad, leaves[2].grad])
    (weight, *grads), (weight_ref, *grads_ref) = results
    torch.testing.assert_close(weight, weight_ref)
    assert grads[1] is None and grads_ref[1] is None  # not asked for, not computed
    for grad, ref in zip(grads, grads_ref, strict=True):
        if ref is not None:
            torch.testing.assert_close(grad, ref)


@pytest.mark.parametrize("mode", ["fast", "softmax"])
def test_gradcheck_of_the_inputs(mode, backward_path):
    # The weights' own gradients are compared above: their float32 normalisation is too coarse
    # for gradcheck's float64 finite differences.
    fuse = WeightedFusion(2, mode=mode).double()
    inputs = [torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    assert torch.autograd.gradcheck(lambda a, b: fuse([a, b]), inputs)


@pytest.mark.filterwarnings("error:There is a performance drop")
def test_per_sample_gradients_with_torch_func(backward_path):
    fuse = WeightedFusion(2)
    params = {"weight": torch.tensor([0.3, 1.2])}
    a, b = torch.randn(2, 4, 3, 5, 5)

    def loss(p, x, y):
        return torch.func.functional_call(fuse, p, ([x[None], y[None]],)).square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, a, b)
    one_by_one = [torch.func.grad(loss)(params, x, y)["weight"] for x, y in zip(a, b)]
    torch.testing.assert_close(per_sample["weight"], torch.stack(one_by_one))


def test_sum_mode_leaves_the_weights_unused():
    fuse = WeightedFusion(2, mode="sum")
    fuse([torch.randn(3, requires_grad=True), torch.randn(3)]).sum().backward()
    assert fuse.weight.grad is None


def test_factory_kwargs():
    fuse = WeightedFusion(3, device="meta", dtype=torch.float64)
    assert fuse.weight.device.type == "meta"
    assert fuse.weight.dtype == torch.float64


def test_wrong_number_of_inputs():
    with pytest.raises(ValueError, match="expected 3 inputs, got 2"):
        WeightedFusion(3)([torch.randn(1, 2, 3, 3)] * 2)


def test_inputs_of_different_shapes_name_the_shapes():
    with pytest.raises(ValueError, match=r"\(1, 2, 3, 3\).*\(1, 2, 4, 4\)"):
        WeightedFusion(2)([torch.randn(1, 2, 3, 3), torch.randn(1, 2, 4, 4)])


def test_bad_inputs():
    fuse = WeightedFusion(2)
    with pytest.raises(TypeError, match="sequence of Tensors"):
        fuse(torch.randn(2, 1, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        fuse([torch.ones(2, 2, dtype=torch.long)] * 2)
    with pytest.raises(TypeError, match="input 1 to be a Tensor"):
        fuse([torch.randn(2), 1.0])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_inputs": 0}, ValueError, "num_inputs"),
        ({"num_inputs": 2.0}, TypeError, "num_inputs"),
        ({"num_inputs": 2, "eps": 0.0}, ValueError, "eps"),
        ({"num_inputs": 2, "eps": float("nan")}, ValueError, "eps"),
        ({"num_inputs": 2, "eps": "1e-4"}, TypeError, "eps"),
        ({"num_inputs": 2, "mode": "mean"}, ValueError, "mode"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        WeightedFusion(**kwargs)


def test_repr():
    assert repr(WeightedFusion(2, mode="softmax")) == (
        "WeightedFusion(num_inputs=2, eps=0.0001, mode='softmax')"
    )
