"""ChannelAttention, SpatialAttention and CBAM (Woo et al. 2018)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dilconv import CBAM, ChannelAttention, SpatialAttention
from dilconv._checks import reduced_channels


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def channel_attention_params(channels: int, reduction: int) -> int:
    hidden = max(1, channels // reduction)
    return (channels * hidden + hidden) + (hidden * channels + channels)


def spatial_attention_params(kernel_size: int) -> int:
    return 2 * kernel_size * kernel_size + 2  # conv without bias, BatchNorm2d(1) affine


sizes = st.integers(min_value=1, max_value=13)


@settings(max_examples=20, deadline=None)
@given(
    batch=st.integers(1, 3),
    channels=st.integers(1, 40),
    reduction=st.integers(1, 20),
    height=sizes,
    width=sizes,
    kernel=st.sampled_from([1, 3, 5, 7]),
)
def test_shapes(batch, channels, reduction, height, width, kernel):
    x = torch.randn(batch, channels, height, width)
    assert ChannelAttention(channels, reduction)(x).shape == x.shape
    assert SpatialAttention(kernel).eval()(x).shape == x.shape
    assert CBAM(channels, reduction, kernel).eval()(x).shape == x.shape


@settings(max_examples=20, deadline=None)
@given(
    channels=st.integers(1, 32),
    reduction=st.integers(1, 20),
    height=sizes,
    width=sizes,
    train=st.booleans(),
    scale=st.floats(0.01, 100.0),
)
def test_cbam_never_amplifies(channels, reduction, height, width, train, scale):
    torch.manual_seed(channels * 31 + height)
    x = torch.randn(2, channels, height, width) * scale
    block = CBAM(channels, reduction).train(train)
    y = block(x)
    assert y.shape == x.shape
    assert torch.all(y.abs() <= x.abs())


def test_cbam_applies_channel_then_spatial():
    torch.manual_seed(0)
    block = CBAM(8, reduction=2).eval()
    x = torch.randn(2, 8, 5, 6)
    expected = block.spatial(block.channel(x))
    torch.testing.assert_close(block(x), expected)
    reversed_order = block.channel(block.spatial(x))
    assert not torch.allclose(block(x), reversed_order)


def test_channel_attention_formula():
    torch.manual_seed(0)
    block = ChannelAttention(6, reduction=2)
    x = torch.randn(3, 6, 4, 5)

    def mlp(d):
        return block.fc2(torch.relu(block.fc1(d)))

    gate = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
    torch.testing.assert_close(block(x), x * gate)


def test_spatial_attention_formula():
    torch.manual_seed(0)
    block = SpatialAttention(3).eval()
    with torch.no_grad():
        block.bn.running_mean.fill_(0.5)
        block.bn.running_var.fill_(2.0)
    x = torch.randn(2, 4, 6, 7)
    pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
    conv = nn.functional.conv2d(pooled, block.conv.weight, padding=1)
    gate = torch.sigmoid((conv - 0.5) / torch.sqrt(torch.tensor(2.0 + block.bn.eps)))
    torch.testing.assert_close(block(x), x * gate)


@pytest.mark.parametrize("channels,reduction", [(1, 16), (8, 16), (15, 16), (3, 4)])
def test_reduced_width_never_below_one(channels, reduction):
    assert channels < reduction
    block = ChannelAttention(channels, reduction)
    assert block.hidden_channels == 1
    assert block.fc1.out_channels == 1
    assert reduced_channels(channels, reduction) == 1


@pytest.mark.parametrize("channels,reduction", [(64, 16), (50, 16), (16, 16), (7, 2), (33, 1)])
def test_reduced_width_is_floor(channels, reduction):
    assert reduced_channels(channels, reduction) == channels // reduction
    assert ChannelAttention(channels, reduction).fc1.out_channels == channels // reduction


@pytest.mark.parametrize(
    "channels,reduction,kernel", [(64, 16, 7), (16, 16, 7), (5, 16, 3), (32, 8, 1), (128, 4, 5)]
)
def test_parameter_counts(channels, reduction, kernel):
    ca = channel_attention_params(channels, reduction)
    sa = spatial_attention_params(kernel)
    assert n_params(ChannelAttention(channels, reduction)) == ca
    assert n_params(SpatialAttention(kernel)) == sa
    assert n_params(CBAM(channels, reduction, kernel)) == ca + sa


@pytest.mark.parametrize(
    "build,argument",
    [
        (lambda: ChannelAttention(0), "channels"),
        (lambda: ChannelAttention(8, 0), "reduction"),
        (lambda: SpatialAttention(4), "kernel_size"),
        (lambda: SpatialAttention(0), "kernel_size"),
        (lambda: SpatialAttention(-3), "kernel_size"),
        (lambda: CBAM(0), "channels"),
        (lambda: CBAM(8, reduction=0), "reduction"),
        (lambda: CBAM(8, spatial_kernel=6), "spatial_kernel"),
        (lambda: CBAM(8, spatial_kernel=0), "spatial_kernel"),
    ],
)
def test_bad_arguments(build, argument):
    with pytest.raises(ValueError, match=argument):
        build()


def test_non_int_arguments():
    with pytest.raises(TypeError, match="channels"):
        CBAM(8.0)
    with pytest.raises(TypeError, match="spatial_kernel"):
        CBAM(8, spatial_kernel=7.0)


@pytest.mark.parametrize("block", [ChannelAttention(8), CBAM(8)], ids=["channel", "cbam"])
def test_wrong_channel_count(block):
    with pytest.raises(ValueError, match="expected 8 input channels, got 6"):
        block(torch.randn(2, 6, 5, 5))


@pytest.mark.parametrize("block", [ChannelAttention(4), SpatialAttention(), CBAM(4)])
def test_wrong_rank(block):
    with pytest.raises(ValueError, match="4-D"):
        block(torch.randn(4, 5, 5))


def test_factory_kwargs_and_options():
    block = CBAM(32, act_layer=nn.GELU, norm_layer=nn.Identity, device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" for p in block.parameters())
    assert all(p.dtype == torch.float64 for p in block.parameters())
    assert isinstance(block.channel.act, nn.GELU)
    assert isinstance(block.spatial.bn, nn.Identity)
    assert block.out_channels == 32
    assert "channels=32" in repr(block) and "kernel_size=7" in repr(block)


def test_backward_reaches_every_parameter():
    block = CBAM(8, reduction=4)
    block(torch.randn(2, 8, 5, 7)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_hidden_channels_and_mlp_bias_options():
    block = CBAM(32, reduction=4, hidden_channels=5, mlp_bias=False)
    assert block.channel.hidden_channels == 5 and block.channel.fc1.out_channels == 5
    assert block.channel.fc1.bias is None and block.channel.fc2.bias is None
    assert set(block.state_dict()) >= {"channel.fc1.weight", "channel.fc2.weight"}
    assert not any(key.startswith("channel.") and key.endswith("bias")
                   for key in block.state_dict())
    assert n_params(block) == 2 * 32 * 5 + spatial_attention_params(7)
    with pytest.raises(ValueError, match="hidden_channels"):
        ChannelAttention(8, hidden_channels=0)
