"""Coarser pyramid levels a neck appends to its outputs (torchvision's ``ExtraFPNBlock``).

Lin et al. (FPN, CVPR 2017, sec. 4.1) add P6 by sub-sampling P5 with stride 2; Lin et al.
(RetinaNet, ICCV 2017, sec. 4) compute P6 by a 3x3 stride-2 convolution and P7 by ReLU and
another one. Both are extra-level blocks here: an :class:`ExtraLevels` takes one map, the neck's
coarsest output (P5) or its coarsest input (C5), and returns the new levels, fine to coarse.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from dilconv._checks import check_choice, check_feature_map, check_positive
from dilconv._layers import ActLayer, Device, DType, FactoryKwargs, create_act

__all__ = ["EXTRA_LEVEL_SOURCES", "ExtraLevels", "MaxPoolLevel", "P6P7Levels"]

EXTRA_LEVEL_SOURCES = ("output", "input")


class ExtraLevels(nn.Module):
    """Base class of the extra levels a neck (:class:`~dilconv.FPNNeck`) appends.

    A subclass sets :attr:`names`, :attr:`source` and :attr:`in_channels` and implements
    ``forward(x) -> list[Tensor]``, the new levels fine to coarse. The neck passes it its
    coarsest output (``source="output"``, P5 of a C2..C5 input) or its coarsest input
    (``source="input"``, C5), checks at construction that the channels agree, and appends the
    returned maps to its outputs, keyed by :attr:`names` when it was given a mapping.
    torchvision's ``ExtraFPNBlock`` receives all outputs and inputs instead; every block
    torchvision ships (``LastLevelMaxPool``, ``LastLevelP6P7``) reads one map only.

    Attributes:
        names: keys of the new levels in a mapping output, one per returned map.
        source: ``"output"`` or ``"input"``, the map the block takes.
        in_channels: channels of that map; ``None`` for any.

    Shape:
        input (N, in_channels, H, W) -> a list of len(names) maps (N, C, H_k, W_k).

    Example:
        >>> import torch
        >>> from dilconv import ExtraLevels
        >>> class AvgPoolLevel(ExtraLevels):
        ...     names = ("avg",)
        ...     def forward(self, x):
        ...         return [torch.nn.functional.avg_pool2d(x, 2, ceil_mode=True)]
        >>> [tuple(p.shape) for p in AvgPoolLevel()(torch.randn(1, 4, 5, 7))]
        [(1, 4, 3, 4)]
    """

    names: tuple[str, ...] = ()
    source: str = "output"
    in_channels: int | None = None

    def forward(self, x: Tensor) -> list[Tensor]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x)")


class MaxPoolLevel(ExtraLevels):
    """One coarser level: ``max_pool2d(kernel 1, stride 2)`` of the neck's coarsest output.

    A kernel-1 max-pool keeps every other row and column, ``ceil(H / 2) x ceil(W / 2)``: the
    sub-sampled P6 of the FPN paper (sec. 4.1), as torchvision's ``LastLevelMaxPool`` computes
    it. Keyed ``"pool"``; no parameters, so it adds no state-dict keys.

    Shape:
        input (N, C, H, W) -> a list of one map (N, C, ceil(H / 2), ceil(W / 2))

    Example:
        >>> import torch
        >>> from dilconv import MaxPoolLevel
        >>> [tuple(p.shape) for p in MaxPoolLevel()(torch.randn(1, 4, 5, 7))]
        [(1, 4, 3, 4)]
    """

    names = ("pool",)

    def forward(self, x: Tensor) -> list[Tensor]:
        check_feature_map(x, name=type(self).__name__)
        return [F.max_pool2d(x, kernel_size=1, stride=2)]


class P6P7Levels(ExtraLevels):
    """RetinaNet's P6 and P7: ``p6 = conv3x3/2(x)``, ``p7 = conv3x3/2(act(p6))`` (sec. 4).

    Both convolutions have a bias and padding 1, so a level has ``ceil(H / 2)`` rows. RetinaNet
    computes P6 from C5 (``source="input"``, torchvision's ``LastLevelP6P7(2048, 256)`` of
    ``retinanet_resnet50_fpn_v2``); torchvision's v1 models from P5
    (``source="output"``, ``LastLevelP6P7(256, 256)``). The activation runs out of place, since
    P6 is an output too. Keyed ``"p6"``, ``"p7"``.

    State dict (public API): ``p6`` and ``p7`` are ``nn.Conv2d`` with bias; in a neck they sit
    under its ``extra_levels`` (``extra_levels.p6.weight``), torchvision's under
    ``extra_blocks``.

    Args:
        in_channels: channels of the map it takes: the neck's ``out_channels`` for
            ``source="output"``, its last ``in_channels`` for ``source="input"``.
        out_channels: channels of P6 and P7.
        source: ``"output"`` (P5) or ``"input"`` (C5).
        act_layer: activation class or factory between P6 and P7 (ReLU in the paper).

    Shape:
        input (N, in_channels, H, W) -> a list [P6, P7] of maps (N, out_channels, H6, W6) and
        (N, out_channels, H7, W7), with H6 = ceil(H / 2), H7 = ceil(H6 / 2), and so for W.

    Example:
        >>> import torch
        >>> from dilconv import P6P7Levels
        >>> levels = P6P7Levels(32, 8, source="input")
        >>> [tuple(p.shape) for p in levels(torch.randn(1, 32, 9, 6))]
        [(1, 8, 5, 3), (1, 8, 3, 2)]
    """

    names = ("p6", "p7")

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        source: str = "output",
        act_layer: ActLayer | None = nn.ReLU,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        check_positive("in_channels", in_channels)
        check_positive("out_channels", out_channels)
        check_choice("source", source, EXTRA_LEVEL_SOURCES)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.source = source
        self.p6 = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1, **dd)
        self.act = create_act(act_layer)
        if getattr(self.act, "inplace", False):
            # P6 is returned as well: an in-place activation would overwrite it.
            self.act.inplace = False  # type: ignore[assignment]  # a flag, typed as a submodule
        self.p7 = nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1, **dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-uniform (a=1) weights and zero biases, as torchvision's ``LastLevelP6P7``."""
        for conv in (self.p6, self.p7):
            nn.init.kaiming_uniform_(conv.weight, a=1)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> list[Tensor]:
        check_feature_map(x, channels=self.in_channels, name=type(self).__name__)
        p6 = self.p6(x)
        return [p6, self.p7(self.act(p6))]

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
            f"source={self.source!r}"
        )
