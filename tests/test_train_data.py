"""Data sets of the training harness: ImageFolder trees of any image mode, digits, errors."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from examples.dfpn_classifier import train
from examples.harness import DataError, TrainConfig, build_datasets
from examples.harness.checkpoint import atomic_write, get_rng_state, set_rng_state
from examples.harness.data import split_indices
from PIL import Image

SIZE = 16
# (mode, width, height): grey, grey+alpha, palette, RGBA, bilevel, RGB, odd and tall sizes
IMAGES = [("L", 13, 7), ("LA", 9, 9), ("P", 20, 11), ("RGBA", 31, 5), ("1", 8, 8), ("RGB", 3, 17)]


def _tree(root: Path, classes: tuple[str, ...] = ("cat", "dog")) -> int:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i, (mode, w, h) in enumerate(IMAGES):
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).convert(mode).save(root / name / f"{i}.png")
    return len(classes) * len(IMAGES)


def _config(data: Path | None, **kwargs: object) -> TrainConfig:
    return TrainConfig(model="resnet50", out=Path("unused"), data=data, image_size=SIZE, **kwargs)


def _check_images(dataset) -> None:
    for image, label in dataset:
        assert image.shape == (3, SIZE, SIZE) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1 and isinstance(int(label), int)


def test_image_folder_with_train_and_test_of_mixed_modes(tmp_path):
    n_train, n_test = _tree(tmp_path / "train"), _tree(tmp_path / "test")
    train_set, test_set, classes = build_datasets(_config(tmp_path))
    assert (len(train_set), len(test_set), classes) == (n_train, n_test, ["cat", "dog"])
    _check_images(train_set)


def test_single_image_folder_is_split_per_class(tmp_path):
    total = _tree(tmp_path, ("a", "b", "c"))
    fraction = 0.4
    train_set, test_set, classes = build_datasets(_config(tmp_path, val_fraction=fraction))
    per_class = total // len(classes)
    assert len(test_set) == len(classes) * round(fraction * per_class)
    assert len(train_set) + len(test_set) == total
    assert set(train_set.indices).isdisjoint(test_set.indices)


def test_train_script_runs_on_an_image_folder(tmp_path):
    _tree(tmp_path / "data" / "train")
    _tree(tmp_path / "data" / "test")
    out = tmp_path / "out"
    assert train.main(["--model", "resnet50", "--data", str(tmp_path / "data"), "--image-size",
                       str(SIZE), "--batch-size", "4", "--epochs", "1", "--out", str(out),
                       "--quiet", "--workers", "0"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_classes"] == 2 and metrics["classes"] == ["cat", "dog"]


def test_split_is_stratified_and_fixed():
    targets = [i % 3 for i in range(30)] + [3]
    train_idx, test_idx = split_indices(targets, 0.2)
    assert (train_idx, test_idx) == split_indices(targets, 0.2)
    assert Counter(targets[i] for i in test_idx) == {0: 2, 1: 2, 2: 2}
    assert sorted(train_idx + test_idx) == list(range(len(targets)))


def test_digits_is_the_real_bundled_set():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train_set, test_set, classes = build_datasets(_config(None, dataset="digits"))
    assert len(train_set) + len(test_set) == len(target)
    assert classes == [str(c) for c in sorted(set(target.tolist()))]
    for label, count in Counter(test_set.tensors[1].tolist()).items():
        assert count == round(0.2 * int((target == label).sum()))
    _check_images(test_set)
    limited = build_datasets(_config(None, dataset="digits", limit=50))
    assert (len(limited[0]), len(limited[1])) == (50, 50)


@pytest.mark.parametrize("layout", ["missing", "empty", "class folders without images"])
def test_unusable_folder_names_the_path(tmp_path, capsys, layout):
    root = tmp_path / "data"
    if layout != "missing":
        root.mkdir()
    if layout == "class folders without images":
        (root / "a").mkdir()
        (root / "b").mkdir()
        (root / "b" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=str(root)):
        build_datasets(_config(root))
    assert train.main(["--model", "resnet50", "--data", str(root), "--out",
                       str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(root) in err and "Traceback" not in err


def test_unreadable_image_names_the_file(tmp_path):
    _tree(tmp_path)
    broken = tmp_path / "cat" / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    train_set, _, _ = build_datasets(_config(tmp_path, val_fraction=0.5))
    tree = train_set.dataset
    with pytest.raises(DataError, match="broken.png"):
        tree[tree.imgs.index((str(broken), 0))]


def test_cifar10_never_downloads_without_the_flag(tmp_path):
    with pytest.raises(DataError, match="--download"):
        build_datasets(_config(tmp_path, dataset="cifar10"))
    assert list(tmp_path.iterdir()) == []


def test_rng_state_survives_a_weights_only_round_trip(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)
    torch.save(get_rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1)) == expected


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "file.bin"
    path.write_bytes(b"old")

    def fail(f) -> None:
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new" and list(tmp_path.iterdir()) == [path]
