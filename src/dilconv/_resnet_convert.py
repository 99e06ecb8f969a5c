"""What :meth:`dilconv.DilatedResNet.from_torchvision` reads from a torchvision ResNet.

The layout (stem, block kind, widths, strides, per-block dilations, norm layer), the checks
that nothing the source had is lost, and where the result is built.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypedDict, TypeVar

import torch
from torch import nn

from dilconv._layers import ActLayer, Device, DType, NormLayer

if TYPE_CHECKING:
    from dilconv.resnet import DilatedResNet

__all__ = [
    "TORCHVISION_STRIDES",
    "TorchvisionLayout",
    "check_same_layers",
    "check_source",
    "follows_torchvision_rule",
    "placement",
    "torchvision_layout",
]

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


def check_source(model: nn.Module) -> None:
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
            f"IntermediateLayerGetter over one), got {type(model).__name__}"
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


def _norm_layer(norm: nn.Module) -> NormLayer:
    """A factory that builds ``norm``'s type with ``norm``'s settings for any channel count."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    if type(norm) is FrozenBatchNorm2d:
        return functools.partial(FrozenBatchNorm2d, eps=norm.eps)
    if type(norm) is nn.BatchNorm2d:
        return functools.partial(
            nn.BatchNorm2d, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
            track_running_stats=norm.track_running_stats,
        )
    if type(norm) is nn.GroupNorm:
        return functools.partial(nn.GroupNorm, norm.num_groups, eps=norm.eps, affine=norm.affine)
    raise TypeError(
        "from_torchvision keeps BatchNorm2d, FrozenBatchNorm2d and GroupNorm norms, "
        f"bn1 is {type(norm).__name__}"
    )


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
        "norm_layer": _norm_layer(model.get_submodule("bn1")),
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


def check_same_layers(source: nn.Module, built: DilatedResNet) -> None:
    """Raise unless every layer of ``built`` is the layer of that name in ``source``."""
    for name, ours in built.named_modules():
        if next(ours.children(), None) is not None:
            continue
        try:
            theirs = source.get_submodule(name)
        except AttributeError:
            theirs = None
        if repr(theirs) != repr(ours):
            raise ValueError(
                f"from_torchvision cannot express {name}: the source has {theirs!r} where the "
                f"DilatedResNet of its layout (one norm layer and one activation, those of bn1 "
                f"and relu) has {ours!r}"
            )


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


def placement(
    model: nn.Module, device: Device, dtype: DType
) -> tuple[Device, torch.dtype]:
    """``device`` and ``dtype``, each defaulting to the one all of ``model``'s tensors share."""
    tensors = [*model.parameters(), *model.buffers()]
    if device is None:
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(
                f"from_torchvision: the source's tensors are on {sorted(map(str, devices))}; "
                "pass device= to choose one"
            )
        (device,) = devices
    if dtype is None:
        dtypes = {t.dtype for t in tensors if t.is_floating_point()}
        if len(dtypes) != 1:
            raise ValueError(
                f"from_torchvision: the source's tensors have dtypes {sorted(map(str, dtypes))}; "
                "pass dtype= to choose one"
            )
        (dtype,) = dtypes
    return device, dtype
