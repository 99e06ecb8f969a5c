"""Top-down feature pyramid neck (Lin et al., "Feature Pyramid Networks", CVPR 2017, fig. 3)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from dilconv._checks import (
    check_choice,
    check_levels,
    check_positive,
    pyramid_channels,
    pyramid_output_keys,
)
from dilconv._layers import Device, DType, FactoryKwargs, NormLayer, conv_bias, create_norm
from dilconv.extra_levels import EXTRA_LEVEL_SOURCES, ExtraLevels, MaxPoolLevel
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
    then have no bias (without one these lists hold parameter-free ``nn.Identity``). Extra
    levels sit under ``extra_levels`` (``extra_levels.p6.weight`` of :class:`P6P7Levels`;
    :class:`MaxPoolLevel`, also what ``extra_level=True`` builds, has no tensors).

    Args:
        in_channels: channels of each input level, fine to coarse (a list, or timm's
            ``FeatureInfo`` of a ``features_only`` model); or a mapping name -> channels, which
            also fixes the names (and order) of the maps ``forward`` accepts.
        out_channels: channels of every output level.
        upsample: ``"nearest"``, ``"bilinear"`` (align_corners=False) or ``"transposed"``.
        smooth_top: smooth the coarsest level too.
        extra_level: append one coarser level, ``max_pool2d(kernel 1, stride 2)`` of the
            coarsest output (torchvision's ``LastLevelMaxPool``), keyed ``"pool"`` in a mapping:
            shorthand for ``extra_levels=MaxPoolLevel()``.
        extra_levels: an :class:`ExtraLevels` block whose levels are appended, computed from
            the coarsest output or the coarsest input (its ``source``), keyed by its
            ``names`` in a mapping: :class:`MaxPoolLevel`, :class:`P6P7Levels` (RetinaNet's
            P6, P7) or your own, as torchvision's ``extra_blocks``.
        norm_layer: norm class or factory after every lateral and smoothing convolution, as
            torchvision's ``FeaturePyramidNetwork(norm_layer=...)``; ``None`` (the default, as
            in the paper) for none. It also replaces the ``BatchNorm2d`` of the transposed
            up-samplers, which keep theirs when ``norm_layer`` is ``None``.

    Shape:
        input: a sequence of L maps (N, in_channels[i], H_i, W_i), fine to coarse, or a mapping
        name -> map in that order. Output: the same kind (same keys) of maps
        (N, out_channels, H_i, W_i), then the extra levels, if any.

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
        extra_levels: ExtraLevels | None = None,
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
        extra = _extra_levels(extra_level, extra_levels, in_channels, out_channels)
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
        self.extra_levels = extra
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform (a=1) weights and zero biases, as torchvision's FPN initialises.

        The extra levels keep theirs (as torchvision leaves its ``extra_blocks``): a block
        passed in with trained weights stays trained.
        """
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
        extra = self.extra_levels
        keys = pyramid_output_keys(keys, [] if extra is None else extra.names, name=name)
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
        if extra is not None:
            outputs += extra(outputs[-1] if extra.source == "output" else maps[-1])
        return outputs if keys is None else dict(zip(keys, outputs))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"upsample={self.upsample_mode!r}, smooth_top={self.smooth_top}, "
            f"extra_level={self.extra_level}"
        )

    @classmethod
    def from_torchvision(
        cls, fpn: nn.Module, *, device: Device = None, dtype: DType = None
    ) -> FPNNeck:
        """Convert a ``torchvision.ops.FeaturePyramidNetwork``, weights included.

        The neck computes what ``fpn`` computes: nearest up-sampling, every level smoothed,
        ``fpn``'s norm layer if it has one (``fasterrcnn_resnet50_fpn_v2``'s ``BatchNorm2d``,
        a ``GroupNorm``, ``FrozenBatchNorm2d``, with their settings) and its extra block:
        ``LastLevelMaxPool`` becomes :class:`MaxPoolLevel`, ``LastLevelP6P7`` a
        :class:`P6P7Levels` reading P5 or C5 as torchvision's does (P5 when its input and
        output channels are equal). Given a mapping it returns one with the same keys
        (``"pool"``, ``"p6"``, ``"p7"`` for the extra levels), given a list a list. Each
        parameter's ``requires_grad``, each module's train/eval mode, the device and dtype
        are kept. The state-dict keys map one to one:

        ======================================  ==========================
        torchvision                             dilconv
        ======================================  ==========================
        ``inner_blocks.{i}.0.{weight,bias}``    ``lateral.{i}.*``
        ``inner_blocks.{i}.1.*`` (norm)         ``lateral_norm.{i}.*``
        ``layer_blocks.{i}.0.{weight,bias}``    ``smooth.{i}.*``
        ``layer_blocks.{i}.1.*`` (norm)         ``smooth_norm.{i}.*``
        ``extra_blocks.p6.*``, ``p7.*``         ``extra_levels.p6.*``, ``p7.*``
        ======================================  ==========================

        Args:
            fpn: the torchvision ``FeaturePyramidNetwork`` (for instance
                ``fasterrcnn_resnet50_fpn_v2(...).backbone.fpn``).
            device: where to build the result; by default where ``fpn``'s tensors are.
            dtype: floating dtype of the result; by default that of ``fpn``'s tensors.

        Raises:
            TypeError: ``fpn`` is not a ``FeaturePyramidNetwork``; its extra block is not
                ``LastLevelMaxPool`` or ``LastLevelP6P7``; its norm is not a
                ``BatchNorm2d``, ``FrozenBatchNorm2d`` or ``GroupNorm``.
            ConversionError: a layer differs from what torchvision's constructor builds
                (naming it), or a tensor would not be carried over.

        Example:
            >>> import torch
            >>> from torchvision.ops import FeaturePyramidNetwork
            >>> from torchvision.ops.feature_pyramid_network import LastLevelP6P7
            >>> theirs = FeaturePyramidNetwork([8, 16], 4, extra_blocks=LastLevelP6P7(16, 4))
            >>> neck = FPNNeck.from_torchvision(theirs)
            >>> feats = {"c4": torch.randn(1, 8, 10, 10), "c5": torch.randn(1, 16, 5, 5)}
            >>> list(neck(feats)), neck.extra_levels.source
            (['c4', 'c5', 'p6', 'p7'], 'input')
            >>> torch.testing.assert_close(neck(feats)["p7"], theirs(feats)["p7"])
        """
        from dilconv.convert.torchvision_fpn import fpn_from_torchvision

        return fpn_from_torchvision(fpn, device=device, dtype=dtype)


def _extra_levels(
    extra_level: bool,
    extra_levels: ExtraLevels | None,
    in_channels: Sequence[int],
    out_channels: int,
) -> ExtraLevels | None:
    """The neck's extra-level block, checked against the channels it will be given."""
    if extra_levels is None:
        return MaxPoolLevel() if extra_level else None
    if not isinstance(extra_levels, ExtraLevels):
        raise TypeError(
            f"extra_levels must be an ExtraLevels block or None, got {type(extra_levels).__name__}"
        )
    if extra_level:
        raise ValueError(
            "extra_level=True is the shorthand for extra_levels=MaxPoolLevel(); pass one of "
            f"them, got both (extra_levels={type(extra_levels).__name__})"
        )
    source = check_choice("extra_levels.source", extra_levels.source, EXTRA_LEVEL_SOURCES)
    channels = out_channels if source == "output" else in_channels[-1]
    if extra_levels.in_channels not in (None, channels):
        where = "out_channels" if source == "output" else "the last in_channels"
        raise ValueError(
            f"extra_levels {type(extra_levels).__name__} takes {extra_levels.in_channels} "
            f"channels from the coarsest {source} (source={source!r}), which has {channels} "
            f"({where})"
        )
    return extra_levels
