"""What differs between classification, detection and segmentation, in one small object each.

The epoch loop (:mod:`~examples.harness.loop`) is the same for every kind of model; a
:class:`Task` supplies the rest, as torchvision's reference scripts share one set of utilities
across their classification, detection and segmentation scripts:

- which data sets ``--dataset`` accepts and how they are built (:meth:`Task.datasets`);
- how samples become a batch (:meth:`Task.collate`, train and test may differ: CutMix is a
  train-time collation) and how a batch reaches the device (:meth:`Task.to_device`);
- the training loss of a batch, and its number of right answers where that means something
  (:meth:`Task.train_loss`), and what the loss is averaged over (:meth:`Task.loss_weight`:
  images, or scored pixels);
- the test metrics (:meth:`Task.evaluator`): running sums on the device for classification,
  ``torchmetrics`` for mean average precision and mean IoU, all reduced over ranks;
- the history key that decides the best epoch (:attr:`Task.headline`).

Every per-step figure stays on the device; the host reads the sums once per pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, default_collate

from examples.harness.config import DATASETS, TrainConfig
from examples.harness.distributed import Dist, reduce_sums
from examples.harness.metrics import RunningTotals

__all__ = [
    "COCO_STATS",
    "ClassificationTask",
    "DetectionTask",
    "Evaluator",
    "SegmentationTask",
    "Task",
    "miss_rate_label",
    "scores_at_mask_size",
]

Batch = tuple[Any, Any]
Autocast = Callable[[], Any]


class Evaluator(Protocol):
    """Accumulates one pass over the test data; :meth:`compute` reduces it over ranks."""

    def update(self, net: nn.Module, inputs: Any, targets: Any) -> None: ...

    def compute(self, info: Dist) -> dict[str, float]: ...


class Task:
    """Image classification with cross-entropy; the base of the other tasks.

    Attributes:
        name: the kind of task, written to ``metrics.json``.
        headline: history key of the figure that picks the best epoch (higher is better).
        metrics: history keys the curves plot besides the losses.
        datasets_accepted: the ``--dataset`` choices.
        default_dataset: the data set when neither ``--dataset`` nor ``--data`` is given.
        layouts: the folder layouts ``--data`` may hold
            (:data:`~examples.harness.layouts.LAYOUTS`).
    """

    name = "classification"
    headline = "test_acc"
    metrics: tuple[str, ...] = ("train_acc", "test_acc")
    datasets_accepted: tuple[str, ...] = DATASETS
    default_dataset = "folder"
    layouts: tuple[str, ...] = ("imagefolder", "imagefolder-tree", "cifar10")

    def datasets(self, config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
        """(train, test, class names) for ``config``; raises ``DataError`` naming the path."""
        from examples.harness.data import build_datasets

        return build_datasets(config)

    def collate(self, samples: Sequence[Any], *, train: bool) -> Batch:
        """A list of samples -> (inputs, targets)."""
        return default_collate(samples)

    def to_device(self, batch: Batch, device: torch.device,
                  memory_format: torch.memory_format) -> Batch:
        images, labels = batch
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        return images, labels.to(device, non_blocking=True)

    def count(self, targets: Any) -> int:
        """Images in a batch (known on the host, no device sync)."""
        return len(targets)

    def loss_weight(self, targets: Any) -> Tensor | int:
        """What a batch's mean loss stands for in the epoch's mean: its images by default."""
        return self.count(targets)

    def train_loss(self, net: nn.Module, inputs: Any, targets: Any, autocast: Autocast
                   ) -> tuple[Tensor, Tensor | None]:
        """(mean loss, number of right answers or None) of one training batch.

        Soft targets (N, classes), as CutMix makes them, go through the same cross-entropy;
        a right answer is then the arg-max of the target.
        """
        with autocast():
            logits = net(inputs).float()
        loss = F.cross_entropy(logits, targets)
        hard = targets.argmax(1) if targets.dim() == 2 else targets
        return loss, (logits.argmax(1) == hard).sum()

    def evaluator(self, num_classes: int, device: torch.device, autocast: Autocast) -> Evaluator:
        return _ClassificationEvaluator(device, autocast)

    def describe(self, h: dict) -> str:
        """The figures of one epoch for the one-line log."""
        return (f"train loss {h['train_loss']:.4f} acc {h['train_acc']:.1%} | test loss "
                f"{h['test_loss']:.4f} acc {h['test_acc']:.1%}")


class ClassificationTask(Task):
    """Image classification, optionally with a train-time batch mix (CutMix, MixUp).

    Args:
        build: ``build(config) -> (train, test, classes)``; default: the harness's ImageFolder,
            CIFAR-10 and digits loaders (:func:`~examples.harness.data.build_datasets`).
        mix: applied to every collated train batch, ``mix(images, labels) -> (images,
            targets)`` (``torchvision.transforms.v2.CutMix`` gives soft targets (N, classes),
            which the loss takes as they are); test batches are never mixed.
        datasets_accepted: the ``--dataset`` choices ``build`` understands.
        default_dataset: the default ``--dataset``.
    """

    def __init__(
        self,
        build: Callable[[TrainConfig], tuple[Dataset, Dataset, list[str]]] | None = None,
        mix: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        datasets_accepted: tuple[str, ...] = DATASETS,
        default_dataset: str = "folder",
    ) -> None:
        self.build = build
        self.mix = mix
        self.datasets_accepted = datasets_accepted
        self.default_dataset = default_dataset

    def datasets(self, config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
        return super().datasets(config) if self.build is None else self.build(config)

    def collate(self, samples: Sequence[Any], *, train: bool) -> Batch:
        images, labels = default_collate(samples)
        if train and self.mix is not None:
            return self.mix(images, labels)
        return images, labels


class _ClassificationEvaluator:
    def __init__(self, device: torch.device, autocast: Autocast) -> None:
        self.totals = RunningTotals(device)
        self.autocast = autocast

    def update(self, net: nn.Module, inputs: Tensor, targets: Tensor) -> None:
        with self.autocast():
            logits = net(inputs).float()
        loss = F.cross_entropy(logits, targets)
        self.totals.update(loss, (logits.argmax(1) == targets).sum(), targets.numel())

    def compute(self, info: Dist) -> dict[str, float]:
        sums = self.totals.reduced(info)
        return {"test_loss": sums.loss, "test_acc": sums.accuracy, "test_images": int(sums.count)}


class DetectionTask(Task):
    """Object detection with a torchvision detector (``model(images, targets)`` -> loss dict).

    A batch is a list of images and a list of ``{"boxes", "labels"}`` dicts (evaluation
    targets may add COCO's ``"iscrowd"`` and ``"area"``). The training loss is the sum of the
    detector's losses. The test metrics are COCO's twelve figures from
    ``torchmetrics.detection.MeanAveragePrecision`` (pycocotools backend; crowd regions and
    areas passed on, so they agree with ``COCOeval`` on the same annotation file): ``map``
    (IoU 0.5:0.95), ``map50``, ``map75``, ``map_small``, ``map_medium``, ``map_large``,
    ``mar1``, ``mar10``, ``mar100``, ``mar_small``, ``mar_medium``, ``mar_large`` (-1 where a
    figure has no ground truth, as COCO gives it); and the pedestrian benchmarks' log-average
    miss rate ``mr2`` (:mod:`~examples.harness.miss_rate`, lower is better) for the class
    ``mr2_label``: the class named by ``--miss-rate-class``, else one named "person" or
    "pedestrian", else every class pooled (``mr2_label`` 0).

    Args:
        build: ``build(config) -> (train, test, classes)``, the detection data sets.
        datasets_accepted: the ``--dataset`` choices ``build`` understands.
        default_dataset: the default ``--dataset``.
    """

    name = "detection"
    headline = "map50"
    metrics = ("map", "map50")
    layouts = ("coco",)

    def __init__(self, build: Callable[[TrainConfig], tuple[Dataset, Dataset, list[str]]],
                 datasets_accepted: tuple[str, ...], default_dataset: str) -> None:
        self.build = build
        self.datasets_accepted = datasets_accepted
        self.default_dataset = default_dataset
        self.miss_rate_label = 0

    def datasets(self, config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
        """The data sets; also picks :attr:`miss_rate_label` from their class names."""
        train, test, classes = self.build(config)
        self.miss_rate_label = miss_rate_label(classes, config.options.get("miss_rate_class"))
        return train, test, classes

    def collate(self, samples: Sequence[Any], *, train: bool) -> Batch:
        images, targets = zip(*samples, strict=True)
        return list(images), list(targets)

    def to_device(self, batch: Batch, device: torch.device,
                  memory_format: torch.memory_format) -> Batch:
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
        return images, targets

    def train_loss(self, net: nn.Module, inputs: Any, targets: Any, autocast: Autocast
                   ) -> tuple[Tensor, Tensor | None]:
        with autocast():
            losses = net(inputs, targets)
        return sum(loss.float() for loss in losses.values()), None

    def evaluator(self, num_classes: int, device: torch.device, autocast: Autocast) -> Evaluator:
        return _DetectionEvaluator(device, autocast, self.miss_rate_label)

    def describe(self, h: dict) -> str:
        return (f"train loss {h['train_loss']:.4f} | mAP {h['map']:.3f} "
                f"mAP@0.5 {h['map50']:.3f} MR-2 {h['mr2']:.1%}")


_PERSON_NAMES = ("person", "pedestrian")
# history key -> torchmetrics' key, in the order of COCOeval's stats
COCO_STATS = {"map": "map", "map50": "map_50", "map75": "map_75", "map_small": "map_small",
              "map_medium": "map_medium", "map_large": "map_large", "mar1": "mar_1",
              "mar10": "mar_10", "mar100": "mar_100", "mar_small": "mar_small",
              "mar_medium": "mar_medium", "mar_large": "mar_large"}


def miss_rate_label(classes: Sequence[str], name: Any = None) -> int:
    """The label MR^-2 is measured on: ``name``'s, else the first class called "person" or
    "pedestrian" (any case), else 0, every class pooled.

    Raises:
        DataError: ``name`` is not one of ``classes[1:]``.
    """
    from examples.harness.data import DataError

    lowered = [c.lower() for c in classes]
    if name:
        if str(name).lower() not in lowered[1:]:
            raise DataError(f"--miss-rate-class {name!r} is not a class of the data; expected "
                            f"one of {list(classes[1:])}")
        return lowered.index(str(name).lower(), 1)
    return next((k for k, c in enumerate(lowered) if k > 0 and c in _PERSON_NAMES), 0)


class _DetectionEvaluator:
    def __init__(self, device: torch.device, autocast: Autocast, miss_rate_label: int = 0
                 ) -> None:
        from torchmetrics.detection import MeanAveragePrecision

        from examples.harness.miss_rate import MissRate

        # COCOeval's own float64 thresholds: torchmetrics' defaults come from a float32
        # linspace, so an IoU or recall exactly at 0.55, 0.3, ... falls on the other side.
        self.metric = MeanAveragePrecision(
            box_format="xyxy", iou_type="bbox",
            iou_thresholds=np.linspace(0.5, 0.95, 10).tolist(),
            rec_thresholds=np.linspace(0.0, 1.0, 101).tolist()).to(device)
        self.miss_rate = MissRate(miss_rate_label or None).to(device)
        self.miss_rate_label = miss_rate_label
        self.autocast = autocast
        self.images = 0  # known on the host: no device sync to count them

    def update(self, net: nn.Module, inputs: list[Tensor], targets: list[dict]) -> None:
        with self.autocast():
            detections = net(inputs)
        preds = [{k: d[k].float() if k != "labels" else d[k] for k in ("boxes", "scores", "labels")}
                 for d in detections]
        truth = [{k: t[k] for k in ("boxes", "labels", "iscrowd", "area") if k in t}
                 for t in targets]
        self.metric.update(preds, truth)
        self.miss_rate.update(preds, truth)
        self.images += len(inputs)

    def compute(self, info: Dist) -> dict[str, float]:
        # torchmetrics gathers the states of every rank itself when a process group exists.
        result = self.metric.compute()
        (images,) = reduce_sums(torch.tensor([float(self.images)]), info)
        coco = {key: float(result[name]) for key, name in COCO_STATS.items()}
        return {**coco, "mr2": float(self.miss_rate.compute()),
                "mr2_label": self.miss_rate_label, "test_images": int(images)}


class SegmentationTask(Task):
    """Semantic segmentation: per-pixel cross-entropy, ``ignore_index`` pixels left out.

    A train batch is images (N, 3, H, W) and masks (N, H, W) of class indices (fixed-size crops).
    A test batch is images (N, 3, H, W) and a list of N masks, each at its label's own size
    (the images were resized for the network, the masks were not): the network's class scores
    are resized bilinearly to each mask's (H_i, W_i) before the arg-max
    (:func:`scores_at_mask_size`), so every labelled pixel is counted once at its own
    resolution, as the Pascal VOC protocol scores. The test metrics are the mean IoU over classes
    (``miou``, from the confusion matrix summed over the whole test set; a class neither in the
    labels nor in the predictions is left out of the mean) and the pixel accuracy
    (``pixel_acc``) from ``torchmetrics`` (``MulticlassJaccardIndex``,
    ``MulticlassAccuracy(average="micro")``), and the test loss.

    Losses are means over scored pixels: the epoch's train and test loss are the summed
    cross-entropy of every pixel that is not ``ignore_index`` divided by their number. A batch
    with no scored pixel adds nothing to either sum (its loss is 0, its weight 0), so it never
    makes the record NaN.

    Args:
        build: ``build(config) -> (train, test, classes)``, the segmentation data sets.
        datasets_accepted: the ``--dataset`` choices ``build`` understands.
        default_dataset: the default ``--dataset``.
        ignore_index: mask value that is not scored (255, as in VOC).
    """

    name = "segmentation"
    headline = "miou"
    metrics = ("miou", "pixel_acc")
    layouts = ("masks", "voc")

    def __init__(self, build: Callable[[TrainConfig], tuple[Dataset, Dataset, list[str]]],
                 datasets_accepted: tuple[str, ...], default_dataset: str,
                 ignore_index: int = 255) -> None:
        self.build = build
        self.datasets_accepted = datasets_accepted
        self.default_dataset = default_dataset
        self.ignore_index = ignore_index

    def datasets(self, config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
        return self.build(config)

    def collate(self, samples: Sequence[Any], *, train: bool) -> Batch:
        """Train: stacked images and masks. Test: stacked images, the masks as a list, each at
        its own size."""
        if train:
            return default_collate(samples)
        images, masks = zip(*samples, strict=True)
        return torch.stack(images), list(masks)

    def to_device(self, batch: Batch, device: torch.device,
                  memory_format: torch.memory_format) -> Batch:
        images, masks = batch
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        if isinstance(masks, Tensor):
            return images, masks.to(device, non_blocking=True)
        return images, [mask.to(device, non_blocking=True) for mask in masks]

    def loss_weight(self, targets: Any) -> Tensor | int:
        """The scored pixels of a batch (a device tensor: no host sync)."""
        return (targets != self.ignore_index).sum()

    def train_loss(self, net: nn.Module, inputs: Any, targets: Any, autocast: Autocast
                   ) -> tuple[Tensor, Tensor | None]:
        with autocast():
            logits = net(inputs).float()
        return _pixel_mean_loss(logits, targets, self.ignore_index), None

    def evaluator(self, num_classes: int, device: torch.device, autocast: Autocast) -> Evaluator:
        return _SegmentationEvaluator(num_classes, self.ignore_index, device, autocast)

    def describe(self, h: dict) -> str:
        return (f"train loss {h['train_loss']:.4f} | test loss {h['test_loss']:.4f} "
                f"mIoU {h['miou']:.3f} pixel acc {h['pixel_acc']:.1%}")


def _pixel_mean_loss(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy summed over the scored pixels, divided by their number (0 when none)."""
    total = F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")
    return total / (targets != ignore_index).sum().clamp(min=1)


def scores_at_mask_size(logits: Tensor, masks: Sequence[Tensor]) -> list[Tensor]:
    """Each image's class scores resized (bilinearly) to its mask's size.

    Args:
        logits: the network's scores for a batch of resized images.
        masks: the batch's labels, each at its own size.

    Shape:
        logits (N, C, H, W), masks N x (H_i, W_i) -> N x (C, H_i, W_i)

    Example:
        >>> scores = scores_at_mask_size(torch.randn(2, 3, 8, 8),
        ...                              [torch.zeros(5, 7), torch.zeros(9, 4)])
        >>> [tuple(s.shape) for s in scores]
        [(3, 5, 7), (3, 9, 4)]
    """
    if len(masks) != len(logits):
        raise ValueError(f"scores_at_mask_size expected one mask per image ({len(logits)}), "
                         f"got {len(masks)}")
    resized = []
    for scores, mask in zip(logits, masks, strict=True):
        if scores.shape[-2:] != mask.shape[-2:]:
            scores = F.interpolate(scores[None], size=tuple(mask.shape[-2:]), mode="bilinear",
                                   align_corners=False)[0]
        resized.append(scores)
    return resized


class _SegmentationEvaluator:
    def __init__(self, num_classes: int, ignore_index: int, device: torch.device,
                 autocast: Autocast) -> None:
        from torchmetrics.classification import MulticlassAccuracy, MulticlassJaccardIndex

        self.iou = MulticlassJaccardIndex(num_classes, ignore_index=ignore_index).to(device)
        self.pixels = MulticlassAccuracy(num_classes, average="micro",
                                         ignore_index=ignore_index).to(device)
        self.totals = RunningTotals(device)
        self.ignore_index = ignore_index
        self.autocast = autocast

    def update(self, net: nn.Module, inputs: Tensor, targets: Tensor | Sequence[Tensor]) -> None:
        with self.autocast():
            logits = net(inputs).float()
        scores = scores_at_mask_size(logits, targets)
        predicted = torch.cat([s.argmax(0).flatten() for s in scores])
        labels = torch.cat([mask.flatten() for mask in targets])
        self.iou.update(predicted, labels)
        self.pixels.update(predicted, labels)
        # one (N=1) cross-entropy per image: the scores of different images differ in size
        total = sum(F.cross_entropy(s[None], m[None], ignore_index=self.ignore_index,
                                    reduction="sum") for s, m in zip(scores, targets, strict=True))
        scored = (labels != self.ignore_index).sum()
        self.totals.update(total / scored.clamp(min=1), labels.new_zeros(()), len(targets),
                           weight=scored)

    def compute(self, info: Dist) -> dict[str, float]:
        sums = self.totals.reduced(info)
        return {"test_loss": sums.loss, "miou": float(self.iou.compute()),
                "pixel_acc": float(self.pixels.compute()), "test_images": int(sums.count)}
