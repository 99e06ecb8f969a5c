"""LearnableResizer (Talebi & Milanfar, ICCV 2021), with and without CBAM."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dilconv import CBAM, LearnableResizer


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def conv_params(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def bn_params(c: int) -> int:
    return 2 * c


def cbam_params(c: int, reduction: int = 16, k: int = 7) -> int:
    hidden = max(1, c // reduction)
    return conv_params(c, hidden, 1) + conv_params(hidden, c, 1) + 2 * k * k + bn_params(1)


def resizer_params(c: int, n: int, r: int, attention: str | None = None) -> int:
    stem = conv_params(c, n, 7) + conv_params(n, n, 1) + bn_params(n)
    block = 2 * (conv_params(n, n, 3) + bn_params(n))
    if attention == "cbam":
        block += cbam_params(n)
    tail = conv_params(n, n, 3) + bn_params(n) + conv_params(n, c, 7)
    return stem + r * block + tail


def test_default_parameter_count_matches_formula_and_docstring():
    expected = resizer_params(3, 16, 1)
    assert n_params(LearnableResizer()) == expected
    assert n_params(LearnableResizer(attention="cbam")) == resizer_params(3, 16, 1, "cbam")
    documented = re.search(r"configuration has ([\d,]+) parameters", LearnableResizer.__doc__)
    assert documented is not None
    assert int(documented.group(1).replace(",", "")) == expected


@pytest.mark.parametrize("c,n,r", [(3, 16, 1), (1, 8, 0), (4, 32, 3), (3, 5, 2)])
@pytest.mark.parametrize("attention", [None, "cbam"])
def test_parameter_count_formula(c, n, r, attention):
    module = LearnableResizer(c, 8, num_filters=n, num_res_blocks=r, attention=attention)
    assert n_params(module) == resizer_params(c, n, r, attention)


@pytest.mark.parametrize("n,r", [(16, 1), (8, 3), (64, 2)])
def test_cbam_adds_exactly_one_cbam_per_block(n, r):
    plain = LearnableResizer(num_filters=n, num_res_blocks=r)
    with_cbam = LearnableResizer(num_filters=n, num_res_blocks=r, attention="cbam")
    assert n_params(with_cbam) - n_params(plain) == r * n_params(CBAM(n))
    assert sum(isinstance(m, CBAM) for m in with_cbam.modules()) == r
    assert not any(isinstance(m, CBAM) for m in plain.modules())


sizes = st.integers(min_value=1, max_value=40)


@settings(max_examples=20, deadline=None)
@given(
    in_h=sizes,
    in_w=sizes,
    out_h=sizes,
    out_w=sizes,
    channels=st.integers(1, 4),
    interpolation=st.sampled_from(["bilinear", "bicubic", "nearest", "area"]),
    attention=st.sampled_from([None, "cbam"]),
)
def test_any_size_to_any_size(in_h, in_w, out_h, out_w, channels, interpolation, attention):
    module = LearnableResizer(
        channels, (out_h, out_w), num_filters=4, interpolation=interpolation, attention=attention
    ).eval()
    y = module(torch.randn(2, channels, in_h, in_w))
    assert y.shape == (2, channels, out_h, out_w)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("in_size,out_size", [((32, 32), (224, 224)), ((33, 47), (9, 5))])
def test_up_and_down_and_per_call_override(in_size, out_size):
    module = LearnableResizer(output_size=out_size, num_filters=4)
    x = torch.randn(1, 3, *in_size)
    assert module(x).shape[-2:] == out_size
    assert module(x, output_size=(13, 7)).shape[-2:] == (13, 7)
    assert module(x, output_size=11).shape[-2:] == (11, 11)
    assert module(x).shape[-2:] == out_size  # the override does not stick


def test_int_output_size_is_square():
    x = torch.randn(1, 3, 10, 12)
    square = LearnableResizer(output_size=15, num_filters=4)
    assert square.output_size == (15, 15)
    assert square(x).shape == (1, 3, 15, 15)
    assert LearnableResizer(output_size=[15, 15]).output_size == (15, 15)


def test_residual_over_interpolated_skip():
    torch.manual_seed(0)
    module = LearnableResizer(output_size=(20, 24), num_filters=4, interpolation="bicubic").eval()
    nn.init.zeros_(module.out_conv.weight)
    nn.init.zeros_(module.out_conv.bias)
    x = torch.randn(2, 3, 9, 11)
    expected = F.interpolate(x, size=(20, 24), mode="bicubic", align_corners=False)
    torch.testing.assert_close(module(x), expected)


def test_forward_matches_architecture():
    torch.manual_seed(0)
    module = LearnableResizer(2, (12, 10), num_filters=4, num_res_blocks=2, attention="cbam")
    module.eval()
    x = torch.randn(2, 2, 7, 9)

    def resize(t):
        return F.interpolate(t, size=(12, 10), mode="bilinear", align_corners=False)

    def act(t):
        return F.leaky_relu(t, 0.2)

    m = module
    feats = m.stem_norm(act(m.stem_proj(act(m.stem_conv(x)))))
    resized = resize(feats)
    out = resized
    for block in m.blocks:
        branch = block.bn2(block.conv2(act(block.bn1(block.conv1(out)))))
        out = block.attn(branch) + out
    out = m.out_conv(m.tail_norm(m.tail_conv(out)) + resized) + resize(x)
    torch.testing.assert_close(module(x), out)


def test_state_dict_layout():
    keys = set(LearnableResizer(num_res_blocks=2, attention="cbam").state_dict())
    for name in [
        "stem_conv.weight",
        "stem_proj.weight",
        "stem_norm.weight",
        "blocks.0.conv1.weight",
        "blocks.1.bn2.running_var",
        "blocks.1.attn.channel.fc1.weight",
        "blocks.1.attn.spatial.conv.weight",
        "tail_conv.weight",
        "tail_norm.weight",
        "out_conv.weight",
        "out_conv.bias",
    ]:
        assert name in keys
    plain = LearnableResizer(num_res_blocks=2)
    plain.load_state_dict(LearnableResizer(num_res_blocks=2).state_dict())


@pytest.mark.parametrize(
    "kwargs,argument",
    [
        ({"interpolation": "lanczos"}, "interpolation"),
        ({"interpolation": "trilinear"}, "interpolation"),
        ({"attention": "se"}, "attention"),
        ({"attention": "CBAM"}, "attention"),
        ({"output_size": 0}, "output_size"),
        ({"output_size": (224, -1)}, "output_size"),
        ({"output_size": (1, 2, 3)}, "output_size"),
        ({"in_channels": 0}, "in_channels"),
        ({"num_filters": 0}, "num_filters"),
        ({"num_res_blocks": -1}, "num_res_blocks"),
    ],
)
def test_bad_arguments(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        LearnableResizer(**kwargs)


def test_bad_per_call_size():
    module = LearnableResizer(num_filters=4)
    with pytest.raises(ValueError, match="output_size"):
        module(torch.randn(1, 3, 8, 8), output_size=(0, 8))


def test_wrong_input_channels():
    with pytest.raises(ValueError, match="expected 3 input channels, got 1"):
        LearnableResizer(num_filters=4)(torch.randn(2, 1, 8, 8))
    with pytest.raises(ValueError, match="4-D"):
        LearnableResizer(num_filters=4)(torch.randn(3, 8, 8))


def test_factory_kwargs_and_repr():
    module = LearnableResizer(attention="cbam", device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" for p in module.parameters())
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert module.out_channels == 3
    assert "output_size=(224, 224)" in repr(module) and "attention='cbam'" in repr(module)


def test_backward_reaches_every_parameter():
    module = LearnableResizer(output_size=(16, 16), num_filters=4, attention="cbam")
    module(torch.randn(2, 3, 8, 8)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
