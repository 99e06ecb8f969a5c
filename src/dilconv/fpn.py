"""Top-down feature pyramid neck (Lin et al., "Feature Pyramid Networks", CVPR 2017, fig. 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dilconv._checks import (
    check_choice,
    check_levels,
    check_positive,
    pyramid_channels,
    pyramid_output_keys,
)
from dilconv._layers import Device, DType, FactoryKwargs, NormLayer, conv_bias, create_norm
from dilconv.upsample import TransposedConvUpsampler, resize_to

__all__ = ["FPNNeck", "UPSAMPLE_MODES"]

UPSAMPLE_MODES = ("nearest", "bilinear", "transposed")

Features = Sequence[Tensor] | Mapping[str, Tensor]


class FPNNeck(nn.Module):
    """Feature pyramid: lateral 1x1 convs, a top-down path, 3x3 smoothing convs.

    Each level's lateral 1x1 conv maps it to ``out_channels``; from the coarsest level down,
    the merged map is up-sampled to the exact size of the next finer lateral and added to it;
    a 3x3 conv smooths every merged map. With ``upsample="nearest"`` and ``smooth_top=True``
    this computes what ``torchvision.ops.FeaturePyramidNetwork`` computes with the same weights.

    State dict (public API): ``lateral.{i}`` and ``smooth.{i}`` are ``nn.Conv2d`` with bias,
    ``i`` counting levels fine to coarse; with ``smooth_top=False`` ``smooth`` has one entry
    fewer (the coarsest level is left unsmoothed, the layout of the widely copied
    kuangliu/pytorch-fpn implementation). With ``upsample="transposed"``, ``upsample.{i}`` is the
    :class:`TransposedConvUpsampler` taking level ``i + 1`` to level ``i``. With a
    ``norm_layer``, ``lateral_norm.{i}`` and ``smooth_norm.{i}`` follow the convolutions, which
    then have no bias (without one these lists hold parameter-free ``nn.Identity``).

    Args:
        in_channels: channels of each input level, fine to coarse; or a mapping name ->
            channels, which also fixes the names (and order) of the maps ``forward`` accepts.
        out_channels: channels of every output level.
        upsample: ``"nearest"``, ``"bilinear"`` (align_corners=False) or ``"transposed"``.
        smooth_top: smooth the coarsest level too.
        extra_level: append one coarser level, ``max_pool2d(kernel 1, stride 2)`` of the
            coarsest output (torchvision's ``LastLevelMaxPool``), keyed ``"pool"`` in a mapping.
        norm_layer: norm class or factory after every lateral and smoothing convolution, as
            torchvision's ``FeaturePyramidNetwork(norm_layer=...)``; ``None`` (the default, as
            in the paper) for none. It also replaces the ``BatchNorm2d`` of the transposed
            up-samplers, which keep theirs when ``norm_layer`` is ``None``.

    Shape:
        input: a sequence of L maps (N, in_channels[i], H_i, W_i), fine to coarse, or a mapping
        name -> map in that order. Output: the same kind (same keys) of maps
        (N, out_channels, H_i, W_i), plus the extra level if asked for.

    Example:
        >>> import torch
        >>> from dilconv import FPNNeck
        >>> neck = FPNNeck([16, 32, 64], out_channels=24, upsample="transposed")
        >>> feats = [torch.randn(1, 16, 15, 15), torch.randn(1, 32, 8, 8), torch.randn(1, 64, 4, 4)]
        >>> [tuple(p.shape) for p in neck(feats)]
        [(1, 24, 15, 15), (1, 24, 8, 8), (1, 24, 4, 4)]
    """

    def __init__(
        self,
        in_channels: Sequence[int] | Mapping[str, int],
        out_channels: int = 256,
        upsample: str = "nearest",
        smooth_top: bool = True,
        *,
        extra_level: bool = False,
        norm_layer: NormLayer | None = None,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        self.in_keys, in_channels = pyramid_channels(in_channels)
        check_positive("out_channels", out_channels)
        check_choice("upsample", upsample, UPSAMPLE_MODES)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.upsample_mode = upsample
        self.smooth_top = smooth_top
        self.extra_level = extra_level
        levels = len(in_channels)
        bias = conv_bias(norm_layer)
        self.lateral = nn.ModuleList(
            nn.Conv2d(c, out_channels, 1, bias=bias, **dd) for c in in_channels
        )
        self.lateral_norm = nn.ModuleList(
            create_norm(norm_layer, out_channels, **dd) for _ in in_channels
        )
        smoothed = levels if smooth_top else levels - 1
        self.smooth = nn.ModuleList(
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=bias, **dd)
            for _ in range(smoothed)
        )
        self.smooth_norm = nn.ModuleList(
            create_norm(norm_layer, out_channels, **dd) for _ in range(smoothed)
        )
        if upsample == "transposed":
            up_norm = nn.BatchNorm2d if norm_layer is None else norm_layer
            self.upsample = nn.ModuleList(
                TransposedConvUpsampler(out_channels, out_channels, norm_layer=up_norm, **dd)
                for _ in range(levels - 1)
            )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform (a=1) weights and zero biases, as torchvision's FPN initialises."""
        for conv in [*self.lateral, *self.smooth]:
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def _up(self, level: int, x: Tensor, like: Tensor) -> Tensor:
        if self.upsample_mode == "transposed":
            return self.upsample[level](x, output_size=like.shape[-2:])
        return resize_to(x, like, self.upsample_mode)

    def forward(self, features: Features) -> Features:
        name = type(self).__name__
        keys, maps = check_levels(features, self.in_channels, name=name, keys=self.in_keys)
        keys = pyramid_output_keys(keys, self.extra_level, name=name)
        top = self.lateral_norm[-1](self.lateral[-1](maps[-1]))
        merged = [top]
        for level in range(len(maps) - 2, -1, -1):
            lateral = self.lateral_norm[level](self.lateral[level](maps[level]))
            top = lateral + self._up(level, top, lateral)
            merged.insert(0, top)
        outputs = [
            self.smooth_norm[i](self.smooth[i](m)) if i < len(self.smooth) else m
            for i, m in enumerate(merged)
        ]
        if self.extra_level:
            outputs.append(F.max_pool2d(outputs[-1], kernel_size=1, stride=2))
        return outputs if keys is None else dict(zip(keys, outputs))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"upsample={self.upsample_mode!r}, smooth_top={self.smooth_top}, "
            f"extra_level={self.extra_level}"
        )
