"""What ``--data ROOT`` holds: the folder layouts the train scripts read, recognised in one place.

Every script passes ``--data ROOT`` through :func:`resolve_dataset`: unless ``--dataset`` names a
data set, the layout found under ROOT picks it. The layouts (:data:`LAYOUTS`):

- ``imagefolder``: ``ROOT/train/`` with ``ROOT/val/`` or ``ROOT/test/``, one sub-folder of
  images per class (torchvision's ``ImageFolder``; ``val/`` is scored when both exist);
- ``imagefolder-tree``: one such tree, ``ROOT/<class>/<images>``, split by ``--val-fraction``;
- ``coco``: ``ROOT/annotations/instances_{train,val}.json`` with the images in ``ROOT/train/``
  and ``ROOT/val/``;
- ``masks``: ``ROOT/images/`` and ``ROOT/masks/`` (PNG class indices, same names), once or under
  both ``ROOT/train/`` and ``ROOT/val/``;
- ``cifar10``: torchvision's CIFAR-10 (``ROOT/cifar-10-batches-py/``), downloadable;
- ``voc``: torchvision's Pascal VOC 2012 (``ROOT/VOCdevkit/VOC2012/``), downloadable.

A script accepts some of them (its task's ``layouts``). When ROOT matches none of those, the
:class:`~examples.harness.data.DataError` names the layouts the script reads and what ROOT holds
(and the layout it does match, if another script reads it).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS

from examples.harness.config import TrainConfig
from examples.harness.data import DataError

__all__ = ["AUTO", "LAYOUTS", "Layout", "describe_folder", "find_layouts", "resolve_dataset"]

AUTO = "auto"
"""The ``--dataset`` default: take the data set from what ``--data`` holds."""

_SHOWN = 8  # entries of ROOT named in an error


def _is_dir(*paths: Path) -> bool:
    return all(path.is_dir() for path in paths)


def _has_class_folders(root: Path) -> bool:
    """A sub-folder of ``root`` holds an image file (at any depth, as ``ImageFolder`` looks)."""
    if not root.is_dir():
        return False
    for child in sorted(root.iterdir()):
        if child.is_dir() and not child.name.startswith("."):
            images = (p for p in child.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS)
            if next(images, None) is not None:
                return True
    return False


def _image_folder(root: Path) -> bool:
    return _has_class_folders(root / "train") and any(
        _has_class_folders(root / split) for split in ("val", "test"))


def _mask_folder(root: Path) -> bool:
    return _is_dir(root / "images", root / "masks") or all(
        _is_dir(root / split / "images", root / split / "masks") for split in ("train", "val"))


def _coco(root: Path) -> bool:
    return all((root / "annotations" / f"instances_{split}.json").is_file()
               for split in ("train", "val"))


@dataclass(frozen=True)
class Layout:
    """A folder layout ``--data`` may hold.

    Attributes:
        name: its key in :data:`LAYOUTS` and the tasks' ``layouts``.
        dataset: the ``--dataset`` value that reads it.
        title: what it is, in a few words (``"a COCO folder"``).
        where: where its files lie under ROOT.
        matches: ``matches(root)``: whether ``root`` holds this layout.
        downloadable: ``--download`` fetches it into a ROOT that holds no layout.
    """

    name: str
    dataset: str
    title: str
    where: str
    matches: Callable[[Path], bool]
    downloadable: bool = False

    @property
    def description(self) -> str:
        return f"{self.title}: {self.where}"


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    Layout("coco", "coco", "a COCO folder", "ROOT/annotations/instances_train.json and "
           "instances_val.json, images in ROOT/train/ and ROOT/val/", _coco),
    Layout("masks", "folder", "a mask folder", "ROOT/images/ and ROOT/masks/ (PNG class "
           "indices, same names), once or under both ROOT/train/ and ROOT/val/", _mask_folder),
    Layout("voc", "voc", "Pascal VOC 2012", "ROOT/VOCdevkit/VOC2012/ (--download fetches it)",
           lambda root: (root / "VOCdevkit" / "VOC2012").is_dir(), downloadable=True),
    Layout("cifar10", "cifar10", "CIFAR-10", "ROOT/cifar-10-batches-py/ (--download fetches it)",
           lambda root: (root / "cifar-10-batches-py").is_dir(), downloadable=True),
    Layout("imagefolder", "folder", "an ImageFolder with splits", "ROOT/train/ with ROOT/val/ "
           "or ROOT/test/, one sub-folder of images per class", _image_folder),
    Layout("imagefolder-tree", "folder", "an ImageFolder tree", "ROOT/<class>/<images>, split "
           "by --val-fraction", _has_class_folders),
)}
"""Every layout, the most specific first (a COCO, mask or VOC folder also holds images in
sub-folders, as an ImageFolder tree does)."""


def find_layouts(root: Path) -> list[Layout]:
    """The layouts ``root`` holds, in :data:`LAYOUTS` order (empty if none or no folder)."""
    if not root.is_dir():
        return []
    return [layout for layout in LAYOUTS.values() if layout.matches(root)]


def describe_folder(root: Path) -> str:
    """What ``root`` holds at its top, in a few words: ``"train/, test/, notes.txt"``."""
    if not root.exists():
        return f"{root} does not exist"
    if not root.is_dir():
        return f"{root} is a file, not a folder"
    entries = sorted(root.iterdir(), key=lambda p: (not p.is_dir(), p.name))
    names = [p.name + ("/" if p.is_dir() else "") for p in itertools.islice(entries, _SHOWN)]
    if not names:
        return f"{root} is empty"
    more = f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else ""
    return f"{root} holds {', '.join(names)}{more}"


def resolve_dataset(config: TrainConfig, layouts: Sequence[str], default: str) -> TrainConfig:
    """``config`` with ``dataset`` decided: as given, or (``"auto"``) from what ``data`` holds.

    With ``dataset="auto"``: no ``data`` gives ``default``; otherwise the first layout of
    :data:`LAYOUTS` that ROOT holds decides (the most specific: a COCO or mask folder also looks
    like an ImageFolder tree) and must be one of ``layouts``; a ROOT holding no layout, with
    ``download`` set, gives the script's downloadable data set (``default`` if it is one).

    Args:
        config: the run's flags.
        layouts: the names of the :data:`LAYOUTS` the script reads.
        default: the script's data set when there is no ``--data``.

    Raises:
        DataError: ROOT holds none of ``layouts`` (and nothing is to be downloaded); the message
            names the accepted layouts and what ROOT holds.
    """
    if config.dataset != AUTO:
        return config
    if config.data is None:
        return dataclasses.replace(config, dataset=default)
    accepted = [LAYOUTS[name] for name in layouts]
    found = find_layouts(config.data)
    if found and found[0] in accepted:
        return dataclasses.replace(config, dataset=found[0].dataset)
    fetchable = sorted((layout for layout in accepted if layout.downloadable),
                       key=lambda layout: layout.dataset != default)
    if config.download and fetchable and not found:
        return dataclasses.replace(config, dataset=fetchable[0].dataset)
    other = f" ({found[0].title}, which this script does not read)" if found else ""
    reads = "; ".join(f"({i}) {layout.description}" for i, layout in enumerate(accepted, 1))
    raise DataError(f"--data {config.data} matches no layout this script reads: {reads}. Found: "
                    f"{describe_folder(config.data)}{other}")
