"""Claims the docs and docstrings make about a peer's code, checked against that code.

Each test builds the peer's own module (torchvision, timm, effdet) or calls its function and
compares values with ours; the claim it backs is named in its docstring (file and sentence).
Initialisations are random, so they are compared by the spread of each tensor: a sample
standard deviation of n values is within a few ``sigma / sqrt(2 (n - 1))`` of the true one, and
PyTorch's default convolution initialisation (``kaiming_uniform_(a=sqrt(5))``) differs from
``kaiming_uniform_(a=1)`` and ``kaiming_normal_(fan_out)`` by factors above 1.7, far outside.
"""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from dilconv import (
    BiFPN,
    DilatedBasicBlock,
    DilatedBottleneck,
    DilatedResNet,
    FPNNeck,
    P6P7Levels,
    WeightedFusion,
)


def _same_spread(ours: torch.Tensor, theirs: torch.Tensor, what: str) -> None:
    """Same shape, and standard deviations equal within 6 standard errors of their difference."""
    assert ours.shape == theirs.shape, what
    a, b = ours.detach().double().flatten(), theirs.detach().double().flatten()
    n = a.numel()
    sigma = b.std().item()
    assert sigma > 0, what
    assert abs(a.std().item() - sigma) < 6 * sigma * math.sqrt(2 / (2 * (n - 1))), what
    assert abs(a.mean().item()) < 6 * sigma / math.sqrt(n), what


def _zero(t: torch.Tensor | None) -> bool:
    return t is None or bool(torch.all(t == 0))


def test_fpn_and_p6p7_start_as_torchvisions():
    """fpn.py ``FPNNeck.reset_parameters`` and extra_levels.py ``P6P7Levels.reset_parameters``:
    kaiming_uniform_(a=1) weights and zero biases, torchvision's FPN and LastLevelP6P7 init."""
    torch.manual_seed(0)
    channels, out = [32, 64, 96], 48
    ours = FPNNeck(channels, out, extra_levels=P6P7Levels(out, out))
    theirs = FeaturePyramidNetwork(channels, out, extra_blocks=LastLevelP6P7(out, out))
    pairs = [(ours.lateral[i], theirs.inner_blocks[i][0]) for i in range(len(channels))]
    pairs += [(ours.smooth[i], theirs.layer_blocks[i][0]) for i in range(len(channels))]
    pairs += [(ours.extra_levels.p6, theirs.extra_blocks.p6),
              (ours.extra_levels.p7, theirs.extra_blocks.p7)]
    for mine, reference in pairs:
        _same_spread(mine.weight, reference.weight, repr(reference))
        assert _zero(mine.bias) and _zero(reference.bias), repr(reference)


@pytest.mark.parametrize("zero_init_residual", [False, True])
def test_resnet_starts_as_torchvisions(zero_init_residual):
    """resnet.py: "Weights start as torchvision's ResNet starts them" (convolutions Kaiming
    normal, fan out; norms 1 and 0; ``zero_init_residual`` zeroes each block's last norm)."""
    torch.manual_seed(0)
    theirs = torchvision.models.resnet18(weights=None, zero_init_residual=zero_init_residual)
    ours = DilatedResNet(block="basic", blocks=(2, 2, 2, 2), zero_init_residual=zero_init_residual)
    reference = dict(theirs.named_modules())
    compared = 0
    for name, module in ours.named_modules():
        if isinstance(module, nn.Conv2d):
            _same_spread(module.weight, reference[name].weight, name)
            compared += 1
        elif isinstance(module, nn.BatchNorm2d):
            torch.testing.assert_close(module.weight, reference[name].weight, msg=name)
            torch.testing.assert_close(module.bias, reference[name].bias, msg=name)
            torch.testing.assert_close(module.running_var, reference[name].running_var)
    assert compared == sum(isinstance(m, nn.Conv2d) for m in theirs.modules())


def test_bifpn_extra_level_is_torchvisions_last_level_max_pool():
    """bifpn.py: with ``extra_level=True`` the appended level is what torchvision's
    ``LastLevelMaxPool`` computes from the coarsest output."""
    torch.manual_seed(0)
    neck = BiFPN([8, 12], 8, num_layers=1, num_levels=3, extra_level=True).eval()
    maps = [torch.randn(2, 8, 13, 11), torch.randn(2, 12, 7, 6)]
    with torch.no_grad():
        outs = neck(maps)
    names = ["p3", "p4", "p5"]
    expected, _ = LastLevelMaxPool()(list(outs[:-1]), maps, list(names))
    assert len(expected) == len(outs) == 4
    torch.testing.assert_close(outs[-1], expected[-1])


def test_weighted_fusion_starts_as_effdets_fast_attention():
    """fusion.py ``reset_parameters``: "every weight 1 (EfficientDet's initial equal fusion)",
    and the fresh fusion gives effdet's ``FpnCombine(weight_method="fastattn")`` values."""
    from effdet.efficientdet import FpnCombine

    torch.manual_seed(0)
    maps = [torch.randn(2, 4, 5, 6) for _ in range(3)]
    info = [{"num_chs": 4, "size": (5, 6)} for _ in maps]
    theirs = FpnCombine(info, 4, (0, 1, 2), (5, 6), weight_method="fastattn")
    ours = WeightedFusion(3)
    torch.testing.assert_close(ours.weight.detach(), theirs.edge_weights.detach())
    with torch.no_grad():
        torch.testing.assert_close(ours(maps), theirs(list(maps)))


def test_torchvision_basic_block_refuses_dilation_and_ours_takes_it():
    """docs/guides/dilate_resnet.rst, bottleneck.py: torchvision's ``BasicBlock`` (ResNet-18/34)
    refuses dilation; its ``replace_stride_with_dilation`` dilates ResNet-50 and larger."""
    with pytest.raises(NotImplementedError, match="Dilation > 1"):
        BasicBlock(8, 8, dilation=2)
    with pytest.raises(NotImplementedError):
        torchvision.models.resnet18(weights=None, replace_stride_with_dilation=[False, True, True])
    with torch.device("meta"):
        torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    block = DilatedBasicBlock(8, 8, dilation=2).eval()
    assert block.conv1.dilation == block.conv2.dilation == (2, 2)
    assert block(torch.randn(1, 8, 9, 7)).shape == (1, 8, 9, 7)


def _empty(n_channels: int, size: tuple[int, int] = (9, 7)) -> torch.Tensor:
    return torch.randn(0, n_channels, *size)


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_passes_through_torchvisions_blocks_as_through_ours(train):
    """docs/api.rst and _checks.py: "Every block passes an empty batch (N = 0) through, as
    torchvision's blocks do": theirs and ours give the same (empty) shapes, train and eval."""
    torch.manual_seed(0)
    channels = [8, 16]
    maps = [_empty(8, (9, 7)), _empty(16, (5, 4))]
    pairs = [
        (FPNNeck(channels, 8, extra_level=True),
         lambda m: list(FeaturePyramidNetwork(channels, 8, extra_blocks=LastLevelMaxPool())
                        .train(m.training)(dict(zip("ab", maps))).values()),
         lambda m: m(maps)),
        (DilatedBottleneck(16, 4), lambda m: Bottleneck(16, 4).train(m.training)(maps[1]),
         lambda m: m(maps[1])),
    ]
    for ours, theirs, call in pairs:
        ours.train(train)
        with torch.no_grad():
            expected, got = theirs(ours), call(ours)
        expected = expected if isinstance(expected, list) else [expected]
        got = got if isinstance(got, list) else [got]
        assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in expected]
        assert all(t.shape[0] == 0 for t in expected)


def test_dilatednet_normalises_with_the_vgg16_weights_preset():
    """examples/dilatednet/models.py: ``normalize=True`` subtracts the ImageNet mean and divides
    by its std, "which torchvision's VGG16 weights expect": the preset of
    ``VGG16_Weights.IMAGENET1K_V1`` (built without downloading) normalises the same way."""
    from examples.dilatednet.models import DilatedNet
    from torchvision.transforms.v2 import functional as TF

    preset = torchvision.models.VGG16_Weights.IMAGENET1K_V1.transforms()
    torch.manual_seed(0)
    normalising = DilatedNet(3, width=1, fc_channels=4, normalize=True).eval()
    plain = DilatedNet(3, width=1, fc_channels=4, normalize=False).eval()
    plain.load_state_dict(normalising.state_dict())
    x = torch.rand(2, 3, 17, 23)
    with torch.no_grad():
        torch.testing.assert_close(
            normalising(x), plain(TF.normalize(x, mean=preset.mean, std=preset.std)))


def _tv_trunk(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer4(model.layer3(model.layer2(model.layer1(x))))


RESNET_SOURCES = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "bottleneck_grouped_dilated_frozen": lambda: torchvision.models.resnet.ResNet(
        Bottleneck, [1, 2, 1, 1], groups=2, width_per_group=16,
        replace_stride_with_dilation=[False, True, True],
        norm_layer=torchvision.ops.misc.FrozenBatchNorm2d),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(RESNET_SOURCES))
def test_converted_resnet_computes_exactly_what_torchvision_computes(name, train):
    """docs/guides/dilate_resnet.rst: "Without output_stride the conversion computes exactly what
    the source computes": the same operations in the same order, so bit for bit."""
    torch.manual_seed(0)
    source = RESNET_SOURCES[name]().train(train)
    with torch.no_grad():
        for module in source.modules():  # statistics and affine terms away from 0 and 1
            for buffer in ("running_mean", "running_var", "weight", "bias"):
                t = getattr(module, buffer, None)
                if isinstance(t, torch.Tensor) and not isinstance(module, nn.Conv2d):
                    t.uniform_(0.5, 1.5)
    net = DilatedResNet.from_torchvision(source)
    x = torch.randn(2, 3, 45, 38)
    with torch.no_grad():
        assert torch.equal(net(x)[-1], _tv_trunk(source, x))


def test_schedules_keep_the_peak_in_initial_lr_as_torchs_schedulers_do():
    """examples/harness/schedule.py: the peak is each group's ``initial_lr``, "set from ``lr``
    the first time, as PyTorch's schedulers do"; stepped per epoch, the rates are MultiStepLR's."""
    from examples.harness.schedule import make_schedule

    def optimizer() -> torch.optim.Optimizer:
        return torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.1},
                                {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.3}])

    theirs, ours = optimizer(), optimizer()
    scheduler = torch.optim.lr_scheduler.MultiStepLR(theirs, [1, 3], 0.5)
    schedule = make_schedule(5, [1, 3], 0.5)
    for epoch in range(5):
        schedule.apply(ours, epoch)
        assert ([g["initial_lr"] for g in ours.param_groups]
                == [g["initial_lr"] for g in theirs.param_groups] == [0.1, 0.3])
        assert [g["lr"] for g in ours.param_groups] == pytest.approx(
            [g["lr"] for g in theirs.param_groups], rel=1e-12)
        theirs.step()
        scheduler.step()


@pytest.mark.parametrize("fpn_name", ["bifpn_fa", "bifpn_attn", "bifpn_sum"])
@pytest.mark.parametrize("num_levels", [2, 3, 5, 7])
def test_bifpn_graph_is_effdets(fpn_name, num_levels):
    """convert/effdet.py ``bifpn_graph``: "the graph of ... effdet's ``bifpn_*``", node for node
    and input for input, against effdet's own FPN config."""
    from effdet.config.fpn_config import get_fpn_config

    from dilconv.convert.effdet import bifpn_graph

    config = get_fpn_config(fpn_name, min_level=3, max_level=2 + num_levels)
    assert bifpn_graph(num_levels) == [list(node["inputs_offsets"]) for node in config.nodes]


def test_coco_figures_without_ground_truth_are_minus_one_as_cocoeval_gives_them(tmp_path):
    """examples/harness/tasks.py: "-1 where a figure has no ground truth, as COCO gives it":
    with no small objects in the file, our evaluator and pycocotools' ``COCOeval`` give the same
    twelve statistics, ``map_small`` and ``mar_small`` -1 in both."""
    import numpy as np
    from examples.harness.tasks import COCO_STATS

    from test_detector_coco_eval import _annotations, _detections, score_both

    rng = np.random.default_rng(0)
    anns = [a for a in _annotations(rng) if a["area"] >= 32**2 or a["iscrowd"]]
    dets = _detections(rng, anns)
    ours, reference, _, _ = score_both(tmp_path, anns, dets)
    assert [ours[key] for key in COCO_STATS] == pytest.approx(list(reference), abs=1e-6)
    assert ours["map_small"] == ours["mar_small"] == -1
