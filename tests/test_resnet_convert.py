"""DilatedResNet.from_torchvision keeps what the source had, and refuses what it cannot express."""

from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.resnet import BasicBlock
from torchvision.ops.misc import FrozenBatchNorm2d

from dilconv import DilatedResNet

NORMS = (nn.BatchNorm2d, nn.GroupNorm, FrozenBatchNorm2d)


def source_stages(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """C2..C5 as the source computes them (a ResNet's trunk, or a detection body's outputs)."""
    if not isinstance(model, torchvision.models.ResNet):
        return list(model(x).values())
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        x = stage(x)
        out.append(x)
    return out


def randomise_norms(model: nn.Module) -> nn.Module:
    """Norms away from their identity start, so that a norm of another kind or setting shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, NORMS):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0.0, 0.2)
            if isinstance(module, (nn.BatchNorm2d, FrozenBatchNorm2d)):
                module.running_mean.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 2.0)
    return model


def leaves(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if next(m.children(), None) is None}


def dilated_resnet18(stage: str = "layer3", dilation: int = 2) -> torchvision.models.ResNet:
    """A resnet18 whose ``stage`` keeps its stride and dilates every block (no torchvision rule)."""
    model = torchvision.models.resnet18(weights=None)
    for block in model.get_submodule(stage):
        for conv in (block.conv1, block.conv2):
            conv.dilation = conv.padding = (dilation, dilation)
    return model


SOURCES = {
    "resnet50_dilate_2_3": lambda: torchvision.models.resnet50(
        weights=None, replace_stride_with_dilation=[False, True, True]),
    "resnet50_dilate_3": lambda: torchvision.models.resnet50(
        weights=None, replace_stride_with_dilation=[False, False, True]),
    "resnet18_frozen_bn": lambda: torchvision.models.resnet18(
        weights=None, norm_layer=functools.partial(FrozenBatchNorm2d, eps=1e-3)),
    "resnet18_bn_eps_momentum": lambda: torchvision.models.resnet18(
        weights=None, norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.3)),
    "resnet18_groupnorm": lambda: torchvision.models.resnet18(
        weights=None, norm_layer=functools.partial(nn.GroupNorm, 4)),
    "resnet18_hand_dilated": dilated_resnet18,
    "fpn_body_frozen_bn": lambda: resnet_fpn_backbone(backbone_name="resnet18", weights=None).body,
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(SOURCES))
def test_converted_computes_what_the_source_computes(name, train):
    torch.manual_seed(0)
    source = randomise_norms(SOURCES[name]()).train(train)
    net = DilatedResNet.from_torchvision(source)
    ours, theirs = leaves(net), leaves(source)
    for key, module in ours.items():
        assert type(module) is type(theirs[key]), key
        assert repr(module) == repr(theirs[key]), key
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source_stages(source, x)
        got = net(x)
    assert len(got) == len(expected)
    for mine, reference in zip(got, expected):
        torch.testing.assert_close(mine, reference)
    state = source.state_dict()
    for key, value in net.state_dict().items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_requires_grad_and_train_mode_are_kept_per_module():
    source = torchvision.models.resnet18(weights=None).train()
    for frozen in (source.conv1, source.bn1, source.layer1):
        frozen.requires_grad_(False)
    source.layer2.eval()
    net = DilatedResNet.from_torchvision(source)
    flags = dict(source.named_parameters())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == {
        n: flags[n].requires_grad for n, _ in net.named_parameters()
    }
    assert {n: m.training for n, m in net.named_modules()} == {
        n: source.get_submodule(n).training for n, _ in net.named_modules()
    }


def test_detection_body_keeps_its_frozen_layers():
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=2).body
    net = DilatedResNet.from_torchvision(body)
    flags = dict(body.named_parameters())
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == [
        n for n, p in flags.items() if not p.requires_grad
    ]
    assert isinstance(net.layer2[0].downsample[1], FrozenBatchNorm2d)


def test_dtype_is_kept_unless_given():
    torch.manual_seed(0)
    source = randomise_norms(torchvision.models.resnet18(weights=None)).double().eval()
    net = DilatedResNet.from_torchvision(source)
    assert {t.dtype for t in net.state_dict().values() if t.is_floating_point()} == {
        torch.float64
    }
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(net(x)[-1], source_stages(source, x)[-1])
    single = DilatedResNet.from_torchvision(source, dtype=torch.float32)
    assert single.conv1.weight.dtype == torch.float32


def test_device_is_kept_unless_given():
    with torch.device("meta"):
        source = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    net = DilatedResNet.from_torchvision(source)
    assert all(t.is_meta for t in [*net.parameters(), *net.buffers()])
    assert net(torch.empty(1, 3, 64, 64, device="meta"))[-1].shape == (1, 512, 2, 2)
    cpu = torchvision.models.resnet18(weights=None)
    assert DilatedResNet.from_torchvision(cpu, device="meta").conv1.weight.is_meta


def test_explicit_output_stride_rebuilds_torchvision_layout_of_a_dilated_source():
    torch.manual_seed(0)
    source = randomise_norms(torchvision.models.resnet50(
        weights=None, replace_stride_with_dilation=[False, False, True])).eval()
    plain = torchvision.models.resnet50(weights=None).eval()
    plain.load_state_dict(source.state_dict())
    net = DilatedResNet.from_torchvision(source, output_stride=32).eval()
    assert net.reductions == [4, 8, 16, 32]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for mine, reference in zip(net(x), source_stages(plain, x)):
            torch.testing.assert_close(mine, reference)


def test_explicit_output_stride_refuses_a_layout_torchvision_does_not_build():
    with pytest.raises(ValueError, match="output_stride=None to keep them"):
        DilatedResNet.from_torchvision(dilated_resnet18(), output_stride=16)


class GatedBlock(BasicBlock):
    pass


def _replace(path: str, module: nn.Module):
    def change(model):
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)
    return change


def _retype(model):
    model.layer3[1].__class__ = GatedBlock


def _pad(model):
    model.layer2[0].conv1.padding = (2, 2)


def _add_parameter(model):
    model.layer1[0].register_parameter("gate", nn.Parameter(torch.ones(1)))


def _mixed_dtype(model):
    model.layer4.double()


REFUSALS = {
    "block_replaced": (_replace("layer2.1", nn.Identity()), TypeError, "layer2.1 is Identity"),
    "block_subclass": (_retype, TypeError, "layer3.1 is GatedBlock"),
    "stem_not_conv": (_replace("conv1", nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3))), TypeError,
                      "conv1 as an nn.Conv2d, got Sequential"),
    "norm_differs": (_replace("layer3.0.bn2", nn.GroupNorm(4, 256)), ValueError,
                     "cannot express layer3.0.bn2: the source has GroupNorm"),
    "stem_norm_unsupported": (_replace("bn1", nn.InstanceNorm2d(64)), TypeError,
                              "bn1 is InstanceNorm2d"),
    "activation_differs": (_replace("layer1.0.relu", nn.GELU()), ValueError,
                           "cannot express layer1.0.relu"),
    "padding_changed": (_pad, ValueError, "cannot express layer2.0.conv1"),
    "shortcut_removed": (_replace("layer2.0.downsample", None), ValueError,
                         "cannot express layer2.0.downsample.0"),
    "parameter_added": (_add_parameter, ValueError, "layer1.0.gate"),
    "mixed_dtypes": (_mixed_dtype, ValueError, "dtypes"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_refuses_what_it_cannot_express(name):
    change, error, message = REFUSALS[name]
    model = torchvision.models.resnet18(weights=None)
    change(model)
    with pytest.raises(error, match=message):
        DilatedResNet.from_torchvision(model)


def test_refuses_a_detection_body_without_layer4():
    body = resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[1, 2]).body
    with pytest.raises(ValueError, match="whole ResNet trunk"):
        DilatedResNet.from_torchvision(body)


@pytest.mark.parametrize("head", ["deeplabv3", "fcn"])
def test_return_layers_drop_into_torchvision_segmentation_models(head):
    # torchvision's segmentation models read features["out"] (and "aux"); the converted,
    # dilated backbone gives them, as IntermediateLayerGetter over the same ResNet does.
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.segmentation.deeplabv3 import DeepLabHead, DeepLabV3
    from torchvision.models.segmentation.fcn import FCN, FCNHead

    torch.manual_seed(0)
    tv = torchvision.models.resnet50(weights=None, replace_stride_with_dilation=[False, True, True])
    layers = {"layer4": "out", "layer3": "aux"}
    ours = DilatedResNet.from_torchvision(tv, return_layers=layers)
    theirs = IntermediateLayerGetter(tv, return_layers=layers)
    make = (lambda b: DeepLabV3(b, DeepLabHead(2048, 3), FCNHead(1024, 3))) if head == "deeplabv3" \
        else (lambda b: FCN(b, FCNHead(2048, 3), FCNHead(1024, 3)))
    model_ours, model_theirs = make(ours).eval(), make(theirs).eval()
    model_ours.classifier.load_state_dict(model_theirs.classifier.state_dict())
    model_ours.aux_classifier.load_state_dict(model_theirs.aux_classifier.state_dict())
    x = torch.randn(1, 3, 65, 47)
    with torch.no_grad():
        out, ref = model_ours(x), model_theirs(x)
    assert list(out) == list(ref) == ["out", "aux"]
    for key in ref:
        assert out[key].shape == (1, 3, 65, 47)
        torch.testing.assert_close(out[key], ref[key])


def test_return_layers_order_and_errors():
    net = DilatedResNet(planes=(4, 4, 4, 4), blocks=(1, 1, 1, 1), return_layers={"layer2": "b",
                        "layer1": "a"})
    out = net(torch.randn(1, 3, 32, 32))
    assert list(out) == ["a", "b"]  # stage order, as IntermediateLayerGetter returns them
    assert "return_layers" in repr(net)
    with pytest.raises(ValueError, match="layer5"):
        DilatedResNet(planes=(4, 4, 4, 4), blocks=(1, 1, 1, 1), return_layers={"layer5": "x"})
    with pytest.raises(TypeError, match="mapping"):
        DilatedResNet(planes=(4, 4, 4, 4), blocks=(1, 1, 1, 1), return_layers=["layer4"])


def test_refusal_names_classes_by_module_path():
    timm = pytest.importorskip("timm")
    with pytest.raises(TypeError, match=r"timm\.models\.resnet\.ResNet"):
        DilatedResNet.from_torchvision(timm.create_model("resnet18", pretrained=False))
