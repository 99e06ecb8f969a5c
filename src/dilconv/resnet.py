"""Features-only ResNet backbone with dilation (He et al. 2016; Yu et al., DRN, 2017).

Module names follow torchvision's ``ResNet`` (``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1`` ... ``layer4``), so :meth:`DilatedResNet.from_torchvision` is a plain state_dict copy.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from dilconv._checks import check_choice, check_feature_map, check_positive
from dilconv._layers import ActLayer, NormLayer, create_act, create_norm
from dilconv.bottleneck import DilatedBasicBlock, DilatedBottleneck

__all__ = ["DilatedResNet"]

_BLOCKS = {"bottleneck": DilatedBottleneck, "basic": DilatedBasicBlock}
_OUTPUT_STRIDES = (8, 16, 32)


def _stage_dilations(
    reduction: int, strides: Sequence[int], dilations: Sequence[int], output_stride: int | None
) -> list[tuple[int, int, int]]:
    """Per stage: (stride, dilation of the first block, dilation of the other blocks).

    Once the running reduction would pass ``output_stride``, a stage's stride becomes 1 and its
    dilation is multiplied by that stride; as in torchvision's ``replace_stride_with_dilation``
    the first block of such a stage keeps the dilation the previous stage ended with.
    """
    plan = []
    factor = 1
    for stride, dilation in zip(strides, dilations):
        previous = factor
        if output_stride is not None and reduction * stride > output_stride:
            factor *= stride
            stride = 1
        reduction *= stride
        plan.append((stride, dilation * previous, dilation * factor))
    return plan


class DilatedResNet(nn.Module):
    """ResNet feature extractor: a stem and residual stages, returning C2..C5 fine to coarse.

    Args:
        in_channels: channels of the input image.
        stem_channels: output channels of the stem convolution.
        stem_kernel: kernel size of the stem convolution (padding ``kernel // 2``).
        stem_stride: stride of the stem convolution.
        stem_bias: whether the stem convolution has a bias.
        stem_pool: follow the stem with a 3x3 / 2 max-pool.
        planes: per stage, the width before expansion.
        blocks: per stage, the number of residual blocks.
        strides: per stage, the stride of its first block.
        dilations: per stage, the dilation of its blocks (all of them, the first included).
        block: ``"bottleneck"`` (:class:`DilatedBottleneck`, expansion 4) or ``"basic"``
            (:class:`DilatedBasicBlock`, expansion 1).
        output_stride: 8, 16 or 32: stages that would reduce the input further than this
            trade their stride for dilation (torchvision's ``replace_stride_with_dilation``,
            timm's ``output_stride``). ``None`` keeps ``strides`` as given.
        groups: groups of the bottleneck 3x3 convolutions (ResNeXt).
        width_per_group: bottleneck width per group at 64 planes (torchvision's argument):
            the 3x3 width of a stage is ``planes * width_per_group / 64 * groups``.
        norm_layer: norm class or factory, called as ``norm_layer(num_features)``
            (``FrozenBatchNorm2d`` works); ``None`` for no norm.
        act_layer: activation class or factory (in place where it supports ``inplace``).

    Attributes:
        out_channels: channels of each returned stage.
        reductions: total down-sampling factor of each returned stage.

    Shape:
        input (N, in_channels, H, W) -> list of 4 maps (N, out_channels[i], H_i, W_i) with
        ``H_i`` about ``H / reductions[i]`` (exactly ``ceil`` for stride-2 steps).

    Example:
        >>> import torch
        >>> from dilconv import DilatedResNet
        >>> net = DilatedResNet(planes=(8, 16, 32, 64), blocks=(1, 1, 1, 1), output_stride=8)
        >>> [tuple(f.shape[1:]) for f in net(torch.randn(1, 3, 64, 64))]
        [(32, 16, 16), (64, 8, 8), (128, 8, 8), (256, 8, 8)]
    """

    def __init__(
        self,
        in_channels: int = 3,
        *,
        stem_channels: int = 64,
        stem_kernel: int = 7,
        stem_stride: int = 2,
        stem_bias: bool = False,
        stem_pool: bool = True,
        planes: Sequence[int] = (64, 128, 256, 512),
        blocks: Sequence[int] = (3, 4, 6, 3),
        strides: Sequence[int] = (1, 2, 2, 2),
        dilations: Sequence[int] = (1, 1, 1, 1),
        block: str = "bottleneck",
        output_stride: int | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.ReLU,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("stem_channels", stem_channels)
        check_positive("stem_kernel", stem_kernel)
        check_positive("stem_stride", stem_stride)
        check_choice("block", block, _BLOCKS)
        check_positive("groups", groups)
        check_positive("width_per_group", width_per_group)
        stages = {"planes": planes, "blocks": blocks, "strides": strides, "dilations": dilations}
        if len({len(v) for v in stages.values()}) != 1 or not len(planes):
            raise ValueError(
                "planes, blocks, strides and dilations must be non-empty and of one length, got "
                + ", ".join(f"{k}={tuple(v)}" for k, v in stages.items())
            )
        for key, values in stages.items():
            for v in values:
                check_positive(key, v)
        if output_stride is not None and output_stride not in _OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride must be one of {_OUTPUT_STRIDES} or None, got {output_stride}"
            )
        if block == "basic" and (groups != 1 or width_per_group != 64):
            raise ValueError("block='basic' supports only groups=1 and width_per_group=64")
        stem_reduction = stem_stride * (2 if stem_pool else 1)
        if output_stride is not None and stem_reduction > output_stride:
            raise ValueError(
                f"output_stride={output_stride} is finer than the stem's reduction {stem_reduction}"
            )
        dd = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.block = block
        self.output_stride = output_stride
        self.conv1 = nn.Conv2d(
            in_channels, stem_channels, stem_kernel, stride=stem_stride,
            padding=stem_kernel // 2, bias=stem_bias, **dd,
        )
        self.bn1 = create_norm(norm_layer, stem_channels, **dd)
        self.relu = create_act(act_layer)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem_pool else nn.Identity()

        block_cls = _BLOCKS[block]
        plan = _stage_dilations(stem_reduction, strides, dilations, output_stride)
        channels = stem_channels
        reduction = stem_reduction
        self.out_channels: list[int] = []
        self.reductions: list[int] = []
        self.stage_dilations: list[tuple[int, ...]] = []
        for index, (width, count, (stride, first, rest)) in enumerate(
            zip(planes, blocks, plan), start=1
        ):
            extra = {}
            if block == "bottleneck":
                extra = {"groups": groups, "width": width * width_per_group // 64 * groups}
            layers = []
            for i in range(count):
                layers.append(
                    block_cls(
                        channels, width, stride if i == 0 else 1, first if i == 0 else rest,
                        norm_layer=norm_layer, act_layer=act_layer, **extra, **dd,
                    )
                )
                channels = layers[-1].out_channels
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            reduction *= stride
            self.out_channels.append(channels)
            self.reductions.append(reduction)
            self.stage_dilations.append((first,) + (rest,) * (count - 1))
        self.num_stages = len(planes)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The residual stages ``layer1`` ... in order."""
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)]

    def forward_stem(self, x: Tensor) -> Tensor:
        """Stem only: conv, norm, activation, optional max-pool."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> list[Tensor]:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        features = []
        x = self.forward_stem(x)
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features

    def extra_repr(self) -> str:
        return (
            f"block={self.block!r}, out_channels={self.out_channels}, "
            f"reductions={self.reductions}, output_stride={self.output_stride}"
        )

    @classmethod
    def from_torchvision(
        cls, model: nn.Module, output_stride: int | None = 32, *, device=None, dtype=None
    ) -> DilatedResNet:
        """Convert a torchvision ``ResNet`` (any depth, ResNeXt and wide variants included).

        The returned backbone holds a copy of ``model``'s weights and buffers (the fc layer is
        dropped) and runs its stages with ``output_stride`` 8, 16 or 32. At 32 it computes what
        ``model`` computes; at 8 or 16 what torchvision's ``replace_stride_with_dilation``
        computes, also for ResNet-18/34, whose ``BasicBlock`` torchvision cannot dilate.

        Example:
            >>> import torch, torchvision
            >>> from dilconv import DilatedResNet
            >>> tv = torchvision.models.resnet18(weights=None)
            >>> net = DilatedResNet.from_torchvision(tv, output_stride=8)
            >>> net(torch.randn(1, 3, 64, 64))[-1].shape
            torch.Size([1, 512, 8, 8])
        """
        from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

        if not isinstance(model, ResNet):
            raise TypeError(
                f"from_torchvision expects a torchvision.models.ResNet, got {type(model).__name__}"
            )
        if output_stride not in _OUTPUT_STRIDES:
            raise ValueError(f"output_stride must be one of {_OUTPUT_STRIDES}, got {output_stride}")
        first = model.layer1[0]
        if isinstance(first, Bottleneck):
            block, groups = "bottleneck", first.conv2.groups
            planes = first.conv3.out_channels // 4
            width_per_group = first.conv2.out_channels * 64 // (groups * planes)
        elif isinstance(first, BasicBlock):
            block, groups, width_per_group = "basic", 1, 64
        else:
            raise TypeError(f"unsupported residual block {type(first).__name__}")
        stages = [model.layer1, model.layer2, model.layer3, model.layer4]
        conv = model.conv1
        net = cls(
            conv.in_channels,
            stem_channels=conv.out_channels,
            stem_kernel=conv.kernel_size[0],
            stem_stride=conv.stride[0],
            stem_bias=conv.bias is not None,
            stem_pool=isinstance(model.maxpool, nn.MaxPool2d),
            planes=[s[0].conv1.out_channels if block == "basic" else s[0].conv3.out_channels // 4
                    for s in stages],
            blocks=[len(s) for s in stages],
            strides=(1, 2, 2, 2),
            block=block,
            output_stride=output_stride,
            groups=groups,
            width_per_group=width_per_group,
            device=device,
            dtype=dtype,
        )
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
        net.load_state_dict(state)
        return net.train(model.training)
