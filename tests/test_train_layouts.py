"""``--data ROOT`` in every train script: each layout it reads is recognised and trained on; a
ROOT it cannot read is refused with the layouts it reads and what ROOT holds."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from examples.detector_neck import train as detector
from examples.detector_neck.data import DigitsCanvas, write_coco
from examples.dfpn_classifier import train as dfpn
from examples.dilatednet import train as dilatednet
from examples.dilatednet.data import RECTANGLE_CLASSES, rectangles, write_segmentation_folder
from examples.harness import DataError, TrainConfig
from examples.harness.layouts import LAYOUTS, find_layouts, resolve_dataset
from examples.resizer_classifier import train as resizer
from PIL import Image

pytestmark = pytest.mark.usefixtures("one_thread")


def _classes(root: Path, count: int = 3) -> None:
    """Two class folders (red, green) of ``count`` small PNGs each."""
    rng = np.random.default_rng(len(str(root)))
    for colour, name in enumerate(("red", "green")):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 80, (10, 12, 3), dtype=np.uint8)
            pixels[..., colour] += 170
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def _imagefolder_test(root: Path) -> None:
    _classes(root / "train")
    _classes(root / "test", 2)


def _imagefolder_val(root: Path) -> None:
    _classes(root / "train")
    _classes(root / "val", 2)


def _imagefolder_tree(root: Path) -> None:
    _classes(root, 5)


def _coco(root: Path) -> None:
    for split, count in (("train", 6), ("val", 2)):
        write_coco(DigitsCanvas(split, count=count, canvas_size=(48, 48), digit_size=(12, 24)),
                   root, split)


def _masks(root: Path) -> None:
    write_segmentation_folder(rectangles(6, 32, seed=1), root, RECTANGLE_CLASSES)


def _masks_split(root: Path) -> None:
    write_segmentation_folder(rectangles(4, 32, seed=1), root / "train", RECTANGLE_CLASSES)
    write_segmentation_folder(rectangles(2, 32, seed=2), root / "val", RECTANGLE_CLASSES)
    (root / "classes.txt").write_text("\n".join(RECTANGLE_CLASSES) + "\n")


def _voc(root: Path) -> None:
    """Pascal VOC 2012's folders as torchvision reads them, with three tiny images."""
    voc = root / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(0)
    for split, names in (("train", ["2007_000032", "2007_000033"]), ("val", ["2007_000039"])):
        for name in names:
            (voc / "JPEGImages").mkdir(parents=True, exist_ok=True)
            (voc / "SegmentationClass").mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(
                voc / "JPEGImages" / f"{name}.jpg")
            mask = np.zeros((24, 32), dtype=np.uint8)
            mask[6:18, 8:24] = 15
            Image.fromarray(mask).save(voc / "SegmentationClass" / f"{name}.png")
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names))


def _cifar10(root: Path) -> None:
    (root / "cifar-10-batches-py").mkdir(parents=True)


def _junk(root: Path) -> None:
    (root / "empty").mkdir(parents=True)
    (root / "notes.txt").write_text("no images here")


MAKE: dict[str, Callable[[Path], None]] = {
    "imagefolder (train/test)": _imagefolder_test, "imagefolder (train/val)": _imagefolder_val,
    "imagefolder-tree": _imagefolder_tree, "coco": _coco, "masks": _masks,
    "masks (train/val)": _masks_split, "voc": _voc, "cifar10": _cifar10,
}
# (layout made, the layout it is, the data set it trains as, train and test items)
CASES = {
    "imagefolder (train/test)": ("imagefolder", "folder", 6, 4),
    "imagefolder (train/val)": ("imagefolder", "folder", 6, 4),
    "imagefolder-tree": ("imagefolder-tree", "folder", 8, 2),
    "coco": ("coco", "coco", 6, 2),
    "masks": ("masks", "folder", 5, 1),
    "masks (train/val)": ("masks", "folder", 4, 2),
    "voc": ("voc", "voc", 2, 1),
    "cifar10": ("cifar10", "cifar10", None, None),
}
CLASSIFIERS = ["imagefolder (train/test)", "imagefolder (train/val)", "imagefolder-tree"]
SCRIPTS = {
    "dfpn": (dfpn.main, ["--model", "resnet50", "--image-size", "16"], CLASSIFIERS),
    "resizer": (resizer.main, ["--model", "vgg16_resizer_cbam", "--arch", "vgg_tiny",
                               "--output-size", "32", "--image-size", "8"], CLASSIFIERS),
    "detector": (detector.main, ["--neck", "fpn_bilinear", "--backbone", "efficientnet_tiny",
                                 "--image-size", "48"], ["coco"]),
    "dilatednet": (dilatednet.main, ["--image-size", "32", "--width", "2", "--fc-channels", "8",
                                     "--dropout", "0"], ["masks", "masks (train/val)", "voc"]),
}
# What a script's refusal names: its layouts, by their titles.
READS = {"dfpn": ["an ImageFolder with splits", "an ImageFolder tree", "CIFAR-10"],
         "detector": ["a COCO folder"], "dilatednet": ["a mask folder", "Pascal VOC 2012"]}
READS["resizer"] = READS["dfpn"]


@pytest.mark.parametrize("made", sorted(MAKE))
def test_each_layout_is_recognised_as_itself_first(tmp_path, made):
    MAKE[made](tmp_path)
    assert find_layouts(tmp_path)[0] is LAYOUTS[CASES[made][0]]


@pytest.mark.parametrize(("script", "made"), [(script, made) for script, (_, _, made_list)
                                              in SCRIPTS.items() for made in made_list])
def test_each_script_trains_on_each_layout_it_reads(tmp_path, script, made):
    MAKE[made](tmp_path / "data")
    main, flags, _ = SCRIPTS[script]
    _, dataset, n_train, n_test = CASES[made]
    out = tmp_path / "run"
    assert main([*flags, "--data", str(tmp_path / "data"), "--batch-size", "2", "--epochs", "1",
                 "--workers", "0", "--device", "cpu", "--out", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == dataset
    assert (metrics["train_samples"], metrics["test_samples"]) == (n_train, n_test)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
@pytest.mark.parametrize("bad", ["junk", "missing", "another script's"])
def test_a_root_no_layout_of_the_script_fits_is_refused_naming_both(tmp_path, capsys, script,
                                                                    bad):
    main, flags, made_list = SCRIPTS[script]
    root = tmp_path / "data"
    other = "coco" if script != "detector" else "masks"
    if bad == "junk":
        _junk(root)
    elif bad == "another script's":
        MAKE[other](root)
    assert main([*flags, "--data", str(root), "--epochs", "1", "--workers", "0", "--device",
                 "cpu", "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "matches no layout this script reads" in err and "Traceback" not in err
    for title in READS[script]:
        assert title in err
    found = {"junk": "holds empty/, notes.txt", "missing": "does not exist",
             "another script's": f"({LAYOUTS[CASES[other][0]].title}, which this script does "
             "not read)"}
    assert found[bad] in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


def test_download_picks_the_downloadable_set_of_an_empty_root(tmp_path):
    config = TrainConfig(model="m", out=tmp_path, data=tmp_path / "nothing", dataset="auto",
                         download=True)
    assert resolve_dataset(config, ("imagefolder", "cifar10"), "folder").dataset == "cifar10"
    assert resolve_dataset(config, ("masks", "voc"), "folder").dataset == "voc"
    with pytest.raises(DataError, match="a COCO folder"):
        resolve_dataset(config, ("coco",), "coco")
    named = TrainConfig(model="m", out=tmp_path, data=tmp_path, dataset="digits")
    assert resolve_dataset(named, ("coco",), "coco") is named
    bare = TrainConfig(model="m", out=tmp_path, dataset="auto")
    assert resolve_dataset(bare, ("coco",), "digits-canvas").dataset == "digits-canvas"


def test_cifar10_folder_is_read_as_cifar10(tmp_path, capsys):
    """torchvision's CIFAR-10 folder goes to its loader (which here finds the files missing)."""
    _cifar10(tmp_path / "data")
    assert resizer.main(["--model", "vgg16", "--data", str(tmp_path / "data"), "--out",
                         str(tmp_path / "run"), "--quiet"]) == 2
    assert "CIFAR-10 not found" in capsys.readouterr().err


def test_issue_example_resizer_on_train_and_test_class_folders(tmp_path):
    """The issue's command: the resizer script on an ImageFolder with train/ and test/."""
    _imagefolder_test(tmp_path / "data")
    torch.manual_seed(0)
    flags = ["--model", "vgg16_resizer_cbam", "--data", str(tmp_path / "data"), "--arch",
             "vgg_tiny", "--output-size", "32", "--image-size", "8", "--epochs", "1",
             "--batch-size", "4", "--out", str(tmp_path / "run"), "--quiet"]
    assert resizer.main(flags) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["classes"] == ["green", "red"] and metrics["config"]["dataset"] == "folder"
