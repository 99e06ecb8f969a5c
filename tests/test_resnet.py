"""DilatedResNet: stage shapes, output_stride, initialisation, torchvision conversion, errors."""

from __future__ import annotations

import functools
import math

import pytest
import torch
import torchvision
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dilconv import DilatedBasicBlock, DilatedBottleneck, DilatedResNet

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


def test_per_block_dilations_rebuild_a_layout():
    torch.manual_seed(0)
    net = DilatedResNet(planes=(4, 4, 4, 4), blocks=(2, 2, 3, 3), output_stride=8).eval()
    strides = [stage[0].stride for stage in net.stages]
    copy = DilatedResNet(planes=(4, 4, 4, 4), blocks=(2, 2, 3, 3), strides=strides,
                         dilations=net.stage_dilations).eval()
    assert copy.stage_dilations == net.stage_dilations and copy.reductions == net.reductions
    copy.load_state_dict(net.state_dict())
    x = torch.randn(1, 3, 40, 36)
    with torch.no_grad():
        torch.testing.assert_close(copy(x)[-1], net(x)[-1])
    grid = DilatedResNet(**SMALL, dilations=(1, (1, 3), 1, 2), output_stride=8)
    assert [b.conv2.dilation[0] for b in grid.layer2] == [1, 3]
    assert grid.stage_dilations == [(1,), (1, 3), (1,), (4,)]


def _convs(net: nn.Module) -> list[nn.Conv2d]:
    return [m for m in net.modules() if isinstance(m, nn.Conv2d)]


def test_conv_weights_are_kaiming_normal_fan_out():
    torch.manual_seed(0)
    net = DilatedResNet(stem_channels=16, planes=(16, 32, 64, 128), blocks=(1, 1, 1, 1), groups=2)
    for conv in _convs(net):
        w = conv.weight.detach().double().flatten()
        n = w.numel()
        sigma = math.sqrt(2 / (conv.out_channels * conv.kernel_size[0] * conv.kernel_size[1]))
        # 6 standard errors: sigma / sqrt(n) for the mean, sigma / sqrt(2 (n - 1)) for the std.
        assert abs(w.mean().item()) < 6 * sigma / math.sqrt(n), conv
        assert abs(w.std().item() - sigma) < 6 * sigma / math.sqrt(2 * (n - 1)), conv


NORM_LAYERS = {"batch": nn.BatchNorm2d, "group": functools.partial(nn.GroupNorm, 2),
               "frozen": FrozenBatchNorm2d, "none": None}


@pytest.mark.parametrize("norm", sorted(NORM_LAYERS))
def test_reset_parameters_restarts_norms_at_one_zero_and_biases_at_zero(norm):
    net = DilatedResNet(**SMALL, norm_layer=NORM_LAYERS[norm], stem_bias=True)
    with torch.no_grad():
        for t in [*net.parameters(), *net.buffers()]:
            if t.is_floating_point():
                t.uniform_(0.5, 1.5)
    net.reset_parameters()
    norms = [m for m in net.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm,
                                                        FrozenBatchNorm2d))]
    per_block = [3 + (b.downsample is not None) for stage in net.stages for b in stage]
    assert len(norms) == (0 if norm == "none" else 1 + sum(per_block))
    for m in norms:
        assert torch.all(m.weight == 1) and torch.all(m.bias == 0), m
        if isinstance(m, nn.BatchNorm2d):
            assert torch.all(m.running_mean == 0) and torch.all(m.running_var == 1), m
    for conv in _convs(net):
        assert conv.bias is None or torch.all(conv.bias == 0), conv
    assert net.conv1.bias is not None


@pytest.mark.parametrize("block", ["basic", "bottleneck"])
@pytest.mark.parametrize("zero", [True, False])
def test_zero_init_residual_makes_each_block_relu_of_its_shortcut(block, zero):
    torch.manual_seed(0)
    net = DilatedResNet(**SMALL, block=block, output_stride=16, zero_init_residual=zero)
    last = "bn3" if block == "bottleneck" else "bn2"
    for stage in net.stages:
        for b in stage:
            norms = {n: m for n, m in b.named_modules() if isinstance(m, nn.BatchNorm2d)}
            assert len(norms) == (3 if block == "bottleneck" else 2) + (b.downsample is not None)
            for name, m in norms.items():
                assert torch.all(m.weight == (0 if zero and name == last else 1)), name
            for train in (True, False):
                b.train(train)
                x = torch.randn(2, b.in_channels, 9, 8)
                with torch.no_grad():
                    shortcut = x if b.downsample is None else b.downsample(x)
                    identity = torch.allclose(b(x), torch.relu(shortcut))
                assert identity == zero


def test_zero_init_residual_on_meta_touches_no_data():
    net = DilatedResNet(**SMALL, zero_init_residual=True, device="meta")
    net.reset_parameters()
    assert all(t.is_meta for t in [*net.parameters(), *net.buffers()])
    assert isinstance(net.layer1[0], DilatedBottleneck)


def test_zero_init_residual_needs_a_norm_weight():
    with pytest.raises(ValueError, match=r"zero_init_residual.*layer1\.0\.bn3"):
        DilatedResNet(**SMALL, norm_layer=None, zero_init_residual=True)


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
    ({"dilations": (1, 1, (1, 2), 1)}, r"dilations\[2\] must be an int or give one dilation"),
    ({"dilations": (1, 1, (1, 2, 0, 1, 1, 1), 1)}, "dilations must be >= 1"),
    ({"stem_channels": 0}, "stem_channels"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DilatedResNet(**kwargs)


def test_wrong_input_channels():
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        DilatedResNet(**SMALL)(torch.randn(1, 1, 32, 32))
