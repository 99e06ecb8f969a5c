"""Learned up-sampling with a transposed convolution (Lin et al. 2017's FPN with the fixed
interpolation of its top-down path replaced by a learned one).

A ``ConvTranspose2d`` with kernel = stride = ``scale`` and no padding maps H to exactly
``scale * H`` (Dumoulin & Visin 2016, relationship 14:
H_out = (H_in - 1) S - 2P + D (K - 1) + output_padding + 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dilconv._checks import check_feature_map, check_positive, is_tracing, pair
from dilconv._layers import Device, DType, FactoryKwargs, NormLayer, conv_bias, create_norm

__all__ = ["TransposedConvUpsampler", "resize_to"]


def resize_to(x: Tensor, like: Tensor, mode: str = "nearest") -> Tensor:
    """Interpolate ``x`` to the exact spatial size of ``like`` (odd sizes included)."""
    align = False if mode in ("bilinear", "bicubic") else None
    return F.interpolate(x, size=like.shape[-2:], mode=mode, align_corners=align)


class TransposedConvUpsampler(nn.Module):
    r"""ConvTranspose2d(kernel=scale, stride=scale) followed by a norm (BatchNorm2d by default).

    A transposed convolution with kernel :math:`k`, stride :math:`s`, padding :math:`p` and
    dilation :math:`d` maps :math:`H_{in}` to (Dumoulin & Visin 2016, relationship 14; the
    formula of ``torch.nn.ConvTranspose2d``)

    .. math::

        H_{out} = (H_{in} - 1)\,s - 2p + d\,(k - 1) + \mathrm{output\_padding} + 1 .

    Here :math:`k = s` = ``scale``, :math:`p = 0`, :math:`d = 1`, so
    :math:`H_{out} = s\,H_{in} + \mathrm{output\_padding}` with
    :math:`0 \le \mathrm{output\_padding} \le s - 1`; the same holds for the width.

    Without ``output_size`` the output is exactly ``scale * H x scale * W``. A requested
    ``output_size`` may lie anywhere in ``[scale * (H - 1) + 1, scale * H + scale - 1]`` per
    dimension, odd sizes included: a smaller target crops the bottom/right rows (where a
    stride-``scale`` down-sampling of that target would have padded), a larger one uses the
    transposed convolution's ``output_padding``. These are the sizes a stride-``scale``
    down-sampling can have come from; anything else raises ``ValueError``. The convolution is
    always called as a module (``self.conv(x)``), so hooks, tracing and module swaps see it;
    the exact ``scale * H x scale * W`` case costs nothing beyond the convolution.

    State dict: ``conv.weight`` (in_channels, out_channels, scale, scale), ``conv.bias`` only
    without a norm, ``norm.*`` (the norm's own keys).

    Args:
        in_channels: channels of the input.
        out_channels: channels of the output.
        scale: up-sampling factor (kernel size and stride of the transposed convolution).
        norm_layer: norm class or factory after the convolution, called as
            ``norm_layer(out_channels)``; ``None`` for no norm, in which case the convolution
            has a bias (with a norm its shift replaces the bias).

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
        >>> TransposedConvUpsampler(8, 8, norm_layer=None).conv.bias.shape
        torch.Size([8])
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        scale: int = 2,
        *,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("out_channels", out_channels)
        check_positive("scale", scale)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.scale = scale
        self.conv = nn.ConvTranspose2d(
            in_channels, out_channels, scale, stride=scale, bias=conv_bias(norm_layer), **dd
        )
        self.norm = create_norm(norm_layer, out_channels, **dd)

    def forward(self, x: Tensor, output_size: int | Sequence[int] | None = None) -> Tensor:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        if output_size is None:
            return self.norm(self.conv(x))
        target = pair("output_size", output_size)
        if not is_tracing():  # a traced size has no value to check
            self._check_reachable(x, target)
        s = self.scale
        exact = [s * x.shape[-2], s * x.shape[-1]]  # not a loop: torch.fx cannot iterate sizes
        if torch.compiler.is_compiling() or is_tracing():
            # One graph for every size (torch.compile(dynamic=True), torch.export, torch.fx,
            # jit.trace): always the largest reachable map, then a crop. Branching on the sizes
            # as below would guard on "target == scale x input" and recompile when an odd size
            # comes, and traced code would keep the one branch its example took.
            out = self.conv(x, output_size=[e + s - 1 for e in exact])
            return self.norm(out[..., : target[0], : target[1]])
        # output_padding adds rows past scale * H; with kernel = stride = scale they see no
        # input, so they hold the bias alone, as a larger transposed convolution would.
        if target == tuple(exact):
            return self.norm(self.conv(x))
        out = self.conv(x, output_size=[max(t, e) for t, e in zip(target, exact)])
        return self.norm(out[..., : target[0], : target[1]])

    def _check_reachable(self, x: Tensor, target: tuple[int, int]) -> None:
        s = self.scale
        for size_in, size_out in zip(x.shape[-2:], target):
            low, high = s * (size_in - 1) + 1, s * size_in + s - 1
            if not low <= size_out <= high:
                raise ValueError(
                    f"TransposedConvUpsampler(scale={s}) can produce sizes {low}..{high} from "
                    f"an input of size {size_in}, got output_size {tuple(target)}"
                )

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"scale={self.scale}"
        )
