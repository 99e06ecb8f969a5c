"""torchvision ``FeaturePyramidNetwork`` -> :class:`dilconv.FPNNeck` (``FPNNeck.from_torchvision``).

torchvision's FPN wraps each lateral and smoothing convolution in a ``Conv2dNormActivation``
(``inner_blocks.{i}``, ``layer_blocks.{i}``: the conv, then the norm when it has a
``norm_layer``) and computes extra levels in ``extra_blocks``; the neck of the same settings
holds the same layers under the names of :data:`PREFIXES`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from dilconv._layers import Device, DType, NormLayer
from dilconv.convert._common import (
    ConversionError,
    check_same_layers,
    copy_state,
    keep_modes,
    key_map,
    norm_factory,
    placement,
)
from dilconv.extra_levels import ExtraLevels, MaxPoolLevel, P6P7Levels
from dilconv.fpn import FPNNeck

__all__ = ["PREFIXES", "fpn_from_torchvision"]

CONVERTER = "FPNNeck.from_torchvision"
# Module names, ours -> torchvision's; level i of the lists is spelled out by _prefixes.
PREFIXES = {
    "lateral": "inner_blocks",
    "lateral_norm": "inner_blocks",
    "smooth": "layer_blocks",
    "smooth_norm": "layer_blocks",
    "extra_levels": "extra_blocks",
}
_LEVEL = {"lateral": "inner_blocks.{}.0", "lateral_norm": "inner_blocks.{}.1",
          "smooth": "layer_blocks.{}.0", "smooth_norm": "layer_blocks.{}.1"}


def _prefixes(levels: int) -> dict[str, str]:
    per_level = {f"{ours}.{i}": theirs.format(i) for ours, theirs in _LEVEL.items()
                 for i in range(levels)}
    return {**PREFIXES, **per_level}


def _check_source(fpn: nn.Module) -> None:
    from torchvision.ops import FeaturePyramidNetwork

    if type(fpn) is not FeaturePyramidNetwork:
        raise TypeError(
            f"{CONVERTER} expects a torchvision.ops.FeaturePyramidNetwork, got "
            f"{type(fpn).__name__}"
        )


def _conv_and_norm(fpn: nn.Module, name: str) -> tuple[nn.Conv2d, nn.Module | None]:
    """The convolution and the norm (None without one) of the block ``name`` of ``fpn``."""
    layers = list(fpn.get_submodule(name).children())
    if not 1 <= len(layers) <= 2 or not isinstance(layers[0], nn.Conv2d):
        raise ConversionError(
            f"{CONVERTER}: {name} holds {[type(m).__name__ for m in layers]}; torchvision's FPN "
            "builds a Conv2d, then the norm of its norm_layer if it has one, and no activation"
        )
    return layers[0], layers[1] if len(layers) == 2 else None


def _extra_levels(fpn: nn.Module) -> Callable[..., ExtraLevels] | None:
    """A factory (taking ``device``/``dtype``) of the block computing ``fpn``'s extra levels."""
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    extra = getattr(fpn, "extra_blocks", None)
    if extra is None:
        return None
    if type(extra) is LastLevelMaxPool:
        return lambda **dd: MaxPoolLevel()
    if type(extra) is LastLevelP6P7:
        # torchvision reads P5 where it was built with in_channels == out_channels, C5 otherwise.
        source = "output" if extra.use_P5 else "input"
        p6 = extra.p6
        return lambda **dd: P6P7Levels(p6.in_channels, p6.out_channels, source=source, **dd)
    raise TypeError(
        f"{CONVERTER} converts the extra_blocks LastLevelMaxPool and LastLevelP6P7, got "
        f"{type(extra).__name__}; write an ExtraLevels block that computes it"
    )


def fpn_from_torchvision(
    fpn: nn.Module, *, device: Device = None, dtype: DType = None
) -> FPNNeck:
    """:meth:`dilconv.FPNNeck.from_torchvision` (see there for what is kept and refused)."""
    _check_source(fpn)
    levels = len(list(fpn.get_submodule("inner_blocks").children()))
    smoothed = len(list(fpn.get_submodule("layer_blocks").children()))
    if levels != smoothed:
        raise ConversionError(
            f"{CONVERTER}: the FPN has {levels} inner_blocks but {smoothed} layer_blocks; "
            "torchvision builds one of each per level"
        )
    blocks = [_conv_and_norm(fpn, f"{kind}.{i}")
              for kind in ("inner_blocks", "layer_blocks") for i in range(levels)]
    lateral, first_norm = blocks[0]
    norm_layer: NormLayer | None = None
    if first_norm is not None:
        norm_layer = norm_factory(
            first_norm, converter=CONVERTER, where="the norm_layer's inner_blocks.0.1"
        )
    extra = _extra_levels(fpn)

    def build(device: Device, dtype: DType) -> FPNNeck:
        return FPNNeck(
            [conv.in_channels for conv, _ in blocks[:levels]], lateral.out_channels,
            upsample="nearest", smooth_top=True, norm_layer=norm_layer,
            extra_levels=None if extra is None else extra(device=device, dtype=dtype),
            device=device, dtype=dtype,
        )

    prefixes = _prefixes(levels)
    # Every other layer is compared with the one the neck builds; torchvision's P6/P7 apply
    # F.relu, which has no module to compare.
    check_same_layers(
        build("meta", None), fpn, prefixes, converter=CONVERTER,
        built="the FPNNeck of its settings", skip=("extra_levels", "extra_levels.act"),
    )
    device, dtype = placement(fpn, device, dtype, converter=CONVERTER)
    neck = build(device, dtype)
    copy_state(neck, fpn, key_map(neck, prefixes), converter=CONVERTER)
    keep_modes(neck, fpn, prefixes)
    return neck
