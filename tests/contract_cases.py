"""The cases of the block contract (tests/test_contract.py): one line per block configuration.

A case names a factory for a small instance (called with the factory kwargs ``device``/``dtype``)
and a factory for its input at a given ``(batch, height, width)``. What kind of input it takes
(``"map"``: one NCHW tensor; ``"pyramid"``: L maps fine to coarse, as a list or a mapping;
``"group"``: same-shaped tensors, for fusion) tells the contract which bad inputs to try and
which message to expect. Adding a block to ``dilconv.__all__`` without a case here fails
``test_every_public_name_has_a_case``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from examples.dfpn_classifier.models import MODELS
from torch import Tensor, nn

from dilconv import (
    CBAM,
    BiFPN,
    BiFPNLayer,
    ChannelAttention,
    ContextModule,
    DilatedBasicBlock,
    DilatedBottleneck,
    DilatedResNet,
    FPNNeck,
    LearnableResizer,
    MaxPoolLevel,
    P6P7Levels,
    SpatialAttention,
    TransposedConvUpsampler,
    WeightedFusion,
)

# Public names that are not nn.Module blocks, and why the block contract does not apply.
EXEMPT = {
    "identity_init_": "an in-place initialiser of an nn.Conv2d, tested in tests/test_context.py",
    "ReceptiveField": "a frozen dataclass (the result of receptive_field), not a module",
    "receptive_field": "an analysis function over a module, not a block",
    "layer_receptive_fields": "an analysis function over a module, not a block",
    "empirical_receptive_field": "an analysis function over a module, not a block",
    "effective_receptive_field": "an analysis function over a module, not a block",
    "gradient_map": "an analysis function over a module, not a block",
    "gridding_holes": "an analysis function over a module, not a block",
}

# Public nn.Module base classes that only subclasses implement (forward raises), and the blocks
# whose cases cover them.
BASES = {"ExtraLevels": ("MaxPoolLevel", "P6P7Levels")}

ALL_CHECKS = frozenset(
    {
        "forward_backward", "gradcheck", "compile", "onnx", "channels_last", "autocast",
        "state", "determinism", "bad_input", "nan", "meta", "empty_batch", "layers",
        "jvp", "vmap_grad", "hessian", "jit_trace", "half_grad", "fx",
    }
)
# The transforms users apply to modules (torch.func, jit.trace, torch.fx, half precision).
TRANSFORMS = frozenset({"jvp", "vmap_grad", "hessian", "jit_trace", "half_grad", "fx"})
# Reference networks (millions of parameters, seconds per check on 2 CPU cores) run as slow
# cases, and only the checks that say something the blocks they are made of do not: gradcheck,
# inductor and the ONNX exporter would take minutes; determinism, NaN propagation and the
# transforms follow from the blocks'.
REFERENCE_SKIP = frozenset({"gradcheck", "compile", "onnx", "determinism", "nan"}) | TRANSFORMS

Inputs = tuple


def one_map(channels: int) -> Callable[[int, int, int], Inputs]:
    """Input factory of a block taking one (N, channels, H, W) map."""
    return lambda n, h, w: (torch.randn(n, channels, h, w),)


def pyramid(channels: list[int], keys: list[str] | None = None) -> Callable[..., Inputs]:
    """Input factory of a neck: level i has size ceil(H / 2**i) x ceil(W / 2**i)."""

    def make(n: int, h: int, w: int) -> Inputs:
        maps = [
            torch.randn(n, c, math.ceil(h / 2**i), math.ceil(w / 2**i))
            for i, c in enumerate(channels)
        ]
        return (maps if keys is None else dict(zip(keys, maps, strict=True)),)

    return make


def group(count: int, channels: int) -> Callable[[int, int, int], Inputs]:
    """Input factory of a fusion: ``count`` tensors of one shape."""
    return lambda n, h, w: ([torch.randn(n, channels, h, w) for _ in range(count)],)


@dataclass(frozen=True)
class Case:
    """One block configuration run through the contract.

    Attributes:
        name: test id.
        build: ``build(device=..., dtype=...)`` -> a small module.
        inputs: ``inputs(n, h, w)`` -> the positional arguments of ``forward``.
        kind: ``"map"``, ``"pyramid"`` or ``"group"`` (which bad inputs apply, see module doc).
        size: ``(n, h, w)`` of the eager checks (odd spatial sizes on purpose).
        tiny: ``(n, h, w)`` of the float64 gradcheck.
        no_grad: parameter names that legitimately receive no gradient.
        any_channels: the block accepts any channel count (no wrong-channel check).
        channels_last_out: 4-D outputs keep a ``channels_last`` input's memory format.
        skip: checks that do not apply, with the reason in a comment where the case is listed.
        slow: every check of the case is marked ``slow`` (``make test-quick`` skips it).
        large: ``(n, h, w)`` above every size threshold in the block's code (per sample, so
            that ``vmap`` takes the large branch too), where it has one; the transform checks
            run at ``size`` and at ``large``.
        converts: the block changes the memory format inside (BiFPN on the CPU: NCHW levels run
            in channels_last); the transform checks run with NCHW and channels_last inputs.
        known_failures: transform checks known to fail with NCHW inputs (torch.fx runs with
            proxies, NCHW only); strict xfail, so the test reports when they pass.
    """

    name: str
    build: Callable[..., nn.Module]
    inputs: Callable[[int, int, int], Inputs]
    kind: str = "map"
    size: tuple[int, int, int] = (2, 9, 11)
    tiny: tuple[int, int, int] = (1, 5, 6)
    no_grad: frozenset[str] = frozenset()
    any_channels: bool = False
    channels_last_out: bool = True
    skip: frozenset[str] = field(default_factory=frozenset)
    slow: bool = False
    large: tuple[int, int, int] | None = None
    converts: bool = False
    known_failures: frozenset[str] = frozenset()

    def runs(self, check: str) -> bool:
        return check not in self.skip


def _fusion_sum(**dd) -> nn.Module:
    return WeightedFusion(3, mode="sum", **dd)


def _fpn_p6p7_from_input(device=None, dtype=None, **layers) -> nn.Module:
    extra = P6P7Levels(16, 8, source="input", device=device, dtype=dtype)
    return FPNNeck(LEVELS, 8, extra_levels=extra, device=device, dtype=dtype, **layers)


LEVELS = [4, 8, 16]
# Sizes above WeightedFusion's 65,536 elements per input (per sample) at the finest fusion:
# 4 channels need 128 x 129, a BiFPN's 8 need 91 x 91.
LARGE_4 = (2, 128, 129)
LARGE_8 = (2, 91, 91)
# Checks a BiFPN case is known to fail (none: its CPU channels_last conversion is skipped inside
# torch.func transforms and under tracing, and its size comparisons are fx leaves).
BIFPN_NCHW: frozenset[str] = frozenset()
KEYS = ["c3", "c4", "c5"]
# Variants of a block that already runs the expensive checks skip them (2 CPU cores in CI).
VARIANT = frozenset({"compile", "onnx"})
# Inductor takes 10-60 s a graph on 2 CPU cores: blocks compiled as part of a larger case
# (bottleneck in the ResNet, attentions in CBAM, BiFPNLayer in BiFPN) skip their own compile.
COMPILED_ELSEWHERE = frozenset({"compile"})
# Variants that fix a layer argument themselves; the default configuration takes the others.
FIXED_LAYERS = VARIANT | {"layers"}

BLOCK_CASES = [
    Case("bottleneck", lambda **dd: DilatedBottleneck(8, 4, stride=2, dilation=2, **dd),
         one_map(8)),
    Case("bottleneck_identity", lambda **dd: DilatedBottleneck(16, 4, groups=2, **dd),
         one_map(16), skip=VARIANT),
    Case("basic_block", lambda **dd: DilatedBasicBlock(6, 8, stride=2, dilation=3, **dd),
         one_map(6)),
    Case("resnet", lambda **dd: DilatedResNet(
        stem_channels=8, planes=(4, 8), blocks=(1, 1), strides=(1, 2), dilations=(1, 1),
        output_stride=8, **dd), one_map(3), size=(2, 17, 15), tiny=(1, 7, 6)),
    Case("resnet_basic", lambda **dd: DilatedResNet(
        stem_channels=8, planes=(4, 4, 8, 8), blocks=(2, 1, 1, 1), block="basic", **dd),
        one_map(3), size=(2, 33, 31), tiny=(1, 7, 6), skip=VARIANT),
    Case("fpn_nearest", lambda **dd: FPNNeck(LEVELS, 8, **dd), pyramid(LEVELS),
         kind="pyramid"),
    Case("fpn_bilinear", lambda **dd: FPNNeck(LEVELS, 8, "bilinear", smooth_top=False, **dd),
         pyramid(LEVELS), kind="pyramid"),
    Case("fpn_transposed", lambda **dd: FPNNeck(LEVELS, 8, "transposed", **dd),
         pyramid(LEVELS), kind="pyramid"),
    Case("fpn_norm", lambda **dd: FPNNeck(LEVELS, 8, norm_layer=nn.BatchNorm2d, **dd),
         pyramid(LEVELS), kind="pyramid", skip=FIXED_LAYERS),
    Case("fpn_transposed_mapping", lambda **dd: FPNNeck(
        LEVELS, 8, "transposed", extra_level=True, **dd), pyramid(LEVELS, KEYS),
        kind="pyramid", skip=COMPILED_ELSEWHERE),
    # RetinaNet v2's P6/P7 from C5, through the whole contract (the extra block in a neck).
    Case("fpn_p6p7_from_input_mapping", _fpn_p6p7_from_input, pyramid(LEVELS, KEYS),
         kind="pyramid", size=(2, 19, 17)),
    Case("p6p7_levels", lambda **dd: P6P7Levels(6, 4, **dd), one_map(6),
         skip=COMPILED_ELSEWHERE),
    # No tensors at all, so the meta check (which wants some state) and the parameter-gradient
    # check in half precision (no parameters) do not apply.
    Case("max_pool_level", lambda **dd: MaxPoolLevel(), one_map(5), any_channels=True,
         skip=VARIANT | {"meta", "half_grad"}),
    Case("upsampler", lambda **dd: TransposedConvUpsampler(4, 6, **dd), one_map(4)),
    Case("upsampler_scale3_no_norm", lambda **dd: TransposedConvUpsampler(
        4, 6, scale=3, norm_layer=None, **dd), one_map(4), skip=FIXED_LAYERS),
    Case("bifpn", lambda **dd: BiFPN(LEVELS, 8, num_layers=1, **dd), pyramid(LEVELS),
         kind="pyramid", large=LARGE_8, converts=True, known_failures=BIFPN_NCHW),
    Case("bifpn_softmax_mapping", lambda **dd: BiFPN(
        LEVELS, 8, num_layers=1, fusion="softmax", extra_level=True, **dd),
        pyramid(LEVELS, KEYS), kind="pyramid", skip=VARIANT, large=LARGE_8, converts=True,
        known_failures=BIFPN_NCHW),
    Case("bifpn_p3_p7_effdet_order", lambda **dd: BiFPN(
        LEVELS, 8, num_layers=1, num_levels=5, node_order="act_conv_norm",
        **dd), pyramid(LEVELS, KEYS), kind="pyramid", size=(2, 33, 31), skip=VARIANT,
        large=LARGE_8, converts=True, known_failures=BIFPN_NCHW),
    # dilconv 0.1's shared projections, TensorFlow "same" max-pools (ONNX export included: their
    # padding follows the size's parity), no redundant biases.
    Case("bifpn_shared_same_padding", lambda **dd: BiFPN(
        LEVELS, 8, num_layers=2, num_levels=4, projection="shared", redundant_bias=False,
        downsample_padding="same", **dd), pyramid(LEVELS), kind="pyramid", size=(2, 16, 14),
        skip=COMPILED_ELSEWHERE, converts=True, known_failures=BIFPN_NCHW),
    Case("bifpn_layer", lambda **dd: BiFPNLayer(4, num_levels=3, **dd), pyramid([4, 4, 4]),
         kind="pyramid", skip=COMPILED_ELSEWHERE, large=LARGE_4, converts=True,
         known_failures=BIFPN_NCHW),
    # An unweighted sum: the fusion weights are buffers, so every parameter gets a gradient.
    Case("bifpn_layer_sum", lambda **dd: BiFPNLayer(4, num_levels=3, fusion="sum", **dd),
         pyramid([4, 4, 4]), kind="pyramid", skip=VARIANT, converts=True,
         known_failures=BIFPN_NCHW),
    Case("fusion_fast", lambda **dd: WeightedFusion(3, **dd), group(3, 4), kind="group",
         large=LARGE_4),
    Case("fusion_softmax", lambda **dd: WeightedFusion(2, mode="softmax", **dd), group(2, 4),
         kind="group", skip=VARIANT, large=LARGE_4),
    # No parameters: no parameter gradients to compare in half precision.
    Case("fusion_sum", _fusion_sum, group(3, 4), kind="group", skip=VARIANT | {"half_grad"}),
    Case("channel_attention", lambda **dd: ChannelAttention(8, reduction=4, **dd), one_map(8),
         skip=COMPILED_ELSEWHERE),
    Case("spatial_attention", lambda **dd: SpatialAttention(3, **dd), one_map(5),
         any_channels=True, skip=COMPILED_ELSEWHERE),
    Case("cbam", lambda **dd: CBAM(8, reduction=4, spatial_kernel=3, **dd), one_map(8)),
    Case("resizer", lambda **dd: LearnableResizer(3, (13, 17), num_filters=4, **dd),
         one_map(3)),
    Case("resizer_cbam_area", lambda **dd: LearnableResizer(
        2, (5, 7), num_filters=4, num_res_blocks=2, interpolation="area", attention="cbam",
        **dd), one_map(2), skip=VARIANT),
    Case("context_basic", lambda **dd: ContextModule(4, **dd), one_map(4)),
    Case("context_large", lambda **dd: ContextModule(2, "large", **dd), one_map(2),
         tiny=(1, 4, 5), skip=VARIANT),
]


def _reference(name: str) -> Callable[..., nn.Module]:
    def build(device=None, dtype=None) -> nn.Module:
        # models.py builds with the default device/dtype; the context manager and .to() give
        # the factory-kwargs behaviour (meta included) without touching the example code.
        with torch.device(device or "cpu"):
            return MODELS[name](num_classes=3).to(dtype=dtype)

    return build


def _unused_pyramid_levels(name: str) -> frozenset[str]:
    # The classifiers pool P2 only: the smoothing convs of P3..P5 are counted in Table 1 but
    # never reach the logits, so they get no gradient.
    module = _reference(name)(device="meta")
    return frozenset(
        key for key, _ in module.named_parameters()
        if key.startswith("neck.smooth.") and not key.startswith("neck.smooth.0.")
    )


REFERENCE_CASES = [
    Case(f"ref_{name}", _reference(name), one_map(3), size=(2, 32, 32), skip=REFERENCE_SKIP,
         no_grad=_unused_pyramid_levels(name), slow=True)
    for name in MODELS
]

CASES = BLOCK_CASES + REFERENCE_CASES


def tensors(out: Tensor | list | tuple | dict) -> list[Tensor]:
    """The tensors of a block's output, in order (a map, a list of maps or a mapping)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in tensors(v)]
    return [t for v in out for t in tensors(v)]


def map_tensors(fn: Callable[[Tensor], Tensor], value):
    """Apply ``fn`` to every tensor of a (nested) tuple / list / dict, keeping the structure."""
    if isinstance(value, Tensor):
        return fn(value)
    if isinstance(value, dict):
        return {k: map_tensors(fn, v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_tensors(fn, v) for v in value)
    return value
