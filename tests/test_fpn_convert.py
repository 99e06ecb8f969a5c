"""FPNNeck.from_torchvision computes what torchvision's FeaturePyramidNetwork computes, keeps
what it had, and refuses what it cannot express."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import (
    ExtraFPNBlock,
    LastLevelMaxPool,
    LastLevelP6P7,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from dilconv import FPNNeck, MaxPoolLevel, P6P7Levels
from dilconv.convert import ConversionError, fpn_from_torchvision
from peer_helpers import randomise_state

CHANNELS = [8, 16, 32]
OUT = 12

SOURCES = {
    "plain": lambda: FeaturePyramidNetwork(CHANNELS, OUT),
    "batchnorm": lambda: FeaturePyramidNetwork(
        CHANNELS, OUT, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.3)),
    "groupnorm": lambda: FeaturePyramidNetwork(
        CHANNELS, OUT, norm_layer=functools.partial(nn.GroupNorm, 4)),
    "frozen_bn": lambda: FeaturePyramidNetwork(CHANNELS, OUT, norm_layer=FrozenBatchNorm2d),
    "max_pool": lambda: FeaturePyramidNetwork(CHANNELS, OUT, extra_blocks=LastLevelMaxPool()),
    "p6p7_from_p5": lambda: FeaturePyramidNetwork(
        CHANNELS, OUT, extra_blocks=LastLevelP6P7(OUT, OUT)),
    "p6p7_from_c5": lambda: FeaturePyramidNetwork(
        CHANNELS, OUT, extra_blocks=LastLevelP6P7(CHANNELS[-1], OUT)),
    "batchnorm_max_pool": lambda: FeaturePyramidNetwork(
        CHANNELS, OUT, extra_blocks=LastLevelMaxPool(), norm_layer=nn.BatchNorm2d),
    "groupnorm_p6p7_from_c5": lambda: FeaturePyramidNetwork(
        CHANNELS, OUT, extra_blocks=LastLevelP6P7(CHANNELS[-1], OUT),
        norm_layer=functools.partial(nn.GroupNorm, 3)),
}
EXTRA_KEYS = {"max_pool": ["pool"], "p6p7": ["p6", "p7"]}
# Our state-dict key "{head}.{index}.{rest}" is torchvision's "{THEIR_KEYS[head]}.{rest}".
THEIR_KEYS = {"lateral": "inner_blocks.{}.0", "lateral_norm": "inner_blocks.{}.1",
              "smooth": "layer_blocks.{}.0", "smooth_norm": "layer_blocks.{}.1",
              "extra_levels": "extra_blocks.{}"}


def randomise(model: nn.Module) -> nn.Module:
    return randomise_state(model, std=0.3)


def features(batch: int = 2) -> dict[str, torch.Tensor]:
    """C3..C5 at odd, non-square sizes that do not halve exactly."""
    sizes = [(27, 19), (14, 10), (7, 5)]
    return {f"c{i + 3}": torch.randn(batch, c, *hw)
            for i, (c, hw) in enumerate(zip(CHANNELS, sizes))}


def expected_keys(name: str) -> list[str]:
    extra = next((keys for kind, keys in EXTRA_KEYS.items() if kind in name), [])
    return ["c3", "c4", "c5", *extra]


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_converted_computes_what_torchvision_computes(name, train):
    torch.manual_seed(0)
    source = randomise(SOURCES[name]()).train(train)
    neck = FPNNeck.from_torchvision(source)
    assert neck.training == train
    feats = features()
    got = neck(feats)
    expected = source(feats)
    assert list(got) == list(expected) == expected_keys(name)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)
    as_list = neck(list(feats.values()))
    assert isinstance(as_list, list) and len(as_list) == len(expected)
    for mine, reference in zip(as_list, expected.values()):
        torch.testing.assert_close(mine, reference)
    # In train mode both updated their running statistics the same way (twice for ours).
    source(feats)
    theirs = source.state_dict()
    for key, value in neck.state_dict().items():
        head, index, rest = key.split(".", 2)
        torch.testing.assert_close(value, theirs[f"{THEIR_KEYS[head].format(index)}.{rest}"])


@settings(max_examples=15, deadline=None)
@given(name=st.sampled_from(sorted(SOURCES)), height=st.integers(1, 40), width=st.integers(1, 40),
       batch=st.integers(0, 2))
def test_same_outputs_at_any_size(name, height, width, batch):
    torch.manual_seed(height * 41 + width)
    source = randomise(SOURCES[name]()).eval()
    neck = FPNNeck.from_torchvision(source)
    feats, size = {}, (height, width)
    for i, c in enumerate(CHANNELS):
        feats[f"c{i + 3}"] = torch.randn(batch, c, *size)
        size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
    got, expected = neck(feats), source(feats)
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


def test_extra_blocks_become_dilconv_blocks():
    assert isinstance(FPNNeck.from_torchvision(SOURCES["max_pool"]()).extra_levels, MaxPoolLevel)
    for name, source in (("p6p7_from_p5", "output"), ("p6p7_from_c5", "input")):
        extra = FPNNeck.from_torchvision(SOURCES[name]()).extra_levels
        assert isinstance(extra, P6P7Levels) and extra.source == source, name
    assert FPNNeck.from_torchvision(SOURCES["plain"]()).extra_levels is None


DETECTORS = {
    "fasterrcnn_resnet50_fpn_v2": torchvision.models.detection.fasterrcnn_resnet50_fpn_v2,
    "retinanet_resnet50_fpn": torchvision.models.detection.retinanet_resnet50_fpn,
    "retinanet_resnet50_fpn_v2": torchvision.models.detection.retinanet_resnet50_fpn_v2,
}


@pytest.mark.parametrize("name", sorted(DETECTORS))
def test_detector_fpns(name):
    torch.manual_seed(0)
    source = DETECTORS[name](weights=None, weights_backbone=None).backbone.fpn
    randomise(source).train()
    neck = FPNNeck.from_torchvision(source)
    channels = [block[0].in_channels for block in source.inner_blocks]
    feats = {str(i): torch.randn(2, c, 9 - 2 * i, 7 - 2 * i) for i, c in enumerate(channels)}
    got, expected = neck(feats), source(feats)
    assert list(got) == list(expected)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], msg=key)


def test_requires_grad_train_mode_device_and_dtype_are_kept():
    source = SOURCES["batchnorm_max_pool"]().train()
    source.inner_blocks[0].requires_grad_(False)
    source.layer_blocks[2][1].weight.requires_grad_(False)
    source.inner_blocks[1].eval()
    neck = FPNNeck.from_torchvision(source)
    frozen = {n for n, p in neck.named_parameters() if not p.requires_grad}
    assert frozen == {"lateral.0.weight", "lateral_norm.0.weight", "lateral_norm.0.bias",
                      "smooth_norm.2.weight"}
    evaluating = {n for n, m in neck.named_modules() if not m.training}
    assert evaluating == {"lateral.1", "lateral_norm.1"}
    double = fpn_from_torchvision(SOURCES["p6p7_from_c5"]().double())
    assert {t.dtype for t in double.state_dict().values()} == {torch.float64}
    single = FPNNeck.from_torchvision(SOURCES["p6p7_from_c5"]().double(), dtype=torch.float32)
    assert single.extra_levels.p6.weight.dtype == torch.float32
    with torch.device("meta"):
        on_meta = SOURCES["groupnorm_p6p7_from_c5"]()
    assert all(t.is_meta for t in FPNNeck.from_torchvision(on_meta).state_dict().values())


class Doubled(ExtraFPNBlock):
    def forward(self, results, x, names):
        return results + [2 * results[-1]], names + ["double"]


def _replace(path: str, module: nn.Module | None):
    def change(model):
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
    return change


def _pad(model):
    model.layer_blocks[2][0].padding = (2, 2)


def _add_parameter(model):
    model.extra_blocks.register_parameter("scale", nn.Parameter(torch.ones(1)))


def _with(extra_blocks=None, norm_layer=None, change=None):
    def build():
        model = FeaturePyramidNetwork(CHANNELS, OUT, extra_blocks=extra_blocks,
                                      norm_layer=norm_layer)
        if change is not None:
            change(model)
        return model
    return build


REFUSALS = {
    "not_an_fpn": (lambda: nn.Conv2d(3, 3, 1), TypeError,
                   "expects a torchvision.ops.FeaturePyramidNetwork, got Conv2d"),
    "extra_block_unknown": (_with(Doubled()), TypeError,
                            "LastLevelMaxPool and LastLevelP6P7, got Doubled"),
    "norm_unsupported": (_with(norm_layer=nn.InstanceNorm2d), TypeError,
                         "norm_layer's inner_blocks.0.1 is InstanceNorm2d"),
    "norms_differ": (_with(norm_layer=nn.BatchNorm2d,
                           change=_replace("layer_blocks.1.1", nn.GroupNorm(3, OUT))),
                     ConversionError, "cannot express layer_blocks.1.1: the source has GroupNorm"),
    "activation_added": (_with(change=lambda m: m.inner_blocks[1].append(nn.ReLU())),
                         ConversionError, "cannot express inner_blocks.1.1: the source has ReLU"),
    "three_layers": (_with(norm_layer=nn.BatchNorm2d,
                           change=lambda m: m.layer_blocks[0].append(nn.ReLU())),
                     ConversionError, r"layer_blocks.0 holds \['Conv2d', 'BatchNorm2d', 'ReLU'\]"),
    "padding_changed": (_with(change=_pad), ConversionError, "cannot express layer_blocks.2.0"),
    "p7_changed": (_with(LastLevelP6P7(OUT, OUT),
                         change=_replace("extra_blocks.p7", nn.Conv2d(OUT, OUT, 3, 1, 1))),
                   ConversionError, "cannot express extra_blocks.p7"),
    "parameter_added": (_with(LastLevelMaxPool(), change=_add_parameter), ConversionError,
                        r"unused \['extra_blocks.scale'\]"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refuses_what_it_cannot_express(name):
    build, error, message = REFUSALS[name]
    with pytest.raises(error, match=message):
        FPNNeck.from_torchvision(build())
