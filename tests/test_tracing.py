"""torch.fx over models that hold dilconv blocks (issue 21): torchvision's
``create_feature_extractor`` and ``symbolic_trace`` give the eager outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor

from dilconv import CBAM, BiFPN, DilatedResNet, FPNNeck

CHANNELS = [4, 8, 16]


def randomise_norms(model: nn.Module) -> nn.Module:
    torch.manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def assert_same(got: dict, expected: dict) -> None:
    assert list(got) == list(expected)
    torch.testing.assert_close(list(got.values()), list(expected.values()))


def test_feature_extractor_over_a_torchvision_resnet_with_cbam():
    # The guide's recipe: CBAM after a stage of a torchvision ResNet, then its features.
    model = resnet18(weights=None)
    model.layer2 = nn.Sequential(model.layer2, CBAM(128))
    model.layer3 = nn.Sequential(model.layer3, CBAM(256))
    model = randomise_norms(model)
    layers = {"layer2": "c3", "layer3": "c4", "layer4": "c5"}
    extractor = create_feature_extractor(model, return_nodes=layers)
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert_same(extractor(x), IntermediateLayerGetter(model, layers)(x))


def test_feature_extractor_over_dilated_resnet():
    net = randomise_norms(DilatedResNet(
        stem_channels=8, planes=(4, 8, 8), blocks=(1, 1, 1), strides=(1, 2, 1),
        dilations=(1, 1, 2), output_stride=8,
    ))
    extractor = create_feature_extractor(net, return_nodes={"layer2": "c3", "layer3": "c4"})
    x = torch.randn(2, 3, 33, 31)
    with torch.no_grad():
        features = net(x)
        assert_same(extractor(x), {"c3": features[1], "c4": features[2]})


class Detector(nn.Module):
    """A backbone feeding a neck, as detection and segmentation models hold them."""

    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.backbone = DilatedResNet(
            stem_channels=8, planes=(4, 8, 16), blocks=(1, 1, 1), strides=(1, 2, 2),
            dilations=(1, 1, 1),
        )
        self.neck = neck

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        c3, c4, c5 = self.backbone(x)
        return self.neck({"c3": c3, "c4": c4, "c5": c5})


NECKS = [
    pytest.param(lambda: FPNNeck([16, 32, 64], 8), id="fpn"),
    pytest.param(lambda: FPNNeck([16, 32, 64], 8, "transposed", extra_level=True),
                 id="fpn-transposed"),
    pytest.param(lambda: BiFPN([16, 32, 64], 8, num_layers=1), id="bifpn"),
]


@pytest.mark.parametrize("make_neck", NECKS)
def test_a_model_holding_a_neck_traces(make_neck):
    model = randomise_norms(Detector(make_neck()))
    graph = torch.fx.symbolic_trace(model)
    for size in [(64, 64), (45, 67)]:  # one graph for every size
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert_same(graph(x), model(x))


def pyramid(batch: int = 2, size: int = 13) -> list[torch.Tensor]:
    sides = [-(-size // 2**i) for i in range(len(CHANNELS))]
    return [torch.randn(batch, c, s, s) for c, s in zip(CHANNELS, sides, strict=True)]


@pytest.mark.parametrize("extra_level", [False, True])
@pytest.mark.parametrize("spec", ["list", "mapping"])
def test_symbolic_trace_of_a_neck(spec, extra_level):
    # The neck as the root: its input is one proxy, taken as a sequence of len(in_channels)
    # maps, or as a mapping with the keys a mapping in_channels fixes.
    keys = ["c3", "c4", "c5"]
    in_channels = CHANNELS if spec == "list" else dict(zip(keys, CHANNELS, strict=True))
    neck = randomise_norms(FPNNeck(in_channels, 8, "transposed", extra_level=extra_level))
    graph = torch.fx.symbolic_trace(neck)
    for size in [13, 20]:
        maps = pyramid(size=size)
        features = maps if spec == "list" else dict(zip(keys, maps, strict=True))
        with torch.no_grad():
            got, expected = graph(features), neck(features)
        assert type(got) is type(expected)
        if spec == "list":
            got, expected = dict(enumerate(got)), dict(enumerate(expected))
        assert_same(got, expected)


def test_symbolic_trace_of_bifpn():
    neck = randomise_norms(BiFPN(CHANNELS, 8, num_layers=1))
    graph = torch.fx.symbolic_trace(neck)
    maps = pyramid()
    with torch.no_grad():
        torch.testing.assert_close(graph(maps), neck(maps))
