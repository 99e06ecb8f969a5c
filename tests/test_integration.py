"""dilconv necks inside torchvision detectors and on timm backbones (issue 4)."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import FasterRCNN
from torchvision.models.feature_extraction import create_feature_extractor

from dilconv import BiFPN, FPNNeck


def detector(neck_factory) -> FasterRCNN:
    body = create_feature_extractor(
        resnet18(weights=None), {f"layer{i}": str(i - 1) for i in range(1, 5)}
    )
    neck = neck_factory({"0": 64, "1": 128, "2": 256, "3": 512})
    backbone = nn.Sequential(body, neck)
    backbone.out_channels = neck.out_channels
    return FasterRCNN(backbone, num_classes=3, min_size=64, max_size=96)


BATCH = [torch.rand(3, 64, 80), torch.rand(3, 71, 57)]
TARGETS = [
    {"boxes": torch.tensor([[4.0, 6.0, 40.0, 50.0]]), "labels": torch.tensor([1])},
    {"boxes": torch.tensor([[5.0, 5.0, 30.0, 60.0], [20.0, 10.0, 50.0, 65.0]]),
     "labels": torch.tensor([2, 1])},
]


@pytest.mark.parametrize("neck_factory", [
    lambda spec: BiFPN(spec, 32, num_layers=2, extra_level=True),
    lambda spec: FPNNeck(spec, 32, upsample="transposed", extra_level=True),
], ids=["bifpn", "fpn-transposed"])
def test_faster_rcnn_with_dilconv_neck_trains_and_detects(neck_factory):
    model = detector(neck_factory)
    model.train()
    losses = model(BATCH, TARGETS)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                           "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert all(math.isfinite(v.item()) for v in losses.values())
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    opt.zero_grad()
    total.backward()
    neck = model.backbone[1]
    assert all(p.grad is not None for p in neck.parameters() if p.requires_grad)
    opt.step()
    model.eval()
    with torch.no_grad():
        detections = model(BATCH)
    assert len(detections) == 2
    for det in detections:
        assert det["boxes"].shape[-1] == 4 and det["boxes"].shape[0] == det["scores"].shape[0]


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("neck_cls", [FPNNeck, BiFPN])
def test_neck_on_timm_features_only_backbone(name, neck_cls):
    body = timm.create_model(name, features_only=True, pretrained=False, out_indices=(1, 2, 3, 4))
    neck = neck_cls(body.feature_info.channels(), 32)
    x = torch.randn(2, 3, 70, 90)
    features = body(x)
    pyramid = neck(features)
    assert [p.shape for p in pyramid] == [(2, 32, *f.shape[-2:]) for f in features]
    assert [round(x.shape[-1] / p.shape[-1]) for p in pyramid[:2]] == \
        body.feature_info.reduction()[:2]


def test_neck_refuses_a_pyramid_it_was_not_built_for():
    body = timm.create_model("resnet18", features_only=True, pretrained=False).eval()
    neck = FPNNeck(body.feature_info.channels()[1:], 16)
    with torch.no_grad():
        features = body(torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="expected 4 feature maps .* got 5"):
        neck(features)
    with pytest.raises(ValueError, match="level 0 expected 64 input channels, got 128"):
        neck(features[2:] + features[:1])
