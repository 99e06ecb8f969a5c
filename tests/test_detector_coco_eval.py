"""COCO folders scored as COCO scores them: crowd regions and areas, against pycocotools."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from examples.detector_neck.data import build_detection_datasets, load_coco
from examples.detector_neck.train import TASK
from examples.harness.distributed import Dist
from examples.harness.tasks import COCO_STATS
from torch import nn
from torchvision.io import write_png

SIZES = [(200, 240), (160, 300), (240, 180)]  # (H, W) of the images, none square
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]


def _annotations(rng: np.random.Generator) -> list[dict]:
    """Small, medium and large objects of both categories, crowd regions, file areas that
    differ from the box areas (as a polygon's do), some across the 32^2 / 96^2 bounds."""
    anns = []
    for image_id, (height, width) in enumerate(SIZES, start=1):
        for w, h, crowd in [(12, 16, 0), (24, 30, 0), (40, 30, 0), (56, 48, 0), (100, 110, 0),
                            (30, 40, 0), (90, 70, 1), (60, 50, 1)]:
            x = float(rng.integers(0, width - w)) + 0.25
            y = float(rng.integers(0, height - h)) + 0.5
            area = w * h * float(rng.choice([0.6, 0.75, 1.0]))
            anns.append({"id": len(anns) + 1, "image_id": image_id, "bbox": [x, y, w, h],
                         "category_id": int(rng.choice([1, 3])), "area": area,
                         "iscrowd": crowd})
    return anns


def _detections(rng: np.random.Generator, anns: list[dict]) -> list[dict]:
    """Hits at many IoUs, duplicates, wrong classes, boxes on crowd regions, strays."""
    dets = []
    for ann in anns:
        x, y, w, h = ann["bbox"]
        for _ in range(int(rng.integers(1, 4))):
            dx, dy = (float(v) * 0.25 for v in rng.integers(-24, 25, 2))
            dw, dh = (float(v) * 0.25 for v in rng.integers(-16, 17, 2))
            category = ann["category_id"] if rng.random() < 0.85 else 4 - ann["category_id"]
            dets.append({"image_id": ann["image_id"], "category_id": category,
                         "bbox": [max(0.0, x + dx), max(0.0, y + dy), w + dw, h + dh]})
    for image_id, (height, width) in enumerate(SIZES, start=1):
        for _ in range(6):
            w, h = (float(v) for v in rng.integers(8, 80, 2))
            dets.append({"image_id": image_id, "category_id": int(rng.choice([1, 3])),
                         "bbox": [float(rng.integers(0, width - 80)),
                                  float(rng.integers(0, height - 80)), w, h]})
    scores = rng.permutation(len(dets)) + 1  # distinct, exact in float32
    for det, score in zip(dets, scores, strict=True):
        det["score"] = float(score) / 256
    return dets


def _write_folder(root: Path, anns: list[dict]) -> None:
    images = []
    for image_id, (height, width) in enumerate(SIZES, start=1):
        name = f"{image_id:06d}.png"
        for split in ("train", "val"):
            (root / split).mkdir(parents=True, exist_ok=True)
            write_png(torch.randint(0, 256, (3, height, width), dtype=torch.uint8),
                      str(root / split / name))
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    text = json.dumps({"images": images, "annotations": anns, "categories": CATEGORIES})
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}.json").write_text(text)


class _Replay(nn.Module):
    """A 'detector' that answers the prepared detections of each image, in order."""

    def __init__(self, answers: list[dict]) -> None:
        super().__init__()
        self.answers = list(answers)

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return [self.answers.pop(0) for _ in images]


def _cocoeval_stats(ann_file: Path, dets: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        truth = COCO(str(ann_file))
        scored = COCOeval(truth, truth.loadRes(dets), "bbox")
        scored.evaluate()
        scored.accumulate()
        scored.summarize()
    return scored.stats


def score_both(root, anns, dets):
    """Write a COCO folder of ``anns`` under ``root``, score ``dets`` with our evaluator (two
    batches) and with pycocotools' ``COCOeval``: ``(ours, COCOeval's stats, train, val)``."""
    _write_folder(root, anns)
    train, val, classes = build_detection_datasets("coco", root, (64, 64), None, seed=0)
    assert classes == ["__background__", "person", "car"]
    label_of = {1: 1, 3: 2}
    answers = []
    for image_id in range(1, len(SIZES) + 1):
        mine = [d for d in dets if d["image_id"] == image_id]
        boxes = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (d["bbox"] for d in mine)])
        answers.append({"boxes": boxes, "scores": torch.tensor([d["score"] for d in mine]),
                        "labels": torch.tensor([label_of[d["category_id"]] for d in mine])})
    scores = TASK.evaluator(len(classes), torch.device("cpu"),
                            lambda: torch.autocast("cpu", enabled=False))
    net = _Replay(answers)
    for start in (0, 2):
        batch = TASK.collate([val[i] for i in range(start, min(start + 2, len(val)))],
                             train=False)
        scores.update(net, *batch)
    ours = scores.compute(Dist(0, 1, 0, torch.device("cpu")))
    reference = _cocoeval_stats(root / "annotations" / "instances_val.json", dets)
    return ours, reference, train, val


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_evaluator_gives_cocoevals_twelve_statistics(tmp_path, seed):
    rng = np.random.default_rng(seed)
    anns = _annotations(rng)
    dets = _detections(rng, anns)
    ours, reference, train, val = score_both(tmp_path, anns, dets)
    # torchmetrics answers in float32
    assert [ours[key] for key in COCO_STATS] == pytest.approx(list(reference), abs=1e-6)
    # the crowd regions are what makes this differ from scoring them as objects
    assert any(d["iscrowd"] for d in anns)
    assert all((val[i][1]["iscrowd"] == 1).any() for i in range(len(val)))
    assert all("iscrowd" not in train[i][1] for i in range(len(train)))


def test_training_targets_leave_crowds_out_and_evaluation_targets_mark_them(tmp_path):
    anns = _annotations(np.random.default_rng(5))
    del anns[0]["area"]  # the file gives no area: the evaluator falls back on the box's
    _write_folder(tmp_path, anns)
    train = load_coco(tmp_path, "train", crowds=False)
    val = load_coco(tmp_path, "val", crowds=True)
    for index, image_id in enumerate(range(1, len(SIZES) + 1)):
        mine = [a for a in anns if a["image_id"] == image_id]
        plain = [a for a in mine if not a["iscrowd"]]
        _, target = train[index]
        assert set(target) == {"boxes", "labels"}
        assert target["boxes"].tolist() == [[x, y, x + w, y + h] for x, y, w, h in
                                            (a["bbox"] for a in plain)]
        _, marked = val[index]
        assert marked["iscrowd"].tolist() == [a["iscrowd"] for a in mine]
        assert marked["area"].tolist() == pytest.approx([a.get("area", 0.0) for a in mine])
        assert len(marked["boxes"]) == len(mine)


def test_a_resize_scales_the_areas_with_the_image(tmp_path):
    from examples.detector_neck.data import detection_transforms

    anns = _annotations(np.random.default_rng(6))
    _write_folder(tmp_path, anns)
    height, width = SIZES[0]
    resized = load_coco(tmp_path, "val", detection_transforms((height // 2, width * 2),
                                                              train=False))
    _, target = resized[0]
    mine = [a for a in anns if a["image_id"] == 1]
    assert target["area"].tolist() == pytest.approx([a["area"] for a in mine])
