"""Train seed 001's detector: EfficientNet C3-C5, one of the study's four necks, an SSD head.

Examples::

    python -m examples.detector_neck.train --neck bifpn --data COCO_ROOT --out runs/bifpn
    python -m examples.detector_neck.train --neck fpn_transposed --dataset digits-canvas \\
        --backbone efficientnet_b0 --image-size 128 --epochs 10 --out runs/canvas
    torchrun --nproc_per_node=4 -m examples.detector_neck.train --neck bifpn --data COCO_ROOT

``--data ROOT`` is a COCO-format folder: ``ROOT/train/`` and ``ROOT/val/`` images with
``ROOT/annotations/instances_train.json`` and ``instances_val.json``. ``--dataset
digits-canvas`` pastes scikit-learn's digits onto canvases (offline). Images are resized to
``--image-size`` x ``--image-width`` (the study's 512 x 640 by default). ``--weights PATH``
loads a local state_dict of the EfficientNet (ImageNet weights, say); nothing is downloaded.

Test metrics are COCO's twelve figures (``map`` over IoU 0.5:0.95, ``map50``, ..., ``mar_large``)
from torchmetrics, with COCO's crowd regions and areas, and the pedestrian benchmarks'
log-average miss rate ``mr2`` (MR^-2, lower is better) of the class ``--miss-rate-class`` names
(default: a class called "person" or "pedestrian" if the data has one, else all classes
pooled); ``best.pt`` keeps the epoch with the best mAP@0.5. COCO val images are scored at their
own size: the detector resizes them to ``--image-size`` x ``--image-width`` itself and answers
in each image's coordinates. Outputs in ``--out`` and ``--resume`` work as for every script on
the harness (``checkpoint.pt`` after every epoch, ``metrics.json``, ``curves.png``).
"""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path

from examples.detector_neck.data import build_detection_datasets
from examples.detector_neck.models import BACKBONES, NECKS, build_ssd
from examples.harness import main as harness_main
from examples.harness.config import TrainConfig
from examples.harness.data import DataError
from examples.harness.loop import ModelFactory
from examples.harness.tasks import DetectionTask

__all__ = ["DATASETS", "TASK", "main"]

DATASETS = ("coco", "digits-canvas")


def image_size(config: TrainConfig) -> tuple[int, int]:
    """``(H, W)`` of the run: ``--image-size`` by ``--image-width`` (square without it)."""
    width = config.options.get("image_width")
    return config.image_size, int(width) if width else config.image_size


def _datasets(config: TrainConfig):
    return build_detection_datasets(config.dataset, config.data, image_size(config),
                                    config.limit, config.seed)


TASK = DetectionTask(_datasets, DATASETS, default_dataset="coco")


def _arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("detector")
    group.add_argument("--backbone", choices=BACKBONES, default="efficientnet_b4",
                       help="torchvision EfficientNet (b0 for quick runs)")
    group.add_argument("--weights", type=Path,
                       help="local state_dict of the backbone (e.g. ImageNet weights)")
    group.add_argument("--image-width", type=int,
                       help="image width (default 640 with the default --image-size 512, "
                       "else --image-size)")
    group.add_argument("--miss-rate-class", metavar="NAME",
                       help="class whose log-average miss rate (mr2) is reported (default: "
                       "'person' or 'pedestrian' if the data has one, else all classes)")
    # The study: 512 x 640 images, batch 16. AdamW at 1e-3 (the harness's default) learns the
    # randomly initialised backbone and neck; SSD's SGD recipe assumes ImageNet weights.
    parser.set_defaults(image_size=512, batch_size=16, epochs=100, weight_decay=1e-4)


def _models(args: argparse.Namespace, config: TrainConfig) -> dict[str, ModelFactory]:
    if args.weights is not None and not args.weights.is_file():
        raise DataError(f"--weights {args.weights} not found")
    if args.image_width is None and config.image_size == 512:
        config.options["image_width"] = 640
    size = image_size(config)
    return {neck: partial(build_ssd, neck, image_size=size, backbone=args.backbone,
                          weights=args.weights)
            for neck in NECKS}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 for a data or checkpoint error)."""
    return harness_main(argv, NECKS, description=__doc__, task=TASK,
                        extra_arguments=_arguments, setup_run=_models,
                        model_flags=("--neck", "--model"))


if __name__ == "__main__":
    raise SystemExit(main())
