"""The pairs the benchmark times: a dilconv block or network against what people use now.

Every builder returns ``(ours, peer, inputs)`` built with random weights (nothing is downloaded)
at the default sizes, or at tiny sizes with ``quick=True``. Where the two sides compute the
same function, the peer gets our weights (or the reverse), so that both do the same work on the
same inputs. Studies without a torchvision counterpart are left out: the DilatedNet of seed 002
(a dilated VGG16 front-end with no pool4/pool5) has none: torchvision's segmentation models
(DeepLabV3, FCN, LR-ASPP) are built on ResNet and MobileNetV3, none on VGG.
:func:`training_cases` gives the blocks again at a training size (EfficientDet-D0: batch 16
of 512 x 512 images).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CASES", "TRAINING_BATCH", "TRAINING_SIDES", "Case", "Inputs", "Pair",
           "training_cases"]

Inputs = Tensor | list[Tensor] | dict[str, Tensor]
Pair = tuple[nn.Module, nn.Module, Inputs]


@dataclass(frozen=True)
class Case:
    """One pair of modules timed against each other.

    Attributes:
        name: what is ours, e.g. ``"FPNNeck"``.
        peer: what it is compared with.
        build: ``build(quick) -> (ours, peer, inputs)``.
        requires: optional packages both sides need; the case is skipped when one is missing.
        memory_bound: report bytes moved and achieved bandwidth.
        conv_ratio: report time(ours) / time(ours' convolutions alone).
        dilation_cost: the pair is a dilated module over the same with dilation 1; its ratio
            is the cost of dilation.
        dilated: ours holds dilated convolutions; the profiler checks its kernels.
        grad_inputs: in forward+backward, the inputs need a gradient too (blocks inside a
            network get one); networks fed with images do not.
    """

    name: str
    peer: str
    build: Callable[[bool], Pair]
    requires: tuple[str, ...] = ()
    memory_bound: bool = False
    conv_ratio: bool = False
    dilation_cost: bool = False
    dilated: bool = False
    grad_inputs: bool = True

    @property
    def label(self) -> str:
        return f"{self.name} vs {self.peer}"


class PlainSum(nn.Module):
    """``inputs[0] + inputs[1] + ...``: the unweighted fusion every FPN uses."""

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        out = inputs[0]
        for x in inputs[1:]:
            out = out + x
        return out


class LastFeature(nn.Module):
    """The coarsest map of a backbone that returns every stage (what a plain trunk returns)."""

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: Tensor) -> Tensor:
        return self.backbone(x)[-1]


class Bilinear(nn.Module):
    """Bilinear resize to a fixed size (align_corners=False), no parameters."""

    def __init__(self, size: tuple[int, int]) -> None:
        super().__init__()
        self.size = size

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)


def _fpn(quick: bool) -> Pair:
    from torchvision.ops import FeaturePyramidNetwork

    from dilconv import FPNNeck

    channels, out, side, batch = ([16, 32, 64, 128], 16, 8, 2) if quick else (
        [256, 512, 1024, 2048], 256, 56, 2)
    feats = OrderedDict(
        (f"c{i + 2}", torch.randn(batch, c, side >> i, side >> i)) for i, c in enumerate(channels)
    )
    ours = FPNNeck(channels, out)
    peer = FeaturePyramidNetwork(channels, out)
    for i in range(len(channels)):
        peer.inner_blocks[i][0].load_state_dict(ours.lateral[i].state_dict())
        peer.layer_blocks[i][0].load_state_dict(ours.smooth[i].state_dict())
    return ours, peer, feats


def _cbam(quick: bool) -> Pair:
    from timm.layers.cbam import CbamModule

    from dilconv import CBAM

    channels, batch, side = (16, 2, 8) if quick else (256, 8, 32)
    return CBAM(channels), CbamModule(channels), torch.randn(batch, channels, side, side)


def _fusion_maps(quick: bool, count: int) -> list[Tensor]:
    shape = (2, 8, 8, 8) if quick else (8, 64, 80, 80)
    return [torch.randn(shape) for _ in range(count)]


def _fusion_vs_effdet(count: int, quick: bool) -> Pair:
    from effdet.efficientdet import FpnCombine

    from dilconv import WeightedFusion

    maps = _fusion_maps(quick, count)
    channels, size = maps[0].shape[1], tuple(maps[0].shape[-2:])
    # Every input already at the output's size and channels: FpnCombine adds no resampling.
    info = [{"num_chs": channels, "size": size} for _ in range(count)]
    peer = FpnCombine(info, channels, tuple(range(count)), size, weight_method="fastattn")
    return WeightedFusion(count), peer, maps


def _fusion_vs_sum(count: int, quick: bool) -> Pair:
    from dilconv import WeightedFusion

    return WeightedFusion(count), PlainSum(), _fusion_maps(quick, count)


def _effdet_bifpn(name: str, side: int) -> tuple[nn.Module, list[int]]:
    """effdet's BiFpn of model ``name`` for P3 of ``side`` x ``side``, and its input channels
    (those of the EfficientNet it sits on; the backbone itself is not built)."""
    from effdet.config import get_efficientdet_config
    from effdet.efficientdet import BiFpn

    backbone_channels = {"efficientdet_d0": [40, 112, 320], "efficientdet_d3": [48, 136, 384]}
    config = get_efficientdet_config(name)
    config.image_size = (side * 8, side * 8)
    channels = backbone_channels[name]
    info = [{"num_chs": c, "reduction": 8 << i} for i, c in enumerate(channels)]
    return BiFpn(config, info), channels


def _bifpn(name: str, quick: bool) -> Pair:
    """EfficientDet's BiFPN, converted from effdet's with :meth:`dilconv.BiFPN.from_effdet`: the
    same network and weights on both sides. efficientdet_d*, not tf_efficientdet_d*: the TF
    port's "same" max-pools pad with an extra op on both sides alike."""
    from dilconv import BiFPN

    batch, side = 2, (8 if quick else 64)
    peer, channels = _effdet_bifpn(name, side)
    ours = BiFPN.from_effdet(peer)
    feats = [torch.randn(batch, c, side >> i, side >> i) for i, c in enumerate(channels)]
    return ours, peer, feats


def _bifpn_shared(quick: bool) -> Pair:
    """dilconv's cheaper variant (each level projected once, ``projection="shared"``) against
    EfficientDet-D0's BiFPN: a different network, timed for what the saving is worth."""
    from dilconv import BiFPN

    batch, side = 2, (8 if quick else 64)
    peer, channels = _effdet_bifpn("efficientdet_d0", side)
    effdet_like = BiFPN.from_effdet(peer)
    ours = BiFPN(
        channels, effdet_like.out_channels, effdet_like.num_layers,
        num_levels=effdet_like.num_levels, projection="shared", redundant_bias=False,
        node_order="act_conv_norm", norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01),
    )
    feats = [torch.randn(batch, c, side >> i, side >> i) for i, c in enumerate(channels)]
    return ours, peer, feats


def _tv_dilated_resnet50() -> nn.Module:
    import torchvision

    dilate = [False, True, True]
    return torchvision.models.resnet50(weights=None, replace_stride_with_dilation=dilate)


def _resnet_stage(quick: bool) -> Pair:
    from dilconv import DilatedResNet

    tv = _tv_dilated_resnet50()
    ours = DilatedResNet.from_torchvision(tv)
    batch, side = (2, 4) if quick else (2, 28)
    return ours.layer4, tv.layer4, torch.randn(batch, 1024, side, side)


def _resnet_os8(quick: bool) -> Pair:
    import torchvision

    from dilconv import DilatedResNet

    tv = _tv_dilated_resnet50()
    ours = DilatedResNet.from_torchvision(torchvision.models.resnet50(weights=None), 8)
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    trunk = nn.Sequential(*list(tv.children())[:-2])
    batch, side = (2, 32) if quick else (2, 128)
    return LastFeature(ours), trunk, torch.randn(batch, 3, side, side)


def _resizer(quick: bool) -> Pair:
    import torchvision

    from dilconv import LearnableResizer

    batch, side, out = (2, 16, 32) if quick else (2, 64, 128)
    classifier = torchvision.models.resnet18(weights=None, num_classes=10)
    ours = nn.Sequential(LearnableResizer(3, out), classifier)
    peer = nn.Sequential(Bilinear((out, out)), copy.deepcopy(classifier))
    return ours, peer, torch.randn(batch, 3, side, side)


def _conv(dilation: int, quick: bool) -> Pair:
    channels, batch, side = (16, 2, 8) if quick else (256, 2, 64)
    ours = nn.Conv2d(channels, channels, 3, padding=dilation, dilation=dilation, bias=False)
    peer = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    peer.weight.data.copy_(ours.weight.data)
    return ours, peer, torch.randn(batch, channels, side, side)


def _bottleneck(quick: bool) -> Pair:
    from dilconv import DilatedBottleneck

    channels, planes, batch, side = (32, 8, 2, 8) if quick else (256, 64, 2, 56)
    ours = DilatedBottleneck(channels, planes, dilation=2)
    peer = DilatedBottleneck(channels, planes, dilation=1)
    peer.load_state_dict(ours.state_dict())
    return ours, peer, torch.randn(batch, channels, side, side)


def _seed000_resnet50(quick: bool) -> Pair:
    import torchvision
    from examples.dfpn_classifier.models import PyramidClassifier

    from dilconv import DilatedResNet

    # The study's classifier layout (backbone, pool, linear) at torchvision's widths, since
    # torchvision builds no ResNet-50 at the study's halved widths.
    tv = torchvision.models.resnet50(weights=None, num_classes=3)
    ours = PyramidClassifier(DilatedResNet.from_torchvision(tv), None, nn.Identity(), 3)
    ours.fc.load_state_dict(tv.fc.state_dict())
    batch, side = (2, 32) if quick else (2, 128)
    return ours, tv, torch.randn(batch, 3, side, side)


def _seed001_trunk(quick: bool) -> Pair:
    from examples.detector_neck.models import build_ssd
    from torchvision.ops import FeaturePyramidNetwork

    backbone, side, batch = ("efficientnet_tiny", 64, 2) if quick else ("efficientnet_b0", 192, 2)
    ours = build_ssd("fpn_bilinear", 2, (side, side), backbone).backbone
    peer = copy.deepcopy(ours)
    peer.neck = FeaturePyramidNetwork(ours.neck.in_channels, ours.neck.out_channels)
    return ours, peer, torch.randn(batch, 3, side, side)


def _seed003_resizer(quick: bool) -> Pair:
    from examples.resizer_classifier.models import vgg16, vgg16_resizer

    arch, batch, side, out = ("vgg_tiny", 2, 16, 32) if quick else ("vgg16", 2, 32, 112)
    ours = vgg16_resizer(10, out, arch)
    peer = vgg16(10, out, arch)
    peer.classifier.load_state_dict(ours.classifier.state_dict())
    return ours, peer, torch.randn(batch, 3, side, side)


CASES: list[Case] = [
    Case("FPNNeck", "torchvision FeaturePyramidNetwork", _fpn, conv_ratio=True),
    Case("CBAM", "timm CbamModule", _cbam, ("timm",), memory_bound=True, conv_ratio=True),
    Case("WeightedFusion(2)", "effdet FpnCombine fastattn", partial(_fusion_vs_effdet, 2),
         ("effdet",), memory_bound=True),
    Case("WeightedFusion(3)", "effdet FpnCombine fastattn", partial(_fusion_vs_effdet, 3),
         ("effdet",), memory_bound=True),
    Case("WeightedFusion(2)", "plain sum", partial(_fusion_vs_sum, 2), memory_bound=True),
    Case("WeightedFusion(3)", "plain sum", partial(_fusion_vs_sum, 3), memory_bound=True),
    Case("BiFPN D0 from_effdet (P3-P7, 64ch, 3 layers)", "effdet BiFpn efficientdet_d0",
         partial(_bifpn, "efficientdet_d0"), ("effdet",), conv_ratio=True),
    Case("BiFPN D3 from_effdet (P3-P7, 160ch, 6 layers)", "effdet BiFpn efficientdet_d3",
         partial(_bifpn, "efficientdet_d3"), ("effdet",), conv_ratio=True),
    Case("BiFPN D0 projection='shared' (not EfficientDet's network)",
         "effdet BiFpn efficientdet_d0", _bifpn_shared, ("effdet",)),
    Case("DilatedResNet-50 layer4 (OS8)", "torchvision resnet50 layer4 (dilated)", _resnet_stage,
         dilated=True),
    Case("DilatedResNet.from_torchvision OS8", "torchvision resnet50 OS8 trunk", _resnet_os8,
         dilated=True, grad_inputs=False),
    Case("LearnableResizer + resnet18", "bilinear + resnet18", _resizer, conv_ratio=True,
         grad_inputs=False),
    Case("Conv3x3 dilation 2", "Conv3x3 dilation 1", partial(_conv, 2), dilation_cost=True,
         dilated=True),
    Case("Conv3x3 dilation 4", "Conv3x3 dilation 1", partial(_conv, 4), dilation_cost=True,
         dilated=True),
    Case("DilatedBottleneck dilation 2", "DilatedBottleneck dilation 1", _bottleneck,
         dilation_cost=True, dilated=True),
    Case("seed 000 ResNet50 classifier", "torchvision resnet50", _seed000_resnet50,
         grad_inputs=False),
    Case("seed 001 EfficientNet-b0 + FPNNeck(bilinear)", "EfficientNet-b0 + torchvision FPN",
         _seed001_trunk, grad_inputs=False),
    Case("seed 003 LearnableResizer + VGG16", "bilinear + VGG16", _seed003_resizer,
         grad_inputs=False),
]
"""Every pair, in the order they run."""


TRAINING_BATCH = 16
"""EfficientDet-D0's training batch (Tan et al., 2020: batch 128 over 32 cores would be 4 a
core; 16 a GPU is what single-GPU recipes such as effdet's use)."""

TRAINING_SIDES: dict[str, int] = {
    r"^FPNNeck$": 128,  # C2 (stride 4) of a 512 x 512 image
    r"^CBAM$": 64,  # on P3 (stride 8)
    r"^WeightedFusion": 64,  # P3 of EfficientDet-D0
    r"^BiFPN D0": 64,  # P3; the coarser levels halve from there
}
"""Side of the largest input map at the training size, by a pattern on the case's name: that
of a 512 x 512 image (EfficientDet-D0's) at the map's stride."""


def _resized(inputs: Inputs, batch: int, side: int) -> Inputs:
    """New random inputs of ``batch`` samples, the largest map ``side`` wide, the others kept
    in proportion (a pyramid stays a pyramid)."""
    largest = max(t.shape[-1] for t in _tensors(inputs))

    def one(t: Tensor) -> Tensor:
        h, w = (max(1, d * side // largest) for d in t.shape[-2:])
        return torch.randn(batch, *t.shape[1:-2], h, w)

    if isinstance(inputs, dict):
        return type(inputs)((k, one(v)) for k, v in inputs.items())
    if isinstance(inputs, list):
        return [one(t) for t in inputs]
    return one(inputs)


def _tensors(inputs: Inputs) -> list[Tensor]:
    if isinstance(inputs, dict):
        return list(inputs.values())
    return list(inputs) if isinstance(inputs, list) else [inputs]


def _at_training_size(build: Callable[[bool], Pair], side: int, quick: bool) -> Pair:
    ours, peer, inputs = build(quick)
    return ours, peer, inputs if quick else _resized(inputs, TRAINING_BATCH, side)


def training_cases(cases: Sequence[Case] | None = None) -> list[Case]:
    """The cases of :data:`TRAINING_SIDES` (of ``cases``, every case by default) with their
    inputs at the training size: batch :data:`TRAINING_BATCH`, the largest map as wide as
    :data:`TRAINING_SIDES` says. Not EfficientDet's own network (``projection='shared'``) is
    left out; ``quick`` builds stay tiny."""
    out = []
    for case in CASES if cases is None else cases:
        side = next((s for p, s in TRAINING_SIDES.items() if re.search(p, case.name)), None)
        if side is None or "shared" in case.name:
            continue
        name = f"{case.name} [training size: batch {TRAINING_BATCH}, 512 x 512 image]"
        build = partial(_at_training_size, case.build, side)
        out.append(dataclasses.replace(case, name=name, build=build))
    return out
