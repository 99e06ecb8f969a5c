"""The layer-injection convention (dilconv._layers): how act_layer and norm_layer are called."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dilconv._layers import conv_bias, create_act, create_norm


@pytest.mark.parametrize(
    ("act_layer", "kind", "inplace"),
    [
        (nn.ReLU, nn.ReLU, True),
        (nn.SiLU, nn.SiLU, True),
        (nn.GELU, nn.GELU, None),
        (nn.Tanh, nn.Tanh, None),
        (partial(nn.LeakyReLU, negative_slope=0.2), nn.LeakyReLU, True),
        (partial(nn.LeakyReLU, 0.2, inplace=False), nn.LeakyReLU, False),
        (partial(nn.ReLU, inplace=False), nn.ReLU, False),
        (None, nn.Identity, None),
    ],
    ids=lambda v: getattr(v, "__name__", None) or repr(v)[:20],
)
def test_create_act_uses_inplace_where_the_layer_takes_it(act_layer, kind, inplace):
    act = create_act(act_layer)
    assert type(act) is kind
    assert getattr(act, "inplace", None) == inplace


def test_create_act_accepts_a_plain_function_returning_a_module():
    assert isinstance(create_act(lambda: nn.Hardtanh(-1, 1)), nn.Hardtanh)


@pytest.mark.parametrize("bad", ["relu", nn.ReLU(), 3])
def test_create_act_refuses_what_is_not_a_factory(bad):
    with pytest.raises(TypeError, match="act_layer"):
        create_act(bad)


@pytest.mark.parametrize(
    "norm_layer", [nn.BatchNorm2d, partial(nn.GroupNorm, 2), FrozenBatchNorm2d,
                   lambda c: nn.GroupNorm(1, c)],
    ids=["bn", "groupnorm", "frozen_bn", "lambda"],
)
@pytest.mark.parametrize("factory", [{}, {"dtype": torch.float64}, {"device": "meta"}],
                         ids=["default", "float64", "meta"])
def test_create_norm_reaches_device_and_dtype(norm_layer, factory):
    norm = create_norm(norm_layer, 4, **factory)
    tensors = [*norm.parameters(), *norm.buffers()]
    assert tensors
    for t in tensors:
        if t.is_floating_point():
            assert t.dtype == factory.get("dtype", torch.float32)
        assert t.device.type == factory.get("device", "cpu")


def test_create_norm_none_is_identity_and_gives_the_conv_a_bias():
    assert isinstance(create_norm(None, 4), nn.Identity)
    assert conv_bias(None) and not conv_bias(nn.BatchNorm2d)


def test_create_norm_refuses_an_instance():
    with pytest.raises(TypeError, match="norm_layer"):
        create_norm(nn.BatchNorm2d(4), 4)
