"""timm's ``CbamModule`` -> :class:`dilconv.CBAM` (``CBAM.from_timm``).

timm (``timm.layers.cbam``) builds the channel MLP as ``channel.fc1``, ``channel.act``,
``channel.fc2`` and the spatial convolution and norm as one ``ConvNormAct``
(``spatial.conv.conv``, ``spatial.conv.bn``, a ``BatchNormAct2d`` whose activation is off); both
gates are ``gate_layer`` modules (``channel.gate``, ``spatial.gate``).
"""

from __future__ import annotations

import copy
import functools

from torch import nn

from dilconv._layers import ActLayer, Device, DType, NormLayer
from dilconv.attention import CBAM
from dilconv.convert._common import (
    ConversionError,
    check_same_layers,
    copy_state,
    keep_modes,
    key_map,
    norm_factory,
    placement,
)

__all__ = ["PREFIXES", "cbam_from_timm"]

CONVERTER = "CBAM.from_timm"
# Module names, ours -> timm's.
PREFIXES = {"spatial.conv": "spatial.conv.conv", "spatial.bn": "spatial.conv.bn"}


def _check_source(module: nn.Module) -> None:
    from timm.layers.cbam import CbamModule, LightCbamModule

    if type(module) is LightCbamModule:
        raise TypeError(
            f"{CONVERTER} cannot express timm's LightCbamModule: it averages the mean and max "
            "descriptors before one pass of the channel MLP and one 1-channel spatial "
            "convolution, where CBAM (Woo et al., eq. 2-3) passes each descriptor through the "
            "MLP and convolves both as two channels; convert a CbamModule"
        )
    if type(module) is not CbamModule:
        raise TypeError(
            f"{CONVERTER} expects timm's CbamModule (timm.layers.cbam), got "
            f"{type(module).__name__}"
        )


def _check_gates(module: nn.Module) -> None:
    from timm.layers.activations import Sigmoid

    for name in ("channel.gate", "spatial.gate"):
        gate = module.get_submodule(name)
        if type(gate) not in (Sigmoid, nn.Sigmoid):
            raise ConversionError(
                f"{CONVERTER}: CBAM gates with the sigmoid (eq. 2-3), the source's gate_layer "
                f"is {type(gate).__name__} ({name})"
            )


def _copy_of(layer: nn.Module, device: Device, dtype: DType) -> ActLayer:
    """A factory of copies of ``layer``, whatever its type and settings."""
    return lambda: copy.deepcopy(layer).to(device=device, dtype=dtype)


def _norm_layer(norm: nn.Module) -> NormLayer:
    """The factory of the spatial norm: timm's norm-with-activation layers must have theirs off."""
    from timm.layers.norm_act import BatchNormAct2d, FrozenBatchNormAct2d
    from torchvision.ops.misc import FrozenBatchNorm2d

    if type(norm) in (BatchNormAct2d, FrozenBatchNormAct2d):
        for part in ("act", "drop"):
            if type(norm.get_submodule(part)) is not nn.Identity:
                raise ConversionError(
                    f"{CONVERTER}: the spatial norm spatial.conv.bn applies {part} "
                    f"{norm.get_submodule(part)!r}; CBAM has no {part} between the spatial "
                    "convolution's norm and the sigmoid"
                )
    if type(norm) is BatchNormAct2d:
        return functools.partial(
            nn.BatchNorm2d, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
            track_running_stats=norm.track_running_stats,
        )
    if type(norm) is FrozenBatchNormAct2d:
        return functools.partial(FrozenBatchNorm2d, eps=norm.eps)
    return norm_factory(norm, converter=CONVERTER, where="spatial.conv.bn")


def cbam_from_timm(module: nn.Module, *, device: Device = None, dtype: DType = None) -> CBAM:
    """:meth:`dilconv.CBAM.from_timm` (see there for what is kept and refused)."""
    _check_source(module)
    _check_gates(module)
    fc1 = module.get_submodule("channel.fc1")
    conv = module.get_submodule("spatial.conv.conv")
    if not isinstance(fc1, nn.Conv2d) or not isinstance(conv, nn.Conv2d):
        raise ConversionError(
            f"{CONVERTER}: channel.fc1 and spatial.conv.conv must be nn.Conv2d, got "
            f"{type(fc1).__name__} and {type(conv).__name__}"
        )
    kernel = conv.kernel_size[0]
    if kernel % 2 == 0:
        raise ConversionError(
            f"{CONVERTER}: spatial_kernel_size must be odd, got {kernel} (timm pads an even "
            "kernel by (k - 1) // 2, and its spatial gate then loses a row and a column)"
        )
    norm_layer = _norm_layer(module.get_submodule("spatial.conv.bn"))
    act = module.get_submodule("channel.act")

    def build(device: Device, dtype: DType) -> CBAM:
        return CBAM(
            fc1.in_channels, spatial_kernel=kernel, hidden_channels=fc1.out_channels,
            mlp_bias=fc1.bias is not None, act_layer=_copy_of(act, device, dtype),
            norm_layer=norm_layer, device=device, dtype=dtype,
        )

    # The spatial norm was read (and its act/drop checked) above; timm prints it as
    # BatchNormAct2d, ours is a BatchNorm2d.
    check_same_layers(
        build("meta", None), module, PREFIXES, converter=CONVERTER,
        built="the CBAM of its settings", skip=("spatial.bn",),
    )
    device, dtype = placement(module, device, dtype, converter=CONVERTER)
    cbam = build(device, dtype)
    copy_state(cbam, module, key_map(cbam, PREFIXES), converter=CONVERTER)
    keep_modes(cbam, module, PREFIXES)
    return cbam

