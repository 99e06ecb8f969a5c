"""Learnable image resizer (Talebi & Milanfar, "Learning to Resize Images for Computer
Vision Tasks", ICCV 2021, Fig. 2), optionally with CBAM (Woo et al. 2018) in its residual
blocks.

The output is the input resized by plain interpolation plus a learned residual computed
from features resized by the same interpolation, so at any initialisation the network
starts close to the fixed resizer and learns what the task downstream needs on top.

State-dict layout (submodule names are API)::

    stem_conv     Conv2d(in_channels, n, 7, padding=3)    bias
    stem_proj     Conv2d(n, n, 1)                          bias
    stem_norm     norm_layer(n)
    blocks.{i}    residual block i, i < num_res_blocks:
        .conv1 Conv2d(n, n, 3, padding=1), .bn1, .conv2 Conv2d(n, n, 3, padding=1), .bn2,
        .attn  CBAM(n) (``attention="cbam"`` only: .attn.channel.fc1/fc2,
               .attn.spatial.conv/bn)
    tail_conv     Conv2d(n, n, 3, padding=1)               bias
    tail_norm     norm_layer(n)
    out_conv      Conv2d(n, in_channels, 7, padding=3)     bias
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch.nn.functional as F
from torch import Tensor, nn

from dilconv._checks import check_choice, check_feature_map, check_positive, pair
from dilconv._layers import (
    ActLayer,
    Device,
    DType,
    FactoryKwargs,
    NormLayer,
    create_act,
    create_norm,
)
from dilconv.attention import CBAM

__all__ = ["LearnableResizer"]

INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "area")
ATTENTIONS = (None, "cbam")
LEAKY_RELU = partial(nn.LeakyReLU, negative_slope=0.2)


class _ResBlock(nn.Module):
    """3x3 conv, norm, act, 3x3 conv, norm (then CBAM when given), plus the block input."""

    def __init__(
        self,
        channels: int,
        norm_layer: NormLayer | None,
        act_layer: ActLayer | None,
        attention: str | None,
        dd: FactoryKwargs,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, **dd)
        self.bn1 = create_norm(norm_layer, channels, **dd)
        self.act = create_act(act_layer)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, **dd)
        self.bn2 = create_norm(norm_layer, channels, **dd)
        self.attn = CBAM(channels, norm_layer=norm_layer, **dd) if attention == "cbam" else None

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.attn is not None:
            out = self.attn(out)
        out += x  # in place: neither a norm nor CBAM keeps its output for backward
        return out


class LearnableResizer(nn.Module):
    r"""Resizes images to ``output_size`` by interpolation plus a learned residual.

    With :math:`B` the fixed interpolation to the target size, the output is

    .. math::

        y = B(x) + R\big(B(f(x))\big),

    where :math:`f` is the stem (7x7 conv, activation, 1x1 conv, activation, norm: features of
    :math:`x` at the input resolution) and :math:`R(r) = W_{7 \times 7}\big(
    \mathrm{norm}(W_{3 \times 3}\, G(r)) + r\big)` the residual blocks :math:`G`, a 3x3 conv
    and the output 7x7 conv. The image skip and the learned branch use the same :math:`B`; the
    learned branch resizes features of :math:`x`, not :math:`B(x)` itself.

    Following Fig. 2 of Talebi & Milanfar (2021), with n = ``num_filters``::

        skip = resize(x)
        f    = norm(act(conv1x1(act(conv7x7(x)))))        # in_channels -> n
        r    = resize(f)
        g    = blocks(r)                                   # num_res_blocks residual blocks
        out  = conv7x7(norm(conv3x3(g)) + r) + skip        # n -> in_channels

    ``resize`` is :func:`torch.nn.functional.interpolate` with ``interpolation``
    (``align_corners=False`` for bilinear and bicubic, no antialiasing), so the resizer goes
    up or down between any sizes. Each residual block is 3x3 conv, norm, act, 3x3 conv,
    norm, plus its input; ``attention="cbam"`` applies a :class:`~dilconv.CBAM` of n
    channels to the block's residual branch before the addition.
    Convolutions have a bias. The default configuration has 12,083 parameters
    (12,232 with ``attention="cbam"``).

    Args:
        in_channels: channels of the image in and out.
        output_size: target ``(H_out, W_out)``, or one int for a square target.
        num_filters: n, channels of the learned features.
        num_res_blocks: r, residual blocks after the feature resize (0 allowed).
        interpolation: ``"bilinear"``, ``"bicubic"``, ``"nearest"`` or ``"area"``, for both
            the image skip and the feature resize. ``"area"`` exports to ONNX with
            ``torch.onnx.export(..., dynamo=True)``; the TorchScript exporter refuses it
            unless the input size is a multiple of the output size.
        attention: ``None`` or ``"cbam"``.
        norm_layer: norm class or factory, called as ``norm_layer(num_features)``; ``None``
            for no norm.
        act_layer: activation class or factory (in place where it takes ``inplace``);
            LeakyReLU(0.2) by default.

    Shape:
        input (N, in_channels, H, W) -> output (N, in_channels, H_out, W_out), where
        ``(H_out, W_out)`` is ``output_size`` or the one given to ``forward``.

    Example:
        >>> import torch
        >>> from dilconv import LearnableResizer
        >>> resizer = LearnableResizer(output_size=(224, 224))
        >>> resizer(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 3, 224, 224])
        >>> resizer(torch.randn(2, 3, 32, 32), output_size=(17, 40)).shape
        torch.Size([2, 3, 17, 40])
        >>> sum(p.numel() for p in LearnableResizer().parameters())
        12083
        >>> sum(p.numel() for p in LearnableResizer(attention="cbam").parameters())
        12232
    """

    def __init__(
        self,
        in_channels: int = 3,
        output_size: int | Sequence[int] = (224, 224),
        num_filters: int = 16,
        num_res_blocks: int = 1,
        interpolation: str = "bilinear",
        attention: str | None = None,
        *,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = LEAKY_RELU,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("num_filters", num_filters)
        check_positive("num_res_blocks", num_res_blocks, minimum=0)
        check_choice("interpolation", interpolation, INTERPOLATIONS)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {attention!r}")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        n = num_filters
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.output_size = pair("output_size", output_size)
        self.num_filters = n
        self.num_res_blocks = num_res_blocks
        self.interpolation = interpolation
        self.attention = attention
        self.stem_conv = nn.Conv2d(in_channels, n, 7, padding=3, **dd)
        self.stem_proj = nn.Conv2d(n, n, 1, **dd)
        self.stem_norm = create_norm(norm_layer, n, **dd)
        self.act = create_act(act_layer)
        self.blocks = nn.Sequential(
            *(_ResBlock(n, norm_layer, act_layer, attention, dd) for _ in range(num_res_blocks))
        )
        self.tail_conv = nn.Conv2d(n, n, 3, padding=1, **dd)
        self.tail_norm = create_norm(norm_layer, n, **dd)
        self.out_conv = nn.Conv2d(n, in_channels, 7, padding=3, **dd)

    def _resize(self, x: Tensor, size: tuple[int, int]) -> Tensor:
        align = False if self.interpolation in ("bilinear", "bicubic") else None
        return F.interpolate(x, size=size, mode=self.interpolation, align_corners=align)

    def forward(self, x: Tensor, output_size: int | Sequence[int] | None = None) -> Tensor:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        size = self.output_size if output_size is None else pair("output_size", output_size)
        skip = self._resize(x, size)
        features = self.stem_norm(self.act(self.stem_proj(self.act(self.stem_conv(x)))))
        resized = self._resize(features, size)
        out = self.tail_norm(self.tail_conv(self.blocks(resized)))
        out += resized
        out = self.out_conv(out)
        out += skip
        return out

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, output_size={self.output_size}, "
            f"num_filters={self.num_filters}, num_res_blocks={self.num_res_blocks}, "
            f"interpolation={self.interpolation!r}, attention={self.attention!r}"
        )
