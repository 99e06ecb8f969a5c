"""Seed 002's DilatedNet against Yu & Koltun, ICLR 2016: shapes, receptive fields (Table 1),
identity at initialisation, and the conversion of torchvision's VGG16."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
import torchvision
from examples.dilatednet.data import IGNORE_INDEX, DigitsSegmentationCanvas
from examples.dilatednet.models import (
    DilatedNet,
    FrontEnd,
    convolutionalised_vgg16,
    linear_to_conv,
    load_vgg16_weights,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dilconv import (
    ContextModule,
    empirical_receptive_field,
    layer_receptive_fields,
    receptive_field,
)

# The paper's Table 1: receptive field after each context layer, in units of the 1/8 grid.
PAPER_CONTEXT_FIELDS = (3, 5, 9, 17, 33, 65, 67, 67)
STRIDE = 8  # pool1-pool3 kept, pool4 and pool5 removed
SMALL = {"width": 1, "fc_channels": 4}


class Scores(nn.Module):
    """The 1/8 scores of a DilatedNet (after the context module), for the field tools."""

    def __init__(self, net: DilatedNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net.forward_scores(x)


@contextmanager
def _one_thread() -> Iterator[None]:
    """Tiny networks run many small operations; on shared cores a second thread mostly waits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def vgg16() -> torchvision.models.VGG:
    return torchvision.models.vgg16(weights=None).eval()


def _meta_vgg(name: str = "vgg16") -> torchvision.models.VGG:
    with torch.device("meta"):
        return getattr(torchvision.models, name)(weights=None)


@settings(max_examples=12, deadline=None)
@given(h=st.integers(1, 45), w=st.integers(1, 45), n=st.integers(1, 2),
       context=st.sampled_from([None, "basic", "large"]))
def test_output_has_the_input_size_and_scores_are_at_one_eighth(h, w, n, context):
    net = DilatedNet(3, context, **SMALL).eval()
    x = torch.rand(n, 3, h, w)
    with torch.no_grad(), _one_thread():
        out, scores, front = net(x), net.forward_scores(x), net.forward_frontend(x)
    assert out.shape == (n, 3, h, w)
    assert scores.shape == front.shape == (n, 3, math.ceil(h / STRIDE), math.ceil(w / STRIDE))


def test_layers_are_the_papers_front_end():
    net = DilatedNet(21, width=64, device="meta")
    front = net.frontend
    convs = [front.features.get_submodule(name) for name in front.conv_names]
    assert [c.out_channels for c in convs] == [c for c in
                                               torchvision.models.vgg.cfgs["D"] if c != "M"]
    assert [c.dilation[0] for c in convs] == [1] * 10 + [2] * 3
    pools = [m for m in front.features if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3
    assert (front.fc6.kernel_size, front.fc6.dilation, front.fc6.out_channels) == \
        ((7, 7), (4, 4), 4096)
    assert (front.fc7.kernel_size, front.final.kernel_size) == ((1, 1), (1, 1))
    assert sum(isinstance(m, nn.Dropout) for m in front.modules()) == 2
    assert net.context is None


def test_state_dict_keys_are_the_documented_ones():
    net = DilatedNet(5, "basic", **SMALL)
    keys = list(net.state_dict())
    names = [f"conv{b}_{i}" for b, n in enumerate((2, 2, 3, 3, 3), 1) for i in range(1, n + 1)]
    expected = [f"frontend.features.{name}.{p}" for name in names for p in ("weight", "bias")]
    expected += [f"frontend.{layer}.{p}" for layer in ("fc6", "fc7", "final")
                 for p in ("weight", "bias")]
    expected += [f"context.convs.{i}.{p}" for i in range(8) for p in ("weight", "bias")]
    assert keys == expected


def test_width_scales_every_stage():
    front = DilatedNet(3, width=8).frontend
    widths = [front.features.get_submodule(n).out_channels for n in front.conv_names]
    assert sorted(set(widths)) == [8, 16, 32, 64]
    assert widths[-1] == 64 and front.fc6.out_channels == 4096 * 8 // 64


def test_up_sampling_keeps_the_one_eighth_grid_whatever_the_input_size():
    # Score pixel j is centred on input pixel 8j + 3.5 for every H: the output for a size that
    # 8 does not divide is a crop of the output at the next multiple of 8, not a stretch.
    net = DilatedNet(4, **SMALL).eval()
    scores = torch.randn(1, 4, 3, 5)
    net.forward_scores = lambda x: scores
    full = net(torch.zeros(1, 3, 24, 40))
    torch.testing.assert_close(full, F.interpolate(scores, size=(24, 40), mode="bilinear",
                                                   align_corners=False))
    for h, w in [(17, 33), (21, 38), (23, 39)]:
        torch.testing.assert_close(net(torch.zeros(1, 3, h, w)), full[..., :h, :w])
    field = receptive_field(Scores(DilatedNet(4, **SMALL)), (64, 64))
    assert field.jump == (STRIDE, STRIDE) and field.start == ((STRIDE - 1) / 2,) * 2


def test_context_adds_the_papers_receptive_fields_on_the_one_eighth_grid():
    size = (96, 80)
    front = receptive_field(Scores(DilatedNet(3, **SMALL)), size)
    whole = receptive_field(Scores(DilatedNet(3, "basic", **SMALL)), size)
    assert front.jump == whole.jump == (STRIDE, STRIDE)
    grow = (PAPER_CONTEXT_FIELDS[-1] - 1) * STRIDE
    assert whole.size == tuple(s + grow for s in front.size)
    assert whole.start == front.start
    layers = layer_receptive_fields(Scores(DilatedNet(3, "large", **SMALL)), size)
    for i, paper in enumerate(PAPER_CONTEXT_FIELDS):
        field = layers[f"net.context.convs.{i}"]
        assert field.size == tuple(s + (paper - 1) * STRIDE for s in front.size), i
        assert field.jump == (STRIDE, STRIDE)


def test_analytic_fields_agree_with_gradients():
    # The empirical box needs an input larger than the field so that no border clips it.
    front = Scores(DilatedNet(3, **SMALL))
    whole = Scores(DilatedNet(3, "basic", **SMALL))
    front_size = receptive_field(front, (64, 64)).size[0]
    whole_size = receptive_field(whole, (64, 64)).size[0]
    for module, field in ((front, front_size), (whole, whole_size)):
        side = field + 5 * STRIDE + 1
        with warnings.catch_warnings(), _one_thread():
            warnings.simplefilter("error")  # a box clipped by the border warns
            measured = empirical_receptive_field(module, (side, side), in_channels=3)
        assert measured.size == (field, field)
        assert measured.jump == (STRIDE, STRIDE)
        assert measured.start == ((STRIDE - 1) / 2,) * 2


def test_basic_context_is_the_identity_on_non_negative_scores():
    net = DilatedNet(5, width=2, fc_channels=8).eval()
    with torch.no_grad():
        net.frontend.final.bias += 10.0
    x = torch.rand(2, 3, 27, 35)
    with torch.no_grad(), _one_thread():
        scores = net.forward_frontend(x)
        assert scores.min() >= 0
        staged = net.add_context("basic").eval()
        torch.testing.assert_close(staged.forward_scores(x), scores, rtol=0, atol=1e-5)
        torch.testing.assert_close(staged(x), net(x), rtol=0, atol=1e-5)


def test_context_truncates_negative_scores():
    # The paper's front-end scores are unbounded; the identity-initialised module's ReLUs
    # clip the negative ones to 0.
    net = DilatedNet(5, width=2, fc_channels=8).eval()
    with torch.no_grad():
        net.frontend.final.weight.mul_(1000.0)
    x = torch.rand(1, 3, 30, 22)
    with torch.no_grad():
        scores = net.forward_frontend(x)
        assert (scores < 0).any() and (scores > 0).any()
        staged = net.add_context("basic").eval()
        torch.testing.assert_close(staged.forward_scores(x), scores.clamp(min=0), rtol=0,
                                   atol=1e-4)


def test_add_context_copies_the_front_end_and_leaves_the_original():
    net = DilatedNet(4, width=2, fc_channels=8).eval()
    staged = net.add_context("large")
    assert isinstance(staged.context, ContextModule) and staged.context.variant == "large"
    assert net.context is None and not staged.training
    before = {k: v.clone() for k, v in net.state_dict().items()}
    front = {k.removeprefix("frontend."): v for k, v in staged.state_dict().items()
             if k.startswith("frontend.")}
    assert all(torch.equal(front[k], v) for k, v in net.frontend.state_dict().items())
    with torch.no_grad():
        staged.frontend.fc7.weight.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ValueError, match="already has a 'large' context"):
        staged.add_context("basic")
    with pytest.raises(ValueError, match="variant"):
        net.add_context("huge")


def test_bad_arguments_and_inputs_are_refused():
    with pytest.raises(ValueError, match="context"):
        DilatedNet(3, "medium")
    with pytest.raises(ValueError, match="width"):
        DilatedNet(3, width=0)
    with pytest.raises(ValueError, match="dropout"):
        DilatedNet(3, dropout=1.0)
    net = DilatedNet(3, **SMALL)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net(torch.rand(1, 1, 16, 16))
    with pytest.raises(TypeError, match="float"):
        net(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))


def test_convolutionalised_vgg16_gives_torchvisions_logits(vgg16):
    conv = convolutionalised_vgg16(vgg16)
    assert not conv.training
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        expected, got = vgg16(x), conv(x)
    assert got.shape == (1, 1000, 1, 1)
    torch.testing.assert_close(got[:, :, 0, 0], expected, rtol=1e-4, atol=1e-6)


def test_from_torchvision_copies_vgg16s_weights(vgg16):
    net = DilatedNet.from_torchvision(vgg16, 21, "basic")
    assert not net.training and net.context is not None
    sources = [m for m in vgg16.features if isinstance(m, nn.Conv2d)]
    targets = [net.frontend.features.get_submodule(n) for n in net.frontend.conv_names]
    for source, target in zip(sources, targets, strict=True):
        assert torch.equal(target.weight, source.weight) and torch.equal(target.bias,
                                                                         source.bias)
    fc6, fc7 = vgg16.classifier[0], vgg16.classifier[3]
    # fc6 dilated by 4 reads every 4th pixel of a 25 x 25 window: the 7 x 7 map fc6 read.
    window = torch.randn(1, 512, 25, 25)
    with torch.no_grad():
        dense = F.conv2d(window, net.frontend.fc6.weight, net.frontend.fc6.bias, dilation=4)
        torch.testing.assert_close(dense[0, :, 0, 0],
                                   fc6(torch.flatten(window[:, :, ::4, ::4], 1))[0],
                                   rtol=1e-4, atol=1e-5)
        features = torch.randn(2, 4096)
        torch.testing.assert_close(net.frontend.fc7(features[:, :, None, None])[:, :, 0, 0],
                                   fc7(features), rtol=1e-4, atol=1e-5)
    # Up to conv4_3 the front-end is VGG16 itself (pool4 is the first layer removed).
    x = torch.rand(1, 3, 40, 48)
    with torch.no_grad():
        end = list(net.frontend.features.named_children()).index(("relu4_3",
                                                                  net.frontend.features.relu4_3))
        ours = net.frontend.features[:end + 1](x)
        torch.testing.assert_close(ours, vgg16.features[:23](x))
        assert net(x).shape == (1, 21, 40, 48)
    assert net.frontend.final.weight.std() < 0.01


def test_front_end_starts_as_torchvisions_vgg16(vgg16):
    """FrontEnd.reset_parameters: convolutions and fc6/fc7 start as torchvision's VGG16 starts
    its convolutions and linear layers (same spread within 6 standard errors, zero biases);
    ``final`` N(0, 0.001). PyTorch's default conv init would be ~1.7x off."""
    torch.manual_seed(0)
    ours = FrontEnd(5, fc_channels=256)
    sources = [m for m in vgg16.features if isinstance(m, nn.Conv2d)]
    targets = [ours.features.get_submodule(n) for n in ours.conv_names]
    pairs = [*zip(targets, sources, strict=True), (ours.fc6, vgg16.classifier[0]),
             (ours.fc7, vgg16.classifier[3])]
    for mine, theirs in pairs:
        # iid draws: the first million of a tensor are a fair sample of all of it
        a, b = (m.weight.detach().flatten()[:10**6].double() for m in (mine, theirs))
        tolerance = 6 * b.std() * math.sqrt(1 / (min(a.numel(), b.numel()) - 1))
        assert abs(a.std() - b.std()) < tolerance and abs(a.mean()) < tolerance, mine
        assert torch.all(mine.bias == 0) and torch.all(theirs.bias == 0), mine
    assert abs(ours.final.weight.std().item() - 1e-3) < 1e-4
    assert torch.all(ours.final.bias == 0)


def test_from_torchvision_keeps_flags_mode_and_dtype():
    vgg = _meta_vgg().to(torch.float64).train()
    vgg.features[0].weight.requires_grad_(False)
    net = DilatedNet.from_torchvision(vgg, 3)
    conv1 = net.frontend.features.conv1_1
    assert net.training and conv1.weight.dtype == torch.float64
    assert not conv1.weight.requires_grad and conv1.bias.requires_grad
    assert net.frontend.fc6.weight.is_meta


@pytest.mark.parametrize(("model", "error", "match"), [
    (lambda: torchvision.models.resnet18(weights=None), TypeError, "torchvision.models.VGG"),
    (lambda: _meta_vgg("vgg16_bn"), ValueError, "batch norm"),
    (lambda: _meta_vgg("vgg11"), ValueError, r"13 convolutions\), got .* \(8 convolutions\)"),
    (lambda: _meta_vgg("vgg19"), ValueError, r"\(16 convolutions\)"),
])
def test_from_torchvision_refuses_what_is_not_vgg16(model, error, match):
    with pytest.raises(error, match=match):
        DilatedNet.from_torchvision(model(), 21)


def test_from_torchvision_refuses_a_replaced_classifier():
    vgg = _meta_vgg()
    vgg.classifier = nn.Sequential(nn.Linear(25088, 10, device="meta"))
    with pytest.raises(ValueError, match="classifier"):
        DilatedNet.from_torchvision(vgg, 21)
    with pytest.raises(ValueError, match="classifier"):
        convolutionalised_vgg16(vgg)


def test_linear_to_conv_checks_the_window_size():
    with pytest.raises(ValueError, match="needs a Linear with 18 in_features, got 10"):
        linear_to_conv(nn.Linear(10, 4), 2, 3)
    linear = nn.Linear(2 * 3 * 3, 4)
    x = torch.randn(5, 2, 3, 3)
    torch.testing.assert_close(linear_to_conv(linear, 2, 3)(x)[:, :, 0, 0],
                               linear(torch.flatten(x, 1)))


def test_load_vgg16_weights_reads_a_state_dict(tmp_path):
    # Each tensor is one distinct value broadcast to its shape: the file stays a few kB.
    shapes = {k: v.shape for k, v in _meta_vgg().state_dict().items()}
    state = {k: torch.full((), float(i)).expand(shape) for i, (k, shape) in
             enumerate(shapes.items())}
    path = tmp_path / "vgg16.pth"
    torch.save(state, path)
    model = load_vgg16_weights(path)
    assert isinstance(model, torchvision.models.VGG)
    loaded = model.state_dict()
    assert list(loaded) == list(shapes)
    for i, (key, shape) in enumerate(shapes.items()):
        assert loaded[key].shape == shape and loaded[key].device.type == "cpu"
        assert torch.equal(loaded[key], torch.full(shape, float(i)))
    assert DilatedNet.from_torchvision(model, 3, context=None).frontend.fc7.weight.shape == \
        (4096, 4096, 1, 1)


def test_load_vgg16_weights_names_the_file_it_refuses(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_vgg16_weights(tmp_path / "missing.pth")
    wrong = tmp_path / "vgg11.pth"
    torch.save({k: torch.zeros(()).expand(v.shape)
                for k, v in _meta_vgg("vgg11").state_dict().items()}, wrong)
    with pytest.raises(ValueError, match="vgg11.pth is not a state_dict of torchvision's vgg16"):
        load_vgg16_weights(wrong)
    garbage = tmp_path / "notes.pth"
    garbage.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*notes.pth"):
        load_vgg16_weights(garbage)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], listed)
    with pytest.raises(ValueError, match="list.pth holds a list"):
        load_vgg16_weights(listed)


def test_a_small_network_learns_digit_canvases():
    torch.manual_seed(0)
    data = DigitsSegmentationCanvas("train", 8, seed=3, canvas_size=(32, 32))
    images, masks = next(iter(DataLoader(data, batch_size=8)))
    net = DilatedNet(len(data.classes), "basic", width=4, fc_channels=32, dropout=0.0)
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    with _one_thread():
        for _ in range(25):
            loss = F.cross_entropy(net(images), masks, ignore_index=IGNORE_INDEX)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
