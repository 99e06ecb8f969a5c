"""Residual blocks with dilation (He et al., CVPR 2016; Yu et al., DRN, CVPR 2017).

Submodule names follow torchvision's ``Bottleneck`` and ``BasicBlock`` (``conv1``, ``bn1``,
..., ``downsample.0``, ``downsample.1``), so a torchvision state_dict loads unchanged.
"""

from __future__ import annotations

from torch import Tensor, nn

from dilconv._checks import check_feature_map, check_positive
from dilconv._layers import (
    ActLayer,
    Device,
    DType,
    FactoryKwargs,
    NormLayer,
    conv_bias,
    create_act,
    create_norm,
)

__all__ = ["DilatedBasicBlock", "DilatedBottleneck"]


def _projection(
    in_channels: int,
    out_channels: int,
    stride: int,
    norm_layer: NormLayer | None,
    dd: FactoryKwargs,
) -> nn.Sequential | None:
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=conv_bias(norm_layer), **dd),
        create_norm(norm_layer, out_channels, **dd),
    )


class DilatedBottleneck(nn.Module):
    """ResNet bottleneck whose 3x3 convolution takes a stride and a dilation.

    1x1 -> norm -> act -> 3x3 (stride, dilation, padding=dilation) -> norm -> act -> 1x1 to
    ``planes * expansion`` -> norm, plus the shortcut (a 1x1 projection with stride and norm
    when the stride is not 1 or the channel count changes), then the activation. Convolutions
    have no bias. The stride sits on the 3x3 convolution ("ResNet v1.5", as in torchvision).

    Args:
        in_channels: channels of the input.
        planes: width of the 3x3 convolution (before expansion).
        stride: stride of the 3x3 convolution and of the projection.
        dilation: dilation (and padding) of the 3x3 convolution.
        expansion: the output has ``planes * expansion`` channels.
        groups: groups of the 3x3 convolution (ResNeXt).
        width: channels of the 3x3 convolution if not ``planes`` (wide ResNets, ResNeXt).
        norm_layer: norm class or factory, called as ``norm_layer(num_features)``; ``None``
            for no norm (the convolutions then have a bias).
        act_layer: activation class or factory (in place where it supports ``inplace``).

    Shape:
        input (N, in_channels, H, W) -> output
        (N, planes * expansion, floor((H - 1) / stride) + 1, floor((W - 1) / stride) + 1)

    Example:
        >>> import torch
        >>> from dilconv import DilatedBottleneck
        >>> DilatedBottleneck(64, 32, stride=2, dilation=2)(torch.randn(2, 64, 15, 16)).shape
        torch.Size([2, 128, 8, 8])
    """

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        expansion: int = 4,
        *,
        groups: int = 1,
        width: int | None = None,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.ReLU,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("planes", planes)
        check_positive("stride", stride)
        check_positive("dilation", dilation)
        check_positive("expansion", expansion)
        check_positive("groups", groups)
        width = planes if width is None else check_positive("width", width)
        if width % groups:
            raise ValueError(f"width ({width}) must be divisible by groups ({groups})")
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        bias = conv_bias(norm_layer)
        self.in_channels = in_channels
        self.out_channels = planes * expansion
        self.stride = stride
        self.dilation = dilation
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=bias, **dd)
        self.bn1 = create_norm(norm_layer, width, **dd)
        self.conv2 = nn.Conv2d(
            width, width, 3, stride=stride, padding=dilation, dilation=dilation,
            groups=groups, bias=bias, **dd,
        )
        self.bn2 = create_norm(norm_layer, width, **dd)
        self.conv3 = nn.Conv2d(width, self.out_channels, 1, bias=bias, **dd)
        self.bn3 = create_norm(norm_layer, self.out_channels, **dd)
        self.relu = create_act(act_layer)
        self.downsample = _projection(in_channels, self.out_channels, stride, norm_layer, dd)

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += shortcut  # in place: bn3 keeps its input, not its output, for backward
        return self.relu(out)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"stride={self.stride}, dilation={self.dilation}"
        )


class DilatedBasicBlock(nn.Module):
    """ResNet-18/34 basic block with dilation (which torchvision's ``BasicBlock`` refuses).

    3x3 (stride, dilation) -> norm -> act -> 3x3 (dilation) -> norm, plus the shortcut (1x1
    projection with stride and norm when needed), then the activation. Convolutions have no
    bias; each 3x3 convolution is padded by its dilation, so only the stride changes the size.

    Args:
        in_channels: channels of the input.
        planes: channels of both 3x3 convolutions and of the output (``expansion`` is 1).
        stride: stride of the first 3x3 convolution and of the projection.
        dilation: dilation of both 3x3 convolutions.
        norm_layer: norm class or factory, called as ``norm_layer(num_features)``; ``None``
            for no norm (the convolutions then have a bias).
        act_layer: activation class or factory (in place where it supports ``inplace``).

    Shape:
        input (N, in_channels, H, W) -> output
        (N, planes, floor((H - 1) / stride) + 1, floor((W - 1) / stride) + 1)

    Example:
        >>> import torch
        >>> from dilconv import DilatedBasicBlock
        >>> DilatedBasicBlock(32, 64, stride=2, dilation=4)(torch.randn(1, 32, 9, 10)).shape
        torch.Size([1, 64, 5, 5])
    """

    expansion = 1

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        dilation: int = 1,
        *,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.ReLU,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("planes", planes)
        check_positive("stride", stride)
        check_positive("dilation", dilation)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        bias = conv_bias(norm_layer)
        self.in_channels = in_channels
        self.out_channels = planes
        self.stride = stride
        self.dilation = dilation
        self.conv1 = nn.Conv2d(
            in_channels, planes, 3, stride=stride, padding=dilation, dilation=dilation,
            bias=bias, **dd,
        )
        self.bn1 = create_norm(norm_layer, planes, **dd)
        self.conv2 = nn.Conv2d(
            planes, planes, 3, padding=dilation, dilation=dilation, bias=bias, **dd
        )
        self.bn2 = create_norm(norm_layer, planes, **dd)
        self.relu = create_act(act_layer)
        self.downsample = _projection(in_channels, planes, stride, norm_layer, dd)

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"stride={self.stride}, dilation={self.dilation}"
        )
