"""Segmentation data of the DilatedNet example: digit canvases, folders, VOC, transforms, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from examples.dilatednet.data import (
    CANVAS_CLASSES,
    IGNORE_INDEX,
    VOC_CLASSES,
    DigitsSegmentationCanvas,
    SegmentationFiles,
    build_segmentation_datasets,
    segmentation_transforms,
    write_segmentation_folder,
)
from examples.harness import DataError
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import DataLoader

CANVAS = (40, 56)  # (H, W), not square, so a swapped axis shows
SQUARE = 48


def _canvas(split: str = "val", count: int = 6, **kwargs: object) -> DigitsSegmentationCanvas:
    return DigitsSegmentationCanvas(split, count, seed=kwargs.pop("seed", 1), canvas_size=CANVAS,
                                    **kwargs)


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _save(path, array: np.ndarray, mode: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "P":  # indices with a colour palette, as VOC's SegmentationClass files
        image = Image.frombytes("P", array.shape[::-1], np.ascontiguousarray(array).tobytes())
        image.putpalette([v for k in range(256) for v in (k, 255 - k, 7 * k % 256)])
    else:
        image = Image.fromarray(array)
    image.save(path)


def _pair(root, name: str, size=(20, 30), mask: np.ndarray | None = None) -> None:
    rng = np.random.default_rng(len(name))
    _save(root / "images" / f"{name}.png", rng.integers(0, 256, (*size, 3), dtype=np.uint8))
    if mask is None:
        mask = rng.integers(0, 3, size, dtype=np.uint8)
    _save(root / "masks" / f"{name}.png", mask)


def test_canvases_are_deterministic_and_differ_between_indices_splits_and_seeds():
    train = _canvas("train", 5)
    first = [train[i] for i in range(5)]
    torch.manual_seed(123)
    np.random.seed(123)
    again = _canvas("train", 5)
    assert all(_same(a, again[i]) for i, a in enumerate(first))
    assert all(_same(train[i], first[i]) for i in reversed(range(5)))
    assert not any(_same(first[i], first[j]) for i in range(5) for j in range(i))
    val, other_seed = _canvas("val", 5), _canvas("train", 5, seed=2)
    assert not any(_same(first[i], val[i]) or _same(first[i], other_seed[i]) for i in range(5))
    assert set(train.digit_indices).isdisjoint(val.digit_indices)
    assert all(p.digit in train.digit_indices for i in range(5) for p in train.placements(i))
    assert all(p.digit in val.digit_indices for i in range(5) for p in val.placements(i))


def test_canvases_are_the_same_in_a_worker_process():
    dataset = _canvas("train", 3)
    loader = DataLoader(dataset, batch_size=None, num_workers=1)
    assert all(_same(item, dataset[i]) for i, item in enumerate(loader))


def test_canvas_items_are_images_and_masks_of_eleven_classes():
    dataset = _canvas("train", 12, max_digits=3)
    assert dataset.classes == CANVAS_CLASSES == ["background", *"0123456789"]
    counts = set()
    for image, mask in dataset:
        assert image.shape == (3, *CANVAS) and image.dtype == torch.float32
        assert 0 <= image.min() and image.max() <= 1
        assert mask.shape == CANVAS and mask.dtype == torch.int64
        assert 0 <= mask.min() and mask.max() <= 10
        counts.add(len(mask.unique()) - 1)
    assert counts - {0} and max(counts) > 1


def test_masks_label_the_strokes_of_each_digit():
    bunch = load_digits()
    dataset = _canvas("train", 10, noise=0.0)
    for index in range(len(dataset)):
        image, mask = dataset[index]
        outside = torch.ones(CANVAS, dtype=torch.bool)
        for placement in dataset.placements(index):
            x1, y1, x2, y2 = placement.box
            outside[y1:y2, x1:x2] = False
            assert placement.label == bunch.target[placement.digit] + 1
            glyph = bunch.images[placement.digit] / 16.0
            rows, cols = np.nonzero(glyph.any(1))[0], np.nonzero(glyph.any(0))[0]
            glyph = torch.as_tensor(glyph[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])
            ink = F.interpolate(glyph[None, None], size=(y2 - y1, x2 - x1), mode="bilinear",
                                align_corners=False)[0, 0]
            strokes = ink > dataset.threshold
            assert strokes.any()
            expected = torch.where(strokes, placement.label, 0)
            assert torch.equal(mask[y1:y2, x1:x2], expected)
        assert (mask[outside] == 0).all()
        # Without noise the background is one colour, and the strokes stand out from it.
        background = image[:, outside][:, :1]
        assert torch.equal(image[:, outside], background.expand(-1, int(outside.sum())))
        contrast = (image[:, mask > 0] - background).abs().amax(0)
        assert (contrast > 0.1).all()


def test_flip_moves_the_mask_with_the_image():
    # On a square canvas a crop of the whole area is the whole image, whatever its drawn ratio.
    raw = DigitsSegmentationCanvas("train", 3, seed=1, canvas_size=(SQUARE, SQUARE))
    flip = segmentation_transforms(SQUARE, train=True, scale=(1.0, 1.0), flip_p=1.0,
                                   photometric_p=0.0)
    flipped = DigitsSegmentationCanvas("train", 3, seed=1, canvas_size=(SQUARE, SQUARE),
                                       transforms=flip)
    for index in range(3):
        (image, mask), (image_f, mask_f) = raw[index], flipped[index]
        assert torch.equal(mask_f, mask.flip(-1))
        torch.testing.assert_close(image_f, image.flip(-1))


def test_photometric_changes_the_image_only():
    raw = DigitsSegmentationCanvas("train", 2, seed=1, canvas_size=(SQUARE, SQUARE))
    colour = segmentation_transforms(SQUARE, train=True, scale=(1.0, 1.0), flip_p=0.0,
                                     photometric_p=1.0)
    distorted = DigitsSegmentationCanvas("train", 2, seed=1, canvas_size=(SQUARE, SQUARE),
                                         transforms=colour)
    torch.manual_seed(4)
    for index in range(2):
        (image, mask), (image_d, mask_d) = raw[index], distorted[index]
        assert torch.equal(mask_d, mask)
        assert not torch.allclose(image_d, image, atol=1e-3)


def test_random_crops_keep_every_mask_pixel_on_its_colour(tmp_path):
    # Quadrant labels 1-4 and an ignored band, each painted in its own colour: wherever the
    # mask is uniform around a pixel, the transformed image must show that label's colour.
    mask = torch.ones(32, 32, dtype=torch.uint8)
    mask[:, 16:] += 1
    mask[16:] += 2
    mask[14:18] = IGNORE_INDEX
    palette = torch.zeros(256, 3, dtype=torch.uint8)
    palette[1:5] = torch.tensor([[250, 10, 10], [10, 250, 10], [10, 10, 250], [250, 250, 10]])
    palette[IGNORE_INDEX] = torch.tensor([128, 128, 128])
    _save(tmp_path / "images" / "q.png", palette[mask.long()].numpy())
    _save(tmp_path / "masks" / "q.png", mask.numpy())
    transforms = segmentation_transforms((48, 40), train=True, photometric_p=0.0)
    files = SegmentationFiles([(tmp_path / "images" / "q.png", tmp_path / "masks" / "q.png")], 5,
                              transforms)
    flipped = set()
    for seed in range(10):
        torch.manual_seed(seed)
        out, out_mask = files[0]
        assert out.shape == (3, 48, 40) and out.dtype == torch.float32
        assert out_mask.shape == (48, 40) and out_mask.dtype == torch.int64
        assert set(out_mask.unique().tolist()) <= {1, 2, 3, 4, IGNORE_INDEX}
        m = out_mask.float()[None, None]
        uniform = (F.max_pool2d(m, 7, 1, 3) == -F.max_pool2d(-m, 7, 1, 3))[0, 0]
        assert uniform.any()
        expected = palette[out_mask[uniform]].float().T / 255
        torch.testing.assert_close(out[:, uniform], expected, rtol=0, atol=2 / 255)
        left, right = out_mask[:, :4].flatten(), out_mask[:, -4:].flatten()
        if (left == 1).any() and (right == 2).any():
            flipped.add(False)
        if (left == 2).any() and (right == 1).any():
            flipped.add(True)
    assert flipped == {True, False}


def test_folder_round_trip_with_classes_file(tmp_path):
    raw = _canvas("val", 5)
    write_segmentation_folder(raw, tmp_path)
    train, val, classes = build_segmentation_datasets("folder", tmp_path, CANVAS, None, seed=0)
    assert classes == CANVAS_CLASSES
    assert len(train) + len(val) == 5 and len(val) == 1
    assert set(train.indices).isdisjoint(val.indices)
    index = val.indices[0]
    image, mask = val[0]
    assert image.dtype == torch.float32 and mask.dtype == torch.int64
    assert torch.equal(mask, raw[index][1])
    torch.testing.assert_close(image, raw[index][0], rtol=0, atol=0.5 / 255 + 1e-6)
    image_t, mask_t = train[0]
    assert image_t.shape == (3, *CANVAS) and mask_t.shape == CANVAS
    again = build_segmentation_datasets("folder", tmp_path, CANVAS, None, seed=5)
    assert again[1].indices == val.indices


def test_train_and_val_subfolders_and_classes_read_from_the_masks(tmp_path):
    write_segmentation_folder(_canvas("train", 3), tmp_path / "train")
    write_segmentation_folder(_canvas("val", 2), tmp_path / "val")
    train, val, classes = build_segmentation_datasets("folder", tmp_path, 24, None, seed=0)
    assert (len(train), len(val)) == (3, 2)
    largest = max(int(mask.max()) for data in (_canvas("train", 3), _canvas("val", 2))
                  for _, mask in data)
    assert classes == ["background", *(f"class_{k}" for k in range(1, largest + 1))]
    image, mask = val[1]
    # the network sees the image at --image-size; the label keeps its own size, to be scored so
    assert image.shape == (3, 24, 24) and torch.equal(mask, _canvas("val", 2)[1][1])
    assert train[0][1].shape == (24, 24)


def test_ignore_index_and_palette_masks_are_read(tmp_path):
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:15, 5:20] = 2
    mask[4, :] = IGNORE_INDEX
    for name in ("a", "b"):
        _pair(tmp_path, name, mask=mask)
    _save(tmp_path / "masks" / "b.png", mask, mode="P")
    (tmp_path / "classes.txt").write_text("background\ncat\ndog\n")
    with Image.open(tmp_path / "masks" / "b.png") as palette, \
            Image.open(tmp_path / "masks" / "a.png") as grey:
        assert (palette.mode, grey.mode) == ("P", "L")
    train, val, classes = build_segmentation_datasets("folder", tmp_path, (20, 30), None, 0)
    assert classes == ["background", "cat", "dog"]
    assert torch.equal(val[0][1], torch.from_numpy(mask).long())
    assert set(train[0][1].unique().tolist()) <= {0, 2, IGNORE_INDEX}
    files = SegmentationFiles([(tmp_path / "images" / f"{name}.png",
                                tmp_path / "masks" / f"{name}.png") for name in "ab"], 3)
    for _, got in files:
        assert torch.equal(got, torch.from_numpy(mask).long())


def test_voc_layout_through_torchvision(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    splits = {"train": ["2007_000032", "2007_000033"], "val": ["2007_000039"]}
    rng = np.random.default_rng(0)
    for split, names in splits.items():
        for name in names:
            _save(voc / "JPEGImages" / f"{name}.jpg",
                  rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
            mask = np.zeros((24, 32), dtype=np.uint8)
            mask[6:18, 8:24] = 15
            mask[5, 8:24] = IGNORE_INDEX
            _save(voc / "SegmentationClass" / f"{name}.png", mask, mode="P")
        (voc / "ImageSets" / "Segmentation").mkdir(parents=True, exist_ok=True)
        (voc / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names))
    train, val, classes = build_segmentation_datasets("voc", tmp_path, (24, 32), None, 0)
    assert classes == VOC_CLASSES and len(classes) == 21 and classes[15] == "person"
    assert (len(train), len(val)) == (2, 1)
    image, mask = val[0]
    assert image.shape == (3, 24, 32)
    assert set(mask.unique().tolist()) == {0, 15, IGNORE_INDEX}
    with pytest.raises(DataError, match="--download"):
        build_segmentation_datasets("voc", tmp_path / "elsewhere", 24, None, 0)


def _mask_too_wide(root):
    _pair(root, "b", mask=np.zeros((20, 31), dtype=np.uint8))
    return "b.png", "masks"


def _class_out_of_range(root):
    (root / "classes.txt").write_text("background\ncat\ndog\n")
    _pair(root, "b", mask=np.full((20, 30), 3, dtype=np.uint8))
    return "b.png", r"class indices \[3\]; expected 0..2 or 255"


def _colour_mask(root):
    _pair(root, "b")
    _save(root / "masks" / "b.png", np.zeros((20, 30, 3), dtype=np.uint8))
    return "b.png", "mode RGB"


def _unreadable_image(root):
    _pair(root, "b")
    (root / "images" / "b.png").write_bytes(b"not a png")
    return "b.png", "cannot read image"


def _image_without_mask(root):
    _pair(root, "b")
    (root / "masks" / "b.png").unlink()
    return "images/b.png", "has no mask"


def _mask_without_image(root):
    _pair(root, "b")
    (root / "images" / "b.png").unlink()
    return "masks/b.png", "has no image"


@pytest.mark.parametrize("make", [_mask_too_wide, _class_out_of_range, _colour_mask,
                                  _unreadable_image, _image_without_mask, _mask_without_image])
def test_bad_data_raises_data_error_naming_the_file(tmp_path, make):
    for name in ("a", "c", "d"):
        _pair(tmp_path, name)
    name, message = make(tmp_path)
    with pytest.raises(DataError, match=message) as caught:
        train, val, _ = build_segmentation_datasets("folder", tmp_path, 16, None, 0)
        for data in (train, val):
            for index in range(len(data)):
                data[index]
    assert name in str(caught.value)


def test_unknown_data_set_and_missing_root_are_data_errors(tmp_path):
    with pytest.raises(DataError, match="unknown segmentation data set 'coco'"):
        build_segmentation_datasets("coco", tmp_path, 16, None, 0)
    with pytest.raises(DataError, match="needs --data"):
        build_segmentation_datasets("folder", None, 16, None, 0)
    with pytest.raises(DataError, match="does not exist"):
        build_segmentation_datasets("folder", tmp_path / "nothing", 16, None, 0)
    with pytest.raises(DataError, match="images"):
        build_segmentation_datasets("folder", tmp_path, 16, None, 0)


def test_digits_canvas_data_sets_follow_size_seed_and_limit():
    train, val, classes = build_segmentation_datasets("digits-canvas", None, (32, 48), None, 7,
                                                      train_count=6, val_count=4)
    assert classes == CANVAS_CLASSES and (len(train), len(val)) == (6, 4)
    image, mask = train[0]
    assert image.shape == (3, 32, 48) and mask.shape == (32, 48)
    other_train, other_val, _ = build_segmentation_datasets("digits-canvas", None, 32, 3, 8,
                                                            train_count=6, val_count=4)
    assert (len(other_train), len(other_val)) == (3, 3)
    assert other_val[0][0].shape == (3, 32, 32)
    same_val = build_segmentation_datasets("digits-canvas", None, (32, 48), None, 8,
                                           train_count=6, val_count=4)[1]
    assert _same(val[0], same_val[0])
    assert train.placements(0) != build_segmentation_datasets(
        "digits-canvas", None, (32, 48), None, 8, train_count=6)[0].placements(0)
