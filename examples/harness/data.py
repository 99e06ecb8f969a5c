"""Data sets of the train scripts: ImageFolder trees, CIFAR-10 and scikit-learn's digits.

Every image becomes a float RGB tensor in [0, 1] (the study's only normalisation, seed 000
section 2.2) of ``image_size`` x ``image_size``, whatever its size and mode (grey, palette,
RGBA). Train/test splits that the data does not come with are drawn with a fixed seed
(:data:`SPLIT_SEED`), independent of ``--seed``, so every run is scored on the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from examples.harness.config import TrainConfig

__all__ = [
    "SPLIT_SEED",
    "DataError",
    "build_datasets",
    "digits",
    "image_folder",
    "limited",
    "split_indices",
]

SPLIT_SEED = 0


class DataError(Exception):
    """A data set that cannot be used: missing, empty or unreadable. The message names the path."""


def _load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from exc


def _to_tensor(image_size: int) -> transforms.Compose:
    return transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor()])


def split_indices(targets: Sequence[int], fraction: float, seed: int = SPLIT_SEED
                  ) -> tuple[list[int], list[int]]:
    """Stratified split: ``fraction`` of every class (at least one image of a class with two or
    more) goes to the test side. Returns (train indices, test indices), each sorted."""
    generator = torch.Generator().manual_seed(seed)
    train: list[int] = []
    test: list[int] = []
    for label in sorted(set(targets)):
        members = [i for i, t in enumerate(targets) if t == label]
        order = torch.randperm(len(members), generator=generator).tolist()
        n_test = min(len(members) - 1, max(1, round(fraction * len(members))))
        test += [members[j] for j in order[:n_test]]
        train += [members[j] for j in order[n_test:]]
    return sorted(train), sorted(test)


def _folder(root: Path, image_size: int) -> datasets.ImageFolder:
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist or is not a folder")
    try:
        return datasets.ImageFolder(str(root), transform=_to_tensor(image_size), loader=_load_rgb)
    except (FileNotFoundError, OSError) as exc:
        raise DataError(f"image folder {root} holds no usable images: expected one sub-folder "
                        f"per class with image files in it ({exc})") from exc


def image_folder(root: Path, image_size: int, val_fraction: float
                 ) -> tuple[Dataset, Dataset, list[str]]:
    """``root/train`` scored on ``root/val`` (or ``root/test`` when there is no val/), else
    ``root`` split by ``val_fraction``."""
    held_out = next((root / name for name in ("val", "test") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and held_out is not None:
        train, test = _folder(root / "train", image_size), _folder(held_out, image_size)
        if train.classes != test.classes:
            raise DataError(f"{root}/train has classes {train.classes} but {held_out} has "
                            f"{test.classes}; they must match")
        return train, test, train.classes
    tree = _folder(root, image_size)
    if len(tree) < 2:
        raise DataError(f"image folder {root} has {len(tree)} image; at least 2 are needed "
                        "to split it into train and test")
    train_idx, test_idx = split_indices(tree.targets, val_fraction)
    return Subset(tree, train_idx), Subset(tree, test_idx), tree.classes


def digits(image_size: int, test_fraction: float = 0.2) -> tuple[Dataset, Dataset, list[str]]:
    """scikit-learn's bundled digits (1797 real 8x8 grey scans, 10 classes), offline.

    Pixel values 0..16 are scaled to [0, 1], bilinearly resized to ``image_size`` and repeated
    over three channels; the split is stratified with :data:`SPLIT_SEED`.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                           align_corners=False).clamp_(0, 1).expand(-1, 3, -1, -1).contiguous()
    targets = torch.as_tensor(bunch.target, dtype=torch.long)
    train_idx, test_idx = split_indices(targets.tolist(), test_fraction)
    classes = [str(c) for c in bunch.target_names]
    return (TensorDataset(images[train_idx], targets[train_idx]),
            TensorDataset(images[test_idx], targets[test_idx]), classes)


def cifar10(root: Path, image_size: int, download: bool) -> tuple[Dataset, Dataset, list[str]]:
    """torchvision's CIFAR-10 under ``root``; downloads only when ``download`` is true."""
    try:
        train = datasets.CIFAR10(str(root), train=True, download=download,
                                 transform=_to_tensor(image_size))
        test = datasets.CIFAR10(str(root), train=False, download=download,
                                transform=_to_tensor(image_size))
    except RuntimeError as exc:
        hint = "" if download else " (pass --download to fetch it)"
        raise DataError(f"CIFAR-10 not found under {root}{hint}: {exc}") from exc
    return train, test, list(train.classes)


def limited(dataset: Dataset, limit: int | None) -> Dataset:
    """At most ``limit`` items of ``dataset``, drawn with :data:`SPLIT_SEED` (all when None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    keep = torch.randperm(len(dataset), generator=generator)[:limit]
    return Subset(dataset, sorted(keep.tolist()))


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    """The (train, test, class names) that ``config`` asks for; ``--limit`` keeps N images of
    each split, drawn with :data:`SPLIT_SEED`."""
    if config.dataset == "digits":
        train, test, classes = digits(config.image_size)
    elif config.data is None:
        raise DataError(f"--dataset {config.dataset} needs --data DIR")
    elif config.dataset == "cifar10":
        train, test, classes = cifar10(config.data, config.image_size, config.download)
    else:
        train, test, classes = image_folder(config.data, config.image_size, config.val_fraction)
    if len(classes) < 2:
        raise DataError(f"{config.data or config.dataset} has {len(classes)} class; "
                        "a classifier needs at least 2")
    return limited(train, config.limit), limited(test, config.limit), classes
