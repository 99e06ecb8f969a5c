"""A small training harness shared by the train scripts in ``examples/``.

It is what a user of torchvision's reference scripts expects, in a few short modules:

- :mod:`~examples.harness.config`: the command-line flags and the :class:`TrainConfig` they fill;
- :mod:`~examples.harness.data`: ImageFolder trees, CIFAR-10 and scikit-learn's bundled digits;
- :mod:`~examples.harness.canvases`: the digit canvases generated for detection and segmentation;
- :mod:`~examples.harness.layouts`: what ``--data ROOT`` holds (ImageFolder, COCO, mask folder),
  recognised in one place for every script;
- :mod:`~examples.harness.checkpoint`: atomic, ``weights_only``-loadable checkpoints and resume;
- :mod:`~examples.harness.distributed`: ``torchrun`` / DistributedDataParallel set-up;
- :mod:`~examples.harness.metrics`: running sums reduced over ranks, ``metrics.json``, curves;
- :mod:`~examples.harness.schedule`: the per-epoch learning rate (cosine, or steps) and its resumes;
- :mod:`~examples.harness.tasks`: what differs between classification, detection and segmentation;
- :mod:`~examples.harness.loop`: the epoch loop, :func:`fit` and the script entry :func:`main`.

The library (``src/dilconv``) stays blocks and tools; nothing here is imported by it.
"""

from __future__ import annotations

from examples.harness.checkpoint import CheckpointError
from examples.harness.config import TrainConfig, add_arguments, config_from_args
from examples.harness.data import DataError, build_datasets
from examples.harness.loop import fit, main

__all__ = [
    "CheckpointError",
    "DataError",
    "TrainConfig",
    "add_arguments",
    "build_datasets",
    "config_from_args",
    "fit",
    "main",
]
