"""Shapes, invariants and errors of the residual blocks and TransposedConvUpsampler."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from dilconv import DilatedBasicBlock, DilatedBottleneck, TransposedConvUpsampler

sizes = st.integers(1, 23)


def strided(size: int, stride: int) -> int:
    return (size - 1) // stride + 1


@given(h=sizes, w=sizes, stride=st.integers(1, 3), dilation=st.integers(1, 4),
       c_in=st.integers(1, 9), planes=st.integers(1, 6), expansion=st.integers(1, 4))
def test_bottleneck_shape(h, w, stride, dilation, c_in, planes, expansion):
    block = DilatedBottleneck(c_in, planes, stride, dilation, expansion).eval()
    out = block(torch.randn(2, c_in, h, w))
    assert out.shape == (2, planes * expansion, strided(h, stride), strided(w, stride))
    assert block.out_channels == planes * expansion
    assert (out >= 0).all()


@given(h=sizes, w=sizes, stride=st.integers(1, 3), dilation=st.integers(1, 4),
       c_in=st.integers(1, 9), planes=st.integers(1, 9))
def test_basic_block_shape(h, w, stride, dilation, c_in, planes):
    block = DilatedBasicBlock(c_in, planes, stride, dilation).eval()
    out = block(torch.randn(1, c_in, h, w))
    assert out.shape == (1, planes, strided(h, stride), strided(w, stride))


def test_projection_only_when_needed():
    assert DilatedBottleneck(64, 16).downsample is None
    assert DilatedBottleneck(64, 16, stride=2).downsample is not None
    assert DilatedBottleneck(32, 16).downsample is not None
    assert DilatedBasicBlock(16, 16).downsample is None
    convs = [m for m in DilatedBottleneck(32, 16, stride=2).modules() if isinstance(m, nn.Conv2d)]
    assert all(c.bias is None for c in convs)


def test_dilation_sets_padding():
    block = DilatedBottleneck(8, 4, dilation=3)
    assert block.conv2.dilation == (3, 3) and block.conv2.padding == (3, 3)


@pytest.mark.parametrize("kwargs, name", [
    ({"in_channels": 0, "planes": 4}, "in_channels"),
    ({"in_channels": 4, "planes": -1}, "planes"),
    ({"in_channels": 4, "planes": 4, "dilation": 0}, "dilation"),
    ({"in_channels": 4, "planes": 4, "stride": 0}, "stride"),
])
@pytest.mark.parametrize("cls", [DilatedBottleneck, DilatedBasicBlock])
def test_bad_arguments_name_the_argument(cls, kwargs, name):
    with pytest.raises(ValueError, match=name):
        cls(**kwargs)


def test_non_int_channels_is_type_error():
    with pytest.raises(TypeError, match="planes"):
        DilatedBottleneck(4, 2.5)


@pytest.mark.parametrize("cls", [DilatedBottleneck, DilatedBasicBlock])
def test_bad_input_is_caught_before_conv(cls):
    block = cls(8, 4)
    with pytest.raises(ValueError, match="expected 8 input channels, got 5"):
        block(torch.randn(1, 5, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(8, 8, 8))
    with pytest.raises(ValueError, match="non-empty spatial size"):
        block(torch.randn(1, 8, 0, 8))


@pytest.mark.parametrize("cls", [DilatedBottleneck, DilatedBasicBlock])
@pytest.mark.parametrize("stride", [1, 2])
def test_empty_batch_passes_in_train_and_eval(cls, stride):
    for train in (True, False):
        block = cls(8, 4, stride).train(train)
        out = block(torch.randn(0, 8, 9, 8))
        assert out.shape == (0, *block(torch.randn(1, 8, 9, 8)).shape[1:])


@given(h=sizes, w=sizes, scale=st.integers(1, 4), c_in=st.integers(1, 5), c_out=st.integers(1, 5))
def test_upsampler_default_shape_follows_the_formula(h, w, scale, c_in, c_out):
    up = TransposedConvUpsampler(c_in, c_out, scale).eval()
    out = up(torch.randn(1, c_in, h, w))
    conv = up.conv
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    expected = [(n - 1) * s - 2 * p + d * (k - 1) + conv.output_padding[0] + 1 for n in (h, w)]
    assert list(out.shape[-2:]) == expected == [scale * h, scale * w]


@given(data=st.data(), h=sizes, w=sizes, scale=st.integers(1, 4))
def test_upsampler_reaches_every_target_a_stride_could_come_from(data, h, w, scale):
    th = data.draw(st.integers(scale * (h - 1) + 1, scale * h + scale - 1))
    tw = data.draw(st.integers(scale * (w - 1) + 1, scale * w + scale - 1))
    up = TransposedConvUpsampler(3, 2, scale).eval()
    x = torch.randn(1, 3, h, w)
    out = up(x, output_size=(th, tw))
    assert out.shape == (1, 2, th, tw)
    full = up(x)
    common = (min(th, scale * h), min(tw, scale * w))
    torch.testing.assert_close(out[..., : common[0], : common[1]],
                               full[..., : common[0], : common[1]])


def test_upsampler_refuses_unreachable_target():
    up = TransposedConvUpsampler(3, 3)
    with pytest.raises(ValueError, match="can produce sizes 7..9"):
        up(torch.randn(1, 3, 4, 4), output_size=(12, 8))


def test_upsampler_without_norm_has_bias():
    assert TransposedConvUpsampler(4, 4, norm_layer=None).conv.bias is not None
    assert isinstance(TransposedConvUpsampler(4, 4, norm_layer=None).norm, nn.Identity)
    assert TransposedConvUpsampler(4, 4).conv.bias is None
    norm = TransposedConvUpsampler(4, 4, norm_layer=partial(nn.GroupNorm, 2)).norm
    assert isinstance(norm, nn.GroupNorm) and norm.num_groups == 2


@pytest.mark.parametrize("target", [(8, 10), (7, 9), (9, 11), (7, 11)], ids=str)
def test_upsampler_calls_its_conv_module(target):
    # Hooks, FX, quantization swaps and pruning see the module only if forward calls it.
    up = TransposedConvUpsampler(3, 2, norm_layer=None).eval()
    calls = []
    up.conv.register_forward_hook(lambda module, args, out: calls.append(tuple(out.shape[-2:])))
    out = up(torch.randn(1, 3, 4, 5), output_size=target)
    assert out.shape[-2:] == target and len(calls) == 1


@given(data=st.data(), h=sizes, w=sizes, scale=st.integers(1, 4))
def test_upsampler_bias_fills_rows_past_the_input(data, h, w, scale):
    # Rows past scale * H see no input: output_padding gives them the bias alone.
    th = data.draw(st.integers(scale * (h - 1) + 1, scale * h + scale - 1))
    tw = data.draw(st.integers(scale * (w - 1) + 1, scale * w + scale - 1))
    up = TransposedConvUpsampler(3, 2, scale, norm_layer=None).eval()
    x = torch.randn(1, 3, h, w)
    grown = (max(th, scale * h), max(tw, scale * w))
    pad = (grown[0] - scale * h, grown[1] - scale * w)
    ref = F.conv_transpose2d(x, up.conv.weight, up.conv.bias, stride=scale, output_padding=pad)
    torch.testing.assert_close(up(x, output_size=(th, tw)), ref[..., :th, :tw])
