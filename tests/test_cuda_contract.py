"""The contract of tests/test_contract.py on CUDA (issue 22): every case of contract_cases in
float32 against the CPU, in float16 and bfloat16 autocast forward and backward, channels_last,
float64 gradcheck, and ``torch.compile(dynamic=True)`` for the blocks with a CUDA fast path.

Skipped without a GPU; ``benchmarks/gpu_check.py`` runs them (every test here has "cuda" in
its name, for ``pytest -k cuda``). cuDNN and cuBLAS run without TF32 so that float32 on CUDA is
float32; tolerances follow the CPU contract's.
"""

from __future__ import annotations

import copy

import pytest
import torch

from contract_cases import CASES, map_tensors, tensors

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

COMPILED = ("fusion_fast", "bifpn")
"""Blocks compiled on CUDA: those that take the fused WeightedFusion op (compiling every case
would not fit the GPU check's six minutes)."""


def _cases(check: str, names: tuple[str, ...] | None = None) -> list:
    return [pytest.param(case, id=case.name) for case in CASES
            if case.runs(check) and (names is None or case.name in names)]


@pytest.fixture(autouse=True)
def _no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _pair(case):
    """The case's module on the CPU and a copy on CUDA, and its inputs (on the CPU)."""
    torch.manual_seed(0)
    cpu = case.build()
    torch.manual_seed(1)
    args = case.inputs(*case.size)
    return cpu, copy.deepcopy(cpu).cuda(), args


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double().cpu() - want.double().cpu()).norm()
            / want.double().norm().clamp_min(1e-12)).item()


def _loss(outputs: list[torch.Tensor], seed: int = 2) -> torch.Tensor:
    """Random projections of the outputs, averaged (a sum would overflow float16 gradients
    in the deeper networks, which training keeps in range with a GradScaler)."""
    generator = torch.Generator().manual_seed(seed)
    return sum((out.float() * torch.randn(out.shape, generator=generator).to(out.device)).mean()
               for out in outputs)


@pytest.mark.parametrize("case", _cases("forward_backward"))
def test_cuda_float32_forward_backward_matches_the_cpu(case):
    cpu, gpu, args = _pair(case)
    results = []
    for module, device in ((cpu, "cpu"), (gpu, "cuda")):
        module.train()
        xs = map_tensors(lambda t, d=device: t.to(d).requires_grad_(), args)
        outputs = tensors(module(*xs))
        _loss(outputs).backward()
        grads = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
        results.append((outputs, grads, [x.grad for x in tensors(xs)]))
    (out_c, grads_c, xg_c), (out_g, grads_g, xg_g) = results
    for got, want in zip(out_g, out_c, strict=True):
        assert got.is_cuda and _relative(got, want) < 1e-4
    assert sorted(grads_g) == sorted(grads_c)
    for name in grads_c:
        assert _relative(grads_g[name], grads_c[name]) < 1e-3, name
    for got, want in zip(xg_g, xg_c, strict=True):
        assert _relative(got, want) < 1e-3


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", _cases("autocast"))
def test_cuda_autocast_forward_backward(case, dtype):
    _, module, args = _pair(case)
    xs = map_tensors(lambda t: t.cuda().requires_grad_(), args)
    module.eval()
    with torch.no_grad():
        expected = tensors(module(*xs))
        with torch.autocast("cuda", dtype=dtype):
            got = tensors(module(*xs))
    for out, ref in zip(got, expected, strict=True):
        assert torch.isfinite(out).all() and _relative(out, ref) < 0.05
    module.train()
    with torch.autocast("cuda", dtype=dtype):
        outputs = tensors(module(*xs))
    _loss(outputs).backward()
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for x in tensors(xs):
        assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("case", _cases("channels_last"))
def test_cuda_channels_last_gives_the_same_output(case):
    _, module, args = _pair(case)
    module.eval()
    plain = map_tensors(lambda t: t.cuda(), args)
    last = map_tensors(lambda t: t.contiguous(memory_format=torch.channels_last)
                       if t.dim() == 4 else t, plain)
    with torch.no_grad():
        expected, got = tensors(module(*plain)), tensors(module(*last))
    for out, ref in zip(got, expected, strict=True):
        assert _relative(out, ref) < 1e-4
        if case.channels_last_out and out.dim() == 4:
            assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", _cases("gradcheck"))
def test_cuda_gradcheck_float64(case):
    torch.manual_seed(0)
    module = case.build(device="cuda", dtype=torch.float64).eval()
    torch.manual_seed(1)
    args = map_tensors(lambda t: t.to("cuda", torch.float64).requires_grad_(),
                       case.inputs(*case.tiny))
    flat = tensors(args)

    def run(*values):
        replacements = iter(values)
        return tuple(tensors(module(*map_tensors(lambda _: next(replacements), args))))

    assert torch.autograd.gradcheck(run, tuple(flat), fast_mode=True)


@pytest.mark.parametrize("case", _cases("compile", COMPILED))
def test_cuda_compile_dynamic_matches_eager(case):
    torch._dynamo.reset()
    _, module, args = _pair(case)
    module.eval()
    compiled = torch.compile(module, dynamic=True, fullgraph=True)
    n, h, w = case.size
    with torch.no_grad():
        for i, size in enumerate([case.size, (n + 1, h + 3, w + 2)]):
            torch.manual_seed(i)
            xs = map_tensors(lambda t: t.cuda(), case.inputs(*size))
            # No duck sizing: equal example sizes would share a symbol (see test_contract).
            with torch._dynamo.config.patch(error_on_recompile=i > 0), \
                    torch.fx.experimental._config.patch(use_duck_shape=False):
                got = tensors(compiled(*xs))
            for out, ref in zip(got, tensors(module(*xs)), strict=True):
                torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()
