"""Train one of the resizer study's classifiers (seed 003, Table 1) with the study's recipe.

Examples::

    python -m examples.resizer_classifier.train --model vgg16_resizer_cbam --data ~/cifar \\
        --download --out runs/cbam
    python -m examples.resizer_classifier.train --model vgg16 --cutmix-p 0 --data ~/cifar \\
        --weights ~/vgg16-imagenet.pt --out runs/vgg
    python -m examples.resizer_classifier.train --model vgg16_resizer --data ~/pictures \\
        --out runs/pictures
    python -m examples.resizer_classifier.train --model vgg16_resizer_cbam --dataset digits \\
        --image-size 8 --arch vgg_tiny --output-size 32 --no-hflip --epochs 6 --lr-milestones 2 3 \\
        --out runs/digits
    torchrun --nproc_per_node=4 -m examples.resizer_classifier.train --model vgg16_resizer \\
        --data ~/cifar --out runs/resizer

``--data ROOT`` is read as what it holds (an ImageFolder, CIFAR-10's folder; an empty ROOT with
``--download`` fetches CIFAR-10; :mod:`examples.harness.layouts`). The defaults are the study's
recipe: CIFAR-10 at 32x32; RandomCrop(32, padding=4), horizontal
flip and ImageNet normalisation for training, normalisation only for testing; CutMix on a train
batch with probability 0.5; SGD with lr 0.01 and plain (not Nesterov) momentum 0.9, batch size
128, 300 epochs, the rate multiplied by 0.1 after epochs 100 and 150; the VGG enlarges to
224x224. The study does not give its weight decay; 5e-4, the usual value for VGG on CIFAR-10,
is the default here. ``--weights`` starts the VGG from a local ImageNet state_dict, as the
study's pre-trained VGG16 (nothing is downloaded). Outputs in ``--out``: ``checkpoint.pt``
(after every epoch; ``--resume`` continues it), ``best.pt`` (the epoch with the best test
accuracy, the study's choice of model), ``metrics.json`` (whose ``config.options`` hold
``arch``, ``output_size`` and the CutMix settings) and ``curves.png``.
"""

from __future__ import annotations

import argparse
import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn
from torch.utils.data import Dataset

from examples.harness import main as harness_main
from examples.harness.checkpoint import CheckpointError
from examples.harness.config import TrainConfig, bounded_float, positive_float
from examples.harness.tasks import ClassificationTask
from examples.resizer_classifier.data import DATASETS, RandomCutMix, build_datasets
from examples.resizer_classifier.models import ARCHS, MIN_OUTPUT_SIZE, MODELS

__all__ = ["CUTMIX_ALPHA", "CUTMIX_P", "RECIPE", "RESIZERS", "ResizerTask", "main",
           "model_factory", "recipe_config"]

CUTMIX_P = 0.5
CUTMIX_ALPHA = 1.0
# The harness flags the study fixes (seed 003, "model settings" and "data pre-processing").
RECIPE: dict[str, object] = {
    "dataset": "cifar10", "image_size": 32, "epochs": 300, "batch_size": 128, "optimizer": "sgd",
    "lr": 0.01, "momentum": 0.9, "nesterov": False, "weight_decay": 5e-4,
    "lr_milestones": [100, 150], "lr_gamma": 0.1,
}
# What enlarges the image in each model, as the study names it.
RESIZERS = {"vgg16": "bilinear", "vgg16_resizer": "Resizer", "vgg16_resizer_cbam": "Resizer_CBAM"}


class ResizerTask(ClassificationTask):
    """Classification on the study's data (:func:`~examples.resizer_classifier.data.
    build_datasets`), train batches mixed by :class:`~examples.resizer_classifier.data.
    RandomCutMix`.

    The CutMix settings are read from ``config.options`` when the data is built (where the
    number of classes becomes known): ``cutmix_p`` (default :data:`CUTMIX_P`; 0 leaves the
    batches and their hard labels alone) and ``cutmix_alpha`` (default :data:`CUTMIX_ALPHA`).
    """

    def __init__(self) -> None:
        super().__init__(build=build_datasets, datasets_accepted=DATASETS,
                         default_dataset="cifar10")

    def datasets(self, config: TrainConfig) -> tuple[Dataset, Dataset, list[str]]:
        train, test, classes = super().datasets(config)
        p = float(config.options.get("cutmix_p", CUTMIX_P))
        alpha = float(config.options.get("cutmix_alpha", CUTMIX_ALPHA))
        self.mix = RandomCutMix(len(classes), p, alpha) if p > 0 else None
        return train, test, classes


def model_factory(model: str, *, arch: str = "vgg16", output_size: int = 224,
                  weights: str | Path | None = None) -> Callable[..., nn.Module]:
    """``factory(num_classes=...)`` building ``MODELS[model]`` with these settings.

    A ``weights`` file that cannot be read as ``arch``'s ImageNet state_dict raises
    :class:`~examples.harness.checkpoint.CheckpointError` naming it when the model is built.
    """
    build = MODELS[model]

    def factory(num_classes: int) -> nn.Module:
        try:
            return build(num_classes=num_classes, output_size=output_size, arch=arch,
                         weights=weights)
        except (OSError, RuntimeError, ValueError, pickle.UnpicklingError) as exc:
            if weights is None:
                raise
            raise CheckpointError(f"--weights {weights}: {exc}") from exc

    return factory


def recipe_config(model: str, out: Path, **changes: object) -> TrainConfig:
    """The study's :class:`~examples.harness.config.TrainConfig` for ``model``, with
    ``changes`` (``options={"arch": "vgg_tiny", "output_size": 32, "cutmix_p": 0}``, say)."""
    options = {"arch": "vgg16", "output_size": 224, "weights": None, "cutmix_p": CUTMIX_P,
               "cutmix_alpha": CUTMIX_ALPHA, "normalize": "imagenet", "hflip": True,
               **changes.pop("options", {})}
    fields = {**RECIPE, "lr_milestones": list(RECIPE["lr_milestones"]), **changes}
    return TrainConfig(model=model, out=out, options=options, **fields)


def _output_size(text: str) -> int:
    value = int(text)
    if value < MIN_OUTPUT_SIZE:
        raise argparse.ArgumentTypeError(f"must be >= {MIN_OUTPUT_SIZE} (VGG's five max-pools), "
                                         f"got {value}")
    return value






def _arguments(parser: argparse.ArgumentParser) -> None:
    # --dataset stays "auto": --data decides (CIFAR-10 where it lies or is to be downloaded).
    parser.set_defaults(**{key: value for key, value in RECIPE.items() if key != "dataset"})
    study = parser.add_argument_group("resizer study")
    study.add_argument("--arch", choices=ARCHS, default="vgg16",
                       help="the VGG behind the resizer (vgg_tiny: a narrow VGG16 for CPU runs)")
    study.add_argument("--output-size", type=_output_size, default=224,
                       help="size the resizer enlarges to, the VGG's input (the study: 224)")
    study.add_argument("--weights", type=Path, default=None,
                       help="local file with --arch's ImageNet state_dict (default: random init)")
    study.add_argument("--cutmix-p", type=bounded_float(0.0, 1.0), default=CUTMIX_P,
                       help="probability of CutMix on a train batch (0: never)")
    study.add_argument("--cutmix-alpha", type=positive_float, default=CUTMIX_ALPHA,
                       help="CutMix's Beta(alpha, alpha) for the pasted area")
    study.add_argument("--normalize", choices=("imagenet", "none"), default="imagenet",
                       help="input normalisation (the study: ImageNet's mean and std)")
    study.add_argument("--hflip", action=argparse.BooleanOptionalAction, default=True,
                       help="random horizontal flips of train images (--no-hflip for digits, "
                       "whose mirror images are other shapes)")


def _setup(args: argparse.Namespace, config: TrainConfig) -> Mapping[str, Callable[..., nn.Module]]:
    if args.weights is not None and not args.weights.is_file():
        raise CheckpointError(f"--weights {args.weights} does not exist or is not a file")
    if os.environ.get("RANK", "0") == "0":
        size = args.image_size
        print(f"{args.model}: arch {args.arch} behind {RESIZERS[args.model]}, {size}x{size} -> "
              f"{args.output_size}x{args.output_size}, CutMix p={args.cutmix_p:g}, "
              f"{'ImageNet weights from ' + str(args.weights) if args.weights else 'random init'}",
              flush=True)
    return {args.model: model_factory(args.model, arch=args.arch, output_size=args.output_size,
                                      weights=args.weights)}


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 for a data, checkpoint or weights error)."""
    return harness_main(argv, MODELS, description=__doc__, task=ResizerTask(),
                        extra_arguments=_arguments, setup_run=_setup)


if __name__ == "__main__":
    raise SystemExit(main())
