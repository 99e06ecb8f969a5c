"""DilatedResNet: stage shapes, output_stride, torchvision conversion, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st

from dilconv import DilatedBasicBlock, DilatedResNet

SMALL = {"planes": (4, 8, 8, 16), "blocks": (1, 2, 1, 1), "stem_channels": 8}


def tv_stages(model: torchvision.models.ResNet, x: torch.Tensor) -> list[torch.Tensor]:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        out.append(x)
    return out


@given(h=st.integers(9, 70), w=st.integers(9, 70), os=st.sampled_from([8, 16, 32, None]),
       block=st.sampled_from(["basic", "bottleneck"]))
def test_stage_shapes(h, w, os, block):
    net = DilatedResNet(**SMALL, block=block, output_stride=os).eval()
    with torch.no_grad():
        feats = net(torch.randn(1, 3, h, w))
    assert [f.shape[1] for f in feats] == net.out_channels
    size = (h, w)
    reduction = 1
    for stride in (2, 2, 1, 2, 2, 2):  # conv1, maxpool, then the four stages
        if reduction * stride <= (os or 32):
            size = tuple((s - 1) // stride + 1 for s in size)
            reduction *= stride
    assert tuple(feats[-1].shape[-2:]) == size
    assert net.reductions[-1] == min(os or 32, 32)


def test_output_stride_follows_torchvision_dilation_rule():
    net = DilatedResNet(**SMALL, output_stride=8)
    assert net.stage_dilations == [(1,), (1, 1), (1,), (2,)]
    net = DilatedResNet(planes=(4, 4, 4, 4), blocks=(2, 2, 3, 3), output_stride=8)
    assert net.stage_dilations == [(1, 1), (1, 1), (1, 2, 2), (2, 4, 4)]


@pytest.mark.slow
@pytest.mark.parametrize("os, replace", [(32, [False, False, False]), (16, [False, False, True]),
                                         (8, [False, True, True])])
def test_from_torchvision_resnet50_matches(os, replace):
    source = torchvision.models.resnet50(weights=None).eval()
    reference = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=replace)
    reference.load_state_dict(source.state_dict())
    reference.eval()
    ours = DilatedResNet.from_torchvision(source, output_stride=os).eval()
    x = torch.randn(1, 3, 67, 61)
    with torch.no_grad():
        for mine, theirs in zip(ours(x), tv_stages(reference, x)):
            torch.testing.assert_close(mine, theirs)


def test_from_torchvision_resnet18_dilated_keeps_one_eighth():
    tv = torchvision.models.resnet18(weights=None).eval()
    net = DilatedResNet.from_torchvision(tv, output_stride=8).eval()
    assert isinstance(net.layer4[0], DilatedBasicBlock)
    assert net.layer4[1].conv1.dilation == (4, 4)
    with torch.no_grad():
        feats = net(torch.randn(1, 3, 64, 80))
    assert [tuple(f.shape[-2:]) for f in feats] == [(16, 20), (8, 10), (8, 10), (8, 10)]
    fresh = DilatedResNet(block="basic", blocks=(2, 2, 2, 2), output_stride=8).eval()
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh.layer4[1].conv2.weight, tv.layer4[1].conv2.weight)
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        torch.testing.assert_close(fresh(x)[-1], net(x)[-1])


def test_from_torchvision_at_32_is_resnet18():
    tv = torchvision.models.resnet18(weights=None).eval()
    net = DilatedResNet.from_torchvision(tv).eval()
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        for mine, theirs in zip(net(x), tv_stages(tv, x)):
            torch.testing.assert_close(mine, theirs)


def test_from_torchvision_errors():
    with pytest.raises(TypeError, match="torchvision.models.ResNet"):
        DilatedResNet.from_torchvision(torchvision.models.mobilenet_v3_small(weights=None))
    with pytest.raises(ValueError, match="output_stride"):
        DilatedResNet.from_torchvision(torchvision.models.resnet18(weights=None), output_stride=4)


@pytest.mark.parametrize("kwargs, name", [
    ({"output_stride": 12}, "output_stride"),
    ({"block": "wide"}, "block"),
    ({"planes": (4, 8), "blocks": (1,)}, "planes, blocks"),
    ({"dilations": (1, 0, 1, 1)}, "dilations"),
    ({"stem_channels": 0}, "stem_channels"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DilatedResNet(**kwargs)


def test_wrong_input_channels():
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        DilatedResNet(**SMALL)(torch.randn(1, 1, 32, 32))
