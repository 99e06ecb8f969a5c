"""Digit canvases: scikit-learn's 8x8 digits pasted on a dark, noisy image, offline.

One renderer for the generated detection data (boxes around the digits,
:class:`~examples.detector_neck.data.DigitsCanvas`) and the generated segmentation data (masks
of their strokes, :class:`~examples.dilatednet.data.DigitsSegmentationCanvas`): the same seed,
split and index draw the same canvas for both. Everything of item ``i`` comes from one
generator seeded with ``(seed, split, i)`` (:func:`canvas_rng`), so an item is the same on every
call and in every process. Train canvases take their digits from the first 80% of
``load_digits()``, val canvases from the last 20% (:func:`digit_rows`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "SPLITS",
    "Canvas",
    "Placement",
    "canvas_rng",
    "digit_glyphs",
    "digit_rows",
    "draw_canvas",
    "ink_crop",
]

SPLITS = ("train", "val")
_TRAIN_DIGITS = 0.8
_PLACEMENT_TRIES = 50


class Placement(NamedTuple):
    """One digit on a canvas: its row in ``load_digits()``, its class (the digit + 1, 0 being
    the background) and its box (x1, y1, x2, y2) in pixels, end-exclusive."""

    digit: int
    label: int
    box: tuple[int, int, int, int]


class Canvas(NamedTuple):
    """A drawn canvas: the image (3, H, W) float32 in [0, 1], the digits in drawing order, and
    each digit's ink (h, w) float64 in [0, 1] over its box."""

    image: Tensor
    placements: list[Placement]
    inks: list[Tensor]


@cache
def digit_glyphs() -> tuple[Tensor, Tensor]:
    """scikit-learn's 1,797 digits as (images (N, 8, 8) in [0, 1], labels (N,)), loaded once."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return (torch.as_tensor(bunch.images, dtype=torch.float64) / 16.0,
            torch.as_tensor(bunch.target, dtype=torch.int64))


def ink_crop(glyph: Tensor) -> Tensor:
    """The smallest rectangle of ``glyph`` (H, W) that holds all its non-zero pixels."""
    rows, cols = glyph.any(1).nonzero()[:, 0], glyph.any(0).nonzero()[:, 0]
    return glyph[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def digit_rows(split: str) -> range:
    """The rows of ``load_digits()`` that canvases of ``split`` draw from."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    total = len(digit_glyphs()[1])
    n_train = int(_TRAIN_DIGITS * total)
    return range(n_train) if split == "train" else range(n_train, total)


def canvas_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of item ``index`` of ``split`` drawn with ``seed``."""
    return np.random.default_rng((seed, SPLITS.index(split), index))


def _free_spot(rng: np.random.Generator, canvas_size: tuple[int, int], h: int, w: int,
               taken: Sequence[Placement]) -> tuple[int, int] | None:
    height, width = canvas_size
    for _ in range(_PLACEMENT_TRIES):
        x, y = int(rng.integers(width - w + 1)), int(rng.integers(height - h + 1))
        overlaps = any(x < x2 and x1 < x + w and y < y2 and y1 < y + h
                       for x1, y1, x2, y2 in (p.box for p in taken))
        if not overlaps:
            return x, y
    return None


def draw_canvas(rng: np.random.Generator, canvas_size: tuple[int, int], rows: Sequence[int],
                max_digits: int, digit_size: tuple[int, int], noise: float) -> Canvas:
    """Draw 1 to ``max_digits`` digits on a dark, noisy canvas.

    The background is one dark colour (each channel uniform in [0, 0.2]) plus uniform noise of
    amplitude ``noise``. Each digit, a row of ``load_digits()`` picked from ``rows``, is cut to
    its ink, bilinearly scaled so its longer side is ``digit_size[0]`` to ``digit_size[1]`` px,
    and blended in a random bright colour (each channel uniform in [0.5, 1]) at a random place
    that overlaps no earlier digit; one that finds no free place in 50 tries is left out.

    Args:
        rng: the item's generator (:func:`canvas_rng`).
        canvas_size: (H, W) of the image.
        rows: rows of ``load_digits()`` to draw from (:func:`digit_rows`).
        max_digits: most digits on one canvas.
        digit_size: (smallest, largest) longer side of a digit in pixels.
        noise: amplitude of the uniform background noise.

    Shape:
        image (3, H, W) float32 in [0, 1]; ink ``k`` (h_k, w_k) over ``placements[k].box``
    """
    glyphs, digits = digit_glyphs()
    height, width = canvas_size
    image = (torch.from_numpy(rng.uniform(0.0, 0.2, (3, 1, 1)))
             + torch.from_numpy(rng.uniform(-noise, noise, (3, height, width))))
    placed: list[Placement] = []
    inks: list[Tensor] = []
    for _ in range(int(rng.integers(1, max_digits + 1))):
        digit = rows[int(rng.integers(len(rows)))]
        glyph = ink_crop(glyphs[digit])
        longer = int(rng.integers(digit_size[0], digit_size[1] + 1))
        h, w = (max(1, round(side * longer / max(glyph.shape))) for side in glyph.shape)
        spot = _free_spot(rng, canvas_size, h, w, placed)
        if spot is None:
            continue
        x, y = spot
        ink = F.interpolate(glyph[None, None], size=(h, w), mode="bilinear",
                            align_corners=False)[0, 0]
        colour = torch.from_numpy(rng.uniform(0.5, 1.0, (3, 1, 1)))
        image[:, y:y + h, x:x + w] += (colour - image[:, y:y + h, x:x + w]) * ink
        placed.append(Placement(digit, int(digits[digit]) + 1, (x, y, x + w, y + h)))
        inks.append(ink)
    return Canvas(image.clamp_(0, 1).float(), placed, inks)
