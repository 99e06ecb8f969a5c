"""CBAM.from_timm computes what timm's CbamModule computes, keeps what it had, and refuses what
it cannot express (LightCbamModule, other gates, even kernels, norms with an activation)."""

from __future__ import annotations

import functools

import pytest
import torch
from timm.layers import freeze_batch_norm_2d, get_act_layer
from timm.layers.cbam import CbamModule, LightCbamModule
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

from dilconv import CBAM
from dilconv.convert import ConversionError, cbam_from_timm
from peer_helpers import randomise_state

SETTINGS = {
    "default": {},
    "rd_ratio_kernel_3": {"rd_ratio": 1 / 4, "spatial_kernel_size": 3},
    "rd_channels_bias_silu": {"rd_channels": 5, "mlp_bias": True, "act_layer": nn.SiLU},
    "rd_divisor_leaky": {"rd_ratio": 1 / 5, "rd_divisor": 4,
                         "act_layer": functools.partial(nn.LeakyReLU, 0.2)},
    "gelu_kernel_1": {"act_layer": get_act_layer("gelu"), "spatial_kernel_size": 1},
    "prelu_kernel_5": {"act_layer": get_act_layer("prelu"), "spatial_kernel_size": 5},
}
CHANNELS = 24
# Ours -> timm's state-dict keys.
THEIR_KEYS = {"spatial.conv": "spatial.conv.conv", "spatial.bn": "spatial.conv.bn"}


def randomise(model: nn.Module) -> nn.Module:
    return randomise_state(model, std=0.5)


def theirs(key: str) -> str:
    module, _, name = key.rpartition(".")
    return f"{THEIR_KEYS.get(module, module)}.{name}"


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_converted_computes_what_timm_computes(name, train):
    torch.manual_seed(0)
    source = randomise(CbamModule(CHANNELS, **SETTINGS[name])).train(train)
    block = CBAM.from_timm(source)
    assert block.training == train
    assert block.channel.hidden_channels == source.channel.fc1.out_channels
    x = torch.randn(3, CHANNELS, 11, 6)
    torch.testing.assert_close(block(x), source(x))
    state = source.state_dict()
    assert len(block.state_dict()) == len(state)
    for key, value in block.state_dict().items():
        torch.testing.assert_close(value, state[theirs(key)], msg=key)


def test_frozen_norm_stays_frozen():
    torch.manual_seed(0)
    source = freeze_batch_norm_2d(randomise(CbamModule(CHANNELS)))
    block = CBAM.from_timm(source)
    assert isinstance(block.spatial.bn, FrozenBatchNorm2d)
    x = torch.randn(2, CHANNELS, 7, 9)
    torch.testing.assert_close(block.train()(x), source.train()(x))


def test_requires_grad_train_mode_device_and_dtype_are_kept():
    source = CbamModule(CHANNELS).train()
    source.channel.fc1.requires_grad_(False)
    source.spatial.eval()
    block = cbam_from_timm(source)
    assert [n for n, p in block.named_parameters() if not p.requires_grad] == [
        "channel.fc1.weight"]
    assert {n for n, m in block.named_modules() if not m.training} == {
        "spatial", "spatial.conv", "spatial.bn"}
    double = CBAM.from_timm(CbamModule(CHANNELS, act_layer=get_act_layer("prelu")).double())
    assert {t.dtype for t in double.state_dict().values() if t.is_floating_point()} == {
        torch.float64}
    single = CBAM.from_timm(CbamModule(CHANNELS).double(), dtype=torch.float32)
    assert single.spatial.conv.weight.dtype == torch.float32
    with torch.device("meta"):
        on_meta = CbamModule(CHANNELS)
    assert all(t.is_meta for t in CBAM.from_timm(on_meta).state_dict().values())


def _set(path: str, module: nn.Module):
    def change(model):
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, module)
        return model
    return change


REFUSALS = {
    "light_cbam": (lambda: LightCbamModule(CHANNELS), TypeError,
                   "cannot express timm's LightCbamModule"),
    "not_cbam": (lambda: CBAM(CHANNELS), TypeError, "expects timm's CbamModule .* got CBAM"),
    "hard_sigmoid_gate": (lambda: CbamModule(CHANNELS, gate_layer="hard_sigmoid"),
                          ConversionError, "gate_layer is Hardsigmoid"),
    "spatial_gate_tanh": (lambda: _set("spatial.gate", nn.Tanh())(CbamModule(CHANNELS)),
                          ConversionError, r"gate_layer is Tanh \(spatial.gate\)"),
    "even_kernel": (lambda: CbamModule(CHANNELS, spatial_kernel_size=4), ConversionError,
                    "spatial_kernel_size must be odd, got 4"),
    "norm_with_act": (lambda: _set("spatial.conv.bn.act", nn.ReLU())(CbamModule(CHANNELS)),
                      ConversionError, "spatial.conv.bn applies act ReLU"),
    "norm_unsupported": (lambda: _set("spatial.conv.bn", nn.InstanceNorm2d(1))(
        CbamModule(CHANNELS)), TypeError, "spatial.conv.bn is InstanceNorm2d"),
    "conv_changed": (lambda: _set("spatial.conv.conv", nn.Conv2d(2, 1, 7, padding=4))(
        CbamModule(CHANNELS)), ConversionError, "cannot express spatial.conv.conv"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refuses_what_it_cannot_express(name):
    build, error, message = REFUSALS[name]
    with pytest.raises(error, match=message):
        CBAM.from_timm(build())
