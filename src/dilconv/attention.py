"""Convolutional Block Attention Module (Woo et al., CBAM, ECCV 2018, eq. 1-4).

Channel attention (eq. 2) then spatial attention (eq. 3), each applied multiplicatively
(eq. 1). The layers are those of the authors' code: the shared MLP has a bias on both
layers and a hidden width of :func:`~dilconv._checks.reduced_channels` ``(C, reduction)``;
the spatial ``k x k`` convolution has no bias and is followed by a norm layer, with no
activation before the sigmoid. The spatial descriptor differs from that code in one place:
it concatenates the channel-wise mean *before* the max, as the paper's eq. 3 writes
``[AvgPool(F); MaxPool(F)]`` and timm's ``CbamModule`` does, whereas the authors' code puts
the max first; their weights load after swapping the two input channels of
``spatial.conv.weight``. State-dict keys: ``channel.fc1``, ``channel.fc2``,
``spatial.conv``, ``spatial.bn``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dilconv._checks import check_feature_map, check_positive, reduced_channels
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

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention"]


def _check_odd_kernel(name: str, kernel_size: int) -> int:
    check_positive(name, kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(
            f"{name} must be odd so that padding {name}//2 keeps the size, got {kernel_size}"
        )
    return kernel_size


class ChannelAttention(nn.Module):
    r"""Rescales channels by a gate from their average- and max-pooled descriptors (eq. 2).

    .. math::

        M_c(F) = \sigma\big(\mathrm{MLP}(\mathrm{AvgPool}(F))
        + \mathrm{MLP}(\mathrm{MaxPool}(F))\big),
        \qquad \mathrm{MLP}(z) = W_1\, \delta(W_0 z + b_0) + b_1,

    pooling over the spatial positions, :math:`\sigma` the sigmoid and :math:`\delta` the
    activation. One MLP is shared by both descriptors: 1x1 conv to ``max(1, C // reduction)``
    channels, activation, 1x1 conv back to C (both with bias, so :math:`b_1` enters twice, as
    in the authors' code). The output is :math:`M_c(F) \otimes F`, broadcast over H and W.

    Args:
        channels: C, channels in and out.
        reduction: hidden width is ``max(1, C // reduction)`` (floor, never below 1).
        act_layer: activation class or factory (in place where it takes ``inplace``) of the MLP.

    Shape:
        input (N, C, H, W) -> output (N, C, H, W)

    Example:
        >>> import torch
        >>> from dilconv import ChannelAttention
        >>> ChannelAttention(32, reduction=8)(torch.randn(2, 32, 7, 9)).shape
        torch.Size([2, 32, 7, 9])
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        *,
        act_layer: ActLayer | None = nn.ReLU,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        check_positive("channels", channels)
        check_positive("reduction", reduction)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.channels = channels
        self.out_channels = channels
        self.reduction = reduction
        self.hidden_channels = reduced_channels(channels, reduction)
        self.fc1 = nn.Conv2d(channels, self.hidden_channels, 1, **dd)
        self.act = create_act(act_layer)
        self.fc2 = nn.Conv2d(self.hidden_channels, channels, 1, **dd)

    def _mlp(self, descriptor: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(descriptor)))

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, channels=self.channels, name=type(self).__name__)
        # Both descriptors through the shared MLP as one batch: two convolution calls, not four.
        n = x.shape[0]
        mlp = self._mlp(torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)]))
        return x * torch.sigmoid(mlp[:n] + mlp[n:])

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, reduction={self.reduction}, "
            f"hidden_channels={self.hidden_channels}"
        )


class SpatialAttention(nn.Module):
    r"""Rescales positions by a gate from the channel-wise mean and max (eq. 3).

    .. math::

        M_s(F) = \sigma\big(\mathrm{norm}(f^{k \times k}([\mathrm{AvgPool}(F);
        \mathrm{MaxPool}(F)]))\big),

    pooling over the channels: the two one-channel maps are concatenated (mean first), a
    ``k x k`` convolution :math:`f^{k \times k}` (2 -> 1 channel, padding ``k // 2``, no bias)
    and a norm layer follow, with no activation. The output is :math:`M_s(F) \otimes F`,
    broadcast over the channels.
    Works on any number of channels.

    Args:
        kernel_size: k, odd and positive (the paper uses 7).
        norm_layer: norm class or factory, called as ``norm_layer(1)``; ``None`` for no norm
            (the convolution then has a bias).

    Shape:
        input (N, C, H, W) -> output (N, C, H, W)

    Example:
        >>> import torch
        >>> from dilconv import SpatialAttention
        >>> SpatialAttention(kernel_size=3)(torch.randn(2, 5, 7, 9)).shape
        torch.Size([2, 5, 7, 9])
    """

    def __init__(
        self,
        kernel_size: int = 7,
        *,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        _check_odd_kernel("kernel_size", kernel_size)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2,
                              bias=conv_bias(norm_layer), **dd)
        self.bn = create_norm(norm_layer, 1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, name=type(self).__name__)
        pooled = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], dim=1)
        return x * torch.sigmoid(self.bn(self.conv(pooled)))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}"


class CBAM(nn.Module):
    r"""Channel attention then spatial attention, both multiplicative (Woo et al., eq. 1).

    .. math::

        F' = M_c(F) \otimes F, \qquad F'' = M_s(F') \otimes F',

    with :math:`M_c` of :class:`ChannelAttention` and :math:`M_s` of :class:`SpatialAttention`.
    Both gates lie in (0, 1), so :math:`|F''| \le |F|` element-wise.

    Args:
        channels: C, channels in and out.
        reduction: the channel MLP's hidden width is ``max(1, C // reduction)``.
        spatial_kernel: k of the spatial ``k x k`` convolution, odd and positive.
        act_layer: activation class or factory of the channel MLP (in place where it takes
            ``inplace``).
        norm_layer: norm class or factory after the spatial convolution, called as
            ``norm_layer(1)``; ``None`` for no norm.

    Shape:
        input (N, C, H, W) -> output (N, C, H, W)

    Example:
        >>> import torch
        >>> from dilconv import CBAM
        >>> CBAM(64)(torch.randn(2, 64, 15, 16)).shape
        torch.Size([2, 64, 15, 16])
    """

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        spatial_kernel: int = 7,
        *,
        act_layer: ActLayer | None = nn.ReLU,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        _check_odd_kernel("spatial_kernel", spatial_kernel)
        self.channels = channels
        self.out_channels = channels
        self.channel = ChannelAttention(
            channels, reduction, act_layer=act_layer, device=device, dtype=dtype
        )
        self.spatial = SpatialAttention(
            spatial_kernel, norm_layer=norm_layer, device=device, dtype=dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, channels=self.channels, name=type(self).__name__)
        return self.spatial(self.channel(x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"
