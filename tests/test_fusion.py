"""WeightedFusion: EfficientDet fast / softmax / sum fusion (eq. 1-3)."""

from __future__ import annotations

import warnings

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
    # The factors are normalised in float32 (float64 for float64 weights), as documented, then
    # applied in the inputs' dtype.
    w = fuse.weight.to(torch.promote_types(fuse.weight.dtype, torch.float32))
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


# Transforms and precision at sizes on both sides of the lean backward's threshold (65,536
# elements per input): 1x4x8x8 takes plain autograd, 1x4x128x128 the custom Function.
SIDES = [pytest.param((1, 4, 8, 8), id="below"), pytest.param((1, 4, 128, 128), id="above")]


@pytest.mark.parametrize("mode", ["fast", "softmax"])
@pytest.mark.parametrize("shape", SIDES)
def test_forward_mode_ad_matches_reverse_mode(shape, mode):
    import torch.autograd.forward_ad as fwAD

    fuse = WeightedFusion(2, mode=mode).double()
    a, b = (torch.randn(shape, dtype=torch.float64, requires_grad=True) for _ in range(2))
    tangent = torch.randn(shape, dtype=torch.float64)
    with fwAD.dual_level():
        out = fuse([fwAD.make_dual(a, tangent), b])
        forward = fwAD.unpack_dual(out).tangent
    direction = torch.randn(shape, dtype=torch.float64)
    (grad_a,) = torch.autograd.grad(fuse([a, b]), a, direction)
    torch.testing.assert_close((forward * direction).sum(), (tangent * grad_a).sum())


@pytest.mark.parametrize("shape", SIDES)
def test_vmap_over_weights_and_inputs_without_a_loop(shape):
    fuse = WeightedFusion(2)
    weights = torch.tensor([[0.3, 1.2], [2.0, 0.0], [1.0, 1.0]])
    a, b = torch.randn(2, *shape)

    def run(w):
        return torch.func.functional_call(fuse, {"weight": w}, ([a, b],))

    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("error", message="There is a performance drop")
        got = torch.func.vmap(run)(weights.requires_grad_())
        hessian = torch.func.hessian(lambda w: run(w).square().sum())(weights[0])
    torch.testing.assert_close(got, torch.stack([run(w) for w in weights]))
    expected = torch.autograd.functional.hessian(lambda w: run(w).square().sum(), weights[0])
    torch.testing.assert_close(hessian, expected, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("shape", SIDES)
def test_jit_trace_passes_its_check(shape, grad):
    # The check re-traces under no_grad: the traced code must not switch paths on grad mode.
    fuse = WeightedFusion(2)
    a, b = torch.randn(2, *shape)
    with torch.set_grad_enabled(grad), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(fuse, ([a, b],))
        torch.testing.assert_close(traced([b, a]), fuse([b, a]))


def _weight_gradient(fuse, inputs, *, autocast: torch.dtype | None = None):
    fuse.weight.grad = None
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = fuse(inputs)
    out.double().square().sum().backward()
    return fuse.weight.grad.double()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autocast", [False, True], ids=["inputs", "autocast"])
def test_half_precision_weight_gradients_accumulate_in_float32(dtype, autocast, backward_path):
    # The issue's case: 2x8x128x128 float16 inputs gave NaN weight gradients (the factors'
    # gradients, ~1e5, overflowed float16) and bfloat16 ones were off by 12% and more.
    torch.manual_seed(0)
    inputs = [torch.randn(2, 8, 128, 128).to(dtype) for _ in range(2)]
    reference = WeightedFusion(2).double()
    expected = _weight_gradient(reference, [x.double() for x in inputs])
    fuse = WeightedFusion(2)
    got = _weight_gradient(fuse, inputs, autocast=dtype if autocast else None)
    assert fuse.weight.grad.dtype == torch.float32
    assert torch.isfinite(got).all()
    # What remains is the output's one rounding to the inputs' dtype (the loss sees it): 2^-11
    # and 2^-8 relative, a few times over. Seen: 0.03% and 0.6%.
    tolerance = {torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
    scale = expected.abs().max().item()
    torch.testing.assert_close(got, expected, rtol=tolerance, atol=tolerance * scale)
