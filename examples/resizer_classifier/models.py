"""The classifiers of the resizer study (seed 003): torchvision's VGG behind an image resizer.

CIFAR-10's 32x32 images are enlarged to ImageNet's 224x224 before an (optionally ImageNet
pre-trained) VGG classifies them, either by bilinear interpolation (the baseline) or by a
:class:`~dilconv.LearnableResizer` (Talebi & Milanfar, ICCV 2021), without or with CBAM in its
residual block (the study's Resizer and Resizer_CBAM). Every network is a
:class:`ResizedClassifier`; :data:`MODELS` maps the study's names to factories.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.models.vgg import VGG, cfgs, make_layers

from dilconv import LearnableResizer

__all__ = [
    "ARCHS",
    "MODELS",
    "MIN_OUTPUT_SIZE",
    "BilinearResize",
    "ResizedClassifier",
    "build_vgg",
    "vgg16",
    "vgg16_resizer",
    "vgg16_resizer_cbam",
]

# torchvision's VGG constructors, plus the narrow stand-in for CPU runs (see build_vgg).
ARCHS = (
    "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "vgg_tiny",
)
# VGG halves the map five times; below 32 pixels the last max-pool has nothing to pool.
MIN_OUTPUT_SIZE = 32
TINY_DIVISOR = 8


class BilinearResize(nn.Module):
    """The baseline's fixed enlargement: bilinear interpolation, no parameters.

    ``F.interpolate(x, output_size, mode="bilinear", align_corners=False)`` without
    anti-aliasing, the interpolation :class:`~dilconv.LearnableResizer` uses for its skip.

    Args:
        output_size: target ``(H_out, W_out)``, or one int for a square target.

    Shape:
        input (N, C, H, W) -> output (N, C, H_out, W_out)

    Example:
        >>> BilinearResize(64)(torch.rand(2, 3, 32, 32)).shape
        torch.Size([2, 3, 64, 64])
    """

    def __init__(self, output_size: int | Sequence[int] = (224, 224)) -> None:
        super().__init__()
        self.output_size = _pair(output_size)

    def forward(self, x: Tensor, output_size: int | Sequence[int] | None = None) -> Tensor:
        if x.ndim != 4:
            raise ValueError(f"BilinearResize expected an (N, C, H, W) batch, got shape "
                             f"{tuple(x.shape)}")
        size = self.output_size if output_size is None else _pair(output_size)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}"


class ResizedClassifier(nn.Module):
    """A resizer that enlarges the image, then a VGG that classifies the enlarged image.

    Args:
        resizer: :class:`BilinearResize` or :class:`~dilconv.LearnableResizer`; its
            ``output_size`` is the size the classifier sees.
        classifier: a torchvision :class:`~torchvision.models.VGG` (see :func:`build_vgg`).
        arch: the VGG's name in :data:`ARCHS`, kept for checkpoints and figures.

    Shape:
        input (N, 3, H, W) -> :meth:`resize` (N, 3, H_out, W_out) -> logits (N, num_classes),
        with ``(H_out, W_out) = output_size``; any H, W >= 1.

    State-dict keys (submodule names are API)::

        resizer.*                  LearnableResizer's keys (stem_conv, stem_proj, stem_norm,
                                   blocks.0.*, tail_conv, tail_norm, out_conv); none for
                                   BilinearResize
        classifier.features.{i}.*  VGG's convolutions (and batch norms for *_bn, vgg_tiny)
        classifier.classifier.{0,3,6}.weight / .bias
                                   VGG's three Linear layers; 6 has num_classes outputs

    Example:
        >>> model = vgg16_resizer(num_classes=10, output_size=64, arch="vgg_tiny")
        >>> x = torch.rand(2, 3, 32, 32)
        >>> model.resize(x).shape, model(x).shape
        (torch.Size([2, 3, 64, 64]), torch.Size([2, 10]))
    """

    def __init__(self, resizer: BilinearResize | LearnableResizer, classifier: VGG, *,
                 arch: str) -> None:
        super().__init__()
        self.resizer = resizer
        self.classifier = classifier
        self.arch = arch
        self.output_size: tuple[int, int] = tuple(resizer.output_size)

    @property
    def num_classes(self) -> int:
        """Outputs of the classifier's last Linear layer."""
        return self.classifier.classifier[-1].out_features

    def resize(self, x: Tensor) -> Tensor:
        """The image the classifier sees: (N, 3, H, W) -> (N, 3, *output_size)."""
        return self.resizer(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.resize(x))

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, output_size={self.output_size}"


def build_vgg(arch: str = "vgg16", num_classes: int = 1000,
              weights: str | Path | None = None) -> VGG:
    """A torchvision VGG with ``num_classes`` outputs, optionally from local ImageNet weights.

    ``weights`` is a file holding the ``state_dict`` of ``arch`` with ImageNet's 1000 classes
    (what ``torchvision.models.VGG16_Weights.IMAGENET1K_V1`` downloads, saved on a machine that
    can download); it is read with ``torch.load(weights_only=True)`` and loaded strictly before
    the last Linear layer is replaced by a fresh ``Linear(4096, num_classes)`` with weights
    N(0, 0.01) and bias 0 (the initialisation torchvision's VGG gives its linear layers).
    Nothing is downloaded.

    ``"vgg_tiny"`` is for CPU runs and tests: torchvision's :class:`~torchvision.models.VGG`
    with VGG16's configuration "D" (13 convolutions, batch norm, five max-pools) at widths
    divided by 8 (8, 16, 32, 64, 64 channels) and a head of the same shape with 512 hidden
    units instead of 4096: 0.23 M parameters in the convolutions and 2.1 M in all with 10
    classes (most in the head's first Linear, 64 * 7 * 7 -> 512), against VGG16's 134 M.

    Raises:
        ValueError: ``arch`` not in :data:`ARCHS`, ``num_classes`` < 1, or a weights file that is
            not a state_dict of ``arch``.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
    model = _tiny_vgg() if arch == "vgg_tiny" else getattr(torchvision.models, arch)(weights=None)
    if weights is not None:
        _load_weights(model, arch, Path(weights))
    if num_classes != model.classifier[-1].out_features:
        model.classifier[-1] = _linear(model.classifier[-1].in_features, num_classes)
    return model


def _tiny_vgg() -> VGG:
    widths = [v if v == "M" else v // TINY_DIVISOR for v in cfgs["D"]]
    features = make_layers(widths, batch_norm=True)
    # VGG.__init__ always builds the 25088 -> 4096 head (400 MB); build that on the meta device
    # and swap in the narrow one. The features already exist on the CPU and get VGG's own init.
    with torch.device("meta"):
        model = VGG(features)
    hidden = 4096 // TINY_DIVISOR
    model.classifier = nn.Sequential(
        _linear(widths[-2] * 7 * 7, hidden), nn.ReLU(True), nn.Dropout(),
        _linear(hidden, hidden), nn.ReLU(True), nn.Dropout(),
        _linear(hidden, 1000),
    )
    return model


def _linear(in_features: int, out_features: int) -> nn.Linear:
    layer = nn.Linear(in_features, out_features)
    nn.init.normal_(layer.weight, 0, 0.01)
    nn.init.zeros_(layer.bias)
    return layer


def _load_weights(model: VGG, arch: str, path: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} should hold the state_dict of {arch} with 1000 ImageNet "
                         f"classes, but holds a {type(state).__name__}")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(f"{path} is not a state_dict of {arch} with 1000 ImageNet classes: "
                         f"{exc}") from exc


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair):
        raise ValueError(f"output_size must be an int or (height, width), got {size!r}")
    return pair


def _resized(resizer_kind: str, num_classes: int, output_size: int | Sequence[int], arch: str,
             weights: str | Path | None) -> ResizedClassifier:
    size = _pair(output_size)
    if min(size) < MIN_OUTPUT_SIZE:
        raise ValueError(f"output_size must be >= {MIN_OUTPUT_SIZE} (VGG's five max-pools), "
                         f"got {output_size!r}")
    if resizer_kind == "bilinear":
        resizer = BilinearResize(size)
    else:
        resizer = LearnableResizer(3, size, attention="cbam" if resizer_kind == "cbam" else None)
    return ResizedClassifier(resizer, build_vgg(arch, num_classes, weights), arch=arch)


def vgg16(
    num_classes: int = 10,
    output_size: int | Sequence[int] = 224,
    arch: str = "vgg16",
    weights: str | Path | None = None,
) -> ResizedClassifier:
    """The study's baseline: bilinear enlargement to ``output_size``, then ``arch``.

    Args:
        num_classes: outputs of the classifier's last Linear layer.
        output_size: the enlarged image's size, int or ``(H, W)``, each >= 32 (the study: 224).
        arch: a name in :data:`ARCHS`: a torchvision VGG constructor, or ``"vgg_tiny"`` for
            CPU runs (see :func:`build_vgg`).
        weights: optional local file with ``arch``'s ImageNet state_dict (see :func:`build_vgg`).

    Shape:
        input (N, 3, H, W) -> logits (N, num_classes)
    """
    return _resized("bilinear", num_classes, output_size, arch, weights)


def vgg16_resizer(
    num_classes: int = 10,
    output_size: int | Sequence[int] = 224,
    arch: str = "vgg16",
    weights: str | Path | None = None,
) -> ResizedClassifier:
    """Resizer: ``LearnableResizer(3, output_size)`` (16 filters, 1 residual block), then
    ``arch``. Arguments as :func:`vgg16`."""
    return _resized("learned", num_classes, output_size, arch, weights)


def vgg16_resizer_cbam(
    num_classes: int = 10,
    output_size: int | Sequence[int] = 224,
    arch: str = "vgg16",
    weights: str | Path | None = None,
) -> ResizedClassifier:
    """Resizer_CBAM: ``LearnableResizer(3, output_size, attention="cbam")``, then ``arch``.
    Arguments as :func:`vgg16`."""
    return _resized("cbam", num_classes, output_size, arch, weights)


MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg16": vgg16,
    "vgg16_resizer": vgg16_resizer,
    "vgg16_resizer_cbam": vgg16_resizer_cbam,
}
