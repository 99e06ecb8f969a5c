"""Seed 000, Table 1: the five classifiers' parameter counts, computed from the real modules."""

from __future__ import annotations

import pytest
import torch
from examples.dfpn_classifier.models import MODELS, PAPER_PARAMS, build
from torch import nn

from dilconv import DilatedBottleneck, FPNNeck

# The study's Table 1 for num_classes=3 (total = trainable).
TABLE_1 = {
    "resnet50": 5_905_667,
    "fpn": 8_152_355,
    "dfpn": 8_156_195,
    "dfpn_a": 9_337_123,
    "dfpn_b": 10_648_355,
}


def count(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def test_models_cover_table_1():
    assert set(MODELS) == set(TABLE_1) == set(PAPER_PARAMS)


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_parameter_count_matches_table_1(name):
    model = MODELS[name](num_classes=3)
    assert count(model) == TABLE_1[name]
    assert count(model, trainable_only=True) == TABLE_1[name]


def bottleneck_params(c_in: int, planes: int, projection: bool) -> int:
    convs = c_in * planes + 9 * planes * planes + planes * 4 * planes
    bns = 2 * (planes + planes + 4 * planes)
    proj = c_in * 4 * planes + 2 * 4 * planes if projection else 0
    return convs + bns + proj


def test_fpn_count_follows_from_the_layers():
    """The FPN row, derived by formula from the study's description, equals the module's count."""
    stem = 3 * 3 * 3 * 32 + 2 * 32
    stages, c_in = 0, 32
    for planes, blocks in zip((32, 64, 128, 256), (3, 4, 6, 3)):
        stages += bottleneck_params(c_in, planes, True)
        stages += (blocks - 1) * bottleneck_params(4 * planes, planes, False)
        c_in = 4 * planes
    lateral = sum(c * 256 + 256 for c in (128, 256, 512, 1024))
    smooth = 3 * (9 * 256 * 256 + 256)
    head = 256 * 3 + 3
    assert count(build("fpn")) == stem + stages + lateral + smooth + head


def test_dfpn_differs_from_fpn_by_its_stem_only():
    assert count(build("dfpn")) - count(build("fpn")) == (7 * 7 - 3 * 3) * 3 * 32


@pytest.mark.parametrize("num_classes", [2, 10])
def test_head_scales_with_classes(num_classes):
    for name in TABLE_1:
        diff = count(build(name, num_classes)) - count(build(name, 3))
        width = build(name).fc.in_features
        assert diff == width * (num_classes - 3) + (num_classes - 3)


@pytest.mark.parametrize("name", ["fpn", "dfpn"])
def test_p2_is_half_resolution_256_channels(name):
    model = build(name).eval()
    with torch.no_grad():
        p2 = model.forward_features(torch.randn(1, 3, 256, 256))
    assert p2.shape == (1, 256, 128, 128)


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_logits_shape(name):
    model = build(name).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 64, 48)).shape == (2, 3)


def test_dfpn_stage3_is_dilated_with_stride():
    backbone = build("dfpn").backbone
    first = backbone.layer3[0]
    assert first.conv2.stride == (2, 2) and first.conv2.dilation == (2, 2)
    assert all(b.conv2.dilation == (2, 2) and b.conv2.padding == (2, 2) for b in backbone.layer3)
    assert all(b.conv2.dilation == (1, 1) for s in ("layer1", "layer2", "layer4")
               for b in getattr(backbone, s))


def test_building_blocks_are_dilconv():
    model = build("dfpn")
    assert isinstance(model.neck, FPNNeck)
    assert all(isinstance(b, DilatedBottleneck) for s in model.backbone.stages for b in s)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        build("vgg")
