"""Gradients that a block reduces over whole maps, under float16 autocast (issue 21, item 2)."""

from __future__ import annotations

import copy

import pytest
import torch

from dilconv import ChannelAttention


def test_channel_attention_gradients_stay_finite_in_float16():
    # The gate (N, C, 1, 1) multiplies a 256 x 256 map: its gradient sums 65,536 products
    # of one sign under a squared loss, past float16's 65,504, and the MLP's convolutions,
    # in float16 under autocast, carry it on.
    torch.manual_seed(0)
    x = torch.randn(1, 16, 256, 256).half()
    module = ChannelAttention(16, reduction=4).eval()
    reference = copy.deepcopy(module).double()
    reference(x.double()).square().sum().backward()
    with torch.autocast("cpu", dtype=torch.float16):
        out = module(x)
    out.float().square().sum().backward()
    for p, ref in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.isfinite(p.grad).all()
        assert (p.grad.double() - ref.grad).norm() / ref.grad.norm() < 0.01


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_channel_attention_half_inputs_without_autocast(dtype):
    # Half inputs into a float32 module (no autocast): the wide path keeps the gate and its
    # gradient in float32 and gives the output in the input's dtype.
    torch.manual_seed(0)
    x = torch.randn(1, 16, 256, 256).to(dtype)
    module = ChannelAttention(16, reduction=4).eval()
    reference = copy.deepcopy(module).double()
    reference(x.double()).square().sum().backward()
    out = module(x)
    assert out.dtype == dtype
    out.float().square().sum().backward()
    for p, ref in zip(module.parameters(), reference.parameters(), strict=True):
        assert torch.isfinite(p.grad).all()
        assert (p.grad.double() - ref.grad).norm() / ref.grad.norm() < 0.02


def test_channel_attention_float32_path_is_unchanged():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 9, 7)
    module = ChannelAttention(8, reduction=2)
    n = x.shape[0]
    mlp = module._mlp(torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)]))
    torch.testing.assert_close(module(x), x * torch.sigmoid(mlp[:n] + mlp[n:]), rtol=0, atol=0)
