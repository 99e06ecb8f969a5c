"""VGG on CIFAR-10 behind a learnable resizer, with or without CBAM (seed 003 of the studies).

- :mod:`~examples.resizer_classifier.models`: :data:`MODELS` (``vgg16``, ``vgg16_resizer``,
  ``vgg16_resizer_cbam``), :class:`ResizedClassifier` and :func:`build_vgg`;
- :mod:`~examples.resizer_classifier.figure`: the study's figure 8 (bilinear vs resizer output
  vs their difference) and its command ``python -m examples.resizer_classifier.figure``.
"""

from __future__ import annotations

from examples.resizer_classifier.models import (
    MODELS,
    BilinearResize,
    ResizedClassifier,
    build_vgg,
)

__all__ = ["MODELS", "BilinearResize", "ResizedClassifier", "build_vgg"]
