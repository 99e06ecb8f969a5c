"""Features-only ResNet backbone with dilation (He et al. 2016; Yu et al., DRN, 2017).

Module names follow torchvision's ``ResNet`` (``conv1``, ``bn1``, ``relu``, ``maxpool``,
``layer1`` ... ``layer4``), so :meth:`DilatedResNet.from_torchvision` rebuilds the source's layout
and copies its state_dict unchanged (:mod:`dilconv.convert.torchvision_resnet`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from dilconv._checks import check_choice, check_feature_map, check_positive
from dilconv._layers import (
    ActLayer,
    Device,
    DType,
    FactoryKwargs,
    NormLayer,
    create_act,
    create_norm,
)
from dilconv.bottleneck import DilatedBasicBlock, DilatedBottleneck

__all__ = ["DilatedResNet"]

_BLOCKS = {"bottleneck": DilatedBottleneck, "basic": DilatedBasicBlock}
# The output strides a network (and dilconv.convert's from_torchvision) can be rebuilt for.
OUTPUT_STRIDES = (8, 16, 32)


def _stage_plan(
    reduction: int,
    strides: Sequence[int],
    dilations: Sequence[tuple[int, ...]],
    output_stride: int | None,
) -> list[tuple[int, tuple[int, ...]]]:
    """Per stage: (stride, dilation of each block).

    Once the running reduction would pass ``output_stride``, a stage's stride becomes 1 and its
    blocks' dilations are multiplied by that stride; as in torchvision's
    ``replace_stride_with_dilation`` the first block of such a stage keeps the factor the previous
    stage ended with.
    """
    plan = []
    factor = 1
    for stride, base in zip(strides, dilations):
        previous = factor
        if output_stride is not None and reduction * stride > output_stride:
            factor *= stride
            stride = 1
        reduction *= stride
        plan.append((stride, tuple(d * (factor if i else previous) for i, d in enumerate(base))))
    return plan


def _check_return_layers(
    return_layers: Mapping[str, str] | None, num_stages: int
) -> dict[str, str] | None:
    if return_layers is None:
        return None
    if isinstance(return_layers, str) or not isinstance(return_layers, Mapping):
        raise TypeError(
            "return_layers must be a mapping stage name -> output name, as torchvision's "
            f"IntermediateLayerGetter takes it, got {type(return_layers).__name__}"
        )
    stages = [f"layer{i}" for i in range(1, num_stages + 1)]
    unknown = [name for name in return_layers if name not in stages]
    if unknown or not return_layers:
        raise ValueError(
            f"return_layers must name some of the stages {stages}, got {dict(return_layers)}"
        )
    return {str(k): str(v) for k, v in return_layers.items()}


def _block_dilations(
    dilations: Sequence[int | Sequence[int]], blocks: Sequence[int]
) -> list[tuple[int, ...]]:
    """``dilations`` with each stage spelled out per block (an int stands for every block)."""
    out = []
    for index, (value, count) in enumerate(zip(dilations, blocks)):
        if not isinstance(value, Sequence):
            per_block = (check_positive("dilations", value),) * count
        elif len(value) != count:
            raise ValueError(
                f"dilations[{index}] must be an int or give one dilation per block "
                f"({count}), got {tuple(value)}"
            )
        else:
            per_block = tuple(value)
        for d in per_block:
            check_positive("dilations", d)
        out.append(per_block)
    return out


class DilatedResNet(nn.Module):
    """ResNet feature extractor: a stem and residual stages, returning C2..C5 fine to coarse.

    Weights start as torchvision's ``ResNet`` starts them (see :meth:`reset_parameters`).

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
        dilations: per stage, the dilation of its blocks: an int for all of them (the first
            included), or one int per block (the exact layout of a converted network, a
            multi-grid); :attr:`stage_dilations` of a network is a valid value.
        block: ``"bottleneck"`` (:class:`DilatedBottleneck`, expansion 4) or ``"basic"``
            (:class:`DilatedBasicBlock`, expansion 1).
        output_stride: 8, 16 or 32: stages that would reduce the input further than this
            trade their stride for dilation (torchvision's ``replace_stride_with_dilation``,
            timm's ``output_stride``). ``None`` keeps ``strides`` and ``dilations`` as given.
        groups: groups of the bottleneck 3x3 convolutions (ResNeXt).
        width_per_group: bottleneck width per group at 64 planes (torchvision's argument):
            the 3x3 width of a stage is ``planes * width_per_group / 64 * groups``.
        norm_layer: norm class or factory, called as ``norm_layer(num_features)``
            (``FrozenBatchNorm2d`` works); ``None`` for no norm.
        act_layer: activation class or factory (in place where it supports ``inplace``).
        zero_init_residual: start the weight of each block's last norm at 0 (``bn3`` of a
            bottleneck, ``bn2`` of a basic block), so that every block starts as
            ``relu(shortcut)`` (Goyal et al. 2017, section 5.1; torchvision's argument). Needs
            a norm with a weight.
        return_layers: stage name -> output name, as torchvision's ``IntermediateLayerGetter``
            takes it (``{"layer4": "out", "layer3": "aux"}``): ``forward`` then returns a dict
            of those stages under those names, in stage order, and stops after the last one
            asked for. So the backbone drops into torchvision's segmentation models
            (``DeepLabV3``, ``FCN``), which read ``features["out"]`` and ``features["aux"]``.
            ``None`` (default): the list of every stage.

    Attributes:
        out_channels: channels of each returned stage.
        reductions: total down-sampling factor of each returned stage.
        stage_dilations: per stage, the dilation of each block.

    Shape:
        input (N, in_channels, H, W) -> list of 4 maps (N, out_channels[i], H_i, W_i) with
        ``H_i`` about ``H / reductions[i]`` (exactly ``ceil`` for stride-2 steps); with
        ``return_layers``, a dict output name -> the map of that stage.

    Example:
        >>> import torch
        >>> from dilconv import DilatedResNet
        >>> net = DilatedResNet(planes=(8, 16, 32, 64), blocks=(1, 1, 1, 1), output_stride=8)
        >>> [tuple(f.shape[1:]) for f in net(torch.randn(1, 3, 64, 64))]
        [(32, 16, 16), (64, 8, 8), (128, 8, 8), (256, 8, 8)]
        >>> net = DilatedResNet(planes=(8, 16, 32, 64), blocks=(1, 1, 3, 1), strides=(1, 2, 1, 1),
        ...                     dilations=(1, 1, (1, 2, 4), 4), zero_init_residual=True)
        >>> net.reductions, net.stage_dilations[2], net.layer3[0].bn3.weight.abs().sum().item()
        ([4, 8, 8, 8], (1, 2, 4), 0.0)
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
        dilations: Sequence[int | Sequence[int]] = (1, 1, 1, 1),
        block: str = "bottleneck",
        output_stride: int | None = None,
        groups: int = 1,
        width_per_group: int = 64,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        act_layer: ActLayer | None = nn.ReLU,
        zero_init_residual: bool = False,
        return_layers: Mapping[str, str] | None = None,
        device: Device = None,
        dtype: DType = None,
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
        for key in ("planes", "blocks", "strides"):
            for v in stages[key]:
                check_positive(key, v)
        per_block = _block_dilations(dilations, blocks)
        if output_stride is not None and output_stride not in OUTPUT_STRIDES:
            raise ValueError(
                f"output_stride must be one of {OUTPUT_STRIDES} or None, got {output_stride}"
            )
        if block == "basic" and (groups != 1 or width_per_group != 64):
            raise ValueError("block='basic' supports only groups=1 and width_per_group=64")
        stem_reduction = stem_stride * (2 if stem_pool else 1)
        if output_stride is not None and stem_reduction > output_stride:
            raise ValueError(
                f"output_stride={output_stride} is finer than the stem's reduction {stem_reduction}"
            )
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.block = block
        self.output_stride = output_stride
        self.zero_init_residual = zero_init_residual
        self.conv1 = nn.Conv2d(
            in_channels, stem_channels, stem_kernel, stride=stem_stride,
            padding=stem_kernel // 2, bias=stem_bias, **dd,
        )
        self.bn1 = create_norm(norm_layer, stem_channels, **dd)
        self.relu = create_act(act_layer)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem_pool else nn.Identity()

        block_cls = _BLOCKS[block]
        plan = _stage_plan(stem_reduction, strides, per_block, output_stride)
        channels = stem_channels
        reduction = stem_reduction
        self.out_channels: list[int] = []
        self.reductions: list[int] = []
        self.stage_dilations: list[tuple[int, ...]] = []
        for index, (width, (stride, stage_dilations)) in enumerate(zip(planes, plan), start=1):
            extra = {}
            if block == "bottleneck":
                extra = {"groups": groups, "width": width * width_per_group // 64 * groups}
            layers = []
            for i, dilation in enumerate(stage_dilations):
                layers.append(
                    block_cls(
                        channels, width, 1 if i else stride, dilation,
                        norm_layer=norm_layer, act_layer=act_layer, **extra, **dd,
                    )
                )
                channels = layers[-1].out_channels
            self.add_module(f"layer{index}", nn.Sequential(*layers))
            reduction *= stride
            self.out_channels.append(channels)
            self.reductions.append(reduction)
            self.stage_dilations.append(stage_dilations)
        self.num_stages = len(planes)
        self.return_layers = _check_return_layers(return_layers, self.num_stages)
        self.reset_parameters()

    @property
    def stages(self) -> list[nn.Sequential]:
        """The residual stages ``layer1`` ... in order."""
        return [getattr(self, f"layer{i}") for i in range(1, self.num_stages + 1)]

    def reset_parameters(self) -> None:
        """Start the weights as torchvision's ``ResNet`` does (He et al., ICCV 2015).

        Every convolution: Kaiming normal with ``mode="fan_out"`` and the ReLU gain (std
        ``sqrt(2 / fan_out)``, the paper's backward-pass case), zero bias. Every norm: weight 1,
        bias 0 where it has them, running statistics reset where it keeps them. With
        ``zero_init_residual`` the weight of each block's last norm is then 0. On the meta
        device this touches no data.
        """
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for norm in self._norms():
            weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
            if isinstance(weight, Tensor):
                nn.init.ones_(weight)
            if isinstance(bias, Tensor):
                nn.init.zeros_(bias)
            reset_running_stats = getattr(norm, "reset_running_stats", None)
            if callable(reset_running_stats):
                reset_running_stats()
        if not self.zero_init_residual:
            return
        for index, stage in enumerate(self.stages, start=1):
            for i, block in enumerate(stage):
                name = "bn3" if isinstance(block, DilatedBottleneck) else "bn2"
                weight = getattr(getattr(block, name), "weight", None)
                if not isinstance(weight, Tensor):
                    raise ValueError(
                        "zero_init_residual=True needs a norm with a weight in each block, "
                        f"layer{index}.{i}.{name} is {getattr(block, name)!r}"
                    )
                nn.init.zeros_(weight)

    def _norms(self) -> list[nn.Module]:
        norms = [self.bn1]
        for stage in self.stages:
            for block in stage:
                norms += [getattr(block, n) for n in ("bn1", "bn2", "bn3") if hasattr(block, n)]
                downsample = getattr(block, "downsample", None)
                if isinstance(downsample, nn.Sequential):
                    norms.append(downsample[1])
        return norms

    def forward_stem(self, x: Tensor) -> Tensor:
        """Stem only: conv, norm, activation, optional max-pool."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> list[Tensor] | dict[str, Tensor]:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        x = self.forward_stem(x)
        if self.return_layers is None:
            features = []
            for stage in self.stages:
                x = stage(x)
                features.append(x)
            return features
        named: dict[str, Tensor] = {}
        for index, stage in enumerate(self.stages, start=1):
            if len(named) == len(self.return_layers):
                break  # later stages are not asked for, as IntermediateLayerGetter drops them
            x = stage(x)
            if f"layer{index}" in self.return_layers:
                named[self.return_layers[f"layer{index}"]] = x
        return named

    def extra_repr(self) -> str:
        returns = "" if self.return_layers is None else f", return_layers={self.return_layers}"
        return (
            f"block={self.block!r}, out_channels={self.out_channels}, "
            f"reductions={self.reductions}, output_stride={self.output_stride}{returns}"
        )

    @classmethod
    def from_torchvision(
        cls,
        model: nn.Module,
        output_stride: int | None = None,
        *,
        return_layers: Mapping[str, str] | None = None,
        device: Device = None,
        dtype: DType = None,
    ) -> DilatedResNet:
        """Convert a torchvision ``ResNet`` (any depth, ResNeXt and wide variants included).

        The returned backbone holds a copy of ``model``'s weights and buffers (``avgpool`` and
        ``fc`` are dropped) and keeps what ``model`` had: its strides and per-block dilations
        (``replace_stride_with_dilation`` included), its norm layer's type and settings
        (``FrozenBatchNorm2d`` and its ``eps``, ``BatchNorm2d``'s ``eps`` and ``momentum``,
        ``GroupNorm``'s groups), each parameter's ``requires_grad``, each module's train/eval
        mode, and the device and dtype of its tensors.

        ``model`` may also be a detection backbone's body (torchvision's
        ``IntermediateLayerGetter``, e.g. ``resnet_fpn_backbone(...).body``) that holds the
        whole trunk; the result returns all four stages.

        Args:
            model: the torchvision ``ResNet`` to convert.
            output_stride: ``None`` computes what ``model`` computes. 8, 16 or 32 rebuilds the
                stages as torchvision's ``replace_stride_with_dilation`` would for that output
                stride (from any torchvision layout, dilated or not), also for ResNet-18/34,
                whose ``BasicBlock`` torchvision cannot dilate.
            return_layers: stage name -> output name (see the class), e.g.
                ``{"layer4": "out", "layer3": "aux"}`` for torchvision's ``DeepLabV3``/``FCN``.
            device: where to build the result; by default where ``model``'s tensors are.
            dtype: floating dtype of the result; by default that of ``model``'s tensors.

        Raises:
            TypeError: ``model`` is not a torchvision ResNet; a block is not torchvision's
                ``BasicBlock``/``Bottleneck`` (all of one kind); a convolution the layout is
                read from (the stem ``conv1`` included) is not an ``nn.Conv2d``; ``bn1`` is
                not a ``BatchNorm2d``, ``FrozenBatchNorm2d`` or ``GroupNorm``.
            ValueError: a module differs from what the DilatedResNet of ``model``'s layout
                builds (another norm or activation in one place, a changed padding, a removed
                shortcut), or a tensor of the trunk would not be carried over (an added
                parameter): both :class:`~dilconv.convert.ConversionError`; an explicit
                ``output_stride`` for strides and dilations that torchvision does not build;
                tensors on several devices or dtypes without ``device``/``dtype``.

        Example:
            >>> import torch, torchvision
            >>> from torchvision.ops.misc import FrozenBatchNorm2d
            >>> from dilconv import DilatedResNet
            >>> tv = torchvision.models.resnet50(replace_stride_with_dilation=[False, True, True])
            >>> DilatedResNet.from_torchvision(tv).reductions
            [4, 8, 8, 8]
            >>> tv = torchvision.models.resnet18(norm_layer=FrozenBatchNorm2d).requires_grad_(False)
            >>> net = DilatedResNet.from_torchvision(tv, output_stride=8)
            >>> net.layer4[1].bn2, net.layer4[1].conv2.dilation, net.conv1.weight.requires_grad
            (FrozenBatchNorm2d(512, eps=1e-05), (4, 4), False)
            >>> net(torch.randn(1, 3, 64, 64))[-1].shape
            torch.Size([1, 512, 8, 8])
        """
        from dilconv.convert.torchvision_resnet import resnet_from_torchvision

        return resnet_from_torchvision(
            model, output_stride, return_layers=return_layers, device=device, dtype=dtype
        )
