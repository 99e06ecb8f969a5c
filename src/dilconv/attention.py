"""Convolutional Block Attention Module (Woo et al., CBAM, ECCV 2018, eq. 1-4).

Channel attention (eq. 2) then spatial attention (eq. 3), each applied multiplicatively
(eq. 1). The layers are those the authors' code builds, as read from its source (not run
here): the shared MLP has a bias on both layers and a hidden width of
:func:`~dilconv._checks.reduced_channels` ``(C, reduction)``;
the spatial ``k x k`` convolution has no bias and is followed by a norm layer, with no
activation before the sigmoid. The spatial descriptor concatenates the channel-wise mean
*before* the max, as the paper's eq. 3 writes ``[AvgPool(F); MaxPool(F)]`` and as timm's
``CbamModule`` does; the authors' code puts the max first, so a state dict of theirs would
need the two input channels of ``spatial.conv.weight`` swapped (not tested: their code is
not a dependency). State-dict keys: ``channel.fc1``, ``channel.fc2``,
``spatial.conv``, ``spatial.bn``. timm's ``CbamModule`` computes the same with an MLP
without biases (its ``mlp_bias=False``); :meth:`CBAM.from_timm` converts it.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from dilconv._checks import check_feature_map, check_positive, is_tracing, reduced_channels
from dilconv._layers import (
    ActLayer,
    Device,
    DType,
    FactoryKwargs,
    NormLayer,
    autocast_enabled,
    conv_bias,
    create_act,
    create_norm,
)

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention"]

_HALF = (torch.float16, torch.bfloat16)


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
    channels, activation, 1x1 conv back to C (both with bias, so :math:`b_1` enters twice; the
    authors' code, as read, has both biases; ``mlp_bias=False``, timm's default, drops
    :math:`b_0, b_1`). The
    output is :math:`M_c(F) \otimes F`, broadcast over H and W.

    Args:
        channels: C, channels in and out.
        reduction: hidden width is ``max(1, C // reduction)`` (floor, never below 1).
        act_layer: activation class or factory (in place where it takes ``inplace``) of the MLP.
        hidden_channels: the hidden width itself, in place of ``reduction`` (timm's
            ``rd_channels``).
        mlp_bias: whether both MLP convolutions have a bias (``fc1.bias``, ``fc2.bias``).

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
        hidden_channels: int | None = None,
        mlp_bias: bool = True,
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
        self.hidden_channels = (
            reduced_channels(channels, reduction) if hidden_channels is None
            else check_positive("hidden_channels", hidden_channels)
        )
        self.fc1 = nn.Conv2d(channels, self.hidden_channels, 1, bias=mlp_bias, **dd)
        self.act = create_act(act_layer)
        self.fc2 = nn.Conv2d(self.hidden_channels, channels, 1, bias=mlp_bias, **dd)

    def _mlp(self, descriptor: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(descriptor)))

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, channels=self.channels, name=type(self).__name__)
        if not is_tracing() and (x.dtype in _HALF or autocast_enabled(x.device.type)):
            return self._forward_wide(x)
        # Both descriptors through the shared MLP as one batch: two convolution calls, not four.
        n = x.shape[0]
        mlp = self._mlp(torch.cat([x.mean((2, 3), keepdim=True), x.amax((2, 3), keepdim=True)]))
        return x * torch.sigmoid(mlp[:n] + mlp[n:])

    def _forward_wide(self, x: Tensor) -> Tensor:
        """The forward for float16/bfloat16 inputs or under autocast. The mean and the gate's
        gradient sum over every position (a 256 x 256 map's gate gradient passes float16's
        65,504), so the descriptors, the MLP (where its weights are float32), the gate and the
        product run in float32 with autocast off; the product is rounded once to ``x``'s
        dtype."""
        wide = torch.promote_types(x.dtype, torch.float32)
        n = x.shape[0]
        on = autocast_enabled(x.device.type)
        with torch.autocast(x.device.type, enabled=False) if on else contextlib.nullcontext():
            descriptors = torch.cat([
                x.mean((2, 3), keepdim=True, dtype=wide), x.amax((2, 3), keepdim=True).to(wide),
            ])
            mlp = self._mlp(descriptors.to(self.fc1.weight.dtype)).to(wide)
            return (x * torch.sigmoid(mlp[:n] + mlp[n:])).to(x.dtype)

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

    At initialisation both gates average about 0.5 (the MLP's output is near zero; the spatial
    map is normalised), so the output keeps about 0.28 of the input's RMS; stacked after every
    stage of a network whose norms are in eval mode the factors multiply (see the guide "A
    dilconv block in your own model").

    Args:
        channels: C, channels in and out.
        reduction: the channel MLP's hidden width is ``max(1, C // reduction)``.
        spatial_kernel: k of the spatial ``k x k`` convolution, odd and positive.
        act_layer: activation class or factory of the channel MLP (in place where it takes
            ``inplace``).
        norm_layer: norm class or factory after the spatial convolution, called as
            ``norm_layer(1)``; ``None`` for no norm.
        hidden_channels: the channel MLP's hidden width itself, in place of ``reduction``.
        mlp_bias: whether the channel MLP's convolutions have biases (timm's ``mlp_bias``).

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
        hidden_channels: int | None = None,
        mlp_bias: bool = True,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        _check_odd_kernel("spatial_kernel", spatial_kernel)
        self.channels = channels
        self.out_channels = channels
        self.channel = ChannelAttention(
            channels, reduction, act_layer=act_layer, hidden_channels=hidden_channels,
            mlp_bias=mlp_bias, device=device, dtype=dtype,
        )
        self.spatial = SpatialAttention(
            spatial_kernel, norm_layer=norm_layer, device=device, dtype=dtype
        )

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, channels=self.channels, name=type(self).__name__)
        return self.spatial(self.channel(x))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"

    @classmethod
    def from_timm(cls, module: nn.Module, *, device: Device = None, dtype: DType = None) -> CBAM:
        """Convert timm's ``CbamModule`` (``timm.layers.cbam``), weights included.

        The block computes what ``module`` computes: its hidden width (what ``rd_ratio``,
        ``rd_channels`` and ``rd_divisor`` gave, kept as ``hidden_channels``), ``mlp_bias``,
        activation (any, copied with its settings), spatial kernel and norm (timm's
        ``BatchNormAct2d`` without activation becomes a ``BatchNorm2d`` with its eps, momentum
        and statistics settings; timm's frozen one, torchvision's ``FrozenBatchNorm2d``). Each
        parameter's ``requires_grad``, each module's train/eval mode, the device and dtype are
        kept. The state-dict keys map one to one:

        ========================================  ================================
        timm                                      dilconv
        ========================================  ================================
        ``channel.fc1.weight`` (and ``.bias``)    ``channel.fc1.weight`` (``.bias``)
        ``channel.fc2.weight`` (and ``.bias``)    ``channel.fc2.weight`` (``.bias``)
        ``spatial.conv.conv.weight``              ``spatial.conv.weight``
        ``spatial.conv.bn.*``                     ``spatial.bn.*``
        ========================================  ================================

        Args:
            module: the timm ``CbamModule``.
            device: where to build the result; by default where ``module``'s tensors are.
            dtype: floating dtype of the result; by default that of ``module``'s tensors.

        Raises:
            TypeError: ``module`` is not a ``CbamModule``; timm's ``LightCbamModule`` is
                refused by name (it pools ``(mean + max) / 2`` before one MLP pass and one
                one-channel convolution, where CBAM's eq. 2-3 keep the two descriptors apart).
            ConversionError: a gate other than the sigmoid (``gate_layer``), an even
                ``spatial_kernel_size``, a norm with an activation or of another type, or a
                layer changed after construction, naming it.

        Example:
            >>> import torch
            >>> from timm.layers.cbam import CbamModule
            >>> theirs = CbamModule(32, rd_ratio=1 / 8, spatial_kernel_size=5).eval()
            >>> ours = CBAM.from_timm(theirs)
            >>> ours.channel.hidden_channels, ours.channel.fc1.bias, ours.training
            (4, None, False)
            >>> x = torch.randn(2, 32, 9, 7)
            >>> torch.testing.assert_close(ours(x), theirs(x))
        """
        from dilconv.convert.timm_cbam import cbam_from_timm

        return cbam_from_timm(module, device=device, dtype=dtype)
