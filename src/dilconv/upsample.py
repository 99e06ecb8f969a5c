"""Learned 2x (or sx) up-sampling with a transposed convolution (seed 001's FPN variant).

A ``ConvTranspose2d`` with kernel = stride = ``scale`` and no padding maps H to exactly
``scale * H`` (Dumoulin & Visin 2016: H_out = (H_in - 1) S - 2P + D (K - 1) + output_padding + 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from dilconv._checks import check_feature_map, check_positive, pair

__all__ = ["TransposedConvUpsampler", "resize_to"]


def resize_to(x: Tensor, like: Tensor, mode: str = "nearest") -> Tensor:
    """Interpolate ``x`` to the exact spatial size of ``like`` (odd sizes included)."""
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=like.shape[-2:], mode=mode, align_corners=align)


class TransposedConvUpsampler(nn.Module):
    """ConvTranspose2d(kernel=scale, stride=scale) followed by BatchNorm2d.

    Without ``output_size`` the output is exactly ``scale * H x scale * W``. A requested
    ``output_size`` may lie anywhere in ``[scale * (H - 1) + 1, scale * H + scale - 1]`` per
    dimension, odd sizes included: a smaller target crops the bottom/right rows (where a
    stride-``scale`` down-sampling of that target would have padded), a larger one uses the
    transposed convolution's ``output_padding``. These are the sizes a stride-``scale``
    down-sampling can have come from; anything else raises ``ValueError``.

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        scale: up-sampling factor (kernel size and stride of the transposed convolution).
        norm: follow the transposed convolution with ``norm_layer`` (the convolution then has
            no bias, since the norm's shift replaces it).
        norm_layer: called as ``norm_layer(num_features, device=..., dtype=...)``.

    Shape:
        input (N, in_channels, H, W) -> output (N, out_channels, scale*H, scale*W), or
        (N, out_channels, *output_size)

    Example:
        >>> import torch
        >>> from dilconv import TransposedConvUpsampler
        >>> up = TransposedConvUpsampler(64, 32)
        >>> up(torch.randn(1, 64, 4, 5)).shape
        torch.Size([1, 32, 8, 10])
        >>> up(torch.randn(1, 64, 4, 5), output_size=(7, 9)).shape
        torch.Size([1, 32, 7, 9])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale: int = 2,
        norm: bool = True,
        *,
        norm_layer=nn.BatchNorm2d,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("out_channels", out_channels)
        check_positive("scale", scale)
        dd = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.scale = scale
        self.conv = nn.ConvTranspose2d(
            in_channels, out_channels, scale, stride=scale, bias=not norm, **dd
        )
        self.norm = norm_layer(out_channels, **dd) if norm else nn.Identity()

    def forward(self, x: Tensor, output_size: int | Sequence[int] | None = None) -> Tensor:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        if output_size is None:
            return self.norm(self.conv(x))
        target = pair("output_size", output_size)
        s = self.scale
        for size_in, size_out in zip(x.shape[-2:], target):
            low, high = s * (size_in - 1) + 1, s * size_in + s - 1
            if not low <= size_out <= high:
                raise ValueError(
                    f"TransposedConvUpsampler(scale={s}) can produce sizes {low}..{high} from "
                    f"an input of size {size_in}, got output_size {tuple(target)}"
                )
        # With kernel = stride = scale and no padding, output row o sees input row o // scale
        # only, so the rows past scale * H that output_padding would add hold the bias alone.
        # Zero-padding by scale - 1 and cropping gives every target the same way, without an
        # output_padding that depends on the input size (exporters need it static).
        out = F.conv_transpose2d(x, self.conv.weight, stride=s)
        out = F.pad(out, (0, s - 1, 0, s - 1))[..., : target[0], : target[1]]
        if self.conv.bias is not None:
            out = out + self.conv.bias.view(-1, 1, 1)
        return self.norm(out)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"scale={self.scale}"
        )
