"""Figure 8 of the resizer study (seed 003): bilinear enlargement vs the resizer's output.

Rows, top to bottom: the image enlarged by bilinear interpolation, the same image through the
model's resizer, and the absolute difference of the two; one column per test image.

Examples::

    python -m examples.resizer_classifier.figure --model vgg16_resizer_cbam --arch vgg_tiny \\
        --output-size 64 --dataset digits --count 4 --out runs/fig.png
    python -m examples.resizer_classifier.figure --checkpoint runs/cbam/best.pt \\
        --out runs/fig8.png

Without ``--checkpoint`` the model is untrained (``--seed`` draws its weights). A checkpoint of
``python -m examples.resizer_classifier.train`` says its model, ``--arch``, ``--output-size``,
``--normalize``, ``--image-size`` and, for digits or CIFAR-10, ``--dataset`` and ``--data``;
flags given here win over it. Other checkpoints need them given as they were trained.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchvision import datasets, transforms

from dilconv import LearnableResizer
from examples.harness.checkpoint import CheckpointError, atomic_write, load_checkpoint
from examples.harness.data import DataError, digits
from examples.resizer_classifier.data import IMAGENET_MEAN, IMAGENET_STD
from examples.resizer_classifier.models import ARCHS, MODELS, ResizedClassifier

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "main", "resizer_figure"]

# Used where a flag is neither given nor found in the checkpoint.
FALLBACK = {"model": "vgg16_resizer_cbam", "arch": "vgg16", "output_size": 224,
            "dataset": "digits", "data": None, "image_size": 32, "normalize": "none"}


def resizer_figure(
    model: ResizedClassifier,
    images: Tensor,
    path: Path,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    titles: Sequence[str] | None = None,
    dpi: int = 100,
) -> Path:
    """Draw bilinear enlargement, ``model.resize`` and their difference; write a PNG.

    The model runs in eval mode without gradients (its mode is restored afterwards). Both
    enlargements are un-normalised (``x * std + mean``, when given) and clipped to [0, 1] for
    display. The difference is ``|resizer - bilinear|`` in un-normalised, unclipped pixel
    values, averaged over the three channels and divided by each image's own maximum (written
    under the image), so a faint difference is as visible as a strong one; a baseline model,
    whose resizer is bilinear, gives an all-zero (black) row.

    Args:
        model: a :class:`~examples.resizer_classifier.models.ResizedClassifier`.
        images: (N, 3, h, w) low-resolution images, normalised as the model expects, N >= 1.
        path: the PNG to write, atomically; missing parent folders are created.
        mean: per-channel mean the images were normalised with, or ``None``.
        std: per-channel standard deviation the images were normalised with, or ``None``.
        titles: one column title per image (class names, say); ``image i`` by default.
        dpi: resolution of the PNG.

    Shape:
        images (N, 3, h, w) -> a 3 x N grid of (H_out, W_out) images, ``model.output_size``.

    Returns:
        ``path``.
    """
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] < 1:
        raise ValueError(f"resizer_figure expected images of shape (N >= 1, 3, h, w), got "
                         f"{tuple(images.shape)}")
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"resizer_figure expected one title per image ({len(images)}), got "
                         f"{len(titles)}")
    bilinear, resized = _enlarge(model, images)
    bilinear, resized = _unnormalise(bilinear, mean, std), _unnormalise(resized, mean, std)
    difference = (resized - bilinear).abs().mean(1)
    peaks = difference.flatten(1).amax(1)
    scaled = difference / peaks.clamp_min(torch.finfo(peaks.dtype).tiny)[:, None, None]

    name = _resizer_name(model)
    n = len(images)
    fig = Figure(figsize=(1.9 * n + 0.7, 6.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, n, squeeze=False)
    for j in range(n):
        axes[0, j].imshow(_rgb(bilinear[j]), interpolation="nearest")
        axes[1, j].imshow(_rgb(resized[j]), interpolation="nearest")
        axes[2, j].imshow(scaled[j].numpy(), cmap="magma", vmin=0, vmax=1,
                          interpolation="nearest")
        axes[0, j].set_title(titles[j] if titles is not None else f"image {j}", fontsize=9)
        axes[2, j].set_xlabel(f"max {peaks[j].item():.3g}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax, label in zip(axes[:, 0], ("bilinear", name, "|difference|")):
        ax.set_ylabel(label, fontsize=9)
    (h, w), (out_h, out_w) = images.shape[-2:], model.output_size
    fig.suptitle(f"{h}x{w} -> {out_h}x{out_w}: bilinear (top), {name} (middle), "
                 f"|{name} - bilinear| (bottom;\nmean over RGB, each image scaled to its own "
                 f"max, printed below it)", fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=dpi))
    return path


def _enlarge(model: ResizedClassifier, images: Tensor) -> tuple[Tensor, Tensor]:
    device = next(model.parameters()).device
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = images.to(device, torch.float32)
            bilinear = F.interpolate(x, size=model.output_size, mode="bilinear",
                                     align_corners=False)
            resized = model.resize(x)
    finally:
        model.train(training)
    return bilinear.float().cpu(), resized.float().cpu()


def _unnormalise(x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
                 ) -> Tensor:
    if std is not None:
        x = x * torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    if mean is not None:
        x = x + torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    return x


def _rgb(image: Tensor):
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def _resizer_name(model: ResizedClassifier) -> str:
    if not isinstance(model.resizer, LearnableResizer):
        return "bilinear (baseline)"
    return "Resizer_CBAM" if model.resizer.attention == "cbam" else "Resizer"


def _test_images(args: argparse.Namespace) -> tuple[Tensor, list[str], int]:
    """The first ``--count`` test images in [0, 1], their class names, the number of classes."""
    if args.dataset == "digits":
        _, test, classes = digits(args.image_size)
    else:
        if args.data is None:
            raise DataError("--dataset cifar10 needs --data DIR (the folder holding "
                            "cifar-10-batches-py)")
        transform = transforms.Compose([transforms.Resize((args.image_size, args.image_size)),
                                        transforms.ToTensor()])
        try:
            test = datasets.CIFAR10(str(args.data), train=False, transform=transform)
        except RuntimeError as exc:
            raise DataError(f"CIFAR-10 not found under {args.data}: {exc}") from exc
        classes = list(test.classes)
    pairs = [test[i] for i in range(min(args.count, len(test)))]
    images = torch.stack([image for image, _ in pairs])
    return images, [classes[int(label)] for _, label in pairs], len(classes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m examples.resizer_classifier.figure", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS),
                        help=f"default: the checkpoint's, else {FALLBACK['model']}")
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="checkpoint.pt or best.pt of a train run (default: an untrained "
                        "model)")
    parser.add_argument("--arch", choices=ARCHS,
                        help=f"default: the checkpoint's, else {FALLBACK['arch']}")
    parser.add_argument("--output-size", type=int,
                        help=f"default: the checkpoint's, else {FALLBACK['output_size']}")
    parser.add_argument("--dataset", choices=("digits", "cifar10"),
                        help=f"default: the checkpoint's, else {FALLBACK['dataset']}")
    parser.add_argument("--data", type=Path, help="CIFAR-10 folder (no download)")
    parser.add_argument("--image-size", type=int,
                        help="size of the low-resolution input images (default: the "
                        f"checkpoint's, else {FALLBACK['image_size']})")
    parser.add_argument("--count", type=int, default=4, help="number of test images")
    parser.add_argument("--normalize", choices=("none", "imagenet"),
                        help="input normalisation the model was trained with (default: the "
                        f"checkpoint's, else {FALLBACK['normalize']})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="PNG file to write")
    return parser


def _trained_with(path: Path) -> dict[str, object]:
    """What a train run's checkpoint says about its flags; empty if it says nothing (a damaged
    file is refused later, with its reason, by ``load_checkpoint``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # torch raises many types for a damaged zip or pickle
        return {}
    if not isinstance(state, dict):
        return {}
    config = state.get("config") or {}
    options = config.get("options") or {}
    found = {"model": state.get("model"), "image_size": config.get("image_size"),
             **{k: options.get(k) for k in ("arch", "output_size", "normalize")}}
    if config.get("dataset") in ("digits", "cifar10"):
        found.update(dataset=config["dataset"], data=config.get("data"))
    return {k: v for k, v in found.items() if v is not None}


def _settle(args: argparse.Namespace) -> None:
    """Fill the flags not given from the checkpoint, then from :data:`FALLBACK`."""
    found = _trained_with(args.checkpoint) if args.checkpoint is not None else {}
    for key, fallback in FALLBACK.items():
        if getattr(args, key) is None:
            setattr(args, key, found.get(key, fallback))
    if args.data is not None:
        args.data = Path(args.data)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0, or 2 for a data or checkpoint error)."""
    args = _parser().parse_args(argv)
    if args.count < 1:
        _parser().error(f"--count must be >= 1, got {args.count}")
    _settle(args)
    try:
        images, titles, num_classes = _test_images(args)
        torch.manual_seed(args.seed)
        model = MODELS[args.model](num_classes=num_classes, output_size=args.output_size,
                                   arch=args.arch)
        if args.checkpoint is not None:
            state = load_checkpoint(args.checkpoint, model=args.model, num_classes=num_classes)
            try:
                model.load_state_dict(state["model_state"])
            except RuntimeError as exc:
                raise CheckpointError(f"{args.checkpoint} does not fit {args.model} with "
                                      f"--arch {args.arch}: {exc}") from exc
    except (CheckpointError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if args.normalize == "imagenet" else (None, None)
    if mean is not None:
        images = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    path = resizer_figure(model, images, args.out, mean=mean, std=std, titles=titles)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
