"""The resizer study's data (seed 003, "data pre-processing"): CIFAR-10, ImageFolder trees or
scikit-learn's digits, with the study's augmentation, and CutMix on train batches.

Train images: ``RandomCrop(S, padding=S // 8)`` (the study's ``RandomCrop(32, padding=4)`` at
``S = 32``), a horizontal flip with probability 0.5, then ImageNet's mean and standard
deviation; test images are only normalised. The harness's loaders
(:func:`examples.harness.data.build_datasets`) read every source as an ``S x S`` RGB tensor in
[0, 1] (CIFAR-10 keeps its 32x32; ``--limit`` and the fixed-seed splits are theirs), and these
transforms run on that tensor, which gives what the study's PIL pipeline gives: the crop pads
with black before the normalisation.

:class:`RandomCutMix` mixes a collated train batch with probability ``p`` (the study: 0.5) by
``torchvision.transforms.v2.CutMix``, drawing from torch's RNG (seeded by ``--seed`` and saved
in the checkpoint), so a run and its resume are reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2

from examples.harness.config import TrainConfig
from examples.harness.data import build_datasets as harness_datasets

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "RandomCutMix",
    "Transformed",
    "build_datasets",
    "eval_transform",
    "train_transform",
]

DATASETS = ("cifar10", "folder", "digits")
# The study normalises its inputs with ImageNet's statistics (seed 003, "data pre-processing").
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def train_transform(image_size: int, normalize: bool = True, hflip: bool = True) -> v2.Compose:
    """The study's train augmentation of one (3, S, S) tensor in [0, 1], ``S = image_size``:
    random crop with ``S // 8`` pixels of black padding, horizontal flip with probability 0.5
    (unless not ``hflip``), normalisation (unless not ``normalize``)."""
    steps: list[Callable] = [v2.RandomCrop(image_size, padding=image_size // 8)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if normalize:
        steps.append(v2.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    return v2.Compose(steps)


def eval_transform(normalize: bool = True) -> v2.Transform:
    """The study's test transform: ImageNet normalisation only (identity if not ``normalize``)."""
    return v2.Normalize(IMAGENET_MEAN, IMAGENET_STD) if normalize else v2.Identity()


class Transformed(Dataset):
    """``dataset``'s (image, label) pairs with ``transform`` applied to the image.

    Args:
        dataset: yields ``(image, label)``.
        transform: called on each image as it is read.
    """

    def __init__(self, dataset: Dataset, transform: Callable[[Tensor], Tensor]) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, Any]:
        image, label = self.dataset[index]
        return self.transform(image), label


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
    """(train, test, class names) for ``config`` with the study's transforms.

    ``config.dataset`` is one of :data:`DATASETS` (read by the harness, at
    ``config.image_size``); ``config.options["normalize"]`` is ``"imagenet"`` (the default) or
    ``"none"``, and ``config.options["hflip"]`` (default true) false leaves out the flip (a
    mirrored digit is another shape).

    Raises:
        DataError: the data set is missing, empty or unreadable (the message names the path).
    """
    normalize = config.options.get("normalize", "imagenet") == "imagenet"
    hflip = bool(config.options.get("hflip", True))
    train, test, classes = harness_datasets(config)
    return (Transformed(train, train_transform(config.image_size, normalize, hflip)),
            Transformed(test, eval_transform(normalize)), classes)


class RandomCutMix:
    """CutMix (Yun et al., ICCV 2019) on a batch with probability ``p``; one-hot targets else.

    With probability ``p`` the batch goes through ``torchvision.transforms.v2.CutMix`` (a box
    drawn from Beta(alpha, alpha) is pasted from the batch rolled by one; targets mixed by the
    box's area). Otherwise the images stay as they are and the labels become one-hot, so every
    train batch has soft targets (N, num_classes); cross-entropy on a one-hot target is the
    cross-entropy of its label. The coin and the box come from torch's global RNG.

    Args:
        num_classes: length of the targets.
        p: probability of mixing a batch, in [0, 1]; 0 never mixes.
        alpha: Beta distribution parameter of the pasted area (CutMix's default, 1: uniform).

    Shape:
        images (N, C, H, W), labels (N,) -> images (N, C, H, W), targets (N, num_classes)

    Example:
        >>> images, targets = RandomCutMix(10, p=1.0)(torch.rand(4, 3, 32, 32),
        ...                                           torch.tensor([0, 1, 2, 3]))
        >>> targets.shape, bool(torch.allclose(targets.sum(1), torch.ones(4)))
        (torch.Size([4, 10]), True)
    """

    def __init__(self, num_classes: int, p: float = 0.5, alpha: float = 1.0) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must lie in [0, 1], got {p}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.num_classes = num_classes
        self.p = p
        self.alpha = alpha
        self.cutmix = v2.CutMix(num_classes=num_classes, alpha=alpha)

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if self.p > 0 and torch.rand(()).item() < self.p:
            return self.cutmix(images, labels)
        return images, F.one_hot(labels, self.num_classes).float()

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_classes={self.num_classes}, p={self.p}, "
                f"alpha={self.alpha})")
