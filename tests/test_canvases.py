"""The digit canvases: one renderer in the harness for the detection and segmentation data."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from examples.detector_neck.data import DigitsCanvas
from examples.dilatednet.data import DigitsSegmentationCanvas
from examples.harness.canvases import canvas_rng, digit_rows, draw_canvas

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module", [
    "examples/dilatednet/data.py", "examples/detector_neck/data.py"])
def test_each_study_takes_the_canvases_from_the_harness_not_from_the_other(module):
    tree = ast.parse((REPO / module).read_text())
    sources = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    other = "examples.detector_neck" if "dilatednet" in module else "examples.dilatednet"
    assert not any(source.startswith(other) for source in sources if source)
    assert "examples.harness.canvases" in sources


@pytest.mark.parametrize("split", ["train", "val"])
def test_detection_and_segmentation_canvases_are_the_same_drawing(split):
    size, digit_size = (40, 56), (8, 20)
    boxes = DigitsCanvas(split, 4, seed=3, canvas_size=size, max_objects=4, digit_size=digit_size)
    masks = DigitsSegmentationCanvas(split, 4, seed=3, canvas_size=size, max_digits=4,
                                     digit_size=digit_size)
    for index in range(4):
        (image, target), (same_image, mask) = boxes[index], masks[index]
        placements = masks.placements(index)
        drawn = draw_canvas(canvas_rng(3, split, index), size, digit_rows(split), 4, digit_size,
                            0.02)
        assert torch.equal(image, same_image) and torch.equal(image, drawn.image)
        assert drawn.placements == placements
        assert target["boxes"].tolist() == [list(p.box) for p in placements]
        assert target["labels"].tolist() == [p.label for p in placements]
        # every stroke pixel of the mask lies in the box of its digit
        for placement, ink in zip(placements, drawn.inks, strict=True):
            x1, y1, x2, y2 = placement.box
            assert ink.shape == (y2 - y1, x2 - x1)
            assert (mask[y1:y2, x1:x2][ink > 0.5] == placement.label).all()
        assert int((mask > 0).sum()) == sum(int((ink > 0.5).sum()) for ink in drawn.inks)


def test_split_is_checked():
    with pytest.raises(ValueError, match="split"):
        digit_rows("test")
