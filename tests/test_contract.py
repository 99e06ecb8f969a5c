"""The contract every public block honours (issue 6), run over every case of contract_cases.

Each check is one test parametrised over the cases (``tests/contract_cases.py``), so a block
gets the whole contract by adding one ``Case`` line there. Decisions and tolerances:

- forward/backward: every parameter gets a gradient (``p.grad is not None``), except a case's
  documented ``no_grad`` allowlist; gradients are finite.
- gradcheck: float64, eval-mode norms, gradients w.r.t. the inputs, ``fast_mode`` (random
  projections of the Jacobian), default eps/atol/rtol.
- compile (slow): inductor under ``torch.no_grad()`` with ``dynamic=True``; the first size
  compiles, the other two (odd ones included, other batch sizes) must reuse that graph
  (``error_on_recompile``); outputs match eager to atol = rtol = 1e-4 (inductor reorders and
  fuses float32 reductions, the differences seen are ~1e-6). ``torch._dynamo.explain`` counts
  0 graph breaks. Training under compile is not part of the contract: in torch 2.14 the
  backward of a convolution re-specialises spatial sizes (one recompile per size).
- onnx (slow): ``torch.onnx.export(dynamo=True)`` at one size with a dynamic batch and dynamic
  spatial sizes, onnxruntime at another, odd size, matching eager to atol = rtol = 1e-4; the
  graph of a neck holds no ScatterND.
- channels_last: same output to atol 1e-5, 4-D outputs channels_last (``channels_last_out``).
- autocast: finite output, relative L2 error to float32 below 5% (bfloat16 keeps 8 bits of
  mantissa, about 0.4% per rounding, compounded over a few layers).
- NaN input: propagates (every output holds a NaN, nothing raises) for every block; none
  needs to reject it, since a NaN is a value, not a shape error.
- empty batch: N = 0 passes through every block, in train and eval mode, with the shape the
  block gives a non-empty batch (torchvision's blocks do; detection heads produce empty
  batches); an empty spatial size (H or W = 0) is rejected by every block that checks a
  feature map.
- layers: every block taking ``act_layer`` / ``norm_layer`` runs, forward and backward, with
  other activations (``nn.GELU``, which takes no ``inplace``; ``nn.Hardswish``, in place; a
  ``partial`` that fixes ``inplace=False``) and other norms (a ``partial(nn.GroupNorm, 1)``;
  torchvision's ``FrozenBatchNorm2d``, which takes no ``device``/``dtype``; ``None``), and the
  layer given is the one it uses.
- transforms (section 13), at the case's size and, where the block's code has a size
  threshold (WeightedFusion's lean backward from 65,536 elements per input), at a ``large``
  size above it (``test_sizes_straddle_the_fusion_threshold`` proves the two take the two
  paths); with NCHW and channels_last inputs where the block converts memory formats (BiFPN);
  eval mode: ``torch.func.jvp`` (through ``functional_call``) and ``torch.autograd.forward_ad``
  (the module as it is) against reverse mode (``<J t, u> = <t, J^T u>``, float64),
  ``vmap(grad)`` per-sample gradients of parameters and inputs against a loop of plain
  autograd (float64), ``torch.func.hessian`` of a scalar along three random directions of
  parameters and inputs against autograd's double backward (float64); float64 comparisons at
  rtol 1e-5 (the fusion normalises in float32). ``torch.jit.trace`` with its default check,
  grad enabled and disabled, then the traced module on other inputs. Half precision:
  parameter gradients under CPU autocast with float16 / bfloat16 inputs against float64 on
  the same rounded inputs, finite, relative L2 error of all gradients together below 3% / 10%
  and of each fusion's weights below 1% / 5%. ``torch.fx.symbolic_trace`` of the block as the
  root (optional arguments at their defaults, a mapping's keys given with ``PH``), its graph
  matching eager at the case's size and another one. Checks known to fail are strict xfails
  (``Case.known_failures``). Reference networks skip them (slow, made of the blocks).
"""

from __future__ import annotations

import copy
import inspect
import io
import itertools
import pickle
from functools import partial

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torchvision.ops.misc import FrozenBatchNorm2d

import dilconv
from contract_cases import (
    ALL_CHECKS,
    BASES,
    BLOCK_CASES,
    CASES,
    EXEMPT,
    Case,
    map_tensors,
    tensors,
)


def cases_for(check: str) -> list:
    assert check in ALL_CHECKS
    return [param(case) for case in CASES if case.runs(check)]


def param(case: Case, *values, name: str | None = None):
    marks = [pytest.mark.slow] if case.slow else []
    return pytest.param(case, *values, id=name or case.name, marks=marks)


def build(case: Case, seed: int = 0, **factory) -> nn.Module:
    torch.manual_seed(seed)
    return case.build(**factory)


def inputs(case: Case, size: tuple[int, int, int] | None = None, seed: int = 1) -> tuple:
    torch.manual_seed(seed)
    return case.inputs(*(size or case.size))


def rebuild(args: tuple, flat: list[torch.Tensor]) -> tuple:
    """``args`` with its tensors replaced, in order, by ``flat``."""
    replacements = iter(flat)
    return map_tensors(lambda _: next(replacements), args)


def assert_same_structure(got, expected) -> None:
    assert type(got) is type(expected)
    if isinstance(expected, dict):
        assert list(got) == list(expected)
    if isinstance(expected, (list, tuple)):
        assert len(got) == len(expected)


# Coverage ----------------------------------------------------------------------------------


def test_every_public_name_has_a_case():
    covered = {type(case.build(device="meta")).__name__ for case in BLOCK_CASES}
    missing = []
    for name in dilconv.__all__:
        obj = getattr(dilconv, name)
        is_block = isinstance(obj, type) and issubclass(obj, nn.Module)
        if is_block and name in BASES:
            continue
        if (is_block and name not in covered) or (not is_block and name not in EXEMPT):
            missing.append(name)
    assert not missing, (
        f"public names without a contract case (add a Case to tests/contract_cases.py, or, "
        f"for a function, an EXEMPT entry with the reason): {missing}"
    )


def test_bases_are_abstract_and_their_subclasses_have_cases():
    covered = {type(case.build(device="meta")).__name__ for case in BLOCK_CASES}
    for name, subclasses in BASES.items():
        base = getattr(dilconv, name)
        assert issubclass(base, nn.Module) and name in dilconv.__all__
        with pytest.raises(NotImplementedError):
            base()(torch.zeros(1, 1, 1, 1))
        for sub in subclasses:
            assert issubclass(getattr(dilconv, sub), base) and sub in covered, sub


def test_exempt_names_are_not_blocks():
    blocks = [
        name for name in EXEMPT
        if isinstance(getattr(dilconv, name, None), type)
        and issubclass(getattr(dilconv, name), nn.Module)
    ]
    assert not blocks, f"nn.Module blocks cannot be exempt from the contract: {blocks}"


def test_case_names_are_unique():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))


# 1. Eager forward and backward --------------------------------------------------------------


@pytest.mark.parametrize("case", cases_for("forward_backward"))
def test_forward_backward_reaches_every_parameter(case):
    module = build(case).train()
    args = map_tensors(lambda t: t.requires_grad_(), inputs(case))
    outputs = tensors(module(*args))
    loss = sum((out * torch.randn_like(out)).sum() for out in outputs)
    loss.backward()
    without = sorted(name for name, p in module.named_parameters() if p.grad is None)
    assert without == sorted(case.no_grad)
    for name, p in module.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name
    for x in tensors(args):
        assert x.grad is not None and torch.isfinite(x.grad).all()


# 2. gradcheck -------------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases_for("gradcheck"))
def test_gradcheck_float64(case):
    module = build(case, dtype=torch.float64).eval()
    args = map_tensors(lambda t: t.double().requires_grad_(), inputs(case, case.tiny))

    def run(*flat):
        return tuple(tensors(module(*rebuild(args, list(flat)))))

    assert torch.autograd.gradcheck(run, tuple(tensors(args)), fast_mode=True)


# 3. torch.compile ---------------------------------------------------------------------------


def duck_shapes(enabled: bool):
    return torch.fx.experimental._config.patch(use_duck_shape=enabled)


def other_sizes(size: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    n, h, w = size
    return [(n + 1, h + 3, w + 2), (n + 2, 2 * h + 1, w + 5)]


@pytest.mark.slow
@pytest.mark.parametrize("case", cases_for("compile"))
def test_compile_dynamic_matches_eager_without_graph_breaks(case):
    torch._dynamo.reset()
    module = build(case).eval()
    with torch.no_grad():
        explanation = torch._dynamo.explain(module)(*inputs(case))
        assert explanation.graph_break_count == 0, explanation.break_reasons
        torch._dynamo.reset()
        compiled = torch.compile(module, dynamic=True)
        for i, size in enumerate([case.size, *other_sizes(case.size)]):
            args = inputs(case, size)
            # Duck sizing gives equal example sizes one symbol (batch 2 and 2 channels, a 3x3
            # coarsest level), and the channel check then pins the batch: an artefact of the
            # example sizes, not of the block.
            with torch._dynamo.config.patch(error_on_recompile=i > 0), duck_shapes(False):
                got = compiled(*args)
            expected = module(*args)
            assert_same_structure(got, expected)
            torch.testing.assert_close(tensors(got), tensors(expected), atol=1e-4, rtol=1e-4)
    torch._dynamo.reset()


# 4. ONNX ------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", cases_for("onnx"))
def test_onnx_export_matches_eager_at_another_size(case):
    onnxruntime = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from torch.export import Dim

    module = build(case).eval()
    args = inputs(case)
    batch = Dim("batch", min=1, max=1024)
    dynamic = tuple(
        map_tensors(lambda t: {0: batch, 2: Dim.AUTO, 3: Dim.AUTO}, arg) for arg in args
    )
    if isinstance(args[-1], dict):
        # torch.onnx.export reads a trailing dict as keyword arguments; an empty one after it
        # makes the mapping positional (the documented idiom).
        args = (*args, {})
    program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic)
    graph = program.model_proto.graph
    if case.kind == "pyramid":
        assert "ScatterND" not in {node.op_type for node in graph.node}
    session = onnxruntime.InferenceSession(
        program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    n, h, w = case.size
    other = inputs(case, (n + 1, 2 * h + 1, 2 * w + 1))
    feeds = {
        arg.name: x.numpy() for arg, x in zip(session.get_inputs(), tensors(other), strict=True)
    }
    got = [torch.from_numpy(y) for y in session.run(None, feeds)]
    with torch.no_grad():
        expected = tensors(module(*other))
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


# 5. channels_last ---------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases_for("channels_last"))
def test_channels_last_gives_the_same_output(case):
    module = build(case).eval()
    args = inputs(case)
    last = map_tensors(lambda t: t.contiguous(memory_format=torch.channels_last), args)
    with torch.no_grad():
        expected, got = module(*args), module(*last)
    assert_same_structure(got, expected)
    torch.testing.assert_close(tensors(got), tensors(expected), atol=1e-5, rtol=1e-5)
    if case.channels_last_out:
        for out in tensors(got):
            assert out.dim() != 4 or out.is_contiguous(memory_format=torch.channels_last)


# 6. Autocast --------------------------------------------------------------------------------

AUTOCAST = [
    pytest.param("cpu", torch.bfloat16, id="cpu-bfloat16"),
    pytest.param(
        "cuda", torch.float16, id="cuda-float16",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    ),
]


@pytest.mark.parametrize(("device", "dtype"), AUTOCAST)
@pytest.mark.parametrize("case", cases_for("autocast"))
def test_autocast_is_finite_and_close_to_float32(case, device, dtype):
    module = build(case, device=device).eval()
    args = map_tensors(lambda t: t.to(device), inputs(case))
    with torch.no_grad():
        expected = tensors(module(*args))
        with torch.autocast(device, dtype=dtype):
            got = tensors(module(*args))
    for out, ref in zip(got, expected, strict=True):
        assert out.shape == ref.shape
        assert torch.isfinite(out).all()
        error = (out.float() - ref).norm() / ref.norm().clamp_min(1e-6)
        assert error < 0.05


# 7. State -----------------------------------------------------------------------------------


def trained(case: Case) -> nn.Module:
    """A module whose parameters and running statistics differ from a fresh one's."""
    module = build(case).train()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
        module(*inputs(case, seed=2))
    return module.eval()


@pytest.mark.parametrize("case", cases_for("state"))
def test_state_dict_round_trip_deepcopy_and_pickle(case):
    source = trained(case)
    args = inputs(case)
    buffer = io.BytesIO()
    torch.save(source.state_dict(), buffer)
    buffer.seek(0)
    fresh = build(case, seed=3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    clones = [fresh.eval(), copy.deepcopy(source), pickle.loads(pickle.dumps(source))]
    with torch.no_grad():
        expected = tensors(source(*args))
        for clone in clones:
            for got, ref in zip(tensors(clone(*args)), expected, strict=True):
                assert torch.equal(got, ref)


# 8. Determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases_for("determinism"))
def test_same_seed_same_output(case):
    runs = [tensors(build(case, seed=5).train()(*inputs(case, seed=6))) for _ in range(2)]
    for first, second in zip(*runs, strict=True):
        assert torch.equal(first, second)


# 9. Bad input -------------------------------------------------------------------------------


def channels_of(x: torch.Tensor) -> int:
    return x.shape[1]


def bad_inputs(case: Case) -> dict[str, tuple[tuple, str]]:
    """Mutations of a good input that the case must reject, with the message expected."""
    n, h, w = case.size
    (good,) = inputs(case, (n, h, w))
    bad: dict[str, tuple[tuple, str]] = {}
    if case.kind == "map":
        c = channels_of(good)
        bad["rank"] = ((good[0],), r"expected a 4-D input \(N, C, H, W\)")
        if not case.any_channels:
            wide = torch.randn(n, c + 1, h, w)
            bad["channels"] = ((wide,), rf"expected {c} input channels, got {c + 1}")
        bad["empty"] = ((good[..., :0],), "expected a non-empty spatial size")
        return bad
    keys = list(good) if isinstance(good, dict) else list(range(len(good)))
    maps = list(good.values()) if isinstance(good, dict) else list(good)
    count = len(maps)

    def with_level(index: int, x: torch.Tensor) -> tuple:
        changed = maps[:index] + [x] + maps[index + 1:]
        return (dict(zip(keys, changed)) if isinstance(good, dict) else changed,)

    one = maps[1]
    wide = torch.randn(one.shape[0], channels_of(one) + 1, *one.shape[2:])
    fewer = (dict(zip(keys[:-1], maps[:-1])) if isinstance(good, dict) else maps[:-1],)
    if case.kind == "group":
        bad["rank"] = (with_level(1, one[0]), "expected inputs of one shape")
        bad["channels"] = (with_level(1, wide), "expected inputs of one shape")
        bad["levels"] = (fewer, rf"expected {count} inputs, got {count - 1}")
        return bad
    level = f"level {keys[1]}"
    bad["rank"] = (with_level(1, one[0]), rf"{level} expected a 4-D input")
    bad["channels"] = (
        with_level(1, wide),
        rf"{level} expected {channels_of(one)} input channels, got {channels_of(one) + 1}",
    )
    bad["levels"] = (
        fewer, rf"expected {count} feature maps \(one per in_channels entry\), got {count - 1}"
    )
    bad["batch"] = (with_level(1, torch.cat([one, one])), "expected one batch size")
    finest = maps[0].shape[-2:]
    larger = torch.randn(*one.shape[:2], finest[0] + 1, finest[1])
    bad["order"] = (
        with_level(1, larger),
        rf"expected levels fine to coarse \(height and width not growing from one level to the "
        rf"next\), got level {keys[1]} of size \({finest[0] + 1}, {finest[1]}\) after level "
        rf"{keys[0]} of size \({finest[0]}, {finest[1]}\)",
    )
    bad["empty"] = (
        map_tensors(lambda t: t[..., :0], (good,)), "expected a non-empty spatial size"
    )
    return bad


BAD_INPUT_CASES = [
    param(case, mutation, name=f"{case.name}-{mutation}")
    for case in CASES
    if case.runs("bad_input")
    for mutation in ("rank", "channels", "levels", "batch", "order", "empty")
    if mutation in bad_inputs(case)
]


@pytest.mark.parametrize(("case", "mutation"), BAD_INPUT_CASES)
def test_bad_input_raises_naming_what_was_expected(case, mutation):
    module = build(case).eval()
    args, message = bad_inputs(case)[mutation]
    with pytest.raises(ValueError, match=message):
        module(*args)


@pytest.mark.parametrize(
    "case", [param(c) for c in CASES if c.kind == "group" and c.runs("bad_input")]
)
def test_fusion_of_empty_inputs_is_empty(case):
    (maps,) = inputs(case)
    empty = [x[:0] for x in maps]
    assert build(case)(empty).shape == empty[0].shape


@pytest.mark.parametrize("case", cases_for("nan"))
def test_nan_input_propagates(case):
    module = build(case).eval()

    def poison(x: torch.Tensor) -> torch.Tensor:
        # The corner too: a strided convolution may skip the centre (odd rows or columns).
        x = x.clone()
        x[..., 0, 0] = x[..., x.shape[-2] // 2, x.shape[-1] // 2] = float("nan")
        return x

    with torch.no_grad():
        outputs = tensors(module(*map_tensors(poison, inputs(case))))
    assert all(torch.isnan(out).any() for out in outputs)


# 10. meta device ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases_for("meta"))
def test_meta_construction_touches_no_data(case):
    module = build(case, device="meta")
    state = list(module.parameters()) + list(module.buffers())
    assert state and all(t.is_meta for t in state)
    real = build(case).eval()
    args = inputs(case)
    with torch.no_grad():
        expected = real(*args)
        got = module.eval()(*map_tensors(lambda t: t.to("meta"), args))
    assert_same_structure(got, expected)
    assert [t.shape for t in tensors(got)] == [t.shape for t in tensors(expected)]
    assert all(t.is_meta for t in tensors(got))


@pytest.mark.parametrize("case", cases_for("meta"))
def test_factory_dtype_reaches_every_tensor(case):
    module = build(case, dtype=torch.float64)
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert not t.is_floating_point() or t.dtype == torch.float64, name



# 11. Empty batch ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", cases_for("empty_batch"))
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_empty_batch_passes_through(case, mode):
    module = build(case).train(mode == "train")
    n, h, w = case.size
    with torch.no_grad():
        full = tensors(module.eval()(*inputs(case)))
        module.train(mode == "train")
        empty = tensors(module(*inputs(case, (0, h, w))))
    assert [t.shape for t in empty] == [(0, *t.shape[1:]) for t in full]


# 12. Layer injection ------------------------------------------------------------------------

OTHER_LAYERS = {
    "act_layer": {
        "gelu": nn.GELU,
        "hardswish": nn.Hardswish,
        "leaky_not_inplace": partial(nn.LeakyReLU, negative_slope=0.1, inplace=False),
    },
    "norm_layer": {
        "groupnorm": partial(nn.GroupNorm, 1),
        "frozen_bn": FrozenBatchNorm2d,
        "none": None,
    },
}
NORMS = (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)


def injection_points(case: Case) -> list[str]:
    module = case.build(device="meta")
    accepted = inspect.signature(type(module)).parameters
    return [arg for arg in OTHER_LAYERS if arg in accepted]


LAYER_CASES = [
    param(case, arg, label, name=f"{case.name}-{label}")
    for case in CASES
    if case.runs("layers")
    for arg in injection_points(case)
    for label in OTHER_LAYERS[arg]
]


def layer_type(layer) -> type | None:
    return layer.func if isinstance(layer, partial) else layer


@pytest.mark.parametrize(("case", "arg", "label"), LAYER_CASES)
def test_any_activation_and_norm_is_accepted(case, arg, label):
    layer = OTHER_LAYERS[arg][label]
    module = build(case, **{arg: layer}).train()
    default = build(case).eval()
    args = map_tensors(lambda t: t.requires_grad_(), inputs(case))
    outputs = tensors(module(*args))
    sum((out * torch.randn_like(out)).sum() for out in outputs).backward()
    with torch.no_grad():
        expected = tensors(default(*inputs(case)))
    assert [t.shape for t in outputs] == [t.shape for t in expected]
    assert all(torch.isfinite(t).all() for t in outputs)
    for x in tensors(args):
        assert x.grad is not None and torch.isfinite(x.grad).all()
    kind = layer_type(layer)
    if kind is not None:
        assert any(type(m) is kind for m in module.modules()), f"{kind.__name__} is not used"
        if layer is OTHER_LAYERS["act_layer"]["leaky_not_inplace"]:
            leaky = [m for m in module.modules() if isinstance(m, nn.LeakyReLU)]
            assert all(not m.inplace and m.negative_slope == 0.1 for m in leaky)
    else:
        def count(net: nn.Module) -> int:
            return sum(isinstance(m, NORMS) for m in net.modules())

        assert count(module) <= count(default)
        if count(default) and "transposed" not in case.name:
            assert count(module) == 0, "norm_layer=None left norms in place"


# 13. Transforms users apply to modules ------------------------------------------------------
# Each runs at the case's size and, where the block's code has a size threshold, at its
# ``large`` size above it; for a block that converts memory formats, with NCHW and
# channels_last inputs. Blocks run in eval mode (running statistics: a per-sample gradient of
# a batch statistic is not per sample). torch.func checks run in float64 and compare to
# rtol = 1e-5: WeightedFusion normalises its weights in float32 whatever the dtype, and the
# two sides round that differently (~5e-7 seen).
FLOAT64_CLOSE = {"rtol": 1e-5, "atol": 1e-8}

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
KNOWN_FAILURE = "fixed in bifpn.py by the lead"


def transform_cases(
    check: str, *extra: tuple, formats: bool = True, slow_large_necks: bool = False
) -> list:
    """``(case, size, layout, *extra)`` for every size and memory format ``check`` runs at;
    ``slow_large_necks`` marks a BiFPN's large size slow (a second or more a test)."""
    params = []
    for case in CASES:
        if not case.runs(check):
            continue
        sizes = {"small": case.size} | ({"large": case.large} if case.large else {})
        layouts = list(LAYOUTS) if case.converts and formats else ["nchw"]
        for (label, size), layout in itertools.product(sizes.items(), layouts):
            for values in extra or [()]:
                slow = case.slow or (slow_large_necks and label == "large" and case.converts)
                marks = [pytest.mark.slow] if slow else []
                if check in case.known_failures and layout == "nchw":
                    marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURE))
                ids = "-".join([case.name, label, layout, *map(str, values)])
                params.append(pytest.param(case, size, layout, *values, id=ids, marks=marks))
    return params


def transform_inputs(case: Case, size, layout: str, seed: int = 1, **to) -> tuple:
    fmt = LAYOUTS[layout]
    return map_tensors(lambda t: t.to(**to).contiguous(memory_format=fmt), inputs(case, size, seed))


def parameters(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in module.named_parameters()}


def run_with(module: nn.Module, params: dict, args: tuple) -> list[torch.Tensor]:
    return tensors(torch.func.functional_call(module, params, args))


def like(tree, seed: int):
    """Random tensors shaped as the tensors of ``tree`` (a dict of parameters or the args)."""
    torch.manual_seed(seed)
    if isinstance(tree, dict) and all(isinstance(v, torch.Tensor) for v in tree.values()):
        return {k: torch.randn_like(v) for k, v in tree.items()}
    return map_tensors(torch.randn_like, tree)


def square_loss(outputs: list[torch.Tensor]) -> torch.Tensor:
    return sum(out.double().square().sum() for out in outputs)


def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("case", [param(case) for case in CASES if case.large])
def test_sizes_straddle_the_fusion_threshold(case, monkeypatch):
    # The transform checks run at ``size`` and ``large`` to test both of WeightedFusion's
    # paths: training takes the plain one at the first, the lean Function at the second.
    lean = dilconv.fusion._WeightedSum
    calls = []
    monkeypatch.setattr(lean, "apply", lambda *args: calls.append(1) or lean.forward(*args))
    for size, expected in [(case.size, False), (case.large, True)]:
        calls.clear()
        build(case).train()(*map_tensors(lambda t: t.requires_grad_(), inputs(case, size)))
        assert bool(calls) == expected, size


@pytest.mark.parametrize(("case", "size", "layout"), transform_cases("jvp"))
def test_jvp_agrees_with_reverse_mode(case, size, layout):
    # <J t, u> = <t, J^T u>: forward mode against plain autograd, along the parameters and
    # inputs (torch.func.jvp through functional_call), and along the inputs of the module
    # called as it is (torch.autograd.forward_ad: its parameters require grad, so
    # WeightedFusion takes its lean Function at the large size; torch.func.jvp does not).
    module = build(case, dtype=torch.float64).eval()
    params = parameters(module)
    args = transform_inputs(case, size, layout, dtype=torch.float64)
    tangents = (like(params, 2), like(args, 3))
    _, along_both = torch.func.jvp(
        lambda p, a: tuple(run_with(module, p, a)), (params, args), tangents
    )
    flat_tangents = tensors(tangents[1])
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(x, t) for x, t in zip(tensors(args), flat_tangents)]
        outputs = tensors(module(*rebuild(args, duals)))
        along_inputs = [forward_ad.unpack_dual(out).tangent for out in outputs]
    leaves = dict(module.named_parameters())
    flat = [t.clone().requires_grad_() for t in tensors(args)]
    outputs = tensors(module(*rebuild(args, flat)))
    directions = [torch.randn_like(out) for out in outputs]
    grads = torch.autograd.grad(outputs, [*leaves.values(), *flat], directions)
    inputs_term = dot(grads[len(leaves) :], flat_tangents)
    params_term = dot(grads[: len(leaves)], list(tangents[0].values()))
    torch.testing.assert_close(dot(along_inputs, directions), inputs_term, **FLOAT64_CLOSE)
    torch.testing.assert_close(
        dot(list(along_both), directions), params_term + inputs_term, **FLOAT64_CLOSE
    )


@pytest.mark.parametrize(("case", "size", "layout"), transform_cases("vmap_grad"))
def test_per_sample_gradients_match_a_loop(case, size, layout):
    module = build(case, dtype=torch.float64).eval()
    params, args = parameters(module), transform_inputs(case, size, layout, dtype=torch.float64)

    def loss(p: dict, sample: tuple) -> torch.Tensor:
        return square_loss(run_with(module, p, map_tensors(lambda t: t.unsqueeze(0), sample)))

    per_sample = torch.func.vmap(torch.func.grad(loss, argnums=(0, 1)), in_dims=(None, 0))
    param_grads, input_grads = per_sample(params, args)
    leaves = list(module.parameters())
    for i in range(size[0]):
        flat = [t[i : i + 1].clone().requires_grad_() for t in tensors(args)]
        loss_i = square_loss(tensors(module(*rebuild(args, flat))))
        expected = torch.autograd.grad(loss_i, leaves + flat)
        got = [g[i] for g in param_grads.values()] + [g[i][None] for g in tensors(input_grads)]
        torch.testing.assert_close(got, list(expected), **FLOAT64_CLOSE)


@pytest.mark.parametrize(
    ("case", "size", "layout"), transform_cases("hessian", slow_large_necks=True)
)
def test_hessian_matches_double_backward(case, size, layout):
    # The Hessian of a scalar along three random directions of (parameters, inputs):
    # torch.func (forward over reverse, vmapped) against autograd's reverse over reverse.
    module = build(case, dtype=torch.float64).eval()
    params, args = parameters(module), transform_inputs(case, size, layout, dtype=torch.float64)
    directions = [(like(params, 10 + j), tensors(like(args, 20 + j))) for j in range(3)]

    def scalar(z: torch.Tensor) -> torch.Tensor:
        p = {
            k: v + sum(z[j] * d[k] for j, (d, _) in enumerate(directions))
            for k, v in params.items()
        }
        flat = [
            x + sum(z[j] * d[i] for j, (_, d) in enumerate(directions))
            for i, x in enumerate(tensors(args))
        ]
        return square_loss(run_with(module, p, rebuild(args, flat)))

    z = torch.zeros(3, dtype=torch.float64)
    got = torch.func.hessian(scalar)(z)
    expected = torch.autograd.functional.hessian(scalar, z)
    torch.testing.assert_close(got, expected, **FLOAT64_CLOSE)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
@pytest.mark.parametrize(
    ("case", "size", "layout", "grad"),
    transform_cases("jit_trace", (True,), (False,), slow_large_necks=True),
)
def test_jit_trace_passes_its_check(case, size, layout, grad):
    # torch.jit.trace's default check re-traces under no_grad and compares the graphs.
    module = build(case).eval()
    args = transform_inputs(case, size, layout)
    with torch.set_grad_enabled(grad):
        traced = torch.jit.trace(module, args, strict=False)
        other = transform_inputs(case, size, layout, seed=2)
        got, expected = traced(*other), module(*other)
    torch.testing.assert_close(tensors(got), tensors(expected))


# Relative L2 error of all parameters' gradients together (the convolutions' and norms' own
# reductions, a few layers deep: seen at most 1.9% and 5.1%) and of each fusion's weights'
# (reduced by dilconv: seen at most 0.4% and 3.2%; NaN and 100% before they were reduced in
# float32, at the large size).
HALF_TOLERANCE = {torch.float16: 0.03, torch.bfloat16: 0.1}
FUSION_TOLERANCE = {torch.float16: 0.01, torch.bfloat16: 0.05}


@pytest.mark.parametrize(
    ("case", "size", "layout", "dtype"),
    transform_cases("half_grad", (torch.float16,), (torch.bfloat16,)),
)
def test_half_precision_parameter_gradients(case, size, layout, dtype):
    """Parameter gradients with half-precision inputs under autocast (float32 parameters)
    against float64 on the same (rounded) inputs: finite, and close (float16 rounds to 11
    bits, bfloat16 to 8, a few times over a block)."""
    module = build(case).eval()
    reference = copy.deepcopy(module).double()
    args = transform_inputs(case, size, layout, dtype=dtype)
    with torch.autocast("cpu", dtype=dtype):
        square_loss(tensors(module(*args))).backward()
    square_loss(tensors(reference(*map_tensors(lambda t: t.double(), args)))).backward()
    grads, expected = [], []
    for (name, p), ref in zip(module.named_parameters(), reference.parameters(), strict=True):
        assert torch.isfinite(p.grad).all(), name
        grads.append(p.grad.double().flatten())
        expected.append(ref.grad.flatten())
    # The whole gradient, and each fusion's weights, whose gradients dilconv itself reduces
    # over whole maps; other parameters' reductions are the kernels' (convolution, norm).
    fused = {name for name, m in module.named_modules() if isinstance(m, dilconv.WeightedFusion)}
    pairs = {"all parameters": (torch.cat(grads), torch.cat(expected), HALF_TOLERANCE)}
    for (name, p), ref in zip(module.named_parameters(), reference.parameters(), strict=True):
        if name.rpartition(".")[0] in fused and p.grad is not None:
            pairs[name] = (p.grad.double(), ref.grad, FUSION_TOLERANCE)
    for name, (got, ref, tolerance) in pairs.items():
        error = (got - ref).norm() / ref.norm().clamp_min(1e-12)
        assert error < tolerance[dtype], (name, error.item())


def concrete_arguments(module: nn.Module, args: tuple) -> dict:
    """What fx needs to know of ``forward``'s arguments: the optional ones at their default
    (``output_size=None``), and a mapping's keys (as torch.fx's docs do, with ``PH``)."""
    concrete = {}
    for (name, p), arg in itertools.zip_longest(
        inspect.signature(module.forward).parameters.items(), args
    ):
        if isinstance(arg, dict):
            concrete[name] = dict.fromkeys(arg, torch.fx.PH)
        elif arg is None and p.default is not inspect.Parameter.empty:
            concrete[name] = p.default
    return concrete


@pytest.mark.parametrize(("case", "size", "layout"), transform_cases("fx", formats=False))
def test_fx_symbolic_trace_matches_eager(case, size, layout):
    # The block as the root of torch.fx.symbolic_trace (what create_feature_extractor does to
    # a model holding it); the graph then serves another size too.
    module = build(case).eval()
    concrete = concrete_arguments(module, inputs(case, size))
    graph = torch.fx.symbolic_trace(module, concrete_args=concrete)
    n, h, w = size
    for other in [size, (n + 1, h + 3, w + 2)]:
        args = inputs(case, other)
        with torch.no_grad():
            got, expected = graph(*args), module(*args)
        assert_same_structure(got, expected)
        torch.testing.assert_close(tensors(got), tensors(expected))
