"""Context module with identity initialisation (Yu & Koltun, ICLR 2016, Table 1 and eq. 4-5).

Layer storage is API: the eight convolutions live in ``convs`` (an ``nn.ModuleList``), so the
state_dict keys are ``convs.0.weight``, ``convs.0.bias``, ..., ``convs.7.weight``,
``convs.7.bias`` (layers 1 to 8 of the paper's Table 1, in order).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from dilconv._checks import check_choice, check_feature_map, check_positive
from dilconv._layers import ActLayer, Device, DType, FactoryKwargs, create_act

__all__ = ["ContextModule", "identity_init_"]

DEFAULT_NOISE_SCALE = 1e-2
"""Noise of eq. 5 relative to ``C / c_out``: the authors' Caffe filler uses
``std=0.01 / multiplier`` with ``multiplier = c_out / C`` (github.com/fyu/dilation; read,
not run here)."""

_DILATIONS = (1, 1, 2, 4, 8, 16, 1)
_LARGE_MULTIPLIERS = (2, 2, 4, 8, 16, 32, 32)


def identity_init_(
    conv: nn.Conv2d,
    *,
    base_channels: int | None = None,
    noise_std: float | None = None,
    generator: torch.Generator | None = None,
) -> nn.Conv2d:
    r"""Fill ``conv`` in place with the identity initialisation of Yu & Koltun (eq. 4 and 5).

    With :math:`C` = ``base_channels``, :math:`c_i` = ``conv.in_channels`` and
    :math:`c_{i+1}` = ``conv.out_channels``, the filter of output map :math:`b` at spatial
    offset :math:`t` from the kernel centre, applied to input map :math:`a`, is (eq. 5)

    .. math::

        k^b(t, a) = \begin{cases}
            \dfrac{C}{c_{i+1}} & \text{if } t = 0 \text{ and }
                \left\lfloor \dfrac{aC}{c_i} \right\rfloor
                = \left\lfloor \dfrac{bC}{c_{i+1}} \right\rfloor, \\[4pt]
            \varepsilon \sim \mathcal{N}(0, \sigma^2) & \text{otherwise,}
        \end{cases}

    with :math:`\sigma` = ``noise_std``, and the bias is 0. As in the paper, ``a`` indexes the
    *input* maps and ``b`` the *output* maps, so the entry is
    ``conv.weight[b, a, kh // 2, kw // 2]``; :math:`\lfloor aC / c_i \rfloor` is then the group
    (one of :math:`C`) of input map :math:`a`. Each output map averages the input maps of its
    group, and every layer keeps each group's sum, so a stack of such layers is the identity on
    ``C`` maps. With :math:`c_i = c_{i+1} = C` this is eq. 4, the basic module's identity
    kernel at the centre, :math:`k^b(t, a) = 1_{[t=0]}\, 1_{[a=b]}`, and the default noise is
    0, so the convolution passes its input through exactly.

    Args:
        conv: a convolution with ``groups=1`` and odd kernel sizes (``t = 0`` is the centre).
        base_channels: ``C``; it must divide both channel counts. Default
            ``gcd(in_channels, out_channels)`` (``min`` of the two when one divides the other).
        noise_std: standard deviation of ``epsilon``. Default 0 for eq. 4 (``c_i = c_{i+1} = C``),
            ``DEFAULT_NOISE_SCALE * C / c_{i+1}`` otherwise (see :data:`DEFAULT_NOISE_SCALE`).
        generator: random generator for the noise (on the device the noise is drawn on).

    Returns:
        ``conv``. A convolution on the meta device is returned untouched.

    Shape:
        ``conv.weight`` (c_{i+1}, c_i, kh, kw) is overwritten; ``conv.bias`` (c_{i+1},) set to 0.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from dilconv import identity_init_
        >>> conv = identity_init_(nn.Conv2d(2, 4, 3, padding=1), noise_std=0.0)
        >>> conv.weight[:, :, 1, 1].tolist()
        [[0.5, 0.0], [0.5, 0.0], [0.0, 0.5], [0.0, 0.5]]
        >>> x = torch.rand(1, 2, 5, 7)
        >>> y = conv(x)
        >>> torch.allclose(y[:, 0] + y[:, 1], x[:, 0]), torch.allclose(y[:, 2] + y[:, 3], x[:, 1])
        (True, True)
    """
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"identity_init_ expected an nn.Conv2d, got {type(conv).__name__}")
    if conv.groups != 1:
        raise ValueError(f"identity_init_ expected a convolution with groups=1, got {conv.groups}")
    kh, kw = conv.kernel_size
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(
            f"identity_init_ expected odd kernel sizes (t = 0 at the centre), got {(kh, kw)}"
        )
    c_in, c_out = conv.in_channels, conv.out_channels
    if base_channels is None:
        base_channels = math.gcd(c_in, c_out)
    check_positive("base_channels", base_channels)
    if c_in % base_channels or c_out % base_channels:
        raise ValueError(
            f"base_channels ({base_channels}) must divide in_channels ({c_in}) "
            f"and out_channels ({c_out})"
        )
    basic = c_in == c_out == base_channels
    if noise_std is None:
        noise_std = 0.0 if basic else DEFAULT_NOISE_SCALE * base_channels / c_out
    if noise_std < 0:
        raise ValueError(f"noise_std must be >= 0, got {noise_std}")
    if conv.weight.is_meta:
        return conv

    device = generator.device if generator is not None else torch.device("cpu")
    kernel = torch.zeros(conv.weight.shape, device=device, dtype=torch.float64)
    if noise_std > 0:
        kernel.normal_(0.0, noise_std, generator=generator)
    group_out = torch.arange(c_out, device=device) * base_channels // c_out
    group_in = torch.arange(c_in, device=device) * base_channels // c_in
    same_group = group_out[:, None] == group_in[None, :]
    centre = kernel[:, :, kh // 2, kw // 2]
    centre.copy_(torch.where(same_group, base_channels / c_out, centre))
    with torch.no_grad():
        conv.weight.copy_(kernel)
        if conv.bias is not None:
            conv.bias.zero_()
    return conv


class ContextModule(nn.Module):
    r"""Multi-scale context aggregation by dilated convolutions (Yu & Koltun, Table 1).

    Seven 3x3 convolutions with dilations 1, 1, 2, 4, 8, 16, 1 (padding = dilation, bias), each
    followed by the activation, then a 1x1 convolution (bias) with no activation. The "basic"
    module keeps ``C`` channels throughout; the "large" one widens to 2C, 2C, 4C, 8C, 16C, 32C,
    32C and projects back to C. With ``identity_init=True`` every layer is filled by
    :func:`identity_init_` with ``base_channels=C``: at initialisation the basic module passes a
    non-negative input through unchanged, the large one up to the noise of eq. 5 (first-order
    error per output element of standard deviation at most
    ``DEFAULT_NOISE_SCALE * sqrt(sum_i k_i C^3 / (c_i c_{i+1})) * max|x|``, about
    ``0.029 * sqrt(C) * max|x|``, with ``k_i`` the taps of layer ``i``).

    In the paper ``C`` is the number of classes: the module maps the front-end's class scores
    to refined class scores of the same width. ``num_classes`` is therefore the same number as
    ``channels``, accepted under the paper's name; give either (or both, equal).

    Args:
        channels: ``C``, the channels in and out.
        variant: ``"basic"`` or ``"large"`` (Table 1's two output-channel rows).
        num_classes: alias of ``channels``.
        identity_init: identity initialisation (eq. 4-5) if True, PyTorch's default otherwise.
        act_layer: activation class or factory (in place where it takes ``inplace``); ReLU
            is the paper's "truncation".

    Attributes:
        dilations: dilation of each of the 8 layers, ``(1, 1, 2, 4, 8, 16, 1, 1)``.
        widths: output channels of each layer.
        receptive_fields: receptive field after each layer, computed from the kernel sizes
            :math:`k_l` and dilations :math:`d_l` (every stride is 1) as
            :math:`r_l = r_{l-1} + (k_l - 1)\, d_l`, :math:`r_0 = 1`:
            ``(3, 5, 9, 17, 33, 65, 67, 67)``.

    Shape:
        input (N, C, H, W) -> output (N, C, H, W)

    Example:
        >>> import torch
        >>> from dilconv import ContextModule
        >>> module = ContextModule(21, "large")
        >>> module.widths
        (42, 42, 84, 168, 336, 672, 672, 21)
        >>> module.receptive_fields
        (3, 5, 9, 17, 33, 65, 67, 67)
        >>> x = torch.rand(2, 4, 9, 13)
        >>> torch.allclose(ContextModule(4)(x), x, atol=1e-6)
        True
    """

    def __init__(
        self,
        channels: int | None = None,
        variant: str = "basic",
        num_classes: int | None = None,
        identity_init: bool = True,
        *,
        act_layer: ActLayer | None = nn.ReLU,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        if channels is None and num_classes is None:
            raise ValueError("ContextModule needs channels (or its alias num_classes)")
        if channels is not None and num_classes is not None and channels != num_classes:
            raise ValueError(
                f"num_classes is an alias of channels (C in the paper); got channels={channels} "
                f"and num_classes={num_classes}"
            )
        if channels is None:
            channels = check_positive("num_classes", num_classes)
        check_positive("channels", channels)
        check_choice("variant", variant, ("basic", "large"))
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        multipliers = _LARGE_MULTIPLIERS if variant == "large" else (1,) * len(_DILATIONS)
        widths = [m * channels for m in multipliers] + [channels]
        self.in_channels = channels
        self.out_channels = channels
        self.variant = variant
        self.identity_init = identity_init
        self.convs = nn.ModuleList()
        c_in = channels
        for c_out, dilation in zip(widths[:-1], _DILATIONS, strict=True):
            self.convs.append(
                nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, **dd)
            )
            c_in = c_out
        self.convs.append(nn.Conv2d(c_in, channels, 1, **dd))
        self.act = create_act(act_layer)
        self.widths = tuple(conv.out_channels for conv in self.convs)
        # nn.ModuleList types its items as nn.Module, not the nn.Conv2d they are.
        self.dilations = tuple(conv.dilation[0] for conv in self.convs)  # type: ignore[index]
        self.receptive_fields = _receptive_fields(self.convs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity initialisation (eq. 4-5) with ``base_channels=C``, or PyTorch's default."""
        # nn.ModuleList types its items as nn.Module, not the nn.Conv2d they are.
        for conv in self.convs:
            if self.identity_init:
                identity_init_(conv, base_channels=self.out_channels)  # type: ignore[arg-type]
            else:
                conv.reset_parameters()  # type: ignore[operator]

    def forward(self, x: Tensor) -> Tensor:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        *context, final = self.convs
        for conv in context:
            x = self.act(conv(x))
        return final(x)

    def extra_repr(self) -> str:
        return (
            f"channels={self.out_channels}, variant={self.variant!r}, "
            f"identity_init={self.identity_init}"
        )


def _receptive_fields(convs: nn.ModuleList) -> tuple[int, ...]:
    """Receptive field after each stride-1 layer: r_l = r_{l-1} + (k_l - 1) * d_l."""
    fields = []
    field = 1
    for conv in convs:
        # nn.ModuleList types its items as nn.Module, not the nn.Conv2d they are.
        field += (conv.kernel_size[0] - 1) * conv.dilation[0]  # type: ignore[assignment, index]
        fields.append(field)
    return tuple(fields)
