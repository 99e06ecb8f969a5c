"""Bidirectional feature pyramid (Tan, Pang & Le, EfficientDet, CVPR 2020, sec. 3, fig. 2f).

A BiFPN layer runs a top-down pass and then a bottom-up pass over the pyramid, fusing the maps
that meet at each node with :class:`~dilconv.WeightedFusion` (eq. 3) and refining the result
with a depthwise-separable 3x3 convolution, a norm and an activation. It replaces the
unweighted sums of an FPN's top-down path (Lin et al. 2017) with learned, normalised ones.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dilconv._checks import (
    check_choice,
    check_levels,
    check_positive,
    is_tracing,
    is_transforming,
    pyramid_channels,
    pyramid_output_keys,
)
from dilconv._layers import (
    ActLayer,
    Device,
    DType,
    FactoryKwargs,
    NormLayer,
    create_act,
    create_norm,
)
from dilconv.fusion import FUSION_MODES, WeightedFusion
from dilconv.upsample import resize_to

__all__ = ["BiFPN", "BiFPNLayer", "DOWNSAMPLE_PADDINGS", "NODE_ORDERS", "PROJECTIONS"]

NODE_ORDERS = ("conv_norm_act", "act_conv_norm")
"""Order of the operations after each fusion: the paper's text (sec. 3.3: separable conv,
batch norm, activation) or effdet's ``BiFpn`` (activation, separable conv, batch norm)."""

PROJECTIONS = ("per_node", "shared")
"""Where the first layer's inputs are brought to ``channels``: ``"per_node"``, EfficientDet's
graph as effdet builds it, gives every fusion node of the first layer its own 1x1
convolution + norm for each input whose channels differ, so a backbone level read by two nodes
is projected twice; ``"shared"`` projects each level once before the first layer (cheaper: at
EfficientDet-D0's size 168 k against 194 k parameters, and fewer FLOPs; not EfficientDet's
network)."""

DOWNSAMPLE_PADDINGS = ("symmetric", "same")
"""Padding of the 3x3 stride-2 max-pools: ``"symmetric"`` pads one pixel on every side (effdet's
``efficientdet_*`` models); ``"same"`` is TensorFlow's "SAME" padding, which effdet's
``tf_efficientdet_*`` models use (timm's ``MaxPool2dSame``): the total padding
``max((ceil(H/2) - 1) * 2 + 3 - H, 0)`` is split with the odd pixel at the right/bottom, so an
even-sized map is padded on the right and bottom only. Both give ``ceil(H / 2)``."""

Features = Sequence[Tensor] | Mapping[Hashable, Tensor]


def _cpu_nchw(levels: Sequence[Tensor]) -> bool:
    """Whether the pyramid is on the CPU in NCHW, and so runs in channels_last inside (eager).

    On the CPU, ``max_pool2d`` and ``upsample_nearest2d`` run as scalar loops in NCHW and
    vectorised in channels_last (on 2x64x64x64: 2.2 against 0.13 ms, 1.3 against 0.32 ms), and
    oneDNN's convolutions take channels_last as they are. Converting the levels once at entry
    and the outputs back at exit makes EfficientDet-D0's BiFPN about 1.5x faster in training and
    inference; the caller still gets the memory format it gave. Levels already in channels_last,
    CUDA tensors and compiled code (where Inductor picks layouts itself) are left as they are,
    and so is every call where the conversion cannot apply or would change what is recorded:
    inside torch.func transforms (vmap, grad, jvp, jacrev: functorch cannot clone to a memory
    format), while ``torch.jit.trace`` or ``torch.fx`` records the graph (a trace must not depend
    on the inputs' layout).
    """
    if torch.compiler.is_compiling():  # checked first: the tests below would add guards
        return False
    if is_tracing() or is_transforming():
        return False
    return all(
        isinstance(x, Tensor) and x.device.type == "cpu" and x.dim() == 4 and x.is_contiguous()
        for x in levels
    )


def _to_channels_last(levels: Sequence[Tensor]) -> list[Tensor]:
    return [x.contiguous(memory_format=torch.channels_last) for x in levels]


def _to_nchw(levels: Sequence[Tensor]) -> list[Tensor]:
    return [x.contiguous() for x in levels]


def _upsample_to(x: Tensor, like: Tensor) -> Tensor:
    return x if x.shape[-2:] == like.shape[-2:] else resize_to(x, like)


def _max_pool_down(x: Tensor, padding: str) -> Tensor:
    """3x3 stride-2 max-pool to ``ceil(H / 2) x ceil(W / 2)`` with ``padding`` (see
    :data:`DOWNSAMPLE_PADDINGS`)."""
    if padding == "symmetric":
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
    # TensorFlow's total padding, max((ceil(H/2) - 1) * 2 + 3 - H, 0), is 1 + H % 2: one pixel
    # at the right/bottom, and one at the left/top too where H is odd.
    height, width = x.shape[-2:]
    x = F.pad(x, (width % 2, 1, height % 2, 1), value=float("-inf"))
    return F.max_pool2d(x, kernel_size=3, stride=2)


def _downsample_to(x: Tensor, like: Tensor, padding: str) -> Tensor:
    # A stride-2 max-pool gives ceil(H / 2); other size ratios (equal, odd, uneven) are then
    # snapped to the target by nearest interpolation, so that any pyramid lines up.
    if x.shape[-2:] == like.shape[-2:]:
        return x
    return _upsample_to(_max_pool_down(x, padding), like)


def _projection_conv(
    in_channels: int, channels: int, bias: bool, norm_layer: NormLayer | None, dd: FactoryKwargs
) -> nn.Conv2d:
    """The 1x1 conv of a projection; a bias in front of a norm (EfficientDet's "redundant" bias)
    starts at zero, so that it changes nothing until trained."""
    conv = nn.Conv2d(in_channels, channels, 1, bias=bias or norm_layer is None, **dd)
    if conv.bias is not None and norm_layer is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _projection(
    in_channels: int, channels: int, bias: bool, norm_layer: NormLayer | None, dd: FactoryKwargs
) -> nn.Module:
    """1x1 conv + norm from ``in_channels`` to ``channels`` (``0`` and ``1`` in the state_dict),
    or ``nn.Identity`` where they are equal."""
    if in_channels == channels:
        return nn.Identity()
    return nn.Sequential(
        _projection_conv(in_channels, channels, bias, norm_layer, dd),
        create_norm(norm_layer, channels, **dd),
    )


class _FusionNode(nn.Module):
    """One BiFPN node: [per-input projection] -> weighted fusion -> depthwise 3x3 -> pointwise
    1x1 -> norm -> act, or with ``order="act_conv_norm"`` fusion -> act -> depthwise ->
    pointwise -> norm. ``project`` exists only where some input has other channels."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int,
        *,
        eps: float,
        fusion: str,
        act_layer: ActLayer | None,
        norm_layer: NormLayer | None,
        order: str,
        redundant_bias: bool,
        dd: FactoryKwargs,
    ) -> None:
        super().__init__()
        self.act_first = order == "act_conv_norm"
        self.project: nn.ModuleList | None = None
        if any(c != channels for c in in_channels):
            self.project = nn.ModuleList(
                _projection(c, channels, redundant_bias, norm_layer, dd) for c in in_channels
            )
        self.fusion = WeightedFusion(len(in_channels), eps=eps, mode=fusion, **dd)
        self.depthwise = nn.Conv2d(
            channels, channels, 3, padding=1, groups=channels, bias=False, **dd
        )
        self.pointwise = nn.Conv2d(
            channels, channels, 1, bias=redundant_bias or norm_layer is None, **dd
        )
        self.norm = create_norm(norm_layer, channels, **dd)
        self.act = create_act(act_layer)

    def prepare(self, index: int, x: Tensor) -> Tensor:
        """Input ``index`` at ``channels`` (projected where the node has a projection for it)."""
        return x if self.project is None else self.project[index](x)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        x = self.fusion(inputs)
        if self.act_first:
            return self.norm(self.pointwise(self.depthwise(self.act(x))))
        return self.act(self.norm(self.pointwise(self.depthwise(x))))


class _ExtraLevel(nn.Module):
    """A coarser level made EfficientDet's way: 1x1 conv + norm where the channels differ, then
    a 3x3 stride-2 max-pool to ``ceil(H / 2)``, padded symmetrically or with TensorFlow's
    "SAME" padding (``padding``, see :data:`DOWNSAMPLE_PADDINGS`)."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        norm_layer: NormLayer | None,
        *,
        padding: str,
        redundant_bias: bool,
        dd: FactoryKwargs,
    ) -> None:
        super().__init__()
        self.padding = padding
        self.conv: nn.Module | None = None
        self.norm: nn.Module | None = None
        if in_channels != channels:
            self.conv = _projection_conv(in_channels, channels, redundant_bias, norm_layer, dd)
            self.norm = create_norm(norm_layer, channels, **dd)

    def forward(self, x: Tensor) -> Tensor:
        if self.conv is not None and self.norm is not None:
            x = self.norm(self.conv(x))
        return _max_pool_down(x, self.padding)


def _out_channels(out_channels: int | None, channels: int | None) -> int:
    """``out_channels``, or the deprecated ``channels`` keyword of dilconv 0.1 (with a warning)."""
    if channels is not None:
        if out_channels is not None:
            raise TypeError("BiFPN got both out_channels and its deprecated alias channels")
        warnings.warn(
            "BiFPN(channels=...) is deprecated and will be removed in dilconv 0.3; pass "
            "out_channels=... (torchvision's name, as FPNNeck takes it)",
            DeprecationWarning, stacklevel=3,
        )
        out_channels = channels
    if out_channels is None:
        raise TypeError("BiFPN missing required argument: 'out_channels'")
    return check_positive("out_channels", out_channels)


def _new_level_keys(keys: Sequence[Hashable], count: int) -> list[Hashable]:
    """Keys of ``count`` new coarser levels: for integer keys the last one counted on (``5`` ->
    ``6``, ``7``); for strings the last key's trailing number counted on (``"c5"`` -> ``"c6"``,
    ``"c7"``); otherwise ``"level{i}"`` with ``i`` the level's index."""
    last = keys[-1]
    new: list[Hashable]
    match = re.fullmatch(r"(.*?)(\d+)", last) if isinstance(last, str) else None
    if isinstance(last, int) and not isinstance(last, bool):
        new = [last + k for k in range(1, count + 1)]
    elif match:
        stem, number = match.group(1), int(match.group(2))
        new = [f"{stem}{number + k}" for k in range(1, count + 1)]
    else:
        new = [f"level{len(keys) + k}" for k in range(count)]
    taken = set(keys) & set(new)
    if taken:
        raise ValueError(
            f"BiFPN's new level keys {new} collide with input keys {sorted(map(repr, taken))}"
        )
    return new


# torch.fx records these as calls rather than tracing into them: they compare sizes, which a
# symbolic trace cannot branch on.
torch.fx.wrap("_upsample_to")
torch.fx.wrap("_downsample_to")
torch.fx.wrap("_max_pool_down")


class BiFPNLayer(nn.Module):
    """One bidirectional (top-down, then bottom-up) fusion layer over ``num_levels`` maps.

    Levels are numbered 0 (finest) to L-1 (coarsest), all with ``channels`` channels. With
    ``node(...)`` a weighted fusion followed by a depthwise-separable 3x3 convolution, norm and
    activation, ``up`` nearest interpolation to the finer level's exact size and ``down`` a
    3x3 stride-2 max-pool snapped to the coarser level's exact size (odd sizes included):

    - top-down: ``td[L-1] = x[L-1]``; ``td[i] = node(x[i], up(td[i+1]))`` for i = L-2 .. 0
    - bottom-up: ``out[0] = td[0]``; ``out[i] = node(x[i], td[i], down(out[i-1]))`` for
      0 < i < L-1; ``out[L-1] = node(x[L-1], down(out[L-2]))``

    Submodules (their names are the state_dict keys, and are kept stable):

    - ``top_down.{i}`` for i = 0 .. L-2: the node producing ``td[i]`` (2 inputs);
    - ``bottom_up.{i}`` for i = 0 .. L-2: the node producing ``out[i+1]`` (3 inputs, 2 for the
      last one);
    - each node holds ``fusion.weight`` (a :class:`~dilconv.WeightedFusion`),
      ``depthwise.weight`` (3x3, ``groups=channels``, no bias), ``pointwise.weight`` and
      ``pointwise.bias`` (1x1; the bias only with ``redundant_bias`` or without a norm),
      ``norm.*`` (``norm_layer``) and ``act``;
    - where ``in_channels`` gives a level other channels (EfficientDet's first layer), each
      node reading that level has ``project.{j}`` for its inputs j: ``nn.Identity`` or an
      ``nn.Sequential`` of a 1x1 conv (``project.{j}.0.weight``, ``.0.bias`` with
      ``redundant_bias``) and ``norm_layer`` (``project.{j}.1.*``), applied before any
      resampling. A level read by two nodes is projected by each (in EfficientDet-D0: C4 and
      C5 twice, C3 once).

    Args:
        channels: C, channels of every level, in and out.
        num_levels: L >= 2, number of pyramid levels.
        eps: ``eps`` of every :class:`~dilconv.WeightedFusion`.
        fusion: mode of every fusion: ``"fast"`` (EfficientDet eq. 3), ``"softmax"`` or
            ``"sum"``.
        act_layer: activation class or factory (in place where it takes ``inplace``);
            EfficientDet uses swish (``nn.SiLU``).
        norm_layer: norm class or factory, called as ``norm_layer(C)``; ``None`` for no norm.
        node_order: what follows each fusion. ``"conv_norm_act"`` (default): separable conv,
            norm, activation, as the paper's sec. 3.3 describes. ``"act_conv_norm"``:
            activation, separable conv, norm, as effdet's ``BiFpn`` computes it. Same parameters
            and state_dict keys either way.
        in_channels: channels of each input level (default: C for every level). Levels with
            other channels are projected to C inside each node that reads them, as in the
            first layer of EfficientDet's BiFPN.
        redundant_bias: give every 1x1 convolution that a norm follows a bias too, as effdet's
            ``tf_efficientdet_*`` models have (effdet's ``redundant_bias``); without a norm
            the convolutions always have one.
        downsample_padding: padding of the stride-2 max-pools, ``"symmetric"`` or
            TensorFlow's ``"same"`` (see :data:`DOWNSAMPLE_PADDINGS`).

    Shape:
        input: L maps (N, in_channels[i], H_i, W_i), as a sequence fine to coarse or a mapping
        name -> map -> output: the same kind of container, same keys, maps (N, C, H_i, W_i)

    Example:
        >>> import torch
        >>> from dilconv import BiFPNLayer
        >>> layer = BiFPNLayer(16, num_levels=3)
        >>> maps = [torch.randn(2, 16, s, s) for s in (15, 8, 4)]
        >>> [tuple(y.shape) for y in layer(maps)]
        [(2, 16, 15, 15), (2, 16, 8, 8), (2, 16, 4, 4)]
        >>> sorted(layer({"p3": maps[0], "p4": maps[1], "p5": maps[2]}))
        ['p3', 'p4', 'p5']
    """

    def __init__(
        self,
        channels: int,
        num_levels: int = 5,
        *,
        eps: float = 1e-4,
        fusion: str = "fast",
        act_layer: ActLayer | None = nn.SiLU,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        node_order: str = "conv_norm_act",
        in_channels: Sequence[int] | None = None,
        redundant_bias: bool = True,
        downsample_padding: str = "symmetric",
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        check_positive("channels", channels)
        check_positive("num_levels", num_levels, minimum=2)
        check_choice("fusion", fusion, FUSION_MODES)
        check_choice("node_order", node_order, NODE_ORDERS)
        check_choice("downsample_padding", downsample_padding, DOWNSAMPLE_PADDINGS)
        if in_channels is None:
            in_channels = [channels] * num_levels
        in_channels = [check_positive("in_channels", c) for c in in_channels]
        if len(in_channels) != num_levels:
            raise ValueError(
                f"in_channels must give one channel count per level ({num_levels}), "
                f"got {len(in_channels)}: {in_channels}"
            )
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        node_kwargs: dict[str, Any] = {
            "eps": eps, "fusion": fusion, "act_layer": act_layer, "norm_layer": norm_layer,
            "order": node_order, "redundant_bias": redundant_bias, "dd": dd,
        }
        self.node_order = node_order
        self.channels = channels
        self.in_channels = in_channels
        self.out_channels = channels
        self.num_levels = num_levels
        self.fusion = fusion
        self.downsample_padding = downsample_padding
        last = num_levels - 1
        self.top_down = nn.ModuleList(
            _FusionNode([in_channels[i], in_channels[i + 1] if i + 1 == last else channels],
                        channels, **node_kwargs)
            for i in range(last)
        )
        self.bottom_up = nn.ModuleList(
            _FusionNode([in_channels[i], channels, channels] if i < last
                        else [in_channels[i], channels], channels, **node_kwargs)
            for i in range(1, num_levels)
        )

    def forward(self, features: Features) -> list[Tensor] | dict[Hashable, Tensor]:
        keys, x = check_levels(features, self.in_channels, name=type(self).__name__)
        nchw = _cpu_nchw(x)
        if nchw:
            x = _to_channels_last(x)
        out = self._fuse(x)
        if nchw:
            out = _to_nchw(out)
        return out if keys is None else dict(zip(keys, out, strict=True))

    def _fuse(self, x: Sequence[Tensor]) -> list[Tensor]:
        last = self.num_levels - 1
        top_down = cast(Sequence[_FusionNode], self.top_down)
        bottom_up = cast(Sequence[_FusionNode], self.bottom_up)
        td = list(x)
        for i in reversed(range(last)):
            node = top_down[i]
            above = _upsample_to(node.prepare(1, td[i + 1]), x[i])
            td[i] = node([node.prepare(0, x[i]), above])
        out = [td[0]]
        for i in range(1, last + 1):
            node = bottom_up[i - 1]
            below = _downsample_to(out[i - 1], x[i], self.downsample_padding)
            inputs = [x[i], td[i], below] if i < last else [x[i], below]
            out.append(node([node.prepare(0, inputs[0]), *inputs[1:]]))
        return out

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, num_levels={self.num_levels}, fusion={self.fusion!r}, "
            f"node_order={self.node_order!r}, in_channels={self.in_channels}"
        )


class BiFPN(nn.Module):
    """EfficientDet's BiFPN neck: new coarser levels, then repeated BiFPN layers whose first
    layer brings every input level to ``channels``.

    With ``num_levels`` above the number of inputs, the missing coarser levels are made as
    EfficientDet makes P6 and P7 from C5 (fig. 3): from the coarsest *input*, a 1x1 convolution
    + ``norm_layer`` where its channels differ from ``channels``, then a 3x3 stride-2 max-pool;
    each further level max-pools the one before. They take part in every layer, so
    ``BiFPN([40, 112, 320], 64, num_levels=5)`` turns C3-C5 into P3-P7. ``num_layers``
    :class:`BiFPNLayer` follow. How input levels whose channels differ from ``channels`` reach
    it is ``projection``:

    - ``"per_node"`` (default): EfficientDet's network, as effdet builds it. Every node of the first
      layer has its own 1x1 convolution + ``norm_layer`` for each such input, so a level that
      two nodes read is projected twice (C4 and C5 in EfficientDet-D0). This is the default
      because it is the network the paper's results, its checkpoints and :meth:`from_effdet`
      have.
    - ``"shared"``: each level is projected once before the first layer (``projections.{i}``)
      and every node reads the projected map. Cheaper (EfficientDet-D0's BiFPN: 168 k against
      194 k parameters, 0.49 against 0.55 GFLOPs at 512 x 512), but not EfficientDet's network;
      dilconv 0.1's only form.

    Each new level halves the previous one (rounded up), so P7 is one pixel whenever P3 is at
    most 16 x 16 (images up to 128 x 128 at strides 8-32); BatchNorm in train mode then needs a
    batch of at least two. For batches of one use larger images, ``norm_layer=partial(
    nn.GroupNorm, g)``, ``FrozenBatchNorm2d`` or eval-mode norms (see the guide "A dilconv block
    in your own model").

    With ``extra_level=True`` one coarser level, ``max_pool2d(coarsest output, kernel_size=1,
    stride=2)``, is appended after the last layer, as torchvision's ``LastLevelMaxPool`` does
    (keyed ``"pool"`` for mappings).

    Submodules (their names are the state_dict keys, and are kept stable):

    - ``projections.{i}`` for each input level i: ``nn.Identity`` (no parameters, always so
      with ``"per_node"``) or, with ``"shared"``, an ``nn.Sequential`` of ``0`` (the 1x1 conv,
      ``projections.{i}.0.weight``, ``.0.bias`` with ``redundant_bias``) and ``1``
      (``norm_layer``, ``projections.{i}.1.*``);
    - ``extra.{j}`` for each new level j (``num_levels`` - inputs of them): ``conv.weight``
      (``conv.bias`` with ``redundant_bias``) and ``norm.*`` where it changes the channels
      (only ``extra.0`` can), and a max-pool without parameters;
    - ``layers.{k}`` for k = 0 .. num_layers-1: a :class:`BiFPNLayer` (see its keys; with
      ``"per_node"`` the nodes of ``layers.0`` that read an input level of other channels have
      ``project.{j}``).

    Output keys (mapping input): the input's keys, then one per new level, counting on the last
    key's trailing number (``"c5"`` -> ``"c6"``, ``"c7"``; ``"5"`` -> ``"6"``, ``"7"``) or
    ``"level{i}"`` (i the level's index from 0) when it has none, then ``"pool"`` for
    ``extra_level``.

    Args:
        in_channels: channels of each input level, fine to coarse; at least 2 levels (a list,
            or timm's ``FeatureInfo`` of a ``features_only`` model). A mapping name -> channels
            also fixes the names the input mapping must have.
        out_channels: C, channels of every output level (torchvision's name, as in
            :class:`~dilconv.FPNNeck`).
        channels: deprecated alias of ``out_channels`` (dilconv 0.1's name), kept for one
            release; it warns.
        num_layers: number of stacked :class:`BiFPNLayer`.
        num_levels: levels the layers fuse, at least the number of inputs (the default);
            EfficientDet uses 5 (P3-P7) from 3 backbone levels (C3-C5).
        extra_level: append one coarser, max-pooled level to the output.
        projection: ``"per_node"`` (EfficientDet's) or ``"shared"``, see above.
        eps, fusion, act_layer, norm_layer, node_order: passed to every :class:`BiFPNLayer`
            (``norm_layer`` also follows each projection and new level's 1x1 convolution).
            EfficientDet: ``fusion="fast"`` (``"sum"`` in D6-D7), ``act_layer=nn.SiLU``,
            ``norm_layer=partial(nn.BatchNorm2d, eps=1e-3, momentum=0.01)``,
            ``node_order="act_conv_norm"``.
        redundant_bias: every 1x1 convolution followed by a norm has a bias too (projections,
            new levels, the nodes' pointwise convolutions), as in effdet's
            ``tf_efficientdet_d*`` models; new such biases start at zero. ``False`` drops them
            (effdet's ``efficientdet_d*`` models).
        downsample_padding: ``"symmetric"`` or TensorFlow's ``"same"`` padding of every
            stride-2 max-pool (effdet's ``tf_efficientdet_d*``), see :data:`DOWNSAMPLE_PADDINGS`.

    Shape:
        input: L maps (N, in_channels[i], H_i, W_i), as a sequence fine to coarse or a mapping
        name -> map -> output: the same kind of container with L maps (N, C, H_i, W_i), then
        ``num_levels - L`` maps each (N, C, ceil(H / 2), ceil(W / 2)) of the one before, (plus
        one more (N, C, ceil(H / 2), ceil(W / 2)) of the coarsest with ``extra_level``).
        Any sizes that get no larger from level to level are accepted, not only those an
        EfficientDet was built for. Outputs have the inputs' memory format. On the CPU, NCHW
        levels run in channels_last inside (converted once at entry and back at exit), where
        the CPU's max-pool and up-sampling kernels are vectorised.

    Example:
        >>> import torch
        >>> from dilconv import BiFPN
        >>> neck = BiFPN([40, 112, 320], out_channels=64, num_layers=2, extra_level=True)
        >>> feats = {"c3": torch.randn(1, 40, 32, 40), "c4": torch.randn(1, 112, 16, 20),
        ...          "c5": torch.randn(1, 320, 8, 10)}
        >>> out = neck(feats)
        >>> list(out)
        ['c3', 'c4', 'c5', 'pool']
        >>> [tuple(v.shape) for v in out.values()]
        [(1, 64, 32, 40), (1, 64, 16, 20), (1, 64, 8, 10), (1, 64, 4, 5)]
        >>> p3_p7 = BiFPN([40, 112, 320], 64, num_levels=5)(feats)
        >>> {key: tuple(v.shape[-2:]) for key, v in p3_p7.items()}
        {'c3': (32, 40), 'c4': (16, 20), 'c5': (8, 10), 'c6': (4, 5), 'c7': (2, 3)}
    """

    def __init__(
        self,
        in_channels: Sequence[int] | Mapping[str, int],
        out_channels: int | None = None,
        num_layers: int = 3,
        *,
        channels: int | None = None,
        num_levels: int | None = None,
        extra_level: bool = False,
        projection: str = "per_node",
        eps: float = 1e-4,
        fusion: str = "fast",
        act_layer: ActLayer | None = nn.SiLU,
        norm_layer: NormLayer | None = nn.BatchNorm2d,
        node_order: str = "conv_norm_act",
        redundant_bias: bool = True,
        downsample_padding: str = "symmetric",
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        self.in_keys, self.in_channels = pyramid_channels(in_channels, min_levels=2)
        channels = _out_channels(out_channels, channels)
        check_positive("num_layers", num_layers)
        check_choice("projection", projection, PROJECTIONS)
        check_choice("downsample_padding", downsample_padding, DOWNSAMPLE_PADDINGS)
        inputs = len(self.in_channels)
        if num_levels is None:
            num_levels = inputs
        check_positive("num_levels", num_levels)
        if num_levels < inputs:
            raise ValueError(
                f"num_levels must be at least the number of input levels ({inputs}), "
                f"got {num_levels}"
            )
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.out_channels = channels
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.extra_level = extra_level
        self.projection = projection
        if self.in_keys is not None:  # refuse colliding keys now rather than at the first call
            new_keys = _new_level_keys(self.in_keys, num_levels - inputs)
            pyramid_output_keys([*self.in_keys, *new_keys], extra_level, name=type(self).__name__)
        self.extra = nn.ModuleList(
            _ExtraLevel(
                self.in_channels[-1] if j == 0 else channels, channels, norm_layer,
                padding=downsample_padding, redundant_bias=redundant_bias, dd=dd,
            )
            for j in range(num_levels - inputs)
        )
        shared = projection == "shared"
        self.projections = nn.ModuleList(
            _projection(c, channels, redundant_bias, norm_layer, dd) if shared else nn.Identity()
            for c in self.in_channels
        )
        first_in = self.in_channels if not shared else [channels] * inputs
        self.layers = nn.ModuleList(
            BiFPNLayer(
                channels, num_levels, eps=eps, fusion=fusion, act_layer=act_layer,
                norm_layer=norm_layer, node_order=node_order, redundant_bias=redundant_bias,
                downsample_padding=downsample_padding,
                in_channels=[*first_in, *[channels] * (num_levels - inputs)] if k == 0 else None,
                **dd,
            )
            for k in range(num_layers)
        )

    @classmethod
    def from_effdet(cls, fpn: nn.Module, *, device: Device = None, dtype: DType = None) -> BiFPN:
        """Convert effdet's ``BiFpn`` (``effdet.create_model(...).fpn``) into a BiFPN with its
        weights and the same outputs; see :func:`dilconv.convert.bifpn_from_effdet`."""
        from dilconv.convert.effdet import bifpn_from_effdet

        return bifpn_from_effdet(fpn, device=device, dtype=dtype)

    def forward(self, features: Features) -> list[Tensor] | dict[Hashable, Tensor]:
        name = type(self).__name__
        in_keys, x = check_levels(features, self.in_channels, name=name, keys=self.in_keys)
        keys: list[Hashable] | None = None
        if in_keys is not None:
            keys = pyramid_output_keys(
                [*in_keys, *_new_level_keys(in_keys, len(self.extra))], self.extra_level,
                name=name,
            )
        nchw = _cpu_nchw(x)
        if nchw:
            x = _to_channels_last(x)
        out = [project(level) for project, level in zip(self.projections, x, strict=True)]
        coarser = x[-1]
        for make_level in self.extra:
            coarser = make_level(coarser)
            out.append(coarser)
        for layer in cast(Sequence[BiFPNLayer], self.layers):
            out = layer._fuse(out)
        if self.extra_level:
            out.append(F.max_pool2d(out[-1], kernel_size=1, stride=2))
        if nchw:
            out = _to_nchw(out)
        return out if keys is None else dict(zip(keys, out, strict=True))

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"num_layers={self.num_layers}, num_levels={self.num_levels}, "
            f"extra_level={self.extra_level}, projection={self.projection!r}"
        )
