"""torchvision ResNet -> :class:`dilconv.DilatedResNet` (``DilatedResNet.from_torchvision``).

Reads the layout (stem, block kind, widths, strides, per-block dilations, norm layer), builds
the DilatedResNet of that layout, checks that its every layer is the source's, and copies the
trunk's tensors one to one (the names are torchvision's; ``avgpool`` and ``fc`` are dropped).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import TypedDict, TypeVar

from torch import nn

from dilconv._layers import ActLayer, Device, DType, NormLayer
from dilconv.convert._common import (
    check_same_layers,
    copy_state,
    keep_modes,
    norm_factory,
    placement,
)
from dilconv.resnet import OUTPUT_STRIDES, DilatedResNet

__all__ = [
    "TORCHVISION_STRIDES",
    "TorchvisionLayout",
    "follows_torchvision_rule",
    "resnet_from_torchvision",
    "torchvision_layout",
]

CONVERTER = "from_torchvision"

# What from_torchvision reads: torchvision's ResNet trunk, and the strides its stages are built
# with before replace_stride_with_dilation trades any of them for dilation.
_TRUNK = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
TORCHVISION_STRIDES = (1, 2, 2, 2)


class TorchvisionLayout(TypedDict, total=False):
    """The :class:`~dilconv.DilatedResNet` keyword arguments that rebuild a torchvision trunk."""

    in_channels: int
    stem_channels: int
    stem_kernel: int
    stem_stride: int
    stem_bias: bool
    stem_pool: bool
    planes: list[int]
    blocks: list[int]
    strides: Sequence[int]
    dilations: list[tuple[int, ...]]
    block: str
    groups: int
    width_per_group: int
    norm_layer: NormLayer
    act_layer: ActLayer


def _check_source(model: nn.Module) -> None:
    from torchvision.models._utils import IntermediateLayerGetter
    from torchvision.models.resnet import ResNet

    if isinstance(model, IntermediateLayerGetter):
        names = tuple(name for name, _ in model.named_children())
        if names != _TRUNK:
            raise ValueError(
                "from_torchvision converts an IntermediateLayerGetter that holds a whole ResNet "
                f"trunk {_TRUNK}, got one with {names}"
            )
    elif not isinstance(model, ResNet):
        raise TypeError(
            "from_torchvision expects a torchvision.models.ResNet (or a detection backbone's "
            f"IntermediateLayerGetter over one), got "
            f"{type(model).__module__}.{type(model).__qualname__}"
        )


_M = TypeVar("_M", bound=nn.Module)


def _submodule(model: nn.Module, name: str, kind: type[_M]) -> _M:
    """``model``'s submodule ``name``, refused with its name unless it is a ``kind``."""
    module = model.get_submodule(name)
    if not isinstance(module, kind):
        raise TypeError(
            f"from_torchvision reads {name} as an nn.{kind.__name__}, got {type(module).__name__}"
        )
    return module


def _conv(model: nn.Module, name: str) -> nn.Conv2d:
    return _submodule(model, name, nn.Conv2d)


def torchvision_layout(model: nn.Module) -> TorchvisionLayout:
    """The DilatedResNet arguments that rebuild ``model``'s trunk as it is."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    names = [f"layer{i}" for i in range(1, 5)]
    stages = [_submodule(model, name, nn.Sequential) for name in names]
    kind = type(stages[0][0])
    if kind not in (BasicBlock, Bottleneck):
        raise TypeError(
            f"from_torchvision converts torchvision's BasicBlock and Bottleneck, "
            f"layer1.0 is {kind.__name__}"
        )
    for name, stage in zip(names, stages):
        for i, block in enumerate(stage):
            if type(block) is not kind:
                raise TypeError(
                    f"from_torchvision: {name}.{i} is {type(block).__name__}, every block must "
                    f"be torchvision's {kind.__name__} as layer1.0 is"
                )
    bottleneck = kind is Bottleneck
    stem = _conv(model, "conv1")
    layout: TorchvisionLayout = {
        "in_channels": stem.in_channels,
        "stem_channels": stem.out_channels,
        "stem_kernel": stem.kernel_size[0],
        "stem_stride": stem.stride[0],
        "stem_bias": stem.bias is not None,
        "stem_pool": isinstance(model.get_submodule("maxpool"), nn.MaxPool2d),
        "blocks": [len(stage) for stage in stages],
        "strides": [_conv(model, f"{n}.0.{'conv2' if bottleneck else 'conv1'}").stride[0]
                    for n in names],
        "dilations": [tuple(_conv(model, f"{n}.{i}.conv2").dilation[0] for i in range(len(s)))
                      for n, s in zip(names, stages)],
        "block": "bottleneck" if bottleneck else "basic",
        "norm_layer": norm_factory(model.get_submodule("bn1"), converter=CONVERTER, where="bn1"),
        "act_layer": functools.partial(
            nn.ReLU, inplace=getattr(model.get_submodule("relu"), "inplace", True)
        ),
    }
    if bottleneck:
        planes = [_conv(model, f"{n}.0.conv3").out_channels // 4 for n in names]
        first = _conv(model, "layer1.0.conv2")
        layout["planes"] = planes
        layout["groups"] = first.groups
        layout["width_per_group"] = first.out_channels * 64 // (first.groups * planes[0])
    else:
        layout["planes"] = [_conv(model, f"{n}.0.conv1").out_channels for n in names]
    return layout


def follows_torchvision_rule(
    strides: Sequence[int], dilations: Sequence[tuple[int, ...]]
) -> bool:
    """Whether torchvision's ResNet builds these strides and per-block dilations.

    Its stages have strides (1, 2, 2, 2); a stage that ``replace_stride_with_dilation`` dilates
    has stride 1 and multiplies the running dilation by 2, its first block keeping the previous.
    """
    dilation = 1
    for nominal, stride, per_block in zip(TORCHVISION_STRIDES, strides, dilations):
        previous = dilation
        if stride == 1:
            dilation *= nominal
        expected = (previous,) + (dilation,) * (len(per_block) - 1)
        if stride not in (1, nominal) or per_block != expected:
            return False
    return True


def resnet_from_torchvision(
    model: nn.Module,
    output_stride: int | None = None,
    *,
    return_layers: Mapping[str, str] | None = None,
    device: Device = None,
    dtype: DType = None,
) -> DilatedResNet:
    """:meth:`dilconv.DilatedResNet.from_torchvision` (see there for what is kept and refused)."""
    _check_source(model)
    if output_stride is not None and output_stride not in OUTPUT_STRIDES:
        raise ValueError(
            f"output_stride must be one of {OUTPUT_STRIDES} or None, got {output_stride}"
        )
    layout = torchvision_layout(model)
    check_same_layers(
        DilatedResNet(**layout, device="meta"), model, {}, converter=CONVERTER,
        built="the DilatedResNet of its layout (one norm layer and one activation, those of bn1 "
        "and relu)",
    )
    if output_stride is not None:
        if not follows_torchvision_rule(layout["strides"], layout["dilations"]):
            raise ValueError(
                f"output_stride={output_stride} rebuilds torchvision's layout, but the "
                f"source's stage strides {layout['strides']} and block dilations "
                f"{layout['dilations']} are not one torchvision builds; pass "
                "output_stride=None to keep them"
            )
        layout["strides"] = TORCHVISION_STRIDES
        layout["dilations"] = [(1,) * n for n in layout["blocks"]]
    device, dtype = placement(model, device, dtype, converter=CONVERTER)
    net = DilatedResNet(
        **layout, output_stride=output_stride, return_layers=return_layers, device=device,
        dtype=dtype,
    )
    # The trunk is the source: avgpool and fc, which a features-only backbone has no use for,
    # are the tensors left behind.
    trunk = nn.ModuleDict({name: model.get_submodule(name) for name in _TRUNK})
    copy_state(net, trunk, {key: key for key in net.state_dict()}, converter=CONVERTER)
    keep_modes(net, model, {})
    return net
