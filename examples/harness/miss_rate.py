"""Log-average miss rate (MR^-2), the score of the pedestrian benchmarks (lower is better).

Caltech Pedestrians (Dollár et al., PAMI 2012) and CityPersons (Zhang et al., CVPR 2017) rank
detectors by the miss rate averaged in log space at nine false-positives-per-image
(FPPI) points evenly spaced in log space over [1e-2, 1e0]. The definitions here follow the
Caltech toolbox's ``bbGt`` (``evalRes``: matching; ``compRoc``: the curve and its reference
points) and ``dbEval`` (the log average) as their MATLAB source reads; that code is not run
here, so ``tests/test_miss_rate.py`` pins the definition with cases worked by hand:

- matching, per image and class (:func:`match_detections`): detections, highest score first,
  take the unmatched ground-truth box they overlap most with IoU >= 0.5; boxes marked ignore
  (COCO's crowd regions here) come after the others, may be matched any number of times, and
  count intersection over the *detection's* area; a detection on an ignored box is dropped,
  neither a hit nor a false positive;
- the curve (:func:`log_average_miss_rate`): the kept detections of every image, sorted by
  score; at each of ``10 ** linspace(-2, 0, 9)`` FPPI the recall of the longest prefix whose
  FPPI is still at most that value (0 when even the first false positive is past it);
- ``MR^-2 = exp(mean(log(max(1e-10, 1 - recall))))``.

The benchmarks' own subsets (Caltech's "reasonable": people taller than 50 px, at most 35 %
occluded) are properties of their annotations and are not applied: every box of the class
counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["FPPI_POINTS", "MissRate", "log_average_miss_rate", "match_detections"]

FPPI_POINTS = tuple(10.0 ** (-2 + k / 4) for k in range(9))
"""The nine reference FPPI values, ``10 ** linspace(-2, 0, 9)``."""

_FLOOR = 1e-10  # dbEval's max(1e-10, miss) keeps log() finite when nothing is missed


def _overlaps(boxes: Tensor, gt_boxes: Tensor, ignore: Tensor) -> Tensor:
    """IoU of each detection (rows) with each ground-truth box; intersection over the
    detection's area for ignored boxes (Caltech's ``compOas``)."""
    top_left = torch.maximum(boxes[:, None, :2], gt_boxes[None, :, :2])
    bottom_right = torch.minimum(boxes[:, None, 2:], gt_boxes[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = (boxes[:, 2:] - boxes[:, :2]).prod(-1)[:, None]
    gt_area = (gt_boxes[:, 2:] - gt_boxes[:, :2]).prod(-1)[None]
    union = torch.where(ignore[None], area, area + gt_area - inter)
    return torch.where(inter > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def match_detections(boxes: Tensor, scores: Tensor, gt_boxes: Tensor, gt_ignore: Tensor,
                     threshold: float = 0.5) -> Tensor:
    """Match one image's detections of one class to its ground truth.

    Args:
        boxes: detections (D, 4), XYXY.
        scores: their scores (D,).
        gt_boxes: ground truth (G, 4), XYXY.
        gt_ignore: (G,) bool, boxes that may be hit but never missed (crowd regions).
        threshold: least overlap of a match.

    Returns:
        (D,) int64 in the detections' order: 1 a true positive, 0 a false positive, -1 a
        detection on an ignored box (left out of the curve).
    """
    result = torch.zeros(len(boxes), dtype=torch.int64)
    if len(boxes) == 0 or len(gt_boxes) == 0:
        return result
    ignore = gt_ignore.bool()
    overlap = _overlaps(boxes.double(), gt_boxes.double(), ignore).tolist()
    flags = ignore.tolist()
    gt_order = torch.argsort(ignore.int(), stable=True).tolist()  # ignored boxes last
    matched = [False] * len(gt_boxes)
    for d in torch.argsort(scores, descending=True, stable=True).tolist():
        best, best_g, kind = threshold, -1, 0
        for g in gt_order:
            if matched[g] and not flags[g]:
                continue
            if kind != 0 and flags[g]:
                break
            if overlap[d][g] < best:
                continue
            best, best_g, kind = overlap[d][g], g, -1 if flags[g] else 1
        if kind == 1:
            matched[best_g] = True
        result[d] = kind
    return result


def log_average_miss_rate(scores: Tensor, hits: Tensor, num_ground_truth: int,
                          num_images: int) -> float:
    """MR^-2 of kept detections pooled over ``num_images`` images.

    Args:
        scores: (D,) scores of the detections that count (ignored ones left out).
        hits: (D,) 1 for a true positive, 0 for a false positive.
        num_ground_truth: ground-truth boxes that count (not ignored).
        num_images: images scored (the denominator of FPPI).

    Returns:
        The log-average miss rate in [0, 1]; -1 when there is no ground truth to miss (the
        value COCO's evaluation gives an undefined figure).
    """
    if num_ground_truth <= 0 or num_images <= 0:
        return -1.0
    order = torch.argsort(scores.double(), descending=True, stable=True)
    true_pos = hits[order].double().cumsum(0)
    false_pos = (1 - hits[order].double()).cumsum(0)
    fppi = false_pos / num_images
    recall = torch.cat([torch.zeros(1, dtype=torch.float64), true_pos / num_ground_truth])
    reference = torch.tensor(FPPI_POINTS, dtype=torch.float64)
    # how many points have FPPI <= each reference; 0 picks the curve's start (recall 0)
    reached = torch.searchsorted(fppi.contiguous(), reference, right=True)
    miss = 1 - recall[reached]
    return math.exp(float(miss.clamp(min=_FLOOR).log().mean()))


def _joined(state: list[Tensor] | Tensor) -> Tensor:
    """A state on the host: a list of this rank's tensors, or one tensor once ranks synced."""
    if isinstance(state, Tensor):
        return state.cpu()
    return dim_zero_cat(state).cpu() if state else torch.zeros(0)


class MissRate(Metric):
    """MR^-2 over a pass, as a ``torchmetrics`` metric (its states gather over ranks).

    :meth:`update` only stores the batch's tensors on their device (no host sync, as the
    harness's other figures); :meth:`compute` matches and scores them.

    Args:
        label: the class scored; ``None`` pools every class (each detection is matched only
            to boxes of its own class; misses and false positives of all classes add up).
        threshold: least IoU of a match.

    ``update(preds, targets)`` takes torchvision's detection format: per image ``{"boxes",
    "scores", "labels"}`` and ``{"boxes", "labels"}`` with optional ``"iscrowd"`` (crowd
    regions are ignored boxes).
    """

    full_state_update = False
    _STATES = ("det_boxes", "det_scores", "det_labels", "det_counts", "gt_boxes", "gt_labels",
               "gt_crowd", "gt_counts")

    def __init__(self, label: int | None = None, threshold: float = 0.5) -> None:
        super().__init__()
        self.label = label
        self.threshold = threshold
        for name in self._STATES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]
               ) -> None:
        for pred, target in zip(preds, targets, strict=True):
            crowd = target.get("iscrowd", torch.zeros_like(target["labels"]))
            self.det_boxes.append(pred["boxes"].detach().float().reshape(-1, 4))
            self.det_scores.append(pred["scores"].detach().double())
            self.det_labels.append(pred["labels"].detach())
            self.det_counts.append(torch.tensor([len(pred["boxes"])], device=self.device))
            self.gt_boxes.append(target["boxes"].detach().float().reshape(-1, 4))
            self.gt_labels.append(target["labels"].detach())
            self.gt_crowd.append(crowd.detach().bool())
            self.gt_counts.append(torch.tensor([len(target["boxes"])], device=self.device))

    def compute(self) -> Tensor:
        states = {name: _joined(getattr(self, name)) for name in self._STATES}
        if not len(states["det_counts"]):
            return torch.tensor(-1.0, dtype=torch.float64)
        dets = [part.split(states["det_counts"].tolist())
                for part in (states["det_boxes"].reshape(-1, 4), states["det_scores"],
                             states["det_labels"])]
        truth = [part.split(states["gt_counts"].tolist())
                 for part in (states["gt_boxes"].reshape(-1, 4), states["gt_labels"],
                              states["gt_crowd"].bool())]
        scores, hits, ground_truth = [torch.zeros(0, dtype=torch.float64)], [], 0
        for boxes, score, label, gt_boxes, gt_label, crowd in zip(*dets, *truth, strict=True):
            labels = ([self.label] if self.label is not None
                      else torch.cat([label, gt_label]).unique().tolist())
            for k in labels:
                mine, theirs = label == k, gt_label == k
                found = match_detections(boxes[mine], score[mine], gt_boxes[theirs],
                                         crowd[theirs], self.threshold)
                scores.append(score[mine][found >= 0])
                hits.append(found[found >= 0])
                ground_truth += int((~crowd[theirs]).sum())
        hit = torch.cat(hits) if hits else torch.zeros(0, dtype=torch.int64)
        value = log_average_miss_rate(torch.cat(scores), hit, ground_truth,
                                      len(states["det_counts"]))
        return torch.tensor(value, dtype=torch.float64)
