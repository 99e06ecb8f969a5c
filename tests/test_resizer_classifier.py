"""Seed 003's classifiers (VGG behind bilinear / Resizer / Resizer_CBAM) and its figure 8.

Forward passes use the narrow ``vgg_tiny``; full-size VGGs are only counted, on the meta device.
"""

from __future__ import annotations

import matplotlib.image
import pytest
import torch
import torch.nn.functional as F
import torchvision
from examples.harness.checkpoint import save_checkpoint
from examples.resizer_classifier import figure
from examples.resizer_classifier.figure import IMAGENET_MEAN, IMAGENET_STD, resizer_figure
from examples.resizer_classifier.models import (
    MODELS,
    BilinearResize,
    ResizedClassifier,
    build_vgg,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from dilconv import LearnableResizer

TINY = "vgg_tiny"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# The attention of each model's LearnableResizer; the baseline "vgg16" has none (bilinear).
LEARNED = {"vgg16_resizer": None, "vgg16_resizer_cbam": "cbam"}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def tiny_vgg_params(num_classes: int) -> int:
    """VGG16's configuration "D" at widths / 8 with batch norm, and a 512-wide head."""
    widths = [8, 8, 16, 16, 32, 32, 32, 64, 64, 64, 64, 64, 64]
    total, c_in = 0, 3
    for c_out in widths:
        total += 9 * c_in * c_out + c_out + 2 * c_out  # 3x3 conv with bias, BN weight and bias
        c_in = c_out
    for f_in, f_out in ((64 * 7 * 7, 512), (512, 512), (512, num_classes)):
        total += f_in * f_out + f_out
    return total


def assert_png(path) -> None:
    data = path.read_bytes()
    assert len(data) > 0 and data[:8] == PNG_SIGNATURE
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.std() > 0


@settings(max_examples=8, deadline=None)
@given(
    name=st.sampled_from(sorted(MODELS)),
    batch=st.integers(1, 2),
    in_size=st.tuples(st.integers(4, 40), st.integers(4, 40)),
    out_size=st.tuples(st.integers(32, 56), st.integers(32, 56)),
    num_classes=st.integers(2, 12),
)
def test_shapes(name, batch, in_size, out_size, num_classes):
    model = MODELS[name](num_classes=num_classes, output_size=out_size, arch=TINY).eval()
    x = torch.rand(batch, 3, *in_size)
    with torch.no_grad():
        resized = model.resize(x)
        logits = model(x)
        composed = model.classifier(resized)
    assert resized.shape == (batch, 3, *out_size)
    assert logits.shape == (batch, num_classes)
    torch.testing.assert_close(logits, composed)
    assert model.output_size == out_size and model.num_classes == num_classes


@pytest.mark.parametrize("arch", [TINY, "vgg16", "vgg11_bn"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_parameter_count_is_vgg_plus_resizer(name, arch):
    with torch.device("meta"):
        model = MODELS[name](num_classes=7, output_size=64, arch=arch)
        if arch == TINY:
            vgg = tiny_vgg_params(7)
        else:
            vgg = n_params(getattr(torchvision.models, arch)(num_classes=7))
        learned = name in LEARNED
        resizer = n_params(LearnableResizer(attention=LEARNED[name])) if learned else 0
    assert isinstance(model, ResizedClassifier) and model.arch == arch
    assert isinstance(model.resizer, LearnableResizer if learned else BilinearResize)
    assert model.classifier.classifier[-1].out_features == 7
    assert n_params(model.classifier) == vgg
    assert n_params(model.resizer) == resizer
    assert n_params(model) == vgg + resizer
    if learned:
        assert model.resizer.attention == LEARNED[name] and model.resizer.output_size == (64, 64)


def test_baseline_resize_is_bilinear_interpolation():
    model = MODELS["vgg16"](output_size=(48, 40), arch=TINY)
    x = torch.rand(2, 3, 17, 32)
    expected = F.interpolate(x, size=(48, 40), mode="bilinear", align_corners=False)
    torch.testing.assert_close(model.resize(x), expected, rtol=0, atol=0)
    assert list(model.resizer.parameters()) == []
    learned = MODELS["vgg16_resizer"](output_size=(48, 40), arch=TINY).eval()
    with torch.no_grad():
        assert not torch.allclose(learned.resize(x), expected)


def test_weights_load_from_local_file(tmp_path):
    source = build_vgg(TINY)
    path = tmp_path / "imagenet.pt"
    torch.save(source.state_dict(), path)
    model = MODELS["vgg16_resizer_cbam"](num_classes=10, output_size=32, arch=TINY, weights=path)
    ours, theirs = model.classifier, source
    torch.testing.assert_close(ours.features[0].weight, theirs.features[0].weight, rtol=0, atol=0)
    torch.testing.assert_close(ours.classifier[3].weight, theirs.classifier[3].weight,
                               rtol=0, atol=0)
    assert theirs.classifier[-1].out_features == 1000 and ours.classifier[-1].out_features == 10
    fresh = MODELS["vgg16_resizer_cbam"](num_classes=10, output_size=32, arch=TINY)
    assert not torch.equal(fresh.classifier.features[0].weight, theirs.features[0].weight)


def test_weights_of_another_arch_are_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="other.pt is not a state_dict of vgg_tiny"):
        MODELS["vgg16"](arch=TINY, weights=path)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"arch": "resnet50"}, "arch must be one of"), ({"output_size": 16}, "output_size must be"),
     ({"num_classes": 0}, "num_classes must be")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MODELS["vgg16_resizer"](**{"arch": TINY, **kwargs})


@pytest.mark.parametrize("name", ["vgg16", "vgg16_resizer_cbam"])
def test_figure_from_untrained_model(tmp_path, name):
    model = MODELS[name](output_size=40, arch=TINY)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    images = (torch.rand(3, 3, 32, 32) - mean) / std
    path = tmp_path / "new" / "folder" / "fig.png"
    assert resizer_figure(model, images, path, mean=IMAGENET_MEAN, std=IMAGENET_STD) == path
    assert_png(path)
    assert list(path.parent.iterdir()) == [path]
    assert model.training


def test_figure_refuses_grey_images(tmp_path):
    with pytest.raises(ValueError, match=r"\(N >= 1, 3, h, w\), got \(2, 1, 32, 32\)"):
        resizer_figure(MODELS["vgg16"](arch=TINY, output_size=32), torch.rand(2, 1, 32, 32),
                       tmp_path / "fig.png")


def test_figure_command_uses_checkpoint(tmp_path, monkeypatch, capsys):
    name = "vgg16_resizer_cbam"
    trained = MODELS[name](num_classes=10, output_size=40, arch=TINY)
    with torch.no_grad():
        trained.resizer.out_conv.bias.fill_(0.25)
    checkpoint = tmp_path / "checkpoint.pt"
    save_checkpoint(checkpoint, {"model": name, "num_classes": 10,
                                 "model_state": trained.state_dict()})
    drawn = []

    def spy(model, images, path, **kwargs):
        drawn.append((model, images))
        return resizer_figure(model, images, path, **kwargs)

    monkeypatch.setattr(figure, "resizer_figure", spy)
    out = tmp_path / "figs" / "fig.png"
    argv = ["--model", name, "--checkpoint", str(checkpoint), "--arch", TINY,
            "--output-size", "40", "--dataset", "digits", "--count", "2", "--out", str(out)]
    assert figure.main(argv) == 0
    assert_png(out)
    (model, images), = drawn
    assert images.shape == (2, 3, 32, 32)
    assert torch.equal(model.resizer.out_conv.bias, torch.full((3,), 0.25))
    assert str(out) in capsys.readouterr().out


def test_figure_command_refuses_checkpoint_of_another_model(tmp_path, capsys):
    checkpoint = tmp_path / "checkpoint.pt"
    model = MODELS["vgg16"](num_classes=10, output_size=32, arch=TINY)
    save_checkpoint(checkpoint, {"model": "vgg16", "num_classes": 10,
                                 "model_state": model.state_dict()})
    out = tmp_path / "fig.png"
    argv = ["--model", "vgg16_resizer", "--checkpoint", str(checkpoint), "--arch", TINY,
            "--output-size", "32", "--out", str(out)]
    assert figure.main(argv) == 2
    assert "belongs to another run" in capsys.readouterr().err
    assert not out.exists()
