"""Seed 002's DilatedNet (Yu & Koltun, ICLR 2016, section 4 and Table 1) from dilconv blocks.

The front-end is VGG16 adapted to dense prediction as the paper's section 4 does it: pool4 and
pool5 are removed, the conv5 block is dilated by 2, fc6 becomes a 7x7 convolution dilated by 4,
fc7 a 1x1 convolution (each followed by ReLU and dropout), and a final 1x1 convolution gives
class scores at 1/8 of the input. A :class:`dilconv.ContextModule` (basic or large, identity
initialised) may follow; bilinear up-sampling brings the scores back to the input size.

Padding: the authors' Caffe front-end (github.com/fyu/dilation, ``network.py``) pads no
convolution and reflect-pads the input image by a 186 px margin instead. Here every
convolution keeps its map size (padding 1 in conv1-conv4, 2 in the dilated conv5, 12 in fc6)
and the three poolings round up (``ceil_mode=True``), so any H x W
input, odd or as small as 1 x 1, gives ceil(H/8) x ceil(W/8) scores. Receptive fields do not
depend on padding. Score pixel ``j`` is centred on input pixel ``8j + 3.5``; the scores are
up-sampled by exactly 8 (bilinear, ``align_corners=False``) and cropped to H x W, which keeps
that alignment (stretching ceil(H/8) pixels to H would shift them when 8 does not divide H).

Input: float RGB images in [0, 1]. With ``normalize=True`` the network subtracts the ImageNet
mean and divides by its standard deviation, which torchvision's VGG16 weights expect.

State dict of :class:`DilatedNet`: ``frontend.features.conv{b}_{i}.weight`` / ``.bias`` for
the 13 VGG convolutions (Caffe's names, b = 1..5), ``frontend.fc6.*``, ``frontend.fc7.*``,
``frontend.final.*`` and, with a context module, ``context.convs.{0..7}.*`` (layers 1-8 of the
paper's Table 1). ReLU, pooling and dropout hold no state; nothing else is stored.
"""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

from dilconv import ContextModule

__all__ = [
    "VGG16_LAYOUT",
    "DilatedNet",
    "FrontEnd",
    "convolutionalised_vgg16",
    "linear_to_conv",
    "load_vgg16_weights",
]

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                512, 512, 512, "M")
"""torchvision's ``vgg16().features``: convolution widths, ``"M"`` for a 2x2 max pooling."""

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OUTPUT_STRIDE = 8
CONTEXT_VARIANTS = ("basic", "large")

_BLOCK_CONVS = (2, 2, 3, 3, 3)
_BLOCK_WIDTHS = (1, 2, 4, 8, 8)  # in units of ``width`` (conv1's channels)
_POOLED_BLOCKS = 3  # pool1-pool3 stay; pool4 and pool5 go
_CONV5_DILATION = 2
_FC6_KERNEL = 7
_FC6_DILATION = 4
_FC_PER_WIDTH = 4096 // 64
# fc6/fc7 N(0, 0.01), the initialisation torchvision's VGG gives its linear layers; the final
# layer N(0, 0.001), the std of the authors' Caffe filler (read, not run). Biases start at 0.
_FC_STD = 1e-2
_FINAL_STD = 1e-3


def _check_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def _init_final(conv: nn.Conv2d) -> None:
    nn.init.normal_(conv.weight, 0.0, _FINAL_STD)
    nn.init.zeros_(conv.bias)


class FrontEnd(nn.Module):
    """VGG16 conv1-conv5 with pool1-pool3, conv5 dilated 2, fc6 (7x7, dilated 4), fc7, final.

    Args:
        num_classes: channels of the final 1x1 convolution.
        width: channels of conv1; the five blocks have ``width * (1, 2, 4, 8, 8)`` channels
            (64 is VGG16: 64, 128, 256, 512, 512).
        fc_channels: channels of fc6 and fc7; default ``64 * width`` (4096 at width 64).
        dropout: probability of ``nn.Dropout`` (element-wise, not channel-wise)
            after fc6 and after fc7; the paper's front-end uses 0.5.

    Attributes:
        conv_names: the 13 convolutions' names in ``features``, ``conv1_1`` ... ``conv5_3``.

    Shape:
        input (N, 3, H, W) -> scores (N, num_classes, ceil(H/8), ceil(W/8))
    """

    def __init__(self, num_classes: int, *, width: int = 64, fc_channels: int | None = None,
                 dropout: float = 0.5, device=None, dtype=None) -> None:
        super().__init__()
        _check_int("num_classes", num_classes)
        _check_int("width", width)
        fc_channels = _FC_PER_WIDTH * width if fc_channels is None else fc_channels
        _check_int("fc_channels", fc_channels)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        dd = {"device": device, "dtype": dtype}
        self.in_channels, self.out_channels = 3, num_classes
        self.width, self.fc_channels, self.dropout = width, fc_channels, dropout
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        c_in = 3
        for block, (convs, multiple) in enumerate(zip(_BLOCK_CONVS, _BLOCK_WIDTHS), start=1):
            dilation = _CONV5_DILATION if block == 5 else 1
            for i in range(1, convs + 1):
                layers[f"conv{block}_{i}"] = nn.Conv2d(c_in, multiple * width, 3, padding=dilation,
                                                       dilation=dilation, **dd)
                layers[f"relu{block}_{i}"] = nn.ReLU(inplace=True)
                c_in = multiple * width
            if block <= _POOLED_BLOCKS:
                layers[f"pool{block}"] = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.features = nn.Sequential(layers)
        self.conv_names = tuple(name for name in layers if name.startswith("conv"))
        fc6_padding = _FC6_DILATION * (_FC6_KERNEL - 1) // 2
        self.fc6 = nn.Conv2d(c_in, fc_channels, _FC6_KERNEL, padding=fc6_padding,
                             dilation=_FC6_DILATION, **dd)
        self.relu6 = nn.ReLU(inplace=True)
        self.drop6 = nn.Dropout(dropout)
        self.fc7 = nn.Conv2d(fc_channels, fc_channels, 1, **dd)
        self.relu7 = nn.ReLU(inplace=True)
        self.drop7 = nn.Dropout(dropout)
        self.final = nn.Conv2d(fc_channels, num_classes, 1, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming normal convolutions (fan out, ReLU gain) and N(0, 0.01) fc6/fc7, the
        initialisation torchvision's VGG16 gives its convolutions and linear layers; ``final``
        N(0, 0.001), the std of the authors' Caffe filler (read, not run); biases 0."""
        for name in self.conv_names:
            conv = self.features.get_submodule(name)
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
        for fc in (self.fc6, self.fc7):
            nn.init.normal_(fc.weight, 0.0, _FC_STD)
            nn.init.zeros_(fc.bias)
        _init_final(self.final)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.drop6(self.relu6(self.fc6(x)))
        x = self.drop7(self.relu7(self.fc7(x)))
        return self.final(x)

    def extra_repr(self) -> str:
        return (f"num_classes={self.out_channels}, width={self.width}, "
                f"fc_channels={self.fc_channels}, dropout={self.dropout}")


class DilatedNet(nn.Module):
    """Dilated VGG16 front-end, optional context module, bilinear up-sampling (Yu & Koltun).

    See the module docstring for the padding, the alignment of the up-sampling, the input
    normalisation and the state_dict keys.

    Args:
        num_classes: K, classes scored per pixel (the context module's ``C``).
        context: ``None`` (the front-end alone), ``"basic"`` or ``"large"``: a
            :class:`dilconv.ContextModule` with identity initialisation on the 1/8 scores.
        width: channels of conv1; 64 is VGG16, smaller widths scale every block (8 gives
            8, 16, 32, 64, 64) so the network trains on a CPU.
        fc_channels: channels of fc6 and fc7; default ``64 * width`` (4096 at width 64).
        dropout: ``nn.Dropout`` probability after fc6 and after fc7 (the paper's 0.5).
        normalize: subtract the ImageNet mean and divide by its std before conv1_1.

    Attributes:
        frontend: :class:`FrontEnd`.
        context: :class:`dilconv.ContextModule` or None.

    Shape:
        input (N, 3, H, W) in [0, 1] -> scores (N, K, H, W), any H, W >= 1;
        :meth:`forward_frontend` and :meth:`forward_scores` give (N, K, ceil(H/8), ceil(W/8)).

    Example:
        >>> import torch
        >>> net = DilatedNet(11, "basic", width=2, fc_channels=8)
        >>> net(torch.rand(1, 3, 21, 30)).shape
        torch.Size([1, 11, 21, 30])
        >>> net.forward_scores(torch.rand(1, 3, 21, 30)).shape
        torch.Size([1, 11, 3, 4])
    """

    output_stride = OUTPUT_STRIDE

    def __init__(self, num_classes: int, context: str | None = None, *, width: int = 64,
                 fc_channels: int | None = None, dropout: float = 0.5, normalize: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        if context is not None and context not in CONTEXT_VARIANTS:
            raise ValueError(f"context must be None or one of {CONTEXT_VARIANTS}, got {context!r}")
        dd = {"device": device, "dtype": dtype}
        self.in_channels, self.num_classes, self.out_channels = 3, num_classes, num_classes
        self.normalize = normalize
        self.frontend = FrontEnd(num_classes, width=width, fc_channels=fc_channels,
                                 dropout=dropout, **dd)
        self.context = None if context is None else ContextModule(num_classes, context, **dd)

    def reset_parameters(self) -> None:
        """Re-initialise the front-end and (identity) the context module."""
        self.frontend.reset_parameters()
        if self.context is not None:
            self.context.reset_parameters()

    def forward_frontend(self, x: Tensor) -> Tensor:
        """Class scores of the front-end alone, (N, K, ceil(H/8), ceil(W/8))."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"DilatedNet expected images (N, 3, H, W), got shape {tuple(x.shape)}")
        if not torch.is_floating_point(x):
            raise TypeError(f"DilatedNet expected float images in [0, 1], got {x.dtype}")
        if self.normalize:
            # Constants made on the input's device and in its dtype.
            mean = torch.as_tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device)
            std = torch.as_tensor(IMAGENET_STD, dtype=x.dtype, device=x.device)
            x = (x - mean[:, None, None]) / std[:, None, None]
        return self.frontend(x)

    def forward_scores(self, x: Tensor) -> Tensor:
        """Class scores at 1/8 after the context module (if any), before up-sampling."""
        scores = self.forward_frontend(x)
        return scores if self.context is None else self.context(scores)

    def forward(self, x: Tensor) -> Tensor:
        scores = self.forward_scores(x)
        up = F.interpolate(scores, scale_factor=self.output_stride, mode="bilinear",
                           align_corners=False)
        return up[..., :x.shape[-2], :x.shape[-1]]

    def add_context(self, variant: str = "basic") -> DilatedNet:
        """The paper's stage 2: a copy of this front-end network with a context module on top.

        The returned network holds a deep copy of ``frontend`` (same weights, ``requires_grad``
        flags, device, dtype and train/eval mode; ``self`` is left untouched) and a new
        :class:`dilconv.ContextModule` with identity initialisation. Identity holds only for
        non-negative scores: the module's ReLUs truncate negative ones. The basic module at
        initialisation therefore computes ``relu(scores)``, not ``scores``; the front-end's
        scores are unbounded (the final 1x1 convolution has no activation), so the new
        network agrees with the old one exactly where the front-end's scores are >= 0 and
        clips the rest to 0. The large module adds the small noise of eq. 5 as well.

        Args:
            variant: ``"basic"`` or ``"large"``.

        Raises:
            ValueError: the network already has a context module, or ``variant`` is unknown.
        """
        if self.context is not None:
            raise ValueError(f"this DilatedNet already has a {self.context.variant!r} context "
                             "module; add_context takes a front-end network")
        if variant not in CONTEXT_VARIANTS:
            raise ValueError(f"variant must be one of {CONTEXT_VARIANTS}, got {variant!r}")
        net = copy.deepcopy(self)
        ref = net.frontend.final.weight
        net.context = ContextModule(self.num_classes, variant, device=ref.device,
                                    dtype=ref.dtype).train(self.training)
        return net

    @classmethod
    def from_torchvision(cls, vgg16: torchvision.models.VGG, num_classes: int,
                         context: str | None = None, *, dropout: float = 0.5,
                         normalize: bool = True) -> DilatedNet:
        """The paper's initialisation: a DilatedNet whose front-end holds a VGG16's weights.

        The 13 convolutions are copied as they are (conv5's dilation changes how its filters
        are applied, not the filters); fc6 ``classifier[0]`` (F x 25088) becomes the 7x7 conv
        weight (F, 512, 7, 7) and fc7 ``classifier[3]`` (F x F) the 1x1 weight (F, F, 1, 1), as
        :func:`linear_to_conv` reshapes them; ``final`` and the context module are initialised
        afresh. Device, dtype, ``requires_grad`` flags and train/eval mode follow ``vgg16``.

        Args:
            vgg16: ``torchvision.models.vgg16(...)`` (without batch norm), any classifier
                width F.
            num_classes: K.
            context: as in :class:`DilatedNet`.
            dropout: after fc6 and fc7.
            normalize: as in :class:`DilatedNet` (torchvision's weights expect it).

        Raises:
            TypeError: ``vgg16`` is not a ``torchvision.models.VGG``.
            ValueError: it is another VGG (batch norm, 11/13/19 layers) or its classifier
                is not VGG's three linear layers.
        """
        linears = _vgg16_linears(vgg16)
        ref = linears[0].weight
        net = cls(num_classes, context, fc_channels=linears[0].out_features, dropout=dropout,
                  normalize=normalize, device="meta", dtype=ref.dtype)
        # Built on meta and filled here: VGG16's 134M front-end values are not drawn twice.
        net.to_empty(device=ref.device)
        sources = [m for m in vgg16.features if isinstance(m, nn.Conv2d)]
        targets = [net.frontend.features.get_submodule(n) for n in net.frontend.conv_names]
        weights = [(conv.weight, conv.bias) for conv in sources]
        weights += [(_conv_weight(fc, c, k), fc.bias)
                    for fc, c, k in zip(linears[:2], (VGG16_LAYOUT[-2], linears[1].in_features),
                                        (_FC6_KERNEL, 1))]
        with torch.no_grad():
            for conv, (weight, bias) in zip([*targets, net.frontend.fc6, net.frontend.fc7],
                                            weights, strict=True):
                conv.weight.copy_(weight).requires_grad_(weight.requires_grad)
                conv.bias.copy_(bias).requires_grad_(bias.requires_grad)
        _init_final(net.frontend.final)
        if net.context is not None:
            net.context.reset_parameters()
        return net.train(vgg16.training)

    def extra_repr(self) -> str:
        variant = None if self.context is None else self.context.variant
        return f"num_classes={self.num_classes}, context={variant!r}, normalize={self.normalize}"


def _layout(features: nn.Sequential) -> list[int | str]:
    layout: list[int | str] = []
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            layout.append(layer.out_channels)
        elif isinstance(layer, nn.MaxPool2d):
            layout.append("M")
        elif isinstance(layer, nn.modules.batchnorm._NormBase):
            raise ValueError(f"expected torchvision's vgg16 (no batch norm, as the paper's "
                             f"front-end), got a VGG with {type(layer).__name__} in its features "
                             "(vgg16_bn?)")
        elif not isinstance(layer, nn.ReLU):
            raise ValueError(f"expected VGG16's features (Conv2d, ReLU, MaxPool2d), got "
                             f"{type(layer).__name__}")
    return layout


def _vgg16_linears(vgg16: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Check that ``vgg16`` is torchvision's VGG16; return its fc6, fc7 and fc8."""
    if not isinstance(vgg16, torchvision.models.VGG):
        raise TypeError(f"expected a torchvision.models.VGG (from torchvision.models.vgg16), got "
                        f"{type(vgg16).__name__}")
    layout = _layout(vgg16.features)
    if tuple(layout) != VGG16_LAYOUT:
        convs = sum(1 for c in layout if c != "M")
        raise ValueError(f"expected VGG16's features {list(VGG16_LAYOUT)} (13 convolutions), got "
                         f"{layout} ({convs} convolutions)")
    for conv in (m for m in vgg16.features if isinstance(m, nn.Conv2d)):
        geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups)
        if geometry != ((3, 3), (1, 1), (1, 1), (1, 1), 1) or conv.bias is None:
            raise ValueError(f"expected VGG16's 3x3 convolutions (stride 1, padding 1, bias), "
                             f"got {conv}")
    pool = vgg16.avgpool
    if not isinstance(pool, nn.AdaptiveAvgPool2d) or pool.output_size not in (7, (7, 7)):
        raise ValueError(f"expected VGG16's avgpool AdaptiveAvgPool2d((7, 7)), got {pool}")
    kinds = [type(m).__name__ for m in vgg16.classifier]
    expected = ["Linear", "ReLU", "Dropout"] * 2 + ["Linear"]
    if kinds != expected:
        raise ValueError(f"expected VGG16's classifier {expected}, got {kinds}")
    fc6, fc7, fc8 = vgg16.classifier[0], vgg16.classifier[3], vgg16.classifier[6]
    channels = VGG16_LAYOUT[-2] * _FC6_KERNEL**2
    if fc6.in_features != channels or fc7.in_features != fc6.out_features \
            or fc7.out_features != fc6.out_features or fc8.in_features != fc7.out_features:
        raise ValueError(f"expected VGG16's classifier Linear({channels}, F), Linear(F, F), "
                         f"Linear(F, classes), got {fc6}, {fc7}, {fc8}")
    if fc6.bias is None or fc7.bias is None or fc8.bias is None:
        raise ValueError("expected VGG16's classifier layers with biases")
    return fc6, fc7, fc8


def _conv_weight(linear: nn.Linear, in_channels: int, kernel_size: int) -> Tensor:
    """``linear.weight`` (out, in_channels * k * k) as a conv weight (out, in_channels, k, k).

    ``torch.flatten(x, 1)`` on (N, C, k, k) orders the features channel-major, then rows, then
    columns, which is the order of a conv weight's last three axes."""
    expected = in_channels * kernel_size**2
    if linear.in_features != expected:
        raise ValueError(f"a {kernel_size}x{kernel_size} convolution over {in_channels} channels "
                         f"needs a Linear with {expected} in_features, got {linear.in_features}")
    return linear.weight.reshape(linear.out_features, in_channels, kernel_size, kernel_size)


def linear_to_conv(linear: nn.Linear, in_channels: int, kernel_size: int = 1, *,
                   dilation: int = 1, padding: int = 0) -> nn.Conv2d:
    """A convolution applying ``linear`` to every (flattened) ``k x k`` window of its input.

    With ``dilation=1`` and ``padding=0`` on a ``k x k`` map it computes ``linear`` on
    ``torch.flatten(x, 1)``, to float round-off (the "convolutionalisation" of Long et al.,
    FCN). The new layer gets copies of the weights with the same ``requires_grad``, device and
    dtype.

    Args:
        linear: with ``in_features == in_channels * kernel_size ** 2``.
        in_channels: channels of the map the convolution reads.
        kernel_size: k.
        dilation: dilation of the convolution.
        padding: padding of the convolution.

    Shape:
        input (N, in_channels, H, W) -> (N, out_features, H', W') as ``nn.Conv2d`` gives.
    """
    weight = _conv_weight(linear, in_channels, kernel_size)
    conv = nn.Conv2d(in_channels, linear.out_features, kernel_size, padding=padding,
                     dilation=dilation, bias=linear.bias is not None, device="meta",
                     dtype=weight.dtype)
    conv.weight = nn.Parameter(weight.detach().clone(), weight.requires_grad)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach().clone(), linear.bias.requires_grad)
    return conv


def convolutionalised_vgg16(vgg16: torchvision.models.VGG) -> nn.Sequential:
    """torchvision's VGG16 with its classifier as convolutions: fc6 7x7, fc7 and fc8 1x1.

    ``features`` is a deep copy (all five poolings, no dilation); fc6, fc7 and fc8 come from
    :func:`linear_to_conv` (no padding), with VGG's ReLU and dropout between them. At 224 x 224
    the output is (N, classes, 1, 1) and equals ``vgg16``'s logits (its adaptive average pool
    is the identity on the 7 x 7 map); larger inputs give a map of logits, one per 32 px. This
    is the network DilatedNet's front-end starts from, before pool4/pool5 are removed and
    conv5/fc6 dilated.

    State dict: ``features.*`` as in ``vgg16``, then ``fc6.*``, ``fc7.*``, ``fc8.*``.

    Shape:
        input (N, 3, H, W) -> (N, classes, floor(H/32) - 6, floor(W/32) - 6)
    """
    fc6, fc7, fc8 = _vgg16_linears(vgg16)
    return nn.Sequential(OrderedDict([
        ("features", copy.deepcopy(vgg16.features)),
        ("fc6", linear_to_conv(fc6, VGG16_LAYOUT[-2], _FC6_KERNEL)),
        ("relu6", nn.ReLU(inplace=True)),
        ("drop6", nn.Dropout(vgg16.classifier[2].p)),
        ("fc7", linear_to_conv(fc7, fc7.in_features)),
        ("relu7", nn.ReLU(inplace=True)),
        ("drop7", nn.Dropout(vgg16.classifier[5].p)),
        ("fc8", linear_to_conv(fc8, fc8.in_features)),
    ])).train(vgg16.training)


def load_vgg16_weights(path: str | Path) -> torchvision.models.VGG:
    """``torchvision.models.vgg16(weights=None)`` holding the state_dict saved at ``path``.

    For a script's ``--weights PATH`` (e.g. torchvision's ``vgg16-397923af.pth``, downloaded by
    the user). The file is read with ``torch.load(..., weights_only=True)`` onto the CPU; the
    model is built on the meta device and takes the loaded tensors as they are (``assign``),
    so no random weights are drawn and the file's dtype is kept.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file is not a weights-only state_dict, or not VGG16's (missing,
            unexpected or mis-shaped keys); the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG16 weights {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise ValueError(f"cannot read {path} as a weights-only state_dict: {exc}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state_dict "
                         "(a mapping of names to tensors) of torchvision's vgg16")
    with torch.device("meta"):
        model = torchvision.models.vgg16(weights=None)
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a state_dict of torchvision's vgg16: {exc}") from exc
    return model
