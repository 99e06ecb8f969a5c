"""Detection data of the SSD example: digits canvas, COCO folders, transforms, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from examples.detector_neck.data import (
    CANVAS_CLASSES,
    DigitsCanvas,
    build_detection_datasets,
    collate_detection,
    detection_transforms,
    load_coco,
    write_coco,
)
from examples.harness import DataError
from torch.utils.data import DataLoader

CANVAS = (96, 112)  # (H, W), not square, so a swapped axis shows
# Ink drawn at full strength differs from the background by at least this much.
INK_CONTRAST = 0.25


def _canvas(split: str = "val", count: int = 6, **kwargs: object) -> DigitsCanvas:
    return DigitsCanvas(split, count, seed=kwargs.pop("seed", 1), canvas_size=CANVAS,
                        digit_size=(12, 40), **kwargs)


def _outside_mask(boxes: torch.Tensor) -> torch.Tensor:
    outside = torch.ones(CANVAS, dtype=torch.bool)
    for x1, y1, x2, y2 in boxes.round().long().tolist():
        outside[y1:y2, x1:x2] = False
    return outside


def _same(a: tuple, b: tuple) -> bool:
    return (torch.equal(a[0], b[0]) and torch.equal(a[1]["boxes"], b[1]["boxes"])
            and torch.equal(a[1]["labels"], b[1]["labels"]))


def test_canvas_items_are_deterministic_and_differ_between_indices_splits_and_seeds():
    train = _canvas("train", 5)
    first = [train[i] for i in range(len(train))]
    torch.manual_seed(123)
    np.random.seed(123)
    again = _canvas("train", 5)
    assert all(_same(a, again[i]) for i, a in enumerate(first))
    assert all(_same(train[i], first[i]) for i in reversed(range(len(train))))
    assert not any(_same(first[i], first[j]) for i in range(5) for j in range(i))
    val, other_seed = _canvas("val", 5), _canvas("train", 5, seed=2)
    assert not any(_same(first[i], val[i]) or _same(first[i], other_seed[i]) for i in range(5))
    assert set(train.digit_indices).isdisjoint(val.digit_indices)


def test_canvas_items_are_the_same_in_a_worker_process():
    dataset = _canvas("train", 3)
    loader = DataLoader(dataset, batch_size=None, num_workers=1)
    assert all(_same(item, dataset[i]) for i, item in enumerate(loader))


def test_canvas_targets_are_in_the_detection_format():
    dataset = _canvas("train", 20, max_objects=4)
    assert dataset.classes == CANVAS_CLASSES == ["__background__", *"0123456789"]
    counts = set()
    for image, target in dataset:
        boxes, labels = target["boxes"], target["labels"]
        assert image.shape == (3, *CANVAS) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert boxes.dtype == torch.float32 and labels.dtype == torch.int64
        assert boxes.shape == (len(labels), 4) and 1 <= len(labels) <= 4
        assert ((1 <= labels) & (labels <= 10)).all()
        counts.add(len(labels))
    assert len(counts) > 1


def test_boxes_are_where_the_digits_are():
    dataset = _canvas("train", 16)
    for image, target in dataset:
        boxes = target["boxes"]
        height, width = CANVAS
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        outside = image[:, _outside_mask(boxes)]
        spread = outside.amax(1) - outside.amin(1)
        assert (spread <= 2 * dataset.noise + 1e-6).all()
        background = outside.median(1).values[:, None, None]
        for x1, y1, x2, y2 in boxes.long().tolist():
            ink = (image[:, y1:y2, x1:x2] - background).abs().amax()
            assert ink > INK_CONTRAST


def test_boxes_are_tight_without_noise():
    dataset = _canvas("val", 8, noise=0.0)
    for image, target in dataset:
        outside = image[:, _outside_mask(target["boxes"])]
        background = outside[:, :1]
        assert torch.equal(outside, background.expand_as(outside))
        for x1, y1, x2, y2 in target["boxes"].long().tolist():
            ink = (image[:, y1:y2, x1:x2] != background[:, :, None]).any(0)
            assert ink[0].any() and ink[-1].any() and ink[:, 0].any() and ink[:, -1].any()


def test_flip_moves_boxes_with_the_image():
    raw = _canvas("train", 3)
    flip = detection_transforms(CANVAS, train=True, flip_p=1.0, photometric_p=0.0)
    flipped = _canvas("train", 3, transforms=flip)
    width = CANVAS[1]
    for (image, target), (image_f, target_f) in zip(raw, flipped):
        assert torch.equal(image_f, image.flip(-1))
        x1, y1, x2, y2 = target["boxes"].unbind(1)
        expected = torch.stack([width - x2, y1, width - x1, y2], 1)
        torch.testing.assert_close(target_f["boxes"], expected)
        assert torch.equal(target_f["labels"], target["labels"])


def test_train_transforms_resize_and_maybe_flip_boxes():
    size = (64, 80)
    scale = torch.tensor([size[1] / CANVAS[1], size[0] / CANVAS[0]] * 2)
    raw = _canvas("train", 1)
    augmented = _canvas("train", 1, transforms=detection_transforms(size, train=True))
    image, target = raw[0]
    plain = target["boxes"] * scale
    mirrored = torch.stack([size[1] - plain[:, 2], plain[:, 1], size[1] - plain[:, 0],
                            plain[:, 3]], 1)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        image_a, target_a = augmented[0]
        assert image_a.shape == (3, *size) and image_a.dtype == torch.float32
        is_plain = torch.allclose(target_a["boxes"], plain, atol=1e-4)
        assert is_plain or torch.allclose(target_a["boxes"], mirrored, atol=1e-4)
        seen.add(is_plain)
    assert seen == {True, False}


def test_write_coco_and_load_coco_round_trip(tmp_path):
    raw = _canvas("val", 5)
    ann_file = write_coco(raw, tmp_path, "val")
    assert ann_file == tmp_path / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    assert [c["id"] for c in data["categories"]] == list(range(1, 11))
    assert [c["name"] for c in data["categories"]] == CANVAS_CLASSES[1:]
    assert all((tmp_path / "val" / entry["file_name"]).is_file() for entry in data["images"])
    first_boxes = raw[0][1]["boxes"]
    x, y, w, h = data["annotations"][0]["bbox"]
    assert [x, y, x + w, y + h] == first_boxes[0].tolist()

    size = (80, 80)
    val_tf = detection_transforms(size, train=False)
    loaded = load_coco(tmp_path, "val", val_tf)
    expected = _canvas("val", 5, transforms=val_tf)
    assert loaded.classes == CANVAS_CLASSES and len(loaded) == len(expected)
    for (image, target), (image_e, target_e) in zip(loaded, expected):
        assert image.shape == (3, *size) and image.dtype == torch.float32
        assert type(target["boxes"]) is torch.Tensor
        torch.testing.assert_close(target["boxes"], target_e["boxes"])
        assert torch.equal(target["labels"], target_e["labels"])
        torch.testing.assert_close(image, image_e, atol=1.5 / 255, rtol=0)


def test_category_ids_become_contiguous_labels(tmp_path):
    write_coco(_canvas("val", 3), tmp_path, "val")
    ann_file = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    for entry in data["categories"]:
        entry["id"] *= 7
    for ann in data["annotations"]:
        ann["category_id"] *= 7
    ann_file.write_text(json.dumps(data))
    loaded = load_coco(tmp_path, "val")
    assert loaded.category_ids == [0, *(7 * k for k in range(1, 11))]
    for index, (_, target) in enumerate(loaded):
        assert torch.equal(target["labels"], _canvas("val", 3)[index][1]["labels"])


def test_image_without_annotations_has_empty_boxes(tmp_path):
    write_coco(_canvas("val", 3), tmp_path, "val")
    ann_file = tmp_path / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2]
    ann_file.write_text(json.dumps(data))
    for transforms in (None, detection_transforms((48, 48), train=True)):
        loaded = load_coco(tmp_path, "val", transforms)
        image, target = loaded[1]
        assert image.dtype == torch.float32 and image.shape[0] == 3
        assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
        assert target["labels"].dtype == torch.int64
        assert len(loaded[0][1]["boxes"]) > 0


def _edit_first_annotation(root: Path, **fields: object) -> tuple[int, str]:
    ann_file = root / "annotations" / "instances_val.json"
    data = json.loads(ann_file.read_text())
    ann = data["annotations"][0]
    ann.update(fields)
    ann_file.write_text(json.dumps(data))
    image = next(e for e in data["images"] if e["id"] == ann["image_id"])
    return ann["id"], image["file_name"]


@pytest.mark.parametrize("bbox_of", [
    pytest.param(lambda w, h: [w - 4.0, 2.0, 10.0, 5.0], id="past-right-edge"),
    pytest.param(lambda w, h: [-6.0, 2.0, 10.0, 5.0], id="negative-x"),
    pytest.param(lambda w, h: [3.0, 2.0, 0.0, 5.0], id="zero-width"),
    pytest.param(lambda w, h: [3.0, 2.0, 5.0, -1.0], id="negative-height"),
])
def test_bad_box_names_annotation_and_image(tmp_path, bbox_of):
    write_coco(_canvas("val", 2), tmp_path, "val")
    ann_id, file_name = _edit_first_annotation(tmp_path, bbox=bbox_of(CANVAS[1], CANVAS[0]))
    with pytest.raises(DataError, match=f"annotation {ann_id} of image .*{file_name}") as info:
        load_coco(tmp_path, "val")
    assert "instances_val.json" in str(info.value)


def test_missing_annotation_file_and_image_folder(tmp_path):
    with pytest.raises(DataError, match="annotations/instances_val.json not found"):
        load_coco(tmp_path, "val")
    write_coco(_canvas("val", 1), tmp_path, "val")
    (tmp_path / "annotations" / "instances_val.json").rename(
        tmp_path / "annotations" / "instances_train.json")
    with pytest.raises(DataError, match=re.escape(f"image folder {tmp_path / 'train'} not found")):
        load_coco(tmp_path, "train")


def test_invalid_json_and_missing_image_file(tmp_path):
    write_coco(_canvas("val", 2), tmp_path, "val")
    (tmp_path / "val" / "000001.png").unlink()
    with pytest.raises(DataError, match="000001.png"):
        load_coco(tmp_path, "val")
    ann_file = tmp_path / "annotations" / "instances_val.json"
    ann_file.write_text("{not json")
    with pytest.raises(DataError, match="instances_val.json is not a valid COCO"):
        load_coco(tmp_path, "val")


def test_unreadable_image_names_the_file(tmp_path):
    write_coco(_canvas("val", 2), tmp_path, "val")
    bad = tmp_path / "val" / "000001.png"
    bad.write_bytes(b"\x89PNG not really an image")
    loaded = load_coco(tmp_path, "val")
    assert loaded[0][0].shape[0] == 3
    with pytest.raises(DataError, match=re.escape(f"cannot read image {bad}")):
        loaded[1]


def test_collate_keeps_lists_of_the_batch_length():
    dataset = _canvas("val", 5, transforms=detection_transforms((32, 32), train=False))
    loader = DataLoader(dataset, batch_size=3, collate_fn=collate_detection)
    batches = list(loader)
    assert [len(images) for images, _ in batches] == [3, 2]
    assert [len(targets) for _, targets in batches] == [3, 2]
    images, targets = batches[0]
    assert all(image.shape == (3, 32, 32) for image in images)
    assert all(set(target) == {"boxes", "labels"} for target in targets)


def test_build_detection_datasets(tmp_path):
    size = (40, 48)
    train, val, classes = build_detection_datasets("digits-canvas", None, size, limit=3, seed=5,
                                                   train_count=8, val_count=4)
    assert (len(train), len(val), classes) == (3, 3, CANVAS_CLASSES)
    assert train[0][0].shape == val[0][0].shape == (3, *size)
    _, val_other_seed, _ = build_detection_datasets("digits-canvas", None, size, None, seed=6,
                                                    val_count=4)
    assert all(_same(val.dataset[i], val_other_seed[i]) for i in range(4))

    for split in ("train", "val"):
        write_coco(_canvas(split, 2), tmp_path, split)
    train, val, classes = build_detection_datasets("coco", tmp_path, size, limit=None, seed=0)
    assert (len(train), len(val), classes) == (2, 2, CANVAS_CLASSES)
    # train is resized for batching; val keeps the file's size (the detector resizes it and
    # answers in its coordinates) and carries COCO's crowd marks and areas
    assert train[1][0].shape == (3, *size) and set(train[1][1]) == {"boxes", "labels"}
    assert val[1][0].shape == (3, *CANVAS)
    assert set(val[1][1]) == {"boxes", "labels", "iscrowd", "area"}


def test_build_detection_datasets_errors(tmp_path):
    with pytest.raises(DataError, match="needs --data"):
        build_detection_datasets("coco", None, (32, 32), None, 0)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=re.escape(f"COCO root {missing} does not exist")):
        build_detection_datasets("coco", missing, (32, 32), None, 0)
    with pytest.raises(DataError, match="unknown detection data set 'voc'"):
        build_detection_datasets("voc", tmp_path, (32, 32), None, 0)
