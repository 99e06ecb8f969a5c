"""Log-average miss rate (MR^-2): the curve, the matching and the detector's report, by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from examples.harness.data import DataError
from examples.harness.distributed import Dist
from examples.harness.miss_rate import (
    FPPI_POINTS,
    MissRate,
    log_average_miss_rate,
    match_detections,
)
from examples.harness.tasks import DetectionTask, miss_rate_label
from torch import nn


def _mr(scores: list[float], hits: list[int], gt: int, images: int) -> float:
    return log_average_miss_rate(torch.tensor(scores), torch.tensor(hits), gt, images)


def test_the_nine_fppi_points_are_evenly_spaced_in_log_space_over_1e_2_to_1():
    assert FPPI_POINTS[0] == pytest.approx(0.01) and FPPI_POINTS[-1] == pytest.approx(1.0)
    steps = [math.log10(b) - math.log10(a) for a, b in zip(FPPI_POINTS, FPPI_POINTS[1:])]
    assert len(FPPI_POINTS) == 9 and steps == pytest.approx([0.25] * 8)


def test_a_curve_worked_by_hand():
    # 2 images, 4 people. Sorted: hit, miss, hit, miss, hit -> FPPI 0, .5, .5, 1, 1 and
    # recall .25, .25, .5, .5, .75. The seven points up to 0.316 see FPPI 0 (recall .25),
    # 0.562 sees FPPI .5 (recall .5), 1.0 sees FPPI 1 (recall .75).
    expected = (0.75 ** 7 * 0.5 * 0.25) ** (1 / 9)
    assert _mr([0.9, 0.8, 0.7, 0.6, 0.5], [1, 0, 1, 0, 1], 4, 2) == pytest.approx(expected)
    # the order is the scores', not the order given
    assert _mr([0.5, 0.7, 0.9, 0.6, 0.8], [1, 1, 1, 0, 0], 4, 2) == pytest.approx(expected)


def test_before_the_first_point_the_recall_is_zero_and_a_zero_miss_rate_is_floored():
    # 1 image: a false positive first (FPPI 1 at once), then the only person. Below FPPI 1
    # nothing is reached (miss 1); at 1 the recall is 1 (miss 0, floored at 1e-10).
    assert _mr([0.9, 0.8], [0, 1], 1, 1) == pytest.approx(1e-10 ** (1 / 9))
    assert _mr([0.9, 0.8], [1, 1], 2, 5) == pytest.approx(1e-10)  # nothing missed anywhere


def test_no_detections_miss_everything_and_no_ground_truth_is_undefined():
    assert _mr([], [], 3, 2) == 1.0
    assert _mr([0.5], [0], 0, 2) == -1.0


def test_more_images_lower_the_fppi_of_the_same_false_positives():
    # 100 images: 1 false positive is FPPI 0.01, so the first point already sees the hit
    # after it: hit, miss, hit with 2 people -> recall 1 from FPPI 0.01 on.
    assert _mr([0.9, 0.8, 0.7], [0, 1, 1], 2, 100) == pytest.approx(1e-10)
    # 10 images: FPPI 0.1 is reached at the fifth point; before it recall 0.
    assert _mr([0.9, 0.8, 0.7], [0, 1, 1], 2, 10) == pytest.approx(1e-10 ** (5 / 9))


def _box(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y + h]


def test_matching_by_hand():
    gt = torch.tensor([_box(0, 0, 10, 10), _box(50, 50, 10, 10), _box(100, 0, 40, 40)])
    ignore = torch.tensor([False, False, True])  # the last is a crowd region
    boxes = torch.tensor([
        _box(0, 0, 10, 10),     # person 1 exactly: hit
        _box(1, 0, 10, 10),     # person 1 again, already taken: false positive
        _box(50, 50, 10, 20),   # person 2 at IoU exactly 0.5: hit
        _box(105, 5, 10, 10),   # inside the crowd (IoU 0.0625, but all of it covered): ignored
        _box(110, 10, 10, 10),  # the crowd again: ignored boxes match any number of times
        _box(135, 0, 10, 10),   # half on the crowd (intersection / own area = 0.5): ignored
        _box(137, 0, 10, 10),   # less than half on it: false positive
        _box(200, 200, 5, 5),   # nothing there: false positive
    ])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2])
    assert match_detections(boxes, scores, gt, ignore).tolist() == [1, 0, 1, -1, -1, -1, 0, 0]
    # The higher score takes person 1; the same boxes in the other order swap the roles.
    assert match_detections(boxes[:2], scores[:2].flip(0), gt, ignore).tolist() == [0, 1]


def test_a_person_in_a_crowd_is_matched_before_the_crowd():
    gt = torch.tensor([_box(0, 0, 100, 100), _box(10, 10, 20, 20)])
    crowd_first = torch.tensor([True, False])
    found = match_detections(torch.tensor([_box(11, 10, 20, 20)]), torch.tensor([0.9]), gt,
                             crowd_first)
    assert found.tolist() == [1]


def test_the_metric_scores_one_class_or_pools_them():
    person = {"boxes": torch.tensor([_box(0, 0, 10, 10), _box(40, 0, 10, 10)]),
              "labels": torch.tensor([1, 2]), "iscrowd": torch.tensor([0, 0])}
    # label 1: a hit; label 2: its box found only with the wrong label (a false positive of
    # label 1 in the pooled count, nothing for label 2)
    pred = {"boxes": torch.tensor([_box(0, 0, 10, 10), _box(40, 0, 10, 10)]),
            "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 1])}
    only = MissRate(label=1)
    only.update([pred], [person])
    # one image, one person: hit, then a false positive at FPPI 1 -> recall 1 everywhere
    assert float(only.compute()) == pytest.approx(1e-10)
    pooled = MissRate(label=None)
    pooled.update([pred], [person])
    # two objects, one found before any false positive: miss 0.5 at every point
    assert float(pooled.compute()) == pytest.approx(0.5)
    empty = MissRate(label=2)
    empty.update([pred], [person])
    assert float(empty.compute()) == 1.0


def test_the_class_is_the_person_by_default_or_the_one_named():
    assert miss_rate_label(["__background__", "car", "Person"]) == 2
    assert miss_rate_label(["__background__", "pedestrian"]) == 1
    assert miss_rate_label(["__background__", "0", "1"]) == 0  # none: every class pooled
    assert miss_rate_label(["__background__", "car", "person"], "CAR") == 1
    with pytest.raises(DataError, match=r"--miss-rate-class 'bus'.*\['car', 'person'\]"):
        miss_rate_label(["__background__", "car", "person"], "bus")


class _Fixed(nn.Module):
    def __init__(self, answer: dict) -> None:
        super().__init__()
        self.answer = answer

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        return [self.answer for _ in images]


def test_the_detection_evaluator_reports_the_persons_miss_rate():
    from examples.harness.config import TrainConfig

    classes = ["__background__", "car", "person"]
    task = DetectionTask(lambda config: ([], [], classes), ("x",), "x")
    task.datasets(TrainConfig(model="m", out=Path("unused"), dataset="x"))
    assert task.miss_rate_label == 2
    task.datasets(TrainConfig(model="m", out=Path("unused"), dataset="x",
                              options={"miss_rate_class": "car"}))
    assert task.miss_rate_label == 1
    task.datasets(TrainConfig(model="m", out=Path("unused"), dataset="x"))
    target = {"boxes": torch.tensor([_box(0, 0, 10, 10), _box(40, 0, 10, 10)]),
              "labels": torch.tensor([1, 2])}
    # the car is found, the person missed; a stray person box is a false positive
    answer = {"boxes": torch.tensor([_box(0, 0, 10, 10), _box(80, 80, 10, 10)]),
              "scores": torch.tensor([0.9, 0.8]), "labels": torch.tensor([1, 2])}
    scores = task.evaluator(3, torch.device("cpu"), lambda: torch.autocast("cpu", enabled=False))
    scores.update(_Fixed(answer), [torch.zeros(3, 100, 100)] * 2, [target, target])
    result = scores.compute(Dist(0, 1, 0, torch.device("cpu")))
    assert result["mr2"] == 1.0 and result["mr2_label"] == 2
    assert result["map50"] == pytest.approx(0.5)  # the car's AP 1, the person's 0


def test_update_reads_nothing_from_the_device(monkeypatch):
    # A host read is a GPU sync; the matching waits for compute().
    reads = []
    for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, _name=name):
            reads.append(_name)
            return _real(self, *args)

        monkeypatch.setattr(torch.Tensor, name, spy)
    metric = MissRate(label=None)
    target = {"boxes": torch.tensor([_box(0, 0, 10, 10)]), "labels": torch.tensor([1]),
              "iscrowd": torch.tensor([0])}
    pred = {"boxes": torch.tensor([_box(0, 0, 10, 10)]), "scores": torch.tensor([0.9]),
            "labels": torch.tensor([1])}
    metric.update([pred, pred], [target, target])
    assert reads == []
    monkeypatch.undo()
    assert float(metric.compute()) == pytest.approx(1e-10)


def test_states_gathered_from_two_ranks_give_the_one_process_figure():
    # torchmetrics' sync concatenates each state in rank order, leaving a tensor per state.
    from torchmetrics.utilities import dim_zero_cat

    gen = torch.Generator().manual_seed(0)

    def image() -> tuple[dict, dict]:
        xy = torch.randint(0, 80, (6, 2), generator=gen).float()
        boxes = torch.cat([xy, xy + 20], 1)
        target = {"boxes": boxes[:4], "labels": torch.tensor([1, 2, 1, 1]),
                  "iscrowd": torch.tensor([0, 0, 0, 1])}
        pred = {"boxes": boxes + torch.randint(-4, 5, (6, 4), generator=gen),
                "scores": torch.rand(6, generator=gen), "labels": torch.tensor([1, 2] * 3)}
        return pred, target

    samples = [image() for _ in range(7)]
    whole, ranks = MissRate(label=1), [MissRate(label=1), MissRate(label=1)]
    for k, (pred, target) in enumerate(samples):
        whole.update([pred], [target])
        ranks[k % 2].update([pred], [target])
    for name in MissRate._STATES:
        setattr(ranks[0], name, torch.cat([dim_zero_cat(getattr(r, name)) for r in ranks]))
    assert 0.0 < float(whole.compute()) < 1.0
    assert float(ranks[0].compute()) == pytest.approx(float(whole.compute()))
