"""The five classifiers of the Dilated-FPN study (seed 000, Table 1), built from dilconv blocks.

Every network is a :class:`PyramidClassifier`: a :class:`~dilconv.DilatedResNet` backbone, an
optional :class:`~dilconv.FPNNeck` whose finest output (P2) is kept, optional extra convolutions
(variants A and B), global average pooling and a linear layer. ``forward_features`` returns the
map the head pools. Parameter counts for ``num_classes=3`` match the study's Table 1 exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn

from dilconv import DilatedResNet, FPNNeck

__all__ = ["MODELS", "PAPER_PARAMS", "PyramidClassifier", "build"]

# The study's backbone: ResNet-50 block counts with halved widths (seed 000, section 2.3.1).
PLANES = (32, 64, 128, 256)
BLOCKS = (3, 4, 6, 3)

# The study's Table 1 (num_classes=3), kept here only to print next to what the modules count.
PAPER_PARAMS = {
    "resnet50": 5_905_667,
    "fpn": 8_152_355,
    "dfpn": 8_156_195,
    "dfpn_a": 9_337_123,
    "dfpn_b": 10_648_355,
}

PAPER_NAMES = {
    "resnet50": "ResNet50",
    "fpn": "FPN",
    "dfpn": "Dilated FPN",
    "dfpn_a": "Dilated FPN_A",
    "dfpn_b": "Dilated FPN_B",
}


class PyramidClassifier(nn.Module):
    """Backbone -> (FPN neck, keep P2) -> (extra convs) -> global average pool -> linear.

    Shape:
        input (N, 3, H, W) -> logits (N, num_classes)
    """

    def __init__(
        self, backbone: DilatedResNet, neck: FPNNeck | None, extra: nn.Module, num_classes: int
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.neck = neck
        self.extra = extra
        width = neck.out_channels if neck is not None else backbone.out_channels[-1]
        convs = [m for m in extra.modules() if isinstance(m, nn.Conv2d)]
        if convs:
            width = convs[-1].out_channels
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, num_classes)

    def forward_features(self, x: Tensor) -> Tensor:
        """The map the head pools: P2, the extra convs' output, or C5 without a neck."""
        features = self.backbone(x)
        out = features[-1] if self.neck is None else self.neck(features)[0]
        return self.extra(out)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(self.forward_features(x)).flatten(1))


def _extra(*convs: tuple[int, int, int]) -> nn.Module:
    layers: list[nn.Module] = []
    for c_in, c_out, k in convs:
        # The study pads the 1x1 of variant B by 1 as well (seed 000, section 2.3.4).
        layers += [nn.Conv2d(c_in, c_out, k, padding=1), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _fpn_backbone(stem_kernel: int, dilations: Sequence[int]) -> DilatedResNet:
    # One stride-2 stem conv and no max-pool: P2 comes out at H/2 x W/2 (seed 000, 2.3.1).
    return DilatedResNet(
        stem_channels=32, stem_kernel=stem_kernel, stem_stride=2, stem_bias=False,
        stem_pool=False, planes=PLANES, blocks=BLOCKS, dilations=dilations,
    )


def _pyramid(stem_kernel: int, dilations: Sequence[int], extra: nn.Module, num_classes: int):
    backbone = _fpn_backbone(stem_kernel, dilations)
    neck = FPNNeck(backbone.out_channels, 256, smooth_top=False)
    return PyramidClassifier(backbone, neck, extra, num_classes)


def resnet50(num_classes: int = 3) -> PyramidClassifier:
    """The study's ResNet50: 7x7/2 stem with bias, max-pool, halved widths, no neck."""
    backbone = DilatedResNet(
        stem_channels=64, stem_kernel=7, stem_stride=2, stem_bias=True, stem_pool=True,
        planes=PLANES, blocks=BLOCKS,
    )
    return PyramidClassifier(backbone, None, nn.Identity(), num_classes)


def fpn(num_classes: int = 3) -> PyramidClassifier:
    """FPN: 3x3 stem, the four stages, FPNNeck(smooth_top=False), P2 pooled."""
    return _pyramid(3, (1, 1, 1, 1), nn.Identity(), num_classes)


def dfpn(num_classes: int = 3) -> PyramidClassifier:
    """Dilated FPN: 7x7 stem; stage 3 dilated 2 (padding 2), its first block keeping stride 2."""
    return _pyramid(7, (1, 1, 2, 1), nn.Identity(), num_classes)


def dfpn_a(num_classes: int = 3) -> PyramidClassifier:
    """Dilated FPN_A: a 3x3 conv 256 -> 512 on P2 before the pool."""
    return _pyramid(7, (1, 1, 2, 1), _extra((256, 512, 3)), num_classes)


def dfpn_b(num_classes: int = 3) -> PyramidClassifier:
    """Dilated FPN_B: a 1x1 conv 256 -> 512 (padding 1) and a 3x3 conv 512 -> 512 on P2."""
    return _pyramid(7, (1, 1, 2, 1), _extra((256, 512, 1), (512, 512, 3)), num_classes)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet50": resnet50,
    "fpn": fpn,
    "dfpn": dfpn,
    "dfpn_a": dfpn_a,
    "dfpn_b": dfpn_b,
}


def build(name: str, num_classes: int = 3) -> PyramidClassifier:
    """Build one of :data:`MODELS` by name, with a clear error for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](num_classes=num_classes)
