"""WeightedFusion's fused Triton op (dilconv._fusion_triton), on the CPU through Triton's
interpreter and, where a GPU is present, on CUDA.

Without CUDA, tests/conftest.py sets ``TRITON_INTERPRET=1`` before Triton is imported and the op
runs on CPU tensors inside ``kernel_on_cpu()``; its values and gradients are compared with
WeightedFusion's plain path (the formula every other device runs) and a float64 reference.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from dilconv import WeightedFusion, _fusion_triton

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(
    not (_fusion_triton.available() and INTERPRETED),
    reason="needs Triton and TRITON_INTERPRET=1 (set when no GPU is present)",
)
needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and _fusion_triton.available() and not INTERPRETED),
    reason="needs CUDA and Triton",
)
MODES = ("fast", "softmax")


@pytest.fixture
def on_cpu():
    _fusion_triton.define_ops()  # some tests call torch.ops.dilconv.* directly
    with _fusion_triton.kernel_on_cpu():
        yield


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls that reach the fused op (so a test cannot pass on the plain path)."""
    calls = []
    real = _fusion_triton.weighted_fusion

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_fusion_triton, "weighted_fusion", counted)
    return calls


def _module(count: int, mode: str, device: str = "cpu") -> WeightedFusion:
    fuse = WeightedFusion(count, mode=mode, device=device)
    with torch.no_grad():
        fuse.weight.copy_(torch.linspace(-0.5, 2.0, count))  # one weight below 0: relu's mask
    return fuse


def _reference(weight: torch.Tensor, inputs: list[torch.Tensor], mode: str,
               eps: float = 1e-4) -> torch.Tensor:
    """The formula in float64 (EfficientDet eq. 2 / eq. 3)."""
    w = weight.double()
    if mode == "softmax":
        f = w.softmax(0)
    else:
        f = w.relu() / (w.relu().sum() + eps)
    return sum(f[i] * x.double() for i, x in enumerate(inputs))


def _inputs(count: int, shape: tuple[int, ...], dtype=torch.float32, device="cpu",
            channels_last=False) -> list[torch.Tensor]:
    out = []
    for _ in range(count):
        x = torch.randn(shape, device=device).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(x.requires_grad_())
    return out


def _grads(fuse, inputs, grad):
    out = fuse(inputs)
    return out, torch.autograd.grad(out, [fuse.weight, *inputs], grad)


# Values and gradients against the plain path -------------------------------------------------

@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("count", [2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 33, 40), (3, 1031)])
def test_values_and_gradients_match_the_plain_path(mode, count, shape, spy):
    fuse = _module(count, mode)
    inputs = _inputs(count, shape)
    grad = torch.randn(shape)
    with _fusion_triton.kernel_on_cpu():
        out, grads = _grads(fuse, inputs, grad)
    assert spy, "the fused op did not run"
    assert not _fusion_triton._traced_under_interpreter(inputs)  # the kernels, not the formula
    expected, expected_grads = _grads(fuse, inputs, grad)  # the plain path
    assert len(spy) == 1
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-5)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
def test_channels_last_keeps_its_layout_and_values(mode, on_cpu, spy):
    fuse = _module(3, mode)
    inputs = _inputs(3, (2, 5, 6, 7), channels_last=True)
    grad = torch.randn(2, 5, 6, 7)
    out, grads = _grads(fuse, inputs, grad)
    assert spy and out.is_contiguous(memory_format=torch.channels_last)
    assert all(g.is_contiguous(memory_format=torch.channels_last) for g in grads[1:])
    torch.testing.assert_close(out, _reference(fuse.weight, inputs, mode).float())
    expected = torch.autograd.grad(_reference(fuse.weight, inputs, mode), [fuse.weight, *inputs],
                                   grad.double())
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)


@needs_interpreter
def test_mixed_layouts_take_the_plain_path(on_cpu, spy):
    fuse = _module(2, "fast")
    a = torch.randn(1, 3, 4, 5)
    b = torch.randn(1, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(fuse([a, b]), _reference(fuse.weight, [a, b], "fast").float())
    assert not spy


@needs_interpreter
def test_the_op_accepts_mixed_layouts_and_any_strides(on_cpu):
    weight = torch.tensor([0.3, 1.2, 0.7])
    a = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    b = torch.randn(2, 3, 4, 5)
    c = torch.randn(2, 3, 5, 4).transpose(-1, -2)
    got = torch.ops.dilconv.weighted_fusion(weight, [a, b, c], "softmax", 1e-4)
    torch.testing.assert_close(got, _reference(weight, [a, b, c], "softmax").float())


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_inputs(mode, dtype, tol, on_cpu, spy):
    # The kernel computes in float32 and rounds once; bfloat16 keeps 8 bits of mantissa (the
    # interpreter computes bfloat16 in float32: the tolerance is the output's rounding).
    fuse = _module(4, mode)
    inputs = _inputs(4, (2, 3, 9, 11), dtype=dtype)
    grad = torch.randn(2, 3, 9, 11).to(dtype)
    out, grads = _grads(fuse, inputs, grad)
    assert spy and out.dtype == dtype and grads[0].dtype == torch.float32
    reference = _reference(fuse.weight, inputs, mode)
    torch.testing.assert_close(out.double(), reference, atol=tol, rtol=tol)
    expected = torch.autograd.grad(reference, [fuse.weight, *inputs], grad.double())
    torch.testing.assert_close(grads[0].double(), expected[0].double(), atol=1e-4, rtol=1e-4)
    for got, want in zip(grads[1:], expected[1:], strict=True):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@needs_interpreter
@pytest.mark.slow
def test_half_precision_weight_gradient_is_accumulated_in_float32(on_cpu, spy):
    # 2x8x128x128 = 262144 products per weight: summed in float16 they overflow or drift.
    mode = "fast"  # the accumulation is the same in both modes
    fuse = _module(2, mode)
    inputs = _inputs(2, (2, 8, 128, 128), dtype=torch.float16)
    grad = torch.rand(2, 8, 128, 128).half()
    _, grads = _grads(fuse, inputs, grad)
    assert spy
    reference = _reference(fuse.weight, inputs, mode)
    expected = torch.autograd.grad(reference, fuse.weight, grad.double())[0]
    assert torch.isfinite(grads[0]).all()
    torch.testing.assert_close(grads[0].double(), expected.double(), rtol=1e-4, atol=1e-4)


# torch.library registration: opcheck, compile, export, vmap, forward AD -----------------------

@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck(mode, layout, on_cpu):
    weight = torch.tensor([0.4, -0.2, 1.5], requires_grad=True)
    inputs = _inputs(3, (2, 3, 4, 5), channels_last=layout == "channels_last")
    torch.library.opcheck(torch.ops.dilconv.weighted_fusion.default,
                          (weight, inputs, mode, 1e-4))
    grad = torch.randn(2, 3, 4, 5)
    torch.library.opcheck(torch.ops.dilconv.weighted_fusion_backward.default,
                          (grad, weight.detach(), [x.detach() for x in inputs], mode, 1e-4,
                           [True, True, False, True]))


@needs_interpreter
def test_compile_fullgraph_keeps_the_op(on_cpu):
    fuse = _module(3, "fast")
    inputs = _inputs(3, (2, 3, 4, 5))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    expected = _reference(fuse.weight, inputs, "fast").float()
    got = torch.compile(fuse, fullgraph=True, backend=backend)(inputs)
    torch.testing.assert_close(got, expected)
    assert any("dilconv.weighted_fusion" in str(g.graph) for g in graphs)
    aot = torch.compile(fuse, fullgraph=True, backend="aot_eager")
    out = aot(inputs)
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    assert fuse.weight.grad is not None and torch.isfinite(fuse.weight.grad).all()


@needs_interpreter
def test_export_records_the_op(on_cpu):
    fuse = _module(2, "softmax").eval()
    inputs = [torch.randn(1, 3, 4, 5), torch.randn(1, 3, 4, 5)]
    exported = torch.export.export(fuse, (inputs,))
    assert "dilconv.weighted_fusion" in str(exported.graph)
    torch.testing.assert_close(exported.module()(inputs), fuse(inputs))


@needs_interpreter
def test_vmap_folds_the_batch_and_gives_per_sample_gradients(on_cpu, spy):
    weight = torch.tensor([0.5, 1.5, -0.1])
    xs = [torch.randn(4, 3, 5) for _ in range(3)]
    batched = torch.func.vmap(
        lambda a, b, c: _fusion_triton.weighted_fusion(weight, [a, b, c], "fast", 1e-4),
        in_dims=(0, 1, None))(xs[0], xs[1].transpose(0, 1), xs[2][0])
    expected = _reference(weight, [xs[0], xs[1], xs[2][0].expand(4, 3, 5)], "fast").float()
    torch.testing.assert_close(batched, expected)

    # vmap over a batched weight, and per-sample weight gradients (vmap of grad).
    weights = torch.randn(4, 3)
    got = torch.func.vmap(
        lambda w, a: _fusion_triton.weighted_fusion(w, [a, a * 2, -a], "softmax", 1e-4))(
        weights, xs[0])
    want = torch.stack([_reference(w, [a, a * 2, -a], "softmax").float()
                        for w, a in zip(weights, xs[0], strict=True)])
    torch.testing.assert_close(got, want)

    assert spy


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
def test_batched_gradients_use_the_backward_rule(mode, on_cpu, spy):
    # vmap over autograd.grad batches the backward op (a Jacobian's rows in one call).
    fuse = _module(3, mode)
    inputs = _inputs(3, (2, 3, 4))
    out = fuse(inputs)
    assert spy
    basis = torch.randn(5, 2, 3, 4)
    rows = torch.func.vmap(
        lambda v: torch.autograd.grad(out, [fuse.weight, *inputs], v, retain_graph=True))(basis)
    reference = _reference(fuse.weight, inputs, mode)
    for i in range(5):
        expected = torch.autograd.grad(reference, [fuse.weight, *inputs], basis[i].double(),
                                       retain_graph=True)
        for got, want in zip(rows, expected, strict=True):
            torch.testing.assert_close(got[i].double(), want.double(), rtol=1e-5, atol=1e-5)


@needs_interpreter
def test_per_sample_gradients_take_the_plain_formula(on_cpu, spy):
    # torch.func.grad cannot run a custom op's autograd: WeightedFusion takes its plain path.
    fuse = _module(3, "fast")
    xs = torch.randn(4, 3, 5)

    def loss(w, a):
        out = torch.func.functional_call(fuse, {"weight": w}, ([a, a.sin(), a.cos()],))
        return out.square().sum()

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0))(
        fuse.weight.detach(), xs)
    assert not spy
    for i in range(4):
        expected = torch.func.grad(
            lambda w, a: _reference(w, [a, a.sin(), a.cos()], "fast").square().sum(),
            argnums=(0, 1))(fuse.weight.detach().double(), xs[i].double())
        torch.testing.assert_close(per_sample[0][i].double(), expected[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(per_sample[1][i].double(), expected[1], rtol=1e-5, atol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
def test_forward_mode_ad_takes_the_plain_formula(mode, on_cpu, spy):
    fuse = _module(3, mode)
    inputs = [torch.randn(2, 3, 4) for _ in range(3)]
    tangents = [torch.randn(2, 3, 4) for _ in range(3)]
    out, jvp = torch.func.jvp(lambda *xs: fuse(list(xs)), tuple(inputs), tuple(tangents))
    assert not spy
    reference = _reference(fuse.weight, inputs, mode).float()
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(jvp, _reference(fuse.weight, tangents, mode).float())
    import torch.autograd.forward_ad as fwAD

    with fwAD.dual_level():
        duals = [fwAD.make_dual(x, t) for x, t in zip(inputs, tangents, strict=True)]
        tangent = fwAD.unpack_dual(fuse(duals)).tangent
    assert not spy
    torch.testing.assert_close(tangent, jvp)


@needs_interpreter
@pytest.mark.parametrize("mode", MODES)
def test_double_backward(mode, on_cpu):
    weight = torch.tensor([0.4, 1.3, 0.8], dtype=torch.float64, requires_grad=True)
    inputs = _inputs(3, (2, 3, 4), torch.float64)

    def fused(w, *xs):
        return _fusion_triton.weighted_fusion(w, list(xs), mode, 1e-4)

    assert torch.autograd.gradcheck(fused, (weight, *inputs))
    assert torch.autograd.gradgradcheck(fused, (weight, *inputs))


@needs_interpreter
def test_the_op_names_what_it_expected(on_cpu):
    x = torch.randn(3)
    with pytest.raises(ValueError, match="2 to 5 inputs, got 6"):
        torch.ops.dilconv.weighted_fusion(torch.ones(6), [x] * 6, "fast", 1e-4)
    with pytest.raises(ValueError, match=r"weight of shape \(2,\), got \(3,\)"):
        torch.ops.dilconv.weighted_fusion(torch.ones(3), [x, x], "fast", 1e-4)
    with pytest.raises(ValueError, match="mode 'fast' or 'softmax', got 'sum'"):
        torch.ops.dilconv.weighted_fusion(torch.ones(2), [x, x], "sum", 1e-4)


def test_cpu_tensors_take_the_plain_path_by_default(spy):
    fuse = _module(2, "fast")
    inputs = [torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)]
    torch.testing.assert_close(fuse(inputs), _reference(fuse.weight, inputs, "fast").float())
    assert not spy


def test_dilconv_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, dilconv\n"
        "from dilconv import _fusion_triton\n"
        "assert not _fusion_triton.available(), 'triton should be missing'\n"
        "fuse = dilconv.WeightedFusion(2)\n"
        "print(fuse([torch.ones(1, 2, 3, 3), torch.zeros(1, 2, 3, 3)]).sum().item())\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert abs(float(done.stdout.split()[-1]) - 18 / (2 + 1e-4)) < 1e-4


# CUDA (run by benchmarks/gpu_check.py) --------------------------------------------------------

@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_values_and_gradients(mode, dtype, channels_last, spy):
    fuse = _module(3, mode, "cuda")
    inputs = _inputs(3, (2, 16, 33, 47), dtype, "cuda", channels_last)
    grad = torch.randn(2, 16, 33, 47, device="cuda").to(dtype)
    out, grads = _grads(fuse, inputs, grad)
    assert spy
    reference = _reference(fuse.weight, inputs, mode)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(out.double(), reference, atol=tol, rtol=tol)
    expected = torch.autograd.grad(reference, [fuse.weight, *inputs], grad.double())
    torch.testing.assert_close(grads[0].double(), expected[0].double(), atol=1e-3, rtol=1e-4)
    for got, want in zip(grads[1:], expected[1:], strict=True):
        torch.testing.assert_close(got.double(), want.double(), atol=tol, rtol=tol)


@needs_cuda
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("count", [2, 5])
def test_cuda_float64_gradcheck(mode, count):
    weight = torch.linspace(-0.3, 1.2, count, device="cuda", dtype=torch.float64)
    weight.requires_grad_()
    inputs = _inputs(count, (2, 3, 5, 7), torch.float64, "cuda")

    def fused(w, *xs):
        return _fusion_triton.weighted_fusion(w, list(xs), mode, 1e-4)

    assert torch.autograd.gradcheck(fused, (weight, *inputs))


@needs_cuda
@pytest.mark.parametrize("dynamic", [False, True])
def test_cuda_compile_fullgraph(dynamic):
    # A graph compiled before any eager call takes the plain formula (the ops are registered on
    # first eager use); registered, the compiled graph holds the op.
    _fusion_triton.define_ops()
    fuse = _module(3, "fast", "cuda")
    inputs = _inputs(3, (2, 8, 17, 19), device="cuda")
    compiled = torch.compile(fuse, fullgraph=True, dynamic=dynamic)
    out = compiled(inputs)
    torch.testing.assert_close(out, _reference(fuse.weight, inputs, "fast").float())
    out.sum().backward()
    expected = torch.autograd.grad(_reference(fuse.weight, inputs, "fast").sum(), fuse.weight)
    torch.testing.assert_close(fuse.weight.grad.double(), expected[0].double(), rtol=1e-4,
                               atol=1e-4)


@needs_cuda
def test_cuda_half_precision_weight_gradient_is_accumulated_in_float32(spy):
    fuse = _module(2, "fast", "cuda")
    inputs = _inputs(2, (2, 8, 128, 128), torch.float16, "cuda")
    grad = torch.rand(2, 8, 128, 128, device="cuda").half()
    _, grads = _grads(fuse, inputs, grad)
    assert spy
    expected = torch.autograd.grad(_reference(fuse.weight, inputs, "fast"), fuse.weight,
                                   grad.double())[0]
    torch.testing.assert_close(grads[0].double(), expected.double(), rtol=1e-4, atol=1e-4)
