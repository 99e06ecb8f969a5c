"""Segmentation data of the DilatedNet example: image/mask folders, Pascal VOC 2012, digit canvases.

Every item is ``(image, mask)``: a float32 RGB tensor (3, H, W) in [0, 1] (ImageNet
normalisation is the model's job, see :class:`~examples.dilatednet.models.DilatedNet`) and an
int64 mask (H, W) of class indices, 255 where the pixel is ignored (:data:`IGNORE_INDEX`, as in
VOC and the paper's loss). Class 0 is the background. In training, image and mask go through the
same geometric transform (:func:`segmentation_transforms`, torchvision v2 with
``tv_tensors.Mask``, so masks are cropped and resized with nearest neighbour and never blended).
For validation only the image is resized for the network; the mask keeps its file's size, and
the harness scores the prediction brought back to that size (the Pascal VOC protocol; see
:class:`~examples.harness.tasks.SegmentationTask`). A mask that does not fit its image or holds
an unknown class raises the harness's :class:`DataError`, whose message names the file.

Folder layout (``--dataset folder --data ROOT``): ``ROOT/images/NAME.{png,jpg,...}`` and
``ROOT/masks/NAME.png`` (one channel of class indices: PNG mode L or P, as VOC's masks), either
once (split into train and val with :data:`SPLIT_SEED`) or under ``ROOT/train/`` and
``ROOT/val/``. ``ROOT/classes.txt``, one name per line (line 1 is class 0), names the classes;
without it the masks are read once and the classes are ``background, class_1, ..., class_K``
with K the largest index found.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Subset
from torchvision import datasets, tv_tensors
from torchvision.io import write_png
from torchvision.transforms import v2

from examples.harness.canvases import SPLITS, Placement, canvas_rng, digit_rows, draw_canvas
from examples.harness.data import SPLIT_SEED, DataError, limited

__all__ = [
    "CANVAS_CLASSES",
    "DATASETS",
    "IGNORE_INDEX",
    "RECTANGLE_CLASSES",
    "VOC_CLASSES",
    "DigitsSegmentationCanvas",
    "Placement",
    "SegmentationFiles",
    "build_segmentation_datasets",
    "read_mask",
    "rectangles",
    "segmentation_folder",
    "segmentation_transforms",
    "voc_segmentation",
    "write_segmentation_folder",
]

IGNORE_INDEX = 255
CANVAS_CLASSES = ["background", *(str(digit) for digit in range(10))]
VOC_CLASSES = ["background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car",
               "cat", "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
               "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
RECTANGLE_CLASSES = ["background", "red", "green"]
DATASETS = ("folder", "voc", "digits-canvas")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
VAL_FRACTION = 0.2

Transforms = Callable[[tv_tensors.Image, tv_tensors.Mask], tuple[Tensor, Tensor]]

_MASK_MODES = ("L", "P", "I", "I;16")


def _pair(name: str, value: int | Sequence[int]) -> tuple[int, int]:
    size = (value, value) if isinstance(value, int) else tuple(value)
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise ValueError(f"{name} must be a positive int or (H, W), got {value!r}")
    return size[0], size[1]


def segmentation_transforms(image_size: int | tuple[int, int], *, train: bool,
                            scale: tuple[float, float] = (0.5, 1.0), flip_p: float = 0.5,
                            photometric_p: float = 0.5) -> v2.Compose:
    """torchvision v2 transforms of an (image, mask) pair.

    Train: ``RandomResizedCrop(image_size, scale)``, ``RandomHorizontalFlip(flip_p)``,
    ``RandomPhotometricDistort(p=photometric_p)`` (the image only), ``ToDtype``; the mask is
    cropped, resized (nearest neighbour, as v2 does for ``tv_tensors.Mask``) and flipped with
    the image. Val: ``Resize(image_size)`` of the image only and ``ToDtype``; the mask keeps its
    own size, so that the prediction is scored at the label's resolution. ``ToDtype`` gives a
    float32 image in [0, 1] and an int64 mask.

    Args:
        image_size: (H, W) of the output, or one int for a square.
        train: whether to augment.
        scale: area range of the random crop (train only).
        flip_p: probability of the horizontal flip (train only).
        photometric_p: probability of each photometric distortion (train only).
    """
    size = _pair("image_size", image_size)
    to_dtype = v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64},
                          scale=True)
    if not train:
        return v2.Compose([_ImageOnly(v2.Resize(size, antialias=True)), to_dtype])
    return v2.Compose([v2.RandomResizedCrop(size, scale=scale, antialias=True),
                       v2.RandomHorizontalFlip(flip_p),
                       v2.RandomPhotometricDistort(p=photometric_p), to_dtype])


class _ImageOnly:
    """``transform`` applied to the image of a sample; masks pass through unchanged."""

    def __init__(self, transform: v2.Transform) -> None:
        self.inner = transform

    def __call__(self, *sample: Tensor) -> Tensor | tuple[Tensor, ...]:
        out = tuple(self.inner(x) if isinstance(x, tv_tensors.Image) else x for x in sample)
        return out if len(out) > 1 else out[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.inner!r})"


def _finish(image: Tensor, mask: Tensor, transforms: Transforms | None) -> tuple[Tensor, Tensor]:
    """Transform image and mask together; return plain float32 (3, H, W) and int64 (H, W)."""
    sample = (tv_tensors.Image(image), tv_tensors.Mask(mask))
    if transforms is not None:
        sample = transforms(*sample)
    out, target = sample
    out = v2.functional.to_dtype(out, torch.float32, scale=True)
    return out.as_subclass(Tensor), target.as_subclass(Tensor).to(torch.int64)


def _read_image(path: Path) -> Tensor:
    try:
        with Image.open(path) as image:
            return v2.functional.pil_to_tensor(image.convert("RGB"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def read_mask(path: Path) -> Tensor:
    """The class indices of a one-channel mask file as an int64 (H, W) tensor.

    Raises:
        DataError: the file cannot be read, or it has colours (RGB) instead of indices.
    """
    try:
        with Image.open(path) as mask:
            if mask.mode not in _MASK_MODES:
                raise DataError(f"mask {path} has mode {mask.mode}; expected one channel of "
                                f"class indices (PNG mode L or P, as VOC's SegmentationClass)")
            return torch.from_numpy(np.asarray(mask).astype(np.int64))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read mask {path}: {exc}") from exc


def _check_mask(mask: Tensor, image: Tensor, num_classes: int, mask_path: Path,
                image_path: Path) -> None:
    if tuple(mask.shape) != tuple(image.shape[-2:]):
        raise DataError(f"mask {mask_path} is {mask.shape[0]}x{mask.shape[1]} (HxW) but its "
                        f"image {image_path} is {image.shape[-2]}x{image.shape[-1]}; they must "
                        "have the same size")
    bad = ((mask < 0) | (mask >= num_classes)) & (mask != IGNORE_INDEX)
    if bad.any():
        found = mask[bad].unique()[:8].tolist()
        raise DataError(f"mask {mask_path} holds class indices {found}; expected 0.."
                        f"{num_classes - 1} or {IGNORE_INDEX} (ignore)")


class SegmentationFiles(Dataset):
    """Pairs of image and mask files, checked as they are read.

    Args:
        pairs: ``(image path, mask path)`` per item.
        num_classes: masks may hold ``0..num_classes - 1`` and :data:`IGNORE_INDEX`.
        transforms: applied to ``(tv_tensors.Image, tv_tensors.Mask)``.

    Shape:
        item -> image (3, H, W) float32 in [0, 1], mask (H, W) int64

    Raises:
        DataError: on reading an item whose files are unreadable, whose mask differs in size
            from its image, or holds a class index out of range; the message names the file.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], num_classes: int,
                 transforms: Transforms | None = None) -> None:
        self.pairs = [(Path(image), Path(mask)) for image, mask in pairs]
        self.num_classes, self.transforms = num_classes, transforms

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image_path, mask_path = self.pairs[index]
        image, mask = _read_image(image_path), read_mask(mask_path)
        _check_mask(mask, image, self.num_classes, mask_path, image_path)
        return _finish(image, mask, self.transforms)


def _folder_pairs(root: Path) -> list[tuple[Path, Path]]:
    """``root/images/NAME.*`` with ``root/masks/NAME.png``, sorted by NAME."""
    image_dir, mask_dir = root / "images", root / "masks"
    for folder in (image_dir, mask_dir):
        if not folder.is_dir():
            raise DataError(f"{folder} not found: a segmentation folder holds images/ and "
                            "masks/, once or under both train/ and val/")
    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        if path.stem in images:
            raise DataError(f"images {images[path.stem]} and {path} share the name "
                            f"{path.stem!r}; each mask must belong to one image")
        images[path.stem] = path
    masks = {path.stem: path for path in sorted(mask_dir.glob("*.png"))}
    for stem, path in images.items():
        if stem not in masks:
            raise DataError(f"image {path} has no mask: expected {mask_dir / (stem + '.png')}")
    for stem, path in masks.items():
        if stem not in images:
            raise DataError(f"mask {path} has no image {image_dir / stem}.* "
                            f"(one of {', '.join(IMAGE_SUFFIXES)})")
    if not images:
        raise DataError(f"{image_dir} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return [(images[stem], masks[stem]) for stem in sorted(images)]


def _folder_classes(root: Path, pairs: Sequence[tuple[Path, Path]]) -> list[str]:
    names_file = root / "classes.txt"
    if names_file.is_file():
        classes = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
    else:
        largest = 0
        for _, mask_path in pairs:
            mask = read_mask(mask_path)
            labels = mask[mask != IGNORE_INDEX]
            largest = max(largest, int(labels.max()) if labels.numel() else 0)
        classes = ["background", *(f"class_{k}" for k in range(1, largest + 1))]
    if len(classes) < 2:
        raise DataError(f"{names_file if names_file.is_file() else root} gives {len(classes)} "
                        "class; segmentation needs at least 2 (background and one more)")
    return classes


def segmentation_folder(root: Path, train_transforms: Transforms | None = None,
                        val_transforms: Transforms | None = None
                        ) -> tuple[Dataset, Dataset, list[str]]:
    """(train, val, classes) of a folder tree; see the module docstring for the layout.

    ``root/train`` and ``root/val`` are used when both exist; otherwise ``root``'s pairs are
    split, :data:`VAL_FRACTION` of them (at least one) to val, drawn with :data:`SPLIT_SEED`.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"segmentation folder {root} does not exist or is not a folder")
    if (root / "train").is_dir() and (root / "val").is_dir():
        train_pairs, val_pairs = _folder_pairs(root / "train"), _folder_pairs(root / "val")
        classes = _folder_classes(root, train_pairs + val_pairs)
        return (SegmentationFiles(train_pairs, len(classes), train_transforms),
                SegmentationFiles(val_pairs, len(classes), val_transforms), classes)
    pairs = _folder_pairs(root)
    if len(pairs) < 2:
        raise DataError(f"segmentation folder {root} has {len(pairs)} image; at least 2 are "
                        "needed to split it into train and val")
    classes = _folder_classes(root, pairs)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(SPLIT_SEED))
    n_val = min(len(pairs) - 1, max(1, round(VAL_FRACTION * len(pairs))))
    train = SegmentationFiles(pairs, len(classes), train_transforms)
    val = SegmentationFiles(pairs, len(classes), val_transforms)
    return (Subset(train, sorted(order[n_val:].tolist())),
            Subset(val, sorted(order[:n_val].tolist())), classes)


def voc_segmentation(root: Path, image_set: str, transforms: Transforms | None = None,
                     download: bool = False) -> SegmentationFiles:
    """Pascal VOC 2012 segmentation (21 classes, 255 on object borders) under ``root``.

    torchvision's ``VOCSegmentation`` finds the files (``root/VOCdevkit/VOC2012``) and downloads
    them only when ``download`` is true; the items are read and checked as any folder's.
    """
    try:
        voc = datasets.VOCSegmentation(str(root), year="2012", image_set=image_set,
                                       download=download)
    except (RuntimeError, OSError) as exc:
        hint = "" if download else " (pass --download to fetch it)"
        raise DataError(f"Pascal VOC 2012 {image_set} not found under {root}/VOCdevkit/VOC2012"
                        f"{hint}: {exc}") from exc
    return SegmentationFiles(list(zip(voc.images, voc.masks)), len(VOC_CLASSES), transforms)


class DigitsSegmentationCanvas(Dataset):
    """Synthetic segmentation: scikit-learn's 8x8 digits pasted on a noisy canvas, offline.

    Item ``i`` holds 1 to ``max_digits`` digits at random places without overlap (one that finds
    no free place is left out), each bilinearly scaled so its longer side is ``digit_size[0]``
    to ``digit_size[1]`` px and drawn in a random bright colour over a dark background. The
    mask is ``digit + 1`` where the scaled digit's ink exceeds ``threshold`` (its strokes) and
    0 elsewhere, so there are 11 classes (:data:`CANVAS_CLASSES`). The canvas is the harness's
    :func:`~examples.harness.canvases.draw_canvas`, which the detection canvases share.
    Everything is drawn from a generator seeded with ``(seed, split, i)``: an item is the same
    on every call and in every process. Train canvases take their digits from the first 80% of
    ``load_digits()``, val canvases from the last 20%.

    Args:
        split: ``"train"`` or ``"val"``.
        count: number of items.
        seed: non-negative seed of the items.
        canvas_size: (H, W) of the image.
        max_digits: most digits on one canvas.
        digit_size: (smallest, largest) longer side of a digit in pixels; default a quarter
            to a half of the canvas's shorter side.
        noise: amplitude of the uniform background noise.
        threshold: ink level (0..1) above which a pixel is a stroke.
        transforms: applied to ``(tv_tensors.Image, tv_tensors.Mask)``.

    Shape:
        item -> image (3, H, W) float32 in [0, 1], mask (H, W) int64 in 0..10
    """

    classes = CANVAS_CLASSES

    def __init__(self, split: str = "train", count: int = 512, *, seed: int = SPLIT_SEED,
                 canvas_size: tuple[int, int] = (64, 64), max_digits: int = 3,
                 digit_size: tuple[int, int] | None = None, noise: float = 0.02,
                 threshold: float = 0.5, transforms: Transforms | None = None) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if count < 0 or seed < 0 or max_digits < 1:
            raise ValueError(f"count and seed must be >= 0 and max_digits >= 1, got count="
                             f"{count}, seed={seed}, max_digits={max_digits}")
        canvas_size = _pair("canvas_size", canvas_size)
        shorter = min(canvas_size)
        if digit_size is None:
            digit_size = (max(1, shorter // 4), max(1, shorter // 2))
        if not 1 <= digit_size[0] <= digit_size[1] <= shorter:
            raise ValueError(f"digit_size must satisfy 1 <= min <= max <= min(canvas_size) = "
                             f"{shorter}, got {digit_size}")
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        self.split, self.count, self.seed = split, count, seed
        self.canvas_size, self.max_digits, self.digit_size = canvas_size, max_digits, digit_size
        self.noise, self.threshold, self.transforms = noise, threshold, transforms
        self.digit_indices = digit_rows(split)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, mask, _ = self._render(self._index(index))
        return _finish(image, mask, self.transforms)

    def placements(self, index: int) -> list[Placement]:
        """The digits drawn on item ``index``, in drawing order."""
        return self._render(self._index(index))[2]

    def _index(self, index: int) -> int:
        if not -self.count <= index < self.count:
            raise IndexError(f"DigitsSegmentationCanvas index {index} out of range for "
                             f"{self.count} items")
        return index % self.count

    def _render(self, index: int) -> tuple[Tensor, Tensor, list[Placement]]:
        canvas = draw_canvas(canvas_rng(self.seed, self.split, index), self.canvas_size,
                             self.digit_indices, self.max_digits, self.digit_size, self.noise)
        mask = torch.zeros(self.canvas_size, dtype=torch.int64)
        for placement, ink in zip(canvas.placements, canvas.inks, strict=True):
            x1, y1, x2, y2 = placement.box
            mask[y1:y2, x1:x2][ink > self.threshold] = placement.label
        return canvas.image, mask, canvas.placements


def rectangles(count: int, size: int = 48, *, seed: int) -> list[tuple[Tensor, Tensor]]:
    """Dark noisy ``size`` x ``size`` images, each with one red (class 1) and one green (class 2)
    rectangle of 14-24 px, and their masks (classes :data:`RECTANGLE_CLASSES`).

    An easy segmentation task that a narrow DilatedNet learns in seconds on a CPU (digit canvases
    need hundreds of steps before the first non-background pixel); write it with
    :func:`write_segmentation_folder` to get a folder data set.
    """
    if size < 25:
        raise ValueError(f"rectangles needs size >= 25 to place 24 px rectangles, got {size}")
    generator = torch.Generator().manual_seed(seed)
    colours = {1: torch.tensor([0.9, 0.2, 0.2]), 2: torch.tensor([0.2, 0.9, 0.2])}
    items = []
    for _ in range(count):
        image = 0.15 * torch.rand(3, size, size, generator=generator)
        mask = torch.zeros(size, size, dtype=torch.int64)
        for label, colour in colours.items():
            h, w = torch.randint(14, 25, (2,), generator=generator).tolist()
            y, x = torch.randint(0, size - 24, (2,), generator=generator).tolist()
            image[:, y:y + h, x:x + w] = colour[:, None, None]
            mask[y:y + h, x:x + w] = label
        items.append((image, mask))
    return items


def write_segmentation_folder(dataset: Dataset, root: Path,
                              classes: Sequence[str] | None = None) -> Path:
    """Write ``dataset``'s items as ``root/images/NNNNNN.png`` and ``root/masks/NNNNNN.png``.

    Images are rounded to 8 bits; masks are written as one-channel (mode L) PNGs of class
    indices. ``classes`` (default ``dataset.classes``) go to ``root/classes.txt``.

    Returns:
        ``root``.
    """
    root = Path(root)
    names = list(classes if classes is not None else dataset.classes)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        image, mask = dataset[index]
        name = f"{index:06d}.png"
        write_png((image * 255).round().clamp(0, 255).to(torch.uint8), str(root / "images" / name))
        write_png(mask[None].to(torch.uint8), str(root / "masks" / name))
    (root / "classes.txt").write_text("\n".join(names) + "\n")
    return root


def build_segmentation_datasets(dataset: str, data: Path | None,
                                image_size: int | tuple[int, int], limit: int | None,
                                seed: int, download: bool = False, *, train_count: int = 512,
                                val_count: int = 128) -> tuple[Dataset, Dataset, list[str]]:
    """The (train, val, class names) of ``--dataset``, with :func:`segmentation_transforms`.

    ``"digits-canvas"`` needs no ``data``: ``train_count`` train canvases of ``image_size``
    drawn with ``seed`` and ``val_count`` val canvases drawn with :data:`SPLIT_SEED`, so every
    run is scored on the same images. ``"folder"`` reads a tree under ``data`` (see the module
    docstring); ``"voc"`` Pascal VOC 2012 train/val under ``data``, downloaded only when
    ``download`` is true. ``limit`` keeps N items of each split, drawn with :data:`SPLIT_SEED`.
    ``classes[0]`` is the background.
    """
    size = _pair("image_size", image_size)
    train_tf = segmentation_transforms(size, train=True)
    val_tf = segmentation_transforms(size, train=False)
    if dataset == "digits-canvas":
        train: Dataset = DigitsSegmentationCanvas("train", train_count, seed=seed,
                                                  canvas_size=size, transforms=train_tf)
        val: Dataset = DigitsSegmentationCanvas("val", val_count, seed=SPLIT_SEED,
                                                canvas_size=size, transforms=val_tf)
        classes = list(CANVAS_CLASSES)
    elif dataset not in DATASETS:
        raise DataError(f"unknown segmentation data set {dataset!r}; expected one of {DATASETS}")
    elif data is None:
        raise DataError(f"--dataset {dataset} needs --data ROOT")
    elif dataset == "voc":
        train = voc_segmentation(Path(data), "train", train_tf, download)
        val = voc_segmentation(Path(data), "val", val_tf, download)
        classes = list(VOC_CLASSES)
    else:
        train, val, classes = segmentation_folder(Path(data), train_tf, val_tf)
    return limited(train, limit), limited(val, limit), classes
