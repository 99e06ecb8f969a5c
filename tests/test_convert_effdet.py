"""BiFPN.from_effdet: effdet's BiFpn, every EfficientDet configuration, gives the same outputs.

effdet's modules are built with random weights and randomised BN statistics and fusion weights,
converted, and both are run on the same levels. Eval mode is compared in float32 at the
tolerance the issue sets (1e-5 of the output's largest magnitude). Train mode normalises with
batch statistics; on P7, 1 x 1 at these sizes, BN divides by the spread of a handful of values,
which amplifies float32 rounding: effdet against itself, NCHW against channels_last, differs by
1.5e-5 (tf_efficientdet_d7) to 2.4e-2 (tf_efficientdet_d7 at 128 x 128, batch 2). So train mode
is compared in float64 for every configuration (where rounding is 1e-14) and in float32 for D0,
whose three layers stay within 1e-5.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

from dilconv import BiFPN
from dilconv.convert import ConversionError

effdet = pytest.importorskip("effdet")
timm = pytest.importorskip("timm")
from effdet.config.model_config import efficientdet_model_param_dict  # noqa: E402
from effdet.efficientdet import BiFpn, get_feature_info  # noqa: E402

# Every EfficientDet effdet defines: efficientdet_d0..d5 and tf_efficientdet_d0..d7 (effdet
# 0.4.1 has no efficientdet_d6/d7; they would join here if it had).
CONFIGS = [name for prefix in ("efficientdet_d", "tf_efficientdet_d") for i in range(8)
           if (name := f"{prefix}{i}") in efficientdet_model_param_dict]
SLOW = {"efficientdet_d5", "tf_efficientdet_d5", "tf_efficientdet_d6", "tf_efficientdet_d7"}


def effdet_fpn(name: str, size: int = 128, **overrides) -> nn.Module:
    """effdet's BiFpn of model ``name`` built for ``size`` x ``size`` images, as
    ``effdet.create_model(name, pretrained=False, pretrained_backbone=False)`` builds it (the
    backbone only gives its channels: it is built on the meta device)."""
    config = effdet.get_efficientdet_config(name)
    config.image_size = (size, size)
    for key, value in overrides.items():
        setattr(config, key, value)
    with torch.device("meta"):
        backbone = timm.create_model(
            config.backbone_name, features_only=True, pretrained=False,
            out_indices=config.backbone_indices or (2, 3, 4), **config.backbone_args,
        )
    return BiFpn(config, get_feature_info(backbone))


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine parameters, fusion weights (some negative: the ReLU of
    fast fusion must see them) and biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.normal_(1, 0.2, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                m.num_batches_tracked.fill_(int(torch.randint(1, 99, (), generator=g)))
        for name, p in module.named_parameters():
            if name.endswith("edge_weights"):
                p.uniform_(-0.3, 2.0, generator=g)
            elif name.endswith("bias"):
                p.normal_(0, 0.1, generator=g)
    return module


def levels_for(neck: BiFPN, size: int, batch: int = 2, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    sides = [-(-size // 2 ** (3 + i)) for i in range(len(neck.in_channels))]
    return [torch.randn(batch, c, s, s, generator=g, dtype=dtype)
            for c, s in zip(neck.in_channels, sides, strict=True)]


def relative_error(ours, theirs) -> float:
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert a.shape == b.shape
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(ours, theirs))


def run_both(fpn, neck, levels, train: bool):
    fpn.train(train)
    neck.train(train)
    with torch.no_grad():
        return neck(levels), fpn(list(levels))


def params(name: str):
    return pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name


@pytest.mark.parametrize("name", [params(n) for n in CONFIGS])
def test_same_outputs_eval_float32(name):
    fpn = randomise(effdet_fpn(name))
    neck = BiFPN.from_effdet(fpn)
    assert relative_error(*run_both(fpn, neck, levels_for(neck, 128), train=False)) <= 1e-5


@pytest.mark.parametrize("name", [params(n) for n in CONFIGS])
def test_same_outputs_train_float64(name):
    fpn = randomise(effdet_fpn(name, size=64)).double()
    neck = BiFPN.from_effdet(fpn)
    assert next(neck.parameters()).dtype == torch.float64
    levels = levels_for(neck, 64, dtype=torch.float64)
    ours, theirs = run_both(fpn, neck, levels, train=True)
    assert relative_error(ours, theirs) <= 1e-5
    # Batch statistics went into the running statistics alike.
    fpn_bn = [m for m in fpn.modules() if isinstance(m, nn.BatchNorm2d)]
    neck_bn = [m for m in neck.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(fpn_bn) == len(neck_bn)
    assert sorted(float(m.running_mean.sum()) for m in fpn_bn) == pytest.approx(
        sorted(float(m.running_mean.sum()) for m in neck_bn), rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", ["efficientdet_d0", "tf_efficientdet_d0"])
def test_same_outputs_train_float32_d0(name):
    fpn = randomise(effdet_fpn(name, size=256))
    neck = BiFPN.from_effdet(fpn)
    assert relative_error(*run_both(fpn, neck, levels_for(neck, 256), train=True)) <= 1e-5


@pytest.mark.parametrize("name", ["efficientdet_d0", "tf_efficientdet_d0", "tf_efficientdet_d6"])
def test_settings_read_from_the_source(name):
    fpn = effdet_fpn(name)
    neck = BiFPN.from_effdet(fpn)
    config = effdet.get_efficientdet_config(name)
    assert neck.projection == "per_node"
    assert neck.out_channels == config.fpn_channels
    assert neck.num_layers == config.fpn_cell_repeats
    assert neck.num_levels == config.num_levels
    layer = neck.layers[0]
    assert layer.fusion == ("sum" if config.fpn_name == "bifpn_sum" else "fast")
    assert layer.downsample_padding == ("same" if config.pad_type == "same" else "symmetric")
    assert layer.node_order == "act_conv_norm"
    bn = layer.top_down[0].norm
    assert (bn.eps, bn.momentum) == (config.norm_kwargs["eps"], config.norm_kwargs["momentum"])
    assert (layer.top_down[0].pointwise.bias is not None) == config.redundant_bias
    # Same tensors, one for one: counts of parameters and of state_dict entries agree (the sum
    # fusion's constant weights are dilconv's own buffers).
    assert sum(p.numel() for p in neck.parameters()) == sum(p.numel() for p in fpn.parameters())
    own = sum(1 for k in neck.state_dict() if k.endswith("fusion.weight")) if (
        layer.fusion == "sum") else 0
    assert len(neck.state_dict()) == len(fpn.state_dict()) + own


def test_d0_is_effdet_size_and_work():
    # The issue's figures: EfficientDet-D0's BiFPN has 194,361 parameters in effdet; the
    # shared-projection variant fewer. Computed from the modules, not written down.
    fpn = effdet_fpn("efficientdet_d0", size=512)
    neck = BiFPN.from_effdet(fpn)
    shared = BiFPN([40, 112, 320], 64, 3, num_levels=5, projection="shared",
                   redundant_bias=False)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(neck) == count(fpn)
    assert count(shared) < count(fpn)


def test_keeps_mode_and_requires_grad():
    fpn = effdet_fpn("efficientdet_d0").eval()
    fpn.cell[0].fnode[0].combine.edge_weights.requires_grad_(False)
    neck = BiFPN.from_effdet(fpn)
    assert not neck.training and not any(m.training for m in neck.modules())
    assert not neck.layers[0].top_down[3].fusion.weight.requires_grad  # effdet fnode 0 = P6td
    assert neck.layers[0].top_down[2].fusion.weight.requires_grad


def test_runs_at_other_sizes_with_effdets_values():
    # effdet fixes its sizes when built; the converted neck takes any. At another multiple of
    # 128 it computes what effdet rebuilt for that size (same weights) computes; at sizes effdet
    # cannot take at all (odd, non-square) it still runs.
    fpn = randomise(effdet_fpn("tf_efficientdet_d0", size=128)).eval()
    neck = BiFPN.from_effdet(fpn)
    other = effdet_fpn("tf_efficientdet_d0", size=256).eval()
    other.load_state_dict(fpn.state_dict())
    levels = levels_for(neck, 256)
    with torch.no_grad():
        with pytest.raises(RuntimeError):
            fpn(list(levels))
        assert relative_error(neck(levels), other(list(levels))) <= 1e-5
        odd = [torch.randn(1, c, h, w) for c, (h, w) in
               zip(neck.in_channels, [(45, 27), (23, 14), (12, 7)], strict=True)]
        out = neck(odd)
    assert [tuple(y.shape[-2:]) for y in out] == [(45, 27), (23, 14), (12, 7), (6, 4), (3, 2)]


@pytest.mark.parametrize(
    ("overrides", "setting"),
    [
        ({"fpn_name": "pan_fa"}, "fpn_name"),
        ({"fpn_name": "qufpn_fa"}, "fpn_name"),
        ({"separable_conv": False}, "separable_conv=False"),
        ({"upsample_type": "bilinear"}, "upsample_type"),
        ({"downsample_type": "avg"}, "downsample_type"),
        ({"downsample_type": "bilinear"}, "downsample_type"),
        ({"apply_resample_bn": False}, "apply_resample_bn=False"),
        ({"conv_bn_relu_pattern": True, "redundant_bias": True}, "redundant_bias"),
    ],
)
def test_refuses_what_it_cannot_express(overrides, setting):
    fpn = effdet_fpn("efficientdet_d0", **overrides)
    with pytest.raises(ConversionError, match=setting):
        BiFPN.from_effdet(fpn)


@pytest.mark.parametrize("act", ["relu", "relu6", "leaky_relu", "silu"])
def test_conv_bn_act_order_and_other_activations(act):
    fpn = randomise(effdet_fpn("efficientdet_d0", conv_bn_relu_pattern=True, act_type=act))
    neck = BiFPN.from_effdet(fpn)
    assert neck.layers[0].node_order == "conv_norm_act"
    assert relative_error(*run_both(fpn, neck, levels_for(neck, 128), train=False)) <= 1e-5


def test_softmax_fusion():
    fpn = randomise(effdet_fpn("efficientdet_d0", fpn_name="bifpn_attn"))
    neck = BiFPN.from_effdet(fpn)
    assert neck.layers[0].fusion == "softmax"
    assert relative_error(*run_both(fpn, neck, levels_for(neck, 128), train=False)) <= 1e-5


def test_refuses_other_modules():
    with pytest.raises(TypeError, match="effdet.efficientdet.BiFpn"):
        BiFPN.from_effdet(nn.Conv2d(3, 3, 1))


def test_dilconv_does_not_import_effdet_or_timm():
    code = "import sys, dilconv, dilconv.convert; print(sorted(m for m in ('effdet', 'timm') " \
           "if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
