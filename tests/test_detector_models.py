"""Seed 001's detector: backbone levels, the four necks' sizes, SSD train and eval steps."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from examples.detector_neck.models import NECKS, backbone_levels, build_ssd
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.models.detection.image_list import ImageList
from torchvision.models.feature_extraction import create_feature_extractor
from torchvision.ops import clip_boxes_to_image

B0 = {"c3": 40, "c4": 112, "c5": 320}


@pytest.fixture(scope="module")
def b4_body():
    net = torchvision.models.efficientnet_b4(weights=None).eval()
    return create_feature_extractor(net, return_nodes=backbone_levels(net))


@pytest.fixture(scope="module")
def b0_body():
    net = torchvision.models.efficientnet_b0(weights=None).eval()
    return create_feature_extractor(net, return_nodes=backbone_levels(net))


def test_b4_levels_at_the_study_size(b4_body):
    # The deepest feature of each stride: b4's 112/160 and 272/448 stages share a stride.
    with torch.no_grad():
        levels = b4_body(torch.zeros(1, 3, 512, 640))
    assert {k: tuple(v.shape[1:]) for k, v in levels.items()} == {
        "c3": (56, 64, 80), "c4": (160, 32, 40), "c5": (448, 16, 20)}


@settings(max_examples=4, deadline=None)
@given(h=st.integers(33, 90), w=st.integers(33, 90), neck=st.sampled_from(sorted(NECKS)))
def test_neck_levels_on_odd_sizes(b0_body, h, w, neck):
    with torch.no_grad():
        out = NECKS[neck](B0).eval()(b0_body(torch.zeros(1, 3, h, w)))
    # Every stride-2 step of the backbone and of the new BiFPN levels gives ceil(size / 2).
    sizes = [(h, w)]
    while len(sizes) < 8:
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    levels = 5 if neck == "bifpn" else 3
    assert [tuple(v.shape[-2:]) for v in out.values()] == sizes[3: 3 + levels]


def conv(c_in: int, c_out: int, k: int, bias: bool = True) -> int:
    return c_in * c_out * k * k + (c_out if bias else 0)


def expected_parameters(neck: str, channels: list[int]) -> int:
    """Each neck's parameter count from the layer shapes its design names."""
    if neck == "width":
        return sum(conv(c, 512, 3) + 2 * 512 for c in channels)
    if neck.startswith("fpn"):
        total = sum(conv(c, 256, 1) for c in channels) + len(channels) * conv(256, 256, 3)
        if neck == "fpn_transposed":
            total += (len(channels) - 1) * (conv(256, 256, 2, bias=False) + 2 * 256)
        return total
    width, levels = 64, 5
    # EfficientDet's first layer: each node projects the backbone levels it reads (1x1 conv with
    # its redundant bias + BN); C3 is read by one node, C4 and C5 by two each.
    reads = [1] + [2] * (len(channels) - 1)
    total = sum(r * (conv(c, width, 1) + 2 * width)
                for r, c in zip(reads, channels, strict=True) if c != width)
    total += conv(channels[-1], width, 1) + 2 * width  # P6 from C5
    node = conv(1, width, 3, bias=False) + conv(width, width, 1) + 2 * width
    fusion_weights = 2 * (levels - 1) + 3 * (levels - 2) + 2
    return total + 3 * (2 * (levels - 1) * node + fusion_weights)


@pytest.mark.parametrize("neck", sorted(NECKS))
def test_neck_parameter_count_follows_its_layers(neck):
    module = NECKS[neck](B0)
    assert sum(p.numel() for p in module.parameters()) == expected_parameters(neck, [*B0.values()])


@pytest.mark.slow
@pytest.mark.parametrize("neck", sorted(NECKS))
def test_ssd_train_and_eval_steps(neck):
    torch.manual_seed(0)
    model = build_ssd(neck, num_classes=4, image_size=(96, 112), backbone="efficientnet_b0")
    images = [torch.rand(3, 96, 112), torch.rand(3, 80, 120)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = model.train()(images, targets)
    assert set(losses) == {"bbox_regression", "classification"}
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        detections = model(images)
    assert len(detections) == 2
    for det, image in zip(detections, images, strict=True):
        assert set(det) == {"boxes", "labels", "scores"}
        assert det["boxes"].shape[1] == 4
        assert (det["boxes"][:, 2] <= image.shape[-1]).all()
        assert (det["labels"] >= 1).all() and (det["labels"] < 4).all()
    levels = 5 if neck == "bifpn" else 3
    assert len(model.anchor_generator.aspect_ratios) == levels


@pytest.mark.parametrize("image_shape", [(64, 96), (80, 72)])
def test_ssd_sees_its_height_and_width_and_answers_in_image_coordinates(image_shape):
    # The model's size is (H, W) = (64, 96); torchvision's SSD wants (W, H). With the head at
    # zero every detection is a default box, so the boxes show which grid the model used.
    size = (64, 96)
    torch.manual_seed(0)
    model = build_ssd("fpn_bilinear", 2, size, "efficientnet_tiny").eval()
    for parameter in model.head.parameters():
        torch.nn.init.zeros_(parameter)
    seen = []
    model.backbone.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape[-2:]))
    image = torch.rand(3, *image_shape)
    with torch.no_grad():
        (detection,) = model([image])
        resized = torch.rand(1, 3, *size)
        levels = list(model.backbone(resized).values())
        anchors = model.anchor_generator(ImageList(resized, [size]), levels)[0]
    assert tuple(seen[0]) == size
    expected = clip_boxes_to_image(anchors, size)
    scale = torch.tensor([image_shape[1] / size[1], image_shape[0] / size[0]]).repeat(2)
    boxes = detection["boxes"]
    assert len(boxes) > 10
    distance = (boxes[:, None] - expected * scale).abs().amax(-1)
    assert distance.min(1).values.max() < 1e-3
    assert (boxes[:, 2] <= image_shape[1] + 1e-4).all()
    assert (boxes[:, 3] <= image_shape[0] + 1e-4).all()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="neck"):
        build_ssd("fpn", 3, (64, 64), "efficientnet_b0")
    with pytest.raises(ValueError, match="backbone"):
        build_ssd("width", 3, (64, 64), "resnet50")
    with pytest.raises(ValueError, match="num_classes"):
        build_ssd("width", 1, (64, 64), "efficientnet_b0")


def test_level_table_prints_the_seed_and_the_real_b4(capsys):
    from examples.detector_neck.demo import SEED_LEVELS, level_table

    level_table()
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.strip()[:1].isdigit()]
    assert len(rows) == len(SEED_LEVELS)
    assert [r[-1] for r in rows if r[-1].startswith("c")] == ["c3", "c4", "c5"]
    # Where the seed halves every level, the real stage 5 keeps stage 4's stride.
    assert rows[3][3] == rows[4][3] == "16"


def test_detection_figure_is_written(tmp_path):
    from examples.detector_neck.data import DigitsCanvas, detection_transforms
    from examples.detector_neck.demo import draw_detections

    model = build_ssd("fpn_bilinear", 11, (64, 64), "efficientnet_tiny")
    data = DigitsCanvas("val", count=2, transforms=detection_transforms((64, 64), train=False))
    images, targets = zip(*(data[i] for i in range(2)), strict=True)
    path = draw_detections(model, list(images), list(targets), tmp_path / "sub" / "boxes.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
