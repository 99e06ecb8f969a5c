"""Analytic receptive fields that follow the real forward (Araujo et al., Distill 2019, eq. 1-3).

Published calculators walk a table of layers and get residual networks, dilation and
up-sampling wrong. Here the module's own forward runs once on zeros (on the meta device when it
can, so no arithmetic is done) while a ``TorchDispatchMode`` follows every ATen operation and
carries, for each spatial axis of each tensor, the first and last input pixel that every index
along that axis depends on. Convolutions, pooling, transposed convolutions, interpolation,
padding, crops and pixel (un)shuffle map those intervals through their exact index arithmetic
(interpolation with the float index computation of PyTorch's CPU kernels, so a tap whose weight
is exactly zero does not count). Point-wise operations, additions and concatenation along
channels merge them: a merge takes the union, i.e. the largest field. Whatever averages over
the whole map makes the field global: global pooling, spatial reductions and softmax, and norm
layers that use statistics of the map itself (batch norm in training mode, instance, group and
layer norm over space); batch norm with running statistics is per pixel. Any other operation
that touches the spatial axes (swapping them, attention over flattened positions, ...) raises
``NotImplementedError`` naming the operation and the layer it ran in.

Conventions (per axis, in input pixels, origin at the centre of pixel 0):
    * ``jump``: distance between the fields of neighbouring output pixels (the product of the
      strides; resizing from ``n`` to ``m`` pixels multiplies it by ``n / m``; where branches
      with different jumps merge, after resizing to an exact size that is not a whole
      multiple, the finest is reported);
    * ``size``: number of input pixels from the first to the last one the output pixel reaches,
      ignoring the image border: every tensor's intervals are extended by its jump beyond its
      edges, so an input smaller than the field still gives the field of an unclipped pixel.
      The padding mode (``"zeros"``, ``"reflect"``, ``"replicate"``, ``"circular"``) decides
      only what the taps beyond the border read, so it changes neither ``size`` nor ``start``;
    * ``start``: the centre of the field of output pixel 0, so that the field of pixel ``i`` is
      centred on ``start + i * jump``.

Up-sampling makes fields depend on the phase of the output pixel (with nearest 2x up-sampling,
even and odd pixels see different inputs), so the field is computed for one output pixel,
``position`` (default: the centre of the output), and reported through the convention above:
``start = centre(position) - position * jump``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from dilconv._checks import check_positive, pair
from dilconv._field_trace import _Axis, _CircularAsConstant, _Refused, _Tracer

__all__ = ["ReceptiveField", "layer_receptive_fields", "receptive_field"]

OutputIndex = int | str | None
_T = TypeVar("_T")


@dataclass(frozen=True)
class ReceptiveField:
    """Receptive field of one output map: ``size``, ``jump`` and ``start``, each ``(h, w)``.

    See the module docstring for the conventions. A global field (the output depends on the
    whole input, as after global pooling) has ``size`` ``inf`` on that axis and ``start`` at the
    centre of the input.

    Example:
        >>> from dilconv import ReceptiveField
        >>> rf = ReceptiveField(size=(7, 7), jump=(2, 2), start=(0.5, 0.5))
        >>> rf.box((3, 0))
        ((3.5, 9.5), (-2.5, 3.5))
    """

    size: tuple[float, float]
    jump: tuple[float, float]
    start: tuple[float, float]

    @property
    def is_global(self) -> bool:
        """True when some axis of the field spans the whole input."""
        return any(math.isinf(s) for s in self.size)

    def box(self, position: Sequence[int] = (0, 0)) -> tuple[tuple[float, float], ...]:
        """Inclusive ``((top, bottom), (left, right))`` input pixels of an output pixel's field."""
        boxes = []
        for start, jump, size, p in zip(self.start, self.jump, self.size, position):
            centre = start + p * jump
            boxes.append((centre - (size - 1) / 2, centre + (size - 1) / 2))
        return tuple(boxes)


def _select_output(out: object, output_index: OutputIndex = None) -> Tensor:
    """The output of ``out`` (a tensor, a sequence or a mapping) that ``output_index`` names.

    ``None`` is allowed when there is only one output; an int picks from a sequence (or a
    mapping's values, in order), a key from a mapping.
    """
    if isinstance(out, Tensor):
        if output_index not in (None, 0):
            raise ValueError(f"the module returns one tensor, got output_index={output_index!r}")
        return out
    if isinstance(out, Mapping):
        labels, values = list(out), list(out.values())
    elif isinstance(out, Sequence) and not isinstance(out, str):
        labels, values = list(range(len(out))), list(out)
    else:
        raise TypeError(f"expected the module to return tensors, got {type(out).__name__}")
    if output_index is None and len(values) != 1:
        raise ValueError(
            f"the module returns {len(values)} outputs ({labels}); pass output_index to choose one"
        )
    if output_index is None:
        chosen = values[0]
    elif output_index in labels:
        chosen = values[labels.index(output_index)]
    elif isinstance(output_index, int) and -len(values) <= output_index < len(values):
        chosen = values[output_index]
    else:
        raise ValueError(f"output_index {output_index!r} is not one of the outputs {labels}")
    if not isinstance(chosen, Tensor):
        raise TypeError(f"output {output_index!r} is a {type(chosen).__name__}, not a Tensor")
    return chosen


def _in_channels(module: nn.Module, in_channels: int | None) -> int:
    if in_channels is not None:
        return check_positive("in_channels", in_channels)
    own = getattr(module, "in_channels", None)
    if isinstance(own, int) and not isinstance(own, bool):
        return own
    for m in module.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            return m.in_channels
    raise ValueError(
        f"cannot infer the input channels of {type(module).__name__} (no in_channels attribute "
        "and no convolution); pass in_channels"
    )


def _like(module: nn.Module) -> dict[str, Any]:
    for t in [*module.parameters(), *module.buffers()]:
        if t.is_floating_point():
            return {"device": t.device, "dtype": t.dtype}
    return {"device": "cpu", "dtype": torch.float32}


def _trace(
    module: nn.Module,
    input_size: int | Sequence[int],
    in_channels: int | None,
    body: Callable[[nn.Module, _Tracer, Tensor, tuple[int, int]], _T],
) -> _T:
    """``body(copy, tracer, x, size)`` with ``copy`` (eval mode) running on traced zeros.

    The forward runs on the meta device (shapes only, no arithmetic) and falls back to the
    module's own device when an operation needs real values.
    """
    size = pair("input_size", input_size)
    channels = _in_channels(module, in_channels)
    try:
        return _run(_meta_copy(module), channels, size, body)
    except _Refused:
        raise
    except Exception:
        return _run(deepcopy(module), channels, size, body)


def _meta_copy(module: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device (no data copied)."""
    memo: dict[int, Tensor] = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    return deepcopy(module, memo)


def _run(
    copy: nn.Module,
    channels: int,
    size: tuple[int, int],
    body: Callable[[nn.Module, _Tracer, Tensor, tuple[int, int]], _T],
) -> _T:
    names = {m: name for name, m in copy.eval().named_modules()}
    tracer = _Tracer(names)

    def enter(m: nn.Module, args: tuple[Any, ...]) -> None:
        tracer.stack.append(m)

    def leave(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        tracer.stack.pop()

    for m in names:
        m.register_forward_pre_hook(enter)
        m.register_forward_hook(leave)
    x = torch.zeros(1, channels, *size, **_like(copy))
    height, width = (_Axis(torch.arange(n).double(), torch.arange(n).double(), Fraction(1))
                     for n in size)
    tracer.mark(x, (height, width))
    with torch.no_grad(), _CircularAsConstant(), tracer:
        return body(copy, tracer, x, size)


def _centre(out: Tensor, position: Sequence[int] | None) -> tuple[int, int]:
    sizes = (out.shape[-2], out.shape[-1]) if out.dim() >= 3 else (1, 1)
    return _position(position, sizes)


def _position(position: Sequence[int] | None, sizes: tuple[int, int]) -> tuple[int, int]:
    """``position`` checked against an output of ``sizes``; its centre pixel when None."""
    if position is None:
        return (sizes[0] - 1) // 2, (sizes[1] - 1) // 2
    q = tuple(position)
    if len(q) != 2 or not all(0 <= p < n for p, n in zip(q, sizes)):
        raise ValueError(f"position must be (y, x) inside the output of size {sizes}, got {q}")
    return q[0], q[1]


def _number(value: float | Fraction) -> float:
    return int(value) if float(value).is_integer() else float(value)


def _report(
    tracer: _Tracer, out: Tensor, size: tuple[int, int], position: Sequence[int] | None
) -> ReceptiveField:
    field = tracer.field(out)
    if field is None:
        raise ValueError(
            "the output carries no receptive field: it does not depend on the input, or the "
            "module builds it in a way the tool cannot follow (e.g. writes into a preallocated "
            "tensor)"
        )
    q = _centre(out, position)
    sizes: list[float] = []
    jumps: list[float] = []
    starts: list[float] = []
    for axis, p, n in zip(field, q, size):
        jumps.append(_number(axis.jump))
        if axis.lo is None or axis.hi is None:  # a global field
            sizes.append(math.inf)
            starts.append(_number(Fraction(n - 1, 2)))
            continue
        lo, hi = axis.lo[p].item(), axis.hi[p].item()
        if math.isinf(lo):
            raise ValueError(f"output pixel {q} does not depend on the input")
        sizes.append(_number(hi - lo + 1))
        starts.append(_number(Fraction(lo + hi) / 2 - p * axis.jump))
    return ReceptiveField((sizes[0], sizes[1]), (jumps[0], jumps[1]), (starts[0], starts[1]))


def receptive_field(
    module: nn.Module,
    input_size: int | Sequence[int],
    *,
    in_channels: int | None = None,
    output_index: OutputIndex = None,
    position: Sequence[int] | None = None,
) -> ReceptiveField:
    r"""Analytic receptive field of ``module``'s output, following its real forward.

    The module (a copy, in eval mode, so the original is untouched) runs once on zeros of
    shape ``(1, C, H, W)``; every operation's kernel, stride, padding, dilation, interpolation
    indices and branch merges are followed as they happen (see the module docstring).

    For a chain of convolutions and poolings with kernel :math:`k_l`, stride :math:`s_l`,
    padding :math:`p_l` and dilation :math:`d_l` this is the recursion of Araujo et al. (2019),
    per axis, with :math:`r_0 = j_0 = 1` and :math:`\mathrm{start}_0 = 0`:

    .. math::

        r_l = r_{l-1} + (k_l - 1)\, d_l\, j_{l-1}, \qquad j_l = j_{l-1}\, s_l,

    .. math::

        \mathrm{start}_l = \mathrm{start}_{l-1}
        + \Big(\frac{(k_l - 1)\, d_l}{2} - p_l\Big)\, j_{l-1},

    so :math:`j_{l-1} = \prod_{i<l} s_i`; ``size`` is :math:`r_L`, ``jump`` :math:`j_L` and
    ``start`` :math:`\mathrm{start}_L`. Where branches merge (residual additions,
    concatenation) the field is the union of theirs, which no single recursion gives.

    Args:
        module: called with one NCHW tensor; may return a tensor, a sequence or a mapping.
        input_size: ``(H, W)`` of the input, or one int for a square (sizes matter for
            interpolation to exact sizes, adaptive pooling and the output pixel chosen).
        in_channels: C; by default the module's ``in_channels`` attribute or the input
            channels of its first registered convolution.
        output_index: which output to report when the module returns several (an index, or
            a key of a mapping).
        position: ``(y, x)`` output pixel whose field is reported; default the centre.

    Returns:
        :class:`ReceptiveField` with ``size``, ``jump`` and ``start`` per axis.

    Raises:
        NotImplementedError: an operation changes the spatial layout in a way the tool does not
            model; the message names the operation and the layer.

    Shape:
        input: zeros (1, C, H, W) with ``(H, W)`` = ``input_size`` -> the chosen output, whose
        last two axes are the spatial ones (a (N, C) output has a global field).

    Example:
        >>> from torch import nn
        >>> from dilconv import receptive_field
        >>> stack = nn.Sequential(*(nn.Conv2d(1, 1, 3, padding=d, dilation=d) for d in (1, 2, 4)))
        >>> receptive_field(stack, (32, 32))
        ReceptiveField(size=(15, 15), jump=(1, 1), start=(0, 0))
    """

    def body(copy: nn.Module, tracer: _Tracer, x: Tensor, size: tuple[int, int]) -> ReceptiveField:
        return _report(tracer, _select_output(copy(x), output_index), size, position)

    return _trace(module, input_size, in_channels, body)


def layer_receptive_fields(
    module: nn.Module, input_size: int | Sequence[int], *, in_channels: int | None = None
) -> dict[str, ReceptiveField]:
    """Receptive field (w.r.t. the module's input) of the output of every submodule.

    Keys are qualified submodule names in the order they first finish; a submodule called
    more than once reports its last call. Each field is the one of the centre pixel of that
    submodule's output. Submodules whose output is not a single tensor are left out.

    Args:
        module: called with one NCHW tensor.
        input_size: ``(H, W)`` of the input, or one int for a square.
        in_channels: C; by default inferred as in :func:`receptive_field`.

    Returns:
        ``{qualified name: ReceptiveField}``, each computed as :func:`receptive_field` does.

    Shape:
        input: zeros (1, C, H, W) -> one field per submodule that returns one tensor.

    Example:
        >>> from torch import nn
        >>> from dilconv import layer_receptive_fields
        >>> stack = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Conv2d(1, 1, 3, stride=2))
        >>> {k: rf.size for k, rf in layer_receptive_fields(stack, (16, 16)).items()}
        {'0': (3, 3), '1': (5, 5)}
    """

    def body(
        copy: nn.Module, tracer: _Tracer, x: Tensor, size: tuple[int, int]
    ) -> dict[str, ReceptiveField]:
        fields: dict[str, ReceptiveField] = {}

        def record(m: nn.Module, args: tuple[Any, ...], out: Any) -> None:
            if isinstance(out, Tensor) and tracer.field(out) is not None:
                fields[tracer.names[m]] = _report(tracer, out, size, None)

        for name, m in copy.named_modules():
            if name:
                m.register_forward_hook(record)
        copy(x)
        return fields

    return _trace(module, input_size, in_channels, body)
