"""Receptive fields: the analytic tool against measurement, on every block and reference network.

"Agree" is checked on inputs large enough that the measured box of the centre pixel (and of
its neighbour, which the measured jump uses) stays inside the image: warnings are errors
there, and ``empirical_receptive_field`` warns about any box that touches the border.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
import warnings
from pathlib import Path

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dilconv import (
    CBAM,
    BiFPN,
    ContextModule,
    DilatedBasicBlock,
    DilatedBottleneck,
    DilatedResNet,
    FPNNeck,
    LearnableResizer,
    ReceptiveField,
    SpatialAttention,
    WeightedFusion,
    effective_receptive_field,
    empirical_receptive_field,
    gradient_map,
    gridding_holes,
    layer_receptive_fields,
    receptive_field,
)

ROOT = Path(__file__).resolve().parents[1]
HAS_MODELS = importlib.util.find_spec("examples.dfpn_classifier.models") is not None


def assert_agree(module, size, channels, output_index=None, *, phased=False) -> ReceptiveField:
    """Analytic == measured; ``phased`` nets (fractional up-sampling) take the analytic jump."""
    analytic = receptive_field(module, size, in_channels=channels, output_index=output_index)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        measured = empirical_receptive_field(
            module, size, in_channels=channels, output_index=output_index,
            jump=analytic.jump if phased else None,
        )
    assert measured.size == analytic.size
    assert measured.jump == pytest.approx(analytic.jump)
    assert measured.start == pytest.approx(analytic.start)
    return analytic


def conv_stack(dilations, channels=1, kernel=3):
    return nn.Sequential(*(
        nn.Conv2d(channels, channels, kernel, padding=d * (kernel // 2), dilation=d)
        for d in dilations
    ))


class Pyramid(nn.Module):
    """Image -> ``levels`` maps (strided 3x3 convs, fine to coarse) -> ``neck``."""

    def __init__(self, neck: nn.Module, levels: int = 3, channels: int = 4) -> None:
        super().__init__()
        self.in_channels = 3
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.down = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, stride=2, padding=1) for _ in range(levels - 1)
        )
        self.neck = neck

    def forward(self, x):
        features = [self.stem(x)]
        for down in self.down:
            features.append(down(features[-1]))
        return self.neck(features)


class Fused(nn.Module):
    """Two branches with different fields, merged by WeightedFusion."""

    def __init__(self) -> None:
        super().__init__()
        self.in_channels = 2
        self.near = nn.Conv2d(2, 2, 3, padding=1)
        self.far = nn.Conv2d(2, 2, 3, padding=3, dilation=3)
        self.fusion = WeightedFusion(2)

    def forward(self, x):
        return self.fusion([self.near(x), self.far(x)])


class Flip(nn.Module):
    def forward(self, x):
        return x.flip(-1)


# --- the analytic tool on known cases -------------------------------------------------------


def test_dilations_1_2_4_give_3_7_15():
    # Seed 002: F_{i+1} has a (2^(i+2) - 1)-square field.
    fields = layer_receptive_fields(conv_stack((1, 2, 4)), (40, 40))
    assert [f.size for f in fields.values()] == [(2 ** (i + 2) - 1,) * 2 for i in range(3)]
    assert_agree(conv_stack((1, 2, 4)), (40, 40), 1)


@pytest.mark.parametrize("variant", ["basic", "large"])
def test_context_module_matches_table_1(variant):
    module = ContextModule(2, variant=variant)
    fields = layer_receptive_fields(module, (72, 72))
    convs = [n for n, m in module.named_modules() if isinstance(m, nn.Conv2d)]
    # Yu & Koltun (ICLR 2016), Table 1: receptive field after each layer.
    assert [fields[n].size[0] for n in convs] == [3, 5, 9, 17, 33, 65, 67, 67]
    assert_agree(module, (72, 72), 2)


def test_field_does_not_depend_on_the_input_being_large():
    assert receptive_field(ContextModule(2), (16, 16)).size == (67, 67)


def test_global_pooling_makes_the_field_global():
    rf = receptive_field(torchvision.models.resnet18(), (64, 64))
    assert rf.is_global and rf.size == (math.inf, math.inf)
    assert not receptive_field(nn.Conv2d(3, 3, 3), (8, 8)).is_global


def test_box_convention():
    rf = receptive_field(nn.Conv2d(1, 1, 5, stride=2, padding=1), (32, 32), position=(0, 0))
    assert rf == ReceptiveField(size=(5, 5), jump=(2, 2), start=(1, 1))
    assert rf.box((3, 0)) == ((5, 9), (-1, 3))


def test_unknown_operation_names_op_and_layer():
    net = nn.Sequential(nn.Conv2d(1, 1, 3), Flip())
    with pytest.raises(NotImplementedError, match=r"aten\.flip.*'1' \(Flip\)"):
        receptive_field(net, (16, 16))


def test_several_outputs_need_output_index():
    net = Pyramid(nn.Identity())
    with pytest.raises(ValueError, match="output_index"):
        receptive_field(net, (32, 32))
    with pytest.raises(ValueError, match="output_index"):
        empirical_receptive_field(net, (32, 32))
    assert receptive_field(net, (32, 32), output_index=-1).jump == (8, 8)


def test_mapping_outputs_take_a_key():
    net = Lambda(lambda x: {"same": x, "wide": nn.functional.avg_pool2d(x, 5, 1, 2)})
    assert receptive_field(net, (16, 16), in_channels=1, output_index="wide").size == (5, 5)
    assert empirical_receptive_field(net, (16, 16), in_channels=1, output_index="wide").size == (
        5, 5
    )


def test_meta_device_module():
    block = DilatedBottleneck(8, 4, dilation=2, device="meta")
    assert receptive_field(block, (16, 16)).size == (5, 5)


# --- analytic == measured -------------------------------------------------------------------


@st.composite
def layer_stacks(draw):
    layers = []
    channels = draw(st.integers(1, 2))
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["conv", "conv", "max", "avg"]))
        k = draw(st.integers(1 if kind == "conv" else 2, 4))
        s = draw(st.integers(1, 2))
        if kind == "conv":
            d = draw(st.integers(1, 3))
            p = draw(st.integers(0, (k - 1) * d))
            layers.append(nn.Conv2d(channels, channels, k, s, p, d))
        elif kind == "max":
            d = draw(st.integers(1, 2))
            p = draw(st.integers(0, k // 2))
            layers.append(nn.MaxPool2d(k, s, p, d, ceil_mode=draw(st.booleans())))
        else:
            p = draw(st.integers(0, k // 2))
            layers.append(nn.AvgPool2d(k, s, p, ceil_mode=draw(st.booleans())))
        layers.append(nn.ReLU())
    return channels, nn.Sequential(*layers)


@settings(max_examples=20, deadline=None)
@given(layer_stacks())
def test_random_stacks_agree(case):
    channels, stack = case
    rough = receptive_field(stack, (256, 256), in_channels=channels)
    side = int(2 * rough.size[0] + 4 * rough.jump[0] + 2 * abs(rough.start[0])) + 8
    analytic = assert_agree(stack, (side, side), channels)
    out = stack(torch.zeros(1, channels, side, side))
    q = ((out.shape[-2] - 1) // 2, (out.shape[-1] - 1) // 2)
    reached = gradient_map(stack, side, in_channels=channels) > 0
    rows, cols = reached.any(1).nonzero().flatten(), reached.any(0).nonzero().flatten()
    box = ((rows[0].item(), rows[-1].item()), (cols[0].item(), cols[-1].item()))
    assert analytic.box(q) == box


class Lambda(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class Branches(nn.Module):
    """Inception-like: two branches concatenated along channels, plus an up-sampled sum."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.Conv2d(2, 2, 1)
        self.large = nn.Conv2d(2, 2, 5, padding=2)
        self.down = nn.Conv2d(4, 4, 3, stride=3)

    def forward(self, x):
        y = torch.cat([self.small(x), self.large(x)], 1)
        z = nn.functional.interpolate(self.down(y), size=y.shape[-2:], mode="bilinear")
        return y + z


def conv(k=3, c_in=2, c_out=2, **kw):
    return nn.Conv2d(c_in, c_out, k, **kw)


LAYER_ZOO = {
    "nearest x2": nn.Sequential(conv(), nn.Upsample(scale_factor=2), conv()),
    "nearest x1.5": nn.Sequential(conv(), nn.Upsample(scale_factor=1.5), conv()),
    "nearest-exact": nn.Sequential(conv(), nn.Upsample(size=(41, 37), mode="nearest-exact")),
    "bilinear x3": nn.Sequential(conv(), nn.Upsample(scale_factor=3, mode="bilinear"), conv()),
    "bilinear aligned": nn.Sequential(
        conv(), nn.Upsample(size=(47, 45), mode="bilinear", align_corners=True)),
    "bicubic x2": nn.Sequential(conv(), nn.Upsample(scale_factor=2, mode="bicubic"), conv()),
    "transposed": nn.Sequential(
        conv(), nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1), conv()),
    "pixel shuffle": nn.Sequential(conv(c_out=8), nn.PixelShuffle(2), conv()),
    "pixel unshuffle": nn.Sequential(conv(), nn.PixelUnshuffle(2), conv(c_in=8)),
    "reflection pad": nn.Sequential(nn.ReflectionPad2d((1, 2, 3, 0)), conv(5)),
    "crop": nn.Sequential(conv(), Lambda(lambda x: x[..., 1:-1, 2::2]), conv()),
    "adaptive pool": nn.Sequential(conv(), nn.AdaptiveAvgPool2d(5)),
    "channel shuffle": nn.Sequential(
        conv(c_out=4), Lambda(lambda x: x.unflatten(1, (2, 2)).transpose(1, 2).flatten(1, 2))),
    "branches": Branches(),
}


@pytest.mark.parametrize("name", LAYER_ZOO)
def test_layers_agree(name):
    assert_agree(LAYER_ZOO[name], (30, 30), 2, phased=True)


def test_swapping_the_spatial_axes_is_refused():
    net = nn.Sequential(conv((5, 1)), Lambda(lambda x: x.transpose(-1, -2)))
    with pytest.raises(NotImplementedError, match=r"transpose.*'1' \(Lambda\).*swaps"):
        receptive_field(net, (16, 16))


PAD_LAYERS = {"reflect": nn.ReflectionPad2d, "replicate": nn.ReplicationPad2d,
              "circular": nn.CircularPad2d}


@pytest.mark.parametrize("mode", sorted(PAD_LAYERS))
def test_padding_mode_does_not_change_the_field(mode):
    def net(padding_mode: str) -> nn.Module:
        pad = nn.ZeroPad2d if padding_mode == "zeros" else PAD_LAYERS[padding_mode]
        # Asymmetric padding, a stride and an even kernel, so that a wrong shift moves ``start``.
        return nn.Sequential(
            nn.Conv2d(1, 2, 3, stride=2, padding=(1, 2), dilation=(1, 2),
                      padding_mode=padding_mode),
            nn.Conv2d(2, 2, (2, 4), padding=(1, 2), padding_mode=padding_mode),
            pad((2, 0, 1, 3)),
            nn.Conv2d(2, 1, 3),
        )

    zeros = receptive_field(net("zeros"), (33, 33))
    assert zeros.start != (0, 0)
    assert receptive_field(net(mode), (33, 33)) == zeros
    assert layer_receptive_fields(net(mode), (33, 33)) == layer_receptive_fields(
        net("zeros"), (33, 33)
    )
    assert assert_agree(net(mode), (33, 33), 1) == zeros


@pytest.mark.parametrize("stride,dilation", [(1, 1), (2, 1), (1, 2), (2, 4)])
def test_dilated_bottleneck_agrees(stride, dilation):
    assert_agree(DilatedBottleneck(8, 4, stride=stride, dilation=dilation), (40, 40), 8)


@pytest.mark.parametrize("stride,dilation", [(1, 3), (2, 2)])
def test_dilated_basic_block_agrees(stride, dilation):
    assert_agree(DilatedBasicBlock(4, 4, stride=stride, dilation=dilation), (48, 48), 4)


@pytest.mark.parametrize("level", range(4))
def test_dilated_resnet_agrees(level):
    net = DilatedResNet(stem_channels=4, planes=(2, 2, 2, 2), blocks=(1, 1, 1, 1),
                        block="basic", output_stride=8)
    assert_agree(net, (240, 240), 3, level)


@pytest.mark.parametrize("upsample", ["nearest", "bilinear", "transposed"])
@pytest.mark.parametrize("level", range(3))
def test_fpn_neck_agrees(upsample, level):
    net = Pyramid(FPNNeck([4, 4, 4], 4, upsample=upsample))
    rf = assert_agree(net, (72, 72), 3, level, phased=True)
    assert rf.jump == (2 ** (level + 1),) * 2


@pytest.mark.parametrize("upsample", ["nearest", "bilinear"])
def test_fpn_neck_agrees_on_odd_sizes(upsample):
    assert_agree(Pyramid(FPNNeck([4, 4, 4], 4, upsample=upsample)), (69, 71), 3, 0, phased=True)


def test_fpn_top_down_path_widens_the_finest_field():
    fpn = receptive_field(Pyramid(FPNNeck([4, 4, 4], 4)), (72, 72), output_index=0)
    plain = receptive_field(Pyramid(nn.Identity()), (72, 72), output_index=0)
    assert fpn.size[0] > plain.size[0]


def test_weighted_fusion_takes_the_union():
    rf = assert_agree(Fused(), (32, 32), 2)
    assert rf.size == (7, 7)


@pytest.mark.parametrize("level", range(3))
def test_bifpn_agrees(level):
    net = Pyramid(BiFPN([4, 4, 4], 4, num_layers=1))
    assert_agree(net, (96, 96), 3, level, phased=True)


def test_bifpn_with_new_levels_agrees():
    # P6 and P7 (max-pooled from the coarsest input) feed every fusion layer, so they widen
    # even the finest level's field; measured and analytic agree on it.
    neck = BiFPN([4, 4, 4], 4, num_layers=1, num_levels=5, node_order="act_conv_norm")
    rf = assert_agree(Pyramid(neck), (128, 128), 3, 0, phased=True)
    three = Pyramid(BiFPN([4, 4, 4], 4, num_layers=1))
    assert rf.size[0] > receptive_field(three, (128, 128), in_channels=3, output_index=0).size[0]
    p7 = receptive_field(Pyramid(neck), (256, 256), in_channels=3, output_index=4)
    assert p7.jump == (32, 32)


def test_spatial_attention_agrees():
    rf = assert_agree(SpatialAttention(7), (24, 24), 4)
    assert rf.size == (7, 7)


def test_cbam_field_is_global_both_ways():
    assert receptive_field(CBAM(8, reduction=2), (16, 16)).is_global
    with pytest.warns(UserWarning, match="border"):
        measured = empirical_receptive_field(CBAM(8, reduction=2), (16, 20))
    assert measured.size == (16, 20)


def test_learnable_resizer_agrees():
    resizer = LearnableResizer(3, output_size=(48, 48), num_filters=4)
    rf = assert_agree(resizer, (24, 24), 3, phased=True)
    assert rf.jump == (0.5, 0.5)
    assert receptive_field(LearnableResizer(3, (48, 48), 4, attention="cbam"), (24, 24)).is_global


def test_torchvision_resnet18_early_stages_agree():
    model = torchvision.models.resnet18()
    trunk = nn.Sequential(*list(model.children())[:-4])
    rf = assert_agree(trunk, (128, 128), 3)
    assert rf.jump == (8, 8)


@pytest.mark.slow
def test_torchvision_resnet18_trunk_agrees():
    trunk = nn.Sequential(*list(torchvision.models.resnet18().children())[:-2])
    assert_agree(trunk, (480, 480), 3)


# --- reference networks (examples/dfpn_classifier) ------------------------------------------


class Features(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


@pytest.mark.skipif(not HAS_MODELS, reason="examples/dfpn_classifier/models.py not present")
def test_dilated_fpn_sees_more_than_fpn_at_the_same_size():
    from examples.dfpn_classifier.models import MODELS

    fpn, dfpn = MODELS["fpn"](), MODELS["dfpn"]()
    stage3 = [receptive_field(m.backbone, (256, 256), output_index=2) for m in (fpn, dfpn)]
    assert stage3[1].size[0] > stage3[0].size[0]
    assert stage3[1].jump == stage3[0].jump
    p2 = [receptive_field(Features(m), (256, 256)) for m in (fpn, dfpn)]
    assert p2[1].size[0] > p2[0].size[0]
    counts = [sum(p.numel() for p in m.parameters()) for m in (fpn, dfpn)]
    assert abs(counts[1] - counts[0]) < 0.001 * counts[0]


@pytest.mark.skipif(not HAS_MODELS, reason="examples/dfpn_classifier/models.py not present")
@pytest.mark.parametrize("name", ["resnet50", "fpn", "dfpn", "dfpn_a", "dfpn_b"])
def test_reference_classifiers_are_global(name):
    from examples.dfpn_classifier.models import MODELS

    assert receptive_field(MODELS[name](), (64, 64)).is_global


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MODELS, reason="examples/dfpn_classifier/models.py not present")
@pytest.mark.parametrize("name", ["fpn", "dfpn"])
def test_reference_backbone_stage_fields_agree(name):
    from examples.dfpn_classifier.models import MODELS

    backbone = MODELS[name]().backbone
    assert_agree(backbone, (288, 288), 3, 2)


# --- gridding and the effective receptive field ---------------------------------------------


def reachable_offsets(dilations):
    """Offsets a stack of 3x3 convolutions reaches: the Minkowski sum of {-d, 0, d}."""
    offsets = {0}
    for d in dilations:
        offsets = {o + t * d for o in offsets for t in (-1, 0, 1)}
    return offsets


@pytest.mark.parametrize("dilations", [(2, 2, 2), (1, 2, 5), (1, 2, 4), (1, 4, 4), (1, 3, 3)])
def test_gridding_holes(dilations):
    holes = gridding_holes(conv_stack(dilations), (41, 41))
    offsets = reachable_offsets(dilations)
    extent = max(offsets) - min(offsets) + 1
    assert int(holes.sum()) == extent**2 - len(offsets) ** 2
    assert bool(holes.any()) == (len(offsets) < extent)
    if dilations in [(1, 2, 5), (1, 2, 4)]:
        assert not holes.any()
    if dilations == (2, 2, 2):
        assert holes.any()
    reached = gradient_map(conv_stack(dilations), (41, 41)) > 0
    assert not (holes & reached).any()


def test_max_pooling_does_not_hide_the_field():
    net = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.Conv2d(1, 1, 3))
    assert not gridding_holes(net, (32, 32)).any()
    assert_agree(net, (32, 32), 1)


def deep_stack(depth: int) -> nn.Sequential:
    torch.manual_seed(depth)
    return nn.Sequential(*(nn.Conv2d(4, 4, 3, padding=1) for _ in range(depth)))


def test_effective_field_is_smaller_than_theory_and_grows_with_depth():
    # Luo et al. (2016): the effective field grows like sqrt(depth), the theoretical like depth.
    radii, halves = [], []
    for depth in (8, 16):
        net = deep_stack(depth)
        halves.append((receptive_field(net, (64, 64)).size[0] - 1) / 2)
        radii.append(effective_receptive_field(net, 2 * depth + 9, samples=4))
    assert radii[0] < halves[0] and radii[1] < 0.75 * halves[1]
    assert radii[1] > radii[0]
    assert radii[1] / halves[1] < radii[0] / halves[0]


def test_effective_field_of_identity_initialised_context_module_is_a_point():
    assert effective_receptive_field(ContextModule(2), (72, 72)) == 0.0


def test_dead_output_pixel_is_reported():
    dead = nn.Sequential(nn.Conv2d(1, 1, 3), nn.ReLU())
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.fill_(-1.0)
    with pytest.raises(ValueError, match="samples"):
        effective_receptive_field(dead, (9, 9))


def test_share_is_checked():
    with pytest.raises(ValueError, match="share"):
        effective_receptive_field(nn.Conv2d(1, 1, 3), (8, 8), share=0.0)


# --- one call form for every function -------------------------------------------------------


class TwoOutputs(nn.Module):
    """[conv, conv of conv], 3x3 dilated 2: two outputs with different fields and holes."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 2, 3, padding=2, dilation=2)
        self.second = nn.Conv2d(2, 2, 3, padding=2, dilation=2)

    def forward(self, x):
        y = self.first(x)
        return [y, self.second(y)]


MEASURED = {
    "gradient_map": gradient_map,
    "empirical_receptive_field": empirical_receptive_field,
    "gridding_holes": gridding_holes,
    "effective_receptive_field": functools.partial(effective_receptive_field, samples=2),
}
ALL = {"receptive_field": receptive_field, "layer_receptive_fields": layer_receptive_fields,
       **MEASURED}


def same(a, b) -> bool:
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("fn", [*ALL.values()], ids=[*ALL])
def test_every_function_takes_size_and_output_the_same_way(fn):
    parameters = inspect.signature(fn).parameters
    assert list(parameters)[:2] == ["module", "input_size"]
    assert parameters["input_size"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert parameters["in_channels"].kind is inspect.Parameter.KEYWORD_ONLY
    for name in ("output_index", "position"):
        if fn is not layer_receptive_fields:
            assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY
    assert "input_shape" not in parameters


@pytest.mark.parametrize("fn", [*ALL.values()], ids=[*ALL])
def test_new_form_on_every_function(fn):
    net = TwoOutputs()
    kw = {} if fn is layer_receptive_fields else {"output_index": 1}
    given = fn(net, (15, 15), in_channels=2, **kw)
    assert same(fn(net, 15, **kw), given)  # an int is a square, C comes from the module
    assert same(fn(net, input_size=(15, 15), **kw), given)
    if fn is not layer_receptive_fields:
        first = fn(net, (15, 15), output_index=0)
        assert not same(first, given)  # output_index chooses
        assert same(fn(net, (15, 15), output_index=0, position=(7, 7)), first)  # the centre


@pytest.mark.parametrize("name", [*MEASURED])
def test_old_forms_warn_and_give_the_same_results(name):
    fn = MEASURED[name]
    net = TwoOutputs()
    new = fn(net, (15, 15), output_index=1)
    positional = [0.95] if name == "effective_receptive_field" else []
    old_calls = {
        "(C, H, W)": lambda: fn(net, (2, 15, 15), output_index=1),
        "(N, C, H, W)": lambda: fn(net, (4, 2, 15, 15), output_index=1),
        "input_shape=": lambda: fn(net, input_shape=(2, 15, 15), output_index=1),
        "positional index": lambda: fn(net, (2, 15, 15), *positional, 1),
    }
    expected = {
        "(C, H, W)": r"input_size=\(15, 15\), in_channels=2 .* instead of input_size=\(2, 15",
        "(N, C, H, W)": r"in_channels=2 .* instead of input_size=\(4, 2, 15, 15\)",
        "input_shape=": r"input_size=\(15, 15\), in_channels=2 .* instead of input_shape=",
        "positional index": r"output_index=1 as a keyword",
    }
    for form, call in old_calls.items():
        with pytest.warns(DeprecationWarning, match=f"{name}: .*0.3; write .*{expected[form]}"):
            assert same(call(), new), form
    with pytest.warns(DeprecationWarning, match="input_size= instead of input_shape="):
        assert same(fn(net, input_shape=(15, 15), output_index=1), new)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fn(net, (15, 15), output_index=1)  # the new form does not warn


@pytest.mark.parametrize("fn", [*ALL.values()], ids=[*ALL])
def test_errors_name_the_argument(fn):
    net = TwoOutputs()
    for size in [(1, 2, 3, 4, 5), 0, (15, -1)]:
        with pytest.raises(ValueError, match="input_size"):
            fn(net, size)
    with pytest.raises(ValueError, match="in_channels"):
        fn(net, 15, in_channels=0)
    with pytest.raises(ValueError, match="pass in_channels"):
        fn(nn.AvgPool2d(3, 1, 1), 15)
    if fn is not layer_receptive_fields:
        with pytest.raises(ValueError, match="output_index"):
            fn(net, 15)
        with pytest.raises(ValueError, match="output_index 2 is not one of"):
            fn(net, 15, output_index=2)
        with pytest.raises(ValueError, match="position"):
            fn(net, 15, output_index=0, position=(15, 0))


@pytest.mark.parametrize("fn", [*MEASURED.values()], ids=[*MEASURED])
def test_old_forms_that_contradict_the_new_are_refused(fn):
    net = TwoOutputs()
    with pytest.raises(TypeError, match="input_shape"):
        fn(net, (15, 15), input_shape=(2, 15, 15))
    with pytest.raises(ValueError, match="in_channels=3 disagrees with C=2"):
        fn(net, (2, 15, 15), in_channels=3, output_index=0)
    with pytest.raises(ValueError, match="input_size"):
        fn(net, (2, 0, 15), output_index=0)
    positional = [0.95] if "effective" in str(fn) else []
    with pytest.raises(TypeError, match="output_index"):
        fn(net, (15, 15), *positional, 0, output_index=0)


# --- the user's module is never touched -----------------------------------------------------


def snapshot(module: nn.Module):
    return (
        {k: v.clone() for k, v in module.state_dict().items()},
        [m.training for m in module.modules()],
        [p.requires_grad for p in module.parameters()],
    )


def test_tools_leave_the_module_untouched():
    block = DilatedBottleneck(8, 4, stride=2, dilation=2).train()
    block.conv2.weight.requires_grad_(False)
    before = snapshot(block)
    receptive_field(block, (24, 24))
    layer_receptive_fields(block, (24, 24))
    empirical_receptive_field(block, (24, 24))
    gridding_holes(block, (24, 24))
    effective_receptive_field(block, (24, 24), samples=2)
    gradient_map(block, (24, 24), weights="real")
    after = snapshot(block)
    assert before[1:] == after[1:]
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert all(p.grad is None for p in block.parameters())


@pytest.mark.slow
@pytest.mark.skipif(not HAS_MODELS, reason="examples/dfpn_classifier/models.py not present")
def test_example_table_and_figure(tmp_path):
    from examples.receptive_fields import draw, receptive_field_table

    rows = receptive_field_table()
    assert all(row["analytic"] == row["measured"] for row in rows)
    assert [r["paper"] for r in rows if r["paper"] is not None] == [r["analytic"] for r in rows
                                                                    if r["paper"] is not None]
    assert draw(tmp_path).stat().st_size > 0
