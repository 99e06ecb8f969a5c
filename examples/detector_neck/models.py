"""Seed 001's detector: an EfficientNet backbone, one of the study's four necks, an SSD head.

The study replaced SSD's VGG16 with EfficientNet-b4 and then tried, in order, four ways of
turning its features into the maps the SSD head reads (SPEC 3.2):

- ``width``: a 3x3 conv (bias) + BatchNorm widening every level to 512 channels (the seed's
  ``conv1 = Conv2d(56, 512, 3, padding=1, bias=True)`` and ``conv1_bn``);
- ``fpn_bilinear``: :class:`dilconv.FPNNeck` with bilinear up-sampling;
- ``fpn_transposed``: :class:`dilconv.FPNNeck` with :class:`dilconv.TransposedConvUpsampler`
  (the seed's ``ConvTranspose2d(k=2, s=2)`` + BN);
- ``bifpn``: :class:`dilconv.BiFPN`, C3-C5 to P3-P7 (P6 and P7 made from C5 as effdet makes
  them) at EfficientDet-D0's width and depth (64 channels, 3 layers), dilconv's defaults
  otherwise (the paper's node order, ``nn.BatchNorm2d``'s own settings).

The backbone gives C3-C5: the deepest feature of strides 8, 16 and 32. In torchvision's b4
the 112- and 160-channel stages share stride 16 and the 272- and 448-channel stages share
stride 32 (the seed's table halves every level, which the network does not), so b4 gives
56, 160 and 448 channels; b0 gives 40, 112 and 320.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
from torchvision.models.detection.ssd import SSD, SSDHead
from torchvision.models.feature_extraction import create_feature_extractor

from dilconv import BiFPN, FPNNeck

__all__ = [
    "BACKBONES",
    "NECKS",
    "NeckedBackbone",
    "WidthNeck",
    "backbone_levels",
    "build_ssd",
    "efficientnet",
]

BACKBONES = (*(f"efficientnet_b{i}" for i in range(8)), "efficientnet_tiny")
"""torchvision's EfficientNets, and ``efficientnet_tiny``: torchvision's ``EfficientNet`` class
with b0's stages at half the width and half the depth (about a tenth of b0's cost), for tests
and CPU demos."""

# b0's stages (Tan & Le 2019, table 1): expand ratio, kernel, stride, in, out, layers.
_B0_STAGES = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2),
              (6, 3, 2, 40, 80, 3), (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4),
              (6, 3, 1, 192, 320, 1))
STRIDES = (8, 16, 32)


class WidthNeck(nn.Module):
    """The study's width scaling: per level a 3x3 conv (with bias) + BatchNorm to ``out_channels``.

    State dict: ``convs.{i}`` (``nn.Conv2d``, bias) and ``norms.{i}`` (``nn.BatchNorm2d``).

    Shape:
        a mapping name -> (N, in_channels[i], H_i, W_i) -> the same keys, (N, out_channels,
        H_i, W_i)
    """

    def __init__(self, in_channels: Mapping[str, int], out_channels: int = 512) -> None:
        super().__init__()
        self.keys = list(in_channels)
        self.out_channels = out_channels
        self.convs = nn.ModuleList(
            nn.Conv2d(c, out_channels, 3, padding=1, bias=True) for c in in_channels.values()
        )
        self.norms = nn.ModuleList(nn.BatchNorm2d(out_channels) for _ in in_channels)

    def forward(self, features: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {
            key: norm(conv(features[key]))
            for key, conv, norm in zip(self.keys, self.convs, self.norms, strict=True)
        }


NeckFactory = Callable[[Mapping[str, int]], nn.Module]

NECKS: dict[str, NeckFactory] = {
    "width": lambda channels: WidthNeck(channels, 512),
    "fpn_bilinear": lambda channels: FPNNeck(channels, 256, upsample="bilinear"),
    "fpn_transposed": lambda channels: FPNNeck(channels, 256, upsample="transposed"),
    "bifpn": lambda channels: BiFPN(channels, 64, num_layers=3, num_levels=5),
}
"""Neck name -> factory taking the backbone's ``{"c3": channels, "c4": ..., "c5": ...}``."""


def efficientnet(name: str) -> nn.Module:
    """A torchvision EfficientNet without weights, by name (see :data:`BACKBONES`)."""
    if name == "efficientnet_tiny":
        from torchvision.models.efficientnet import EfficientNet, MBConvConfig

        stages = [MBConvConfig(*stage, width_mult=0.5, depth_mult=0.5) for stage in _B0_STAGES]
        return EfficientNet(stages, dropout=0.2)
    return getattr(torchvision.models, name)(weights=None)


def backbone_levels(model: nn.Module) -> dict[str, str]:
    """Return nodes of the deepest feature of strides 8, 16 and 32: ``{"features.3": "c3", ...}``.

    The stride of each block of ``model.features`` is measured with a small input (the last
    block, the 1x1 head convolution, is left out, as the study's seven stages are).
    """
    features = list(model.features.children())[:-1]
    x = torch.zeros(1, 3, 64, 64)
    deepest: dict[int, str] = {}
    with torch.no_grad():
        for index, block in enumerate(features):
            x = block.eval()(x)
            deepest[64 // x.shape[-1]] = f"features.{index}"
    return {deepest[s]: f"c{s.bit_length() - 1}" for s in STRIDES}


class NeckedBackbone(nn.Module):
    """Backbone feature extractor followed by a neck; returns an ordered mapping of maps."""

    def __init__(self, body: nn.Module, neck: nn.Module) -> None:
        super().__init__()
        self.body = body
        self.neck = neck

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return OrderedDict(self.neck(self.body(images)))


def _channels(body: nn.Module, names: list[str]) -> dict[str, int]:
    with torch.no_grad():
        out = body(torch.zeros(1, 3, 64, 64))
    return {name: out[name].shape[1] for name in names}


def build_ssd(
    neck: str,
    num_classes: int,
    image_size: tuple[int, int],
    backbone: str = "efficientnet_b4",
    *,
    weights: str | Path | None = None,
) -> SSD:
    """The study's detector: EfficientNet C3-C5 -> ``NECKS[neck]`` -> torchvision's SSD.

    Args:
        neck: a key of :data:`NECKS`.
        num_classes: classes including the background (label 0).
        image_size: ``(H, W)`` every image is resized to inside the model (the study used
            512 x 640: 512 rows, 640 columns); boxes come back in each input image's own
            coordinates.
        backbone: any torchvision EfficientNet (``efficientnet_b0`` ... ``b7``), or
            ``efficientnet_tiny`` for tests and CPU demos.
        weights: a local state_dict of that EfficientNet (ImageNet weights, say); none by
            default, nothing is downloaded.

    Returns:
        ``torchvision.models.detection.SSD`` with one ``DefaultBoxGenerator`` level (aspect
        ratios 2 and 3) per neck output and an ``SSDHead`` on the neck's channels. In train
        mode ``model(images, targets)`` returns the loss dict; in eval mode ``model(images)``
        returns one ``{"boxes", "labels", "scores"}`` per image.
    """
    if neck not in NECKS:
        raise ValueError(f"neck must be one of {sorted(NECKS)}, got {neck!r}")
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got "
                         f"{num_classes}")
    net = efficientnet(backbone)
    if weights is not None:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict(state)
    nodes = backbone_levels(net)
    body = create_feature_extractor(net, return_nodes=nodes).train()
    names = list(nodes.values())
    neck_module = NECKS[neck](_channels(body, names))
    trunk = NeckedBackbone(body, neck_module)
    with torch.no_grad():
        levels = trunk.eval()(torch.zeros(1, 3, *image_size))
    trunk.train()
    count = len(levels)
    anchors = DefaultBoxGenerator([[2, 3]] * count)
    head = SSDHead([f.shape[1] for f in levels.values()],
                   anchors.num_anchors_per_location(), num_classes)
    # torchvision's SSD takes size as (width, height): GeneralizedRCNNTransform resizes every
    # image to (size[1], size[0]) = (H, W). COCO scores at most 100 detections per image.
    height, width = image_size
    return SSD(trunk, anchors, (width, height), num_classes, head=head, detections_per_img=100)
