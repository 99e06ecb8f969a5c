"""Detection data of the SSD example: a synthetic digits canvas and COCO-format folders.

Both data sets give ``(image, target)`` in the format torchvision's detection models take: a
float RGB tensor in [0, 1] of shape (3, H, W) and ``{"boxes": float32 (K, 4) in pixels, XYXY,
"labels": int64 (K,)}``, plain tensors (COCO evaluation targets add ``"iscrowd"`` and
``"area"``, see :class:`CocoDetectionData`). Label 0 is SSD's background; ``classes[0]`` is
``"__background__"``. The same :func:`detection_transforms` move the boxes with the image on
both paths. A data set that cannot be used raises the harness's :class:`DataError`, whose
message names the file.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import datasets, tv_tensors
from torchvision.io import write_png
from torchvision.transforms import v2

from examples.harness.canvases import SPLITS, canvas_rng, digit_rows, draw_canvas
from examples.harness.checkpoint import atomic_write
from examples.harness.data import SPLIT_SEED, DataError, limited

__all__ = [
    "CANVAS_CLASSES",
    "CocoDetectionData",
    "DigitsCanvas",
    "Target",
    "build_detection_datasets",
    "collate_detection",
    "detection_transforms",
    "load_coco",
    "write_coco",
]

Target = dict[str, Tensor]
Transforms = Callable[[tv_tensors.Image, dict], tuple[tv_tensors.Image, dict]]

CANVAS_CLASSES = ["__background__", *(str(digit) for digit in range(10))]
# COCO's own boxes overshoot the image edge by rounding now and then; they are clamped.
_EDGE_TOLERANCE = 1.0


def _finish(image: Tensor, boxes: Tensor, labels: Tensor, transforms: Transforms | None,
            marks: Target | None = None) -> tuple[Tensor, Target]:
    """Run ``transforms`` on the image with its boxes; return plain float tensors.

    ``marks`` are more per-box tensors (``iscrowd``, ``area``) that travel with the boxes; an
    ``area`` is scaled by the change in the image's pixel count (a resize scales every area so).
    """
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY",
                                                canvas_size=tuple(image.shape[-2:])),
              "labels": labels, **(marks or {})}
    pixels = image.shape[-2] * image.shape[-1]
    out = tv_tensors.Image(image)
    if transforms is not None:
        out, target = transforms(out, target)
    plain = {key: value.as_subclass(Tensor) for key, value in target.items()}
    plain["boxes"] = plain["boxes"].float()
    if "area" in plain:
        plain["area"] = plain["area"] * (out.shape[-2] * out.shape[-1] / pixels)
    out = v2.functional.to_dtype(out, torch.float32, scale=True)
    return out.as_subclass(Tensor), plain


class DigitsCanvas(Dataset):
    """Synthetic detection: scikit-learn's 8x8 digits pasted on a dark, noisy canvas, offline.

    Item ``i`` holds 1 to ``max_objects`` digits at random places, without overlap (one that
    finds no free place is left out), each scaled so its longer side is ``digit_size[0]`` to
    ``digit_size[1]`` px, in a random bright colour (the harness's
    :func:`~examples.harness.canvases.draw_canvas`, which the segmentation canvases share). A
    box is tight around the digit's ink.
    Everything is drawn from a generator seeded with ``(seed, split, i)``, so an item is the
    same on every call and in every process. The train split takes its digits from the first
    80% of ``load_digits()``, val from the last 20%.

    Args:
        split: ``"train"`` or ``"val"``.
        count: number of items.
        seed: non-negative seed of the items.
        canvas_size: (H, W) of the image.
        max_objects: most digits on one canvas.
        digit_size: (smallest, largest) longer side of a pasted digit in pixels.
        noise: amplitude of the uniform background noise.
        transforms: applied to ``(tv_tensors.Image, {"boxes": BoundingBoxes, "labels"})``.

    Shape:
        item -> image (3, H, W) float32 in [0, 1], boxes (K, 4) float32, labels (K,) int64
    """

    classes = CANVAS_CLASSES

    def __init__(self, split: str = "train", count: int = 512, *, seed: int = SPLIT_SEED,
                 canvas_size: tuple[int, int] = (128, 128), max_objects: int = 3,
                 digit_size: tuple[int, int] = (16, 48), noise: float = 0.02,
                 transforms: Transforms | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if count < 0 or seed < 0 or max_objects < 1:
            raise ValueError(f"count and seed must be >= 0 and max_objects >= 1, got count="
                             f"{count}, seed={seed}, max_objects={max_objects}")
        if not 1 <= digit_size[0] <= digit_size[1] <= min(canvas_size):
            raise ValueError(f"digit_size must satisfy 1 <= min <= max <= min(canvas_size) = "
                             f"{min(canvas_size)}, got {digit_size}")
        self.split, self.count, self.seed = split, count, seed
        self.canvas_size, self.max_objects = canvas_size, max_objects
        self.digit_size, self.noise, self.transforms = digit_size, noise, transforms
        self.digit_indices = digit_rows(split)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        if not -self.count <= index < self.count:
            raise IndexError(f"DigitsCanvas index {index} out of range for {self.count} items")
        image, boxes, labels = self._render(index % self.count)
        return _finish(image, boxes, labels, self.transforms)

    def _render(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        canvas = draw_canvas(canvas_rng(self.seed, self.split, index), self.canvas_size,
                             self.digit_indices, self.max_objects, self.digit_size, self.noise)
        boxes = torch.tensor([p.box for p in canvas.placements], dtype=torch.float32)
        labels = torch.tensor([p.label for p in canvas.placements], dtype=torch.int64)
        return canvas.image, boxes.reshape(-1, 4), labels


def write_coco(dataset: Dataset, root: Path, split: str, *,
               classes: Sequence[str] | None = None) -> Path:
    """Write ``dataset``'s items as ``root/{split}/NNNNNN.png`` and a COCO annotation file.

    Image ids and annotation ids count from 1; category ``k`` is label ``k`` and is named
    ``classes[k]`` (``classes`` defaults to ``dataset.classes``). The JSON file is written
    atomically.

    Args:
        dataset: gives ``(image float (3, H, W) in [0, 1], {"boxes" XYXY, "labels"})``.
        root: folder of the COCO tree; created if needed.
        split: name of the image folder and of ``annotations/instances_{split}.json``.
        classes: names of the labels, ``"__background__"`` first.

    Returns:
        The path of the annotation file.
    """
    names = list(classes if classes is not None else dataset.classes)
    image_dir, ann_file = root / split, root / "annotations" / f"instances_{split}.json"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for index in range(len(dataset)):
        image, target = dataset[index]
        name = f"{index:06d}.png"
        write_png((image * 255).round().clamp(0, 255).to(torch.uint8), str(image_dir / name))
        images.append({"id": index + 1, "file_name": name,
                       "height": image.shape[-2], "width": image.shape[-1]})
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": index + 1,
                                "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": k, "name": name} for k, name in enumerate(names) if k > 0]
    text = json.dumps({"images": images, "annotations": annotations, "categories": categories})
    atomic_write(ann_file, lambda f: f.write(text.encode()))
    return ann_file


def _check_coco(data: dict, ann_file: Path, image_dir: Path) -> list[str]:
    """Vet a parsed annotation file; return the category names in order of their ids."""
    categories = sorted(data.get("categories", []), key=lambda c: c["id"])
    if not categories:
        raise DataError(f"{ann_file} lists no categories; a detector needs at least one")
    files = {}
    for entry in data.get("images", []):
        path = image_dir / entry["file_name"]
        if not path.is_file():
            raise DataError(f"image {path} (id {entry['id']}, listed in {ann_file}) not found")
        files[entry["id"]] = (path, entry["width"], entry["height"])
    category_ids = {c["id"] for c in categories}
    for ann in data.get("annotations", []):
        if ann["image_id"] not in files:
            raise DataError(f"{ann_file}: annotation {ann['id']} refers to image id "
                            f"{ann['image_id']}, which is not in 'images'")
        path, width, height = files[ann["image_id"]]
        where = f"{ann_file}: annotation {ann['id']} of image {path}"
        if ann["category_id"] not in category_ids:
            raise DataError(f"{where} has category_id {ann['category_id']}, expected one of "
                            f"{sorted(category_ids)}")
        x, y, w, h = ann["bbox"]
        if not all(map(math.isfinite, (x, y, w, h))) or w <= 0 or h <= 0:
            raise DataError(f"{where} has bbox [x, y, w, h] = {ann['bbox']}; width and height "
                            "must be positive")
        t = _EDGE_TOLERANCE
        if x < -t or y < -t or x + w > width + t or y + h > height + t:
            raise DataError(f"{where} has bbox [x, y, w, h] = {ann['bbox']}, outside the "
                            f"{width}x{height} image")
    return [c["name"] for c in categories]


class CocoDetectionData(Dataset):
    """A COCO-format folder read through torchvision's ``CocoDetection``.

    Reads ``root/{split}/`` and ``root/annotations/instances_{split}.json``, which is vetted
    up front: every listed image exists; every box has positive width and height and lies in
    its image. Category ids become contiguous labels ``1..K`` in the order of the ids.

    Crowd regions (``iscrowd: 1``, one box over many objects) are used as COCO defines them:
    with ``crowds=False`` (training) they are left out of the targets; with ``crowds=True``
    (evaluation) they stay, marked, and every target also carries ``iscrowd`` (int64 (K,)) and
    ``area`` (float32 (K,): the file's area, scaled with the image when ``transforms`` resize
    it; 0 where the file gives none, and the evaluator then takes the box's area), which
    :class:`~examples.harness.tasks.DetectionTask` passes on so that a detection on a crowd
    region is neither a hit nor a false positive and the small / medium / large ranges use
    COCO's areas.

    Args:
        root: folder with ``{split}/`` and ``annotations/``.
        split: ``"train"``, ``"val"`` or any name that has a folder and an annotation file.
        transforms: applied to ``(tv_tensors.Image, {"boxes": BoundingBoxes, "labels", ...})``.
        crowds: keep crowd regions, marked (evaluation), or leave them out (training).

    Attributes:
        classes: ``["__background__", *category names]``.
        category_ids: ``category_ids[label]`` is the COCO category id (index 0 is unused).

    Shape:
        item -> image (3, H, W) float32 in [0, 1], boxes (K, 4) float32, labels (K,) int64
        (and with ``crowds``: iscrowd (K,) int64, area (K,) float32)
    """

    def __init__(self, root: Path, split: str, transforms: Transforms | None = None, *,
                 crowds: bool = True) -> None:
        root = Path(root)
        self.image_dir = root / split
        ann_file = root / "annotations" / f"instances_{split}.json"
        if not ann_file.is_file():
            raise DataError(f"{ann_file} not found: a COCO tree needs ROOT/annotations/"
                            f"instances_{split}.json next to ROOT/{split}/")
        if not self.image_dir.is_dir():
            raise DataError(f"image folder {self.image_dir} not found: the images of "
                            f"{ann_file} belong in ROOT/{split}/")
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                coco = datasets.CocoDetection(str(self.image_dir), str(ann_file))
            names = _check_coco(coco.coco.dataset, ann_file, self.image_dir)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise DataError(f"{ann_file} is not a valid COCO annotation file "
                            f"({type(exc).__name__}: {exc})") from exc
        self.classes = ["__background__", *names]
        self.category_ids = [0, *sorted(coco.coco.cats)]
        self._label_of = torch.zeros(max(self.category_ids) + 1, dtype=torch.int64)
        self._label_of[self.category_ids[1:]] = torch.arange(1, len(self.category_ids))
        self._coco = coco
        self.crowds = crowds
        self.transforms = transforms

    def __len__(self) -> int:
        return len(self._coco)

    def __getitem__(self, index: int) -> tuple[Tensor, Target]:
        image_id = self._coco.ids[index]
        path = self.image_dir / self._coco.coco.imgs[image_id]["file_name"]
        try:
            with Image.open(path) as image:
                pixels = v2.functional.pil_to_tensor(image.convert("RGB"))
        except (OSError, SyntaxError, ValueError) as exc:
            raise DataError(f"cannot read image {path}: {exc}") from exc
        annotations = [ann for ann in self._coco.coco.imgToAnns[image_id]
                       if self.crowds or not ann.get("iscrowd", 0)]
        xywh = torch.tensor([ann["bbox"] for ann in annotations],
                            dtype=torch.float64).reshape(-1, 4)
        boxes = tv_tensors.BoundingBoxes(torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
                                         format="XYXY", canvas_size=tuple(pixels.shape[-2:]))
        boxes = v2.functional.clamp_bounding_boxes(boxes).as_subclass(Tensor).float()
        labels = self._label_of[[ann["category_id"] for ann in annotations]]
        marks = None
        if self.crowds:
            marks = {"iscrowd": torch.tensor([int(ann.get("iscrowd", 0)) for ann in annotations],
                                             dtype=torch.int64),
                     "area": torch.tensor([float(ann.get("area", 0.0)) for ann in annotations],
                                          dtype=torch.float32)}
        return _finish(pixels, boxes, labels.reshape(-1), self.transforms, marks)


def load_coco(root: Path, split: str, transforms: Transforms | None = None, *,
              crowds: bool = True) -> CocoDetectionData:
    """``ROOT/{split}/`` with ``ROOT/annotations/instances_{split}.json``; see
    :class:`CocoDetectionData`."""
    return CocoDetectionData(root, split, transforms, crowds=crowds)


def _per_box(sample: tuple[tv_tensors.Image, Target]) -> tuple[Tensor, ...]:
    """The per-box tensors of a target, which ``SanitizeBoundingBoxes`` filters with the boxes."""
    return tuple(sample[1][key] for key in ("labels", "iscrowd", "area") if key in sample[1])


def detection_transforms(image_size: tuple[int, int] | None, *, train: bool,
                         flip_p: float = 0.5, photometric_p: float = 0.5) -> v2.Compose:
    """torchvision v2 transforms that move boxes with the image.

    Train: ``RandomPhotometricDistort(p=photometric_p)``, ``RandomHorizontalFlip(flip_p)``,
    ``Resize(image_size)``, ``ToDtype(float32, scale=True)``, ``SanitizeBoundingBoxes`` (drops
    boxes that shrank below 1 px, with their labels and marks). Val: ``Resize`` and ``ToDtype``
    only.

    Args:
        image_size: (H, W) of the output image; ``None`` keeps each image's size (the detector
            resizes it itself and answers in the image's own coordinates).
        train: whether to augment.
        flip_p: probability of the horizontal flip (train only).
        photometric_p: probability of each photometric distortion (train only).
    """
    augment = [v2.RandomPhotometricDistort(p=photometric_p), v2.RandomHorizontalFlip(flip_p)]
    resize = [] if image_size is None else [v2.Resize(tuple(image_size), antialias=True)]
    steps = [*resize, v2.ToDtype(torch.float32, scale=True)]
    if not train:
        return v2.Compose(steps)
    return v2.Compose([*augment, *steps, v2.SanitizeBoundingBoxes(labels_getter=_per_box)])


def collate_detection(batch: Sequence[tuple[Tensor, Target]]) -> tuple[list[Tensor], list[Target]]:
    """Keep images and targets as lists, as torchvision's detection models take them."""
    return [image for image, _ in batch], [target for _, target in batch]


def build_detection_datasets(dataset: str, data: Path | None, image_size: tuple[int, int],
                             limit: int | None, seed: int, train_count: int = 512,
                             val_count: int = 128) -> tuple[Dataset, Dataset, list[str]]:
    """The (train, val, class names) of ``--dataset``, with :func:`detection_transforms`.

    ``"digits-canvas"`` needs no ``data``: ``train_count`` train canvases drawn with ``seed`` and
    ``val_count`` val canvases drawn with :data:`SPLIT_SEED`, so every run is scored on the same
    images. ``"coco"`` reads ``data/{train,val}/`` and ``data/annotations/``: train without
    its crowd regions, resized to ``image_size``; val with them, marked, at each image's own
    size, so that the detector's boxes (it resizes to ``image_size`` itself and maps its boxes
    back) are scored in the annotation file's coordinates and areas, as ``COCOeval`` scores
    them. ``limit`` keeps N items of each split, drawn with :data:`SPLIT_SEED`.
    """
    train_tf = detection_transforms(image_size, train=True)
    val_tf = detection_transforms(image_size, train=False)
    if dataset == "digits-canvas":
        train: Dataset = DigitsCanvas("train", train_count, seed=seed, transforms=train_tf)
        val: Dataset = DigitsCanvas("val", val_count, seed=SPLIT_SEED, transforms=val_tf)
        classes = list(CANVAS_CLASSES)
    elif dataset == "coco":
        if data is None:
            raise DataError("--dataset coco needs --data ROOT (with train/, val/, annotations/)")
        if not Path(data).is_dir():
            raise DataError(f"COCO root {data} does not exist or is not a folder; expected ROOT/"
                            "train/, ROOT/val/ and ROOT/annotations/instances_{train,val}.json")
        coco_train = load_coco(data, "train", train_tf, crowds=False)
        coco_val = load_coco(data, "val", detection_transforms(None, train=False), crowds=True)
        if coco_train.classes != coco_val.classes:
            raise DataError(f"{data}: train has categories {coco_train.classes[1:]} but val has "
                            f"{coco_val.classes[1:]}; they must match")
        train, val, classes = coco_train, coco_val, coco_train.classes
    else:
        raise DataError(f"unknown detection data set {dataset!r}; expected 'digits-canvas' or "
                        "'coco'")
    return limited(train, limit), limited(val, limit), classes
