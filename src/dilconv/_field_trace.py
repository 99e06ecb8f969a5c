"""Per-axis interval arithmetic and the dispatch mode that carries it through a forward.

Every traced tensor holds, for each of its last two (spatial) axes, the first and last input
pixel that each index along that axis depends on (an :class:`_Axis`), extended linearly by the
axis' jump beyond the tensor's border so that fields are not clipped by the image. Each ATen
operation maps those intervals through its exact index arithmetic (``_window`` for convolution
and pooling, ``_transposed``, ``_interpolated`` with PyTorch's own float index computation,
``_adaptive``); merges take the union; see :mod:`dilconv.analytic_field` for the conventions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, NoReturn

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch._ops import OpOverload
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__: list[str] = []  # private to dilconv.analytic_field and dilconv.effective_field

aten = torch.ops.aten


class _Refused(NotImplementedError):
    """An operation the tracer does not model (as opposed to one the meta device lacks)."""


@dataclass(frozen=True)
class _Axis:
    """Per-index interval ``[lo[i], hi[i]]`` of input pixels along one axis, or a global field."""

    lo: Tensor | None
    hi: Tensor | None
    jump: Fraction

    @property
    def whole(self) -> bool:
        return self.lo is None

    def gather(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Intervals of indices ``idx``, extended linearly (by ``jump``) beyond the border."""
        if self.lo is None or self.hi is None:
            raise ValueError("a global field has no per-index intervals to gather")
        inside = idx.clamp(0, self.lo.numel() - 1)
        shift = (idx - inside).double() * float(self.jump)
        return self.lo[inside] + shift, self.hi[inside] + shift

    def globalised(self) -> _Axis:
        return _Axis(None, None, self.jump)


_Field = tuple[_Axis, _Axis]


def _taps(axis: _Axis, idx: Tensor, valid: Tensor | None, ratio: Fraction) -> _Axis:
    """Output index ``i`` reaches the union of the fields of input indices ``idx[i, valid[i]]``."""
    if axis.whole:
        return _Axis(None, None, axis.jump * ratio)
    lo, hi = axis.gather(idx)
    if valid is not None:
        lo = lo.masked_fill(~valid, math.inf)
        hi = hi.masked_fill(~valid, -math.inf)
    return _Axis(lo.amin(1), hi.amax(1), axis.jump * ratio)


def _window(
    axis: _Axis, n_out: int, kernel: int, stride: int, padding: int, dilation: int
) -> _Axis:
    idx = (torch.arange(n_out) * stride - padding)[:, None] + torch.arange(kernel) * dilation
    return _taps(axis, idx, None, Fraction(stride))


def _transposed(
    axis: _Axis, n_out: int, kernel: int, stride: int, padding: int, dilation: int
) -> _Axis:
    # Output o receives input i through tap t when o = i * stride - padding + t * dilation.
    num = (torch.arange(n_out) + padding)[:, None] - torch.arange(kernel) * dilation
    return _taps(axis, num.div(stride, rounding_mode="floor"), num % stride == 0,
                 Fraction(1, stride))


def _adaptive(axis: _Axis, n_in: int, n_out: int) -> _Axis:
    if n_out == 1:
        return axis.globalised()
    starts = [(i * n_in) // n_out for i in range(n_out)]
    ends = [-(-((i + 1) * n_in) // n_out) for i in range(n_out)]
    width = max(e - s for s, e in zip(starts, ends))
    idx = torch.tensor(starts)[:, None] + torch.arange(width)
    return _taps(axis, idx, idx < torch.tensor(ends)[:, None], Fraction(n_in, n_out))


def _source_scale(
    n_in: int, n_out: int, scale: float | None, align: bool | None, dt: torch.dtype
) -> Tensor:
    """The float scale PyTorch's CPU up-sampling kernels compute (``UpSample.h``)."""
    if align:
        value = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
        return torch.tensor(value, dtype=dt)
    if scale is not None and scale > 0:
        return torch.tensor(1.0 / scale, dtype=dt)
    return torch.tensor(n_in, dtype=dt) / torch.tensor(n_out, dtype=dt)


def _interpolated(axis: _Axis, n_in: int, n_out: int, mode: str, align: bool | None,
                  scale: float | None, dt: torch.dtype) -> _Axis:
    ratio = Fraction(n_in, n_out)
    j = torch.arange(n_out)
    if n_in == n_out:
        return _taps(axis, j[:, None], None, ratio)
    s = _source_scale(n_in, n_out, scale, align, dt)
    jf = j.to(dt)
    if mode == "nearest":
        src = j // 2 if n_out == 2 * n_in else (jf * s).floor().long()
        return _taps(axis, src.clamp(max=n_in - 1)[:, None], None, ratio)
    if mode == "nearest-exact":
        src = ((j.double() + 0.5) * s.double()).to(dt).floor().long()
        return _taps(axis, src.clamp(max=n_in - 1)[:, None], None, ratio)
    real = jf * s if align else (jf + 0.5) * s - 0.5
    if mode == "bilinear":
        real = real.clamp(min=0)
        first = real.floor().long().clamp(max=n_in - 1)
        frac = (real - first).clamp(0, 1)
        idx = torch.stack([first, (first + 1).clamp(max=n_in - 1)], 1)
        return _taps(axis, idx, torch.stack([frac < 1, frac > 0], 1), ratio)
    # Bicubic: four taps around floor(real); at whole-pixel positions only the centre one
    # has a non-zero weight (Keys' kernel vanishes at the other integers).
    first = real.floor().long()
    idx = (first[:, None] + torch.arange(-1, 3)).clamp(0, n_in - 1)
    exact = (real == first)[:, None]
    return _taps(axis, idx, ~exact | (torch.arange(-1, 3) == 0), ratio)


def _merge(axes: Sequence[_Axis]) -> _Axis:
    """Union of fields; when jumps differ (exact-size resizing), the finest one is reported."""
    jump = min(a.jump for a in axes)
    if any(a.whole for a in axes):
        return _Axis(None, None, jump)
    lo = torch.stack([a.lo for a in axes if a.lo is not None]).amin(0)
    hi = torch.stack([a.hi for a in axes if a.hi is not None]).amax(0)
    return _Axis(lo, hi, jump)


def _two(value: int | Sequence[int] | None, default: int) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    values = [default] if value is None or len(value) == 0 else list(value)
    return (values[0], values[-1])


def _bind(func: OpOverload, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """``func``'s arguments by schema name, defaults filled in."""
    bound = {}
    for i, arg in enumerate(func._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
    return bound


def _spatial_dims(value: int | Sequence[int] | None, ndim: int) -> set[int]:
    """Which of the last two axes (0: height, 1: width) a ``dim`` argument names."""
    if value is None or value == []:
        return {0, 1}
    dims = [value] if isinstance(value, int) else list(value)
    return {d % ndim - (ndim - 2) for d in dims} & {0, 1}


_EXTRA_POINTWISE = {
    aten.hardswish, aten.hardswish_, aten.gelu_, aten._prelu_kernel, aten.native_dropout,
    aten.log_sigmoid_forward, aten._to_copy, aten.detach, aten.alias, aten.lift_fresh,
}
_SAME_LAYOUT = {aten.view, aten._unsafe_view, aten.reshape, aten.expand, aten.unsqueeze,
                aten.squeeze, aten.repeat, aten.contiguous}
_REDUCTIONS = {aten.mean, aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.var,
               aten.std, aten.var_mean, aten.std_mean, aten.prod, aten.logsumexp,
               aten.linalg_vector_norm, aten.norm, aten.argmax, aten.argmin}
_BATCH_NORMS = {aten.native_batch_norm, aten._native_batch_norm_legit, aten.cudnn_batch_norm,
                aten.miopen_batch_norm}
_UPSAMPLES = {
    aten.upsample_nearest2d: "nearest", aten._upsample_nearest_exact2d: "nearest-exact",
    aten.upsample_bilinear2d: "bilinear", aten.upsample_bicubic2d: "bicubic",
}


class _CircularAsConstant(TorchFunctionMode):
    """Follows circular padding as constant padding of the same widths.

    ATen builds circular padding (``F.pad(mode="circular")``, a convolution's
    ``padding_mode="circular"``) by writing slices of the input into a new tensor, which the
    tracer cannot follow. Under the border-free convention the values a padded pixel takes do
    not matter, only how far the padding shifts the indices: reflection and replication padding
    are followed that way too (``aten.reflection_pad2d``, ``aten.replication_pad2d``).
    """

    def __torch_function__(
        self, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.pad and (args[2] if len(args) > 2 else kwargs.get("mode")) == "circular":
            return F.pad(args[0], args[1] if len(args) > 1 else kwargs["pad"])
        return func(*args, **kwargs)


class _Tracer(TorchDispatchMode):
    """Tags every tensor the forward produces with the receptive field of its spatial axes."""

    def __init__(self, names: Mapping[nn.Module, str]) -> None:
        super().__init__()
        self.records: dict[int, tuple[Tensor, _Field]] = {}
        self.names = names
        self.stack: list[nn.Module] = []

    def mark(self, t: Tensor, field: _Field | None) -> None:
        if field is None:
            self.records.pop(id(t), None)
        else:
            self.records[id(t)] = (t, field)

    def field(self, t: Tensor) -> _Field | None:
        record = self.records.get(id(t))
        return None if record is None else record[1]

    def _known(self, t: Tensor) -> _Field:
        """The field of a tensor known to be traced."""
        return self.records[id(t)][1]

    def __torch_dispatch__(
        self, func: OpOverload, types: Sequence[type], args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        traced = [t for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, Tensor) and id(t) in self.records]
        if not outputs or not traced:
            return out
        first = outputs[0]
        field = self._propagate(func, _bind(func, args, kwargs), traced, first)
        for t in outputs:
            if t is first or (t.dim() >= 2 and t.shape[-2:] == first.shape[-2:]):
                self.mark(t, field)
        return out

    def _fit(self, t: Tensor, shape: torch.Size, func: OpOverload) -> _Field:
        """``t``'s field broadcast to ``shape``; a size-1 axis stretched over many is global."""
        field = self._known(t)
        axes = []
        for k, a in enumerate((-2, -1)):
            n_in = t.shape[a] if t.dim() >= 2 else 1
            n_out = shape[a] if len(shape) >= 2 else 1
            axis = field[k]
            if axis.whole or n_in == n_out:
                axes.append(axis)
            elif n_in == 1:
                axes.append(axis.globalised())
            else:
                self._refuse(func, f"maps a spatial axis of size {n_in} to size {n_out}")
        return axes[0], axes[1]

    def _merged(self, tensors: Sequence[Tensor], shape: torch.Size, func: OpOverload) -> _Field:
        fields = [self._fit(t, shape, func) for t in tensors if id(t) in self.records]
        return _merge([f[0] for f in fields]), _merge([f[1] for f in fields])

    def _global(self, x: Tensor, axes: AbstractSet[int] = frozenset({0, 1})) -> _Field:
        height, width = self._known(x)
        return (height.globalised() if 0 in axes else height,
                width.globalised() if 1 in axes else width)

    def _refuse(self, func: OpOverload, why: str) -> NoReturn:
        inner = self.stack[-1] if self.stack else None
        where = "the top-level forward"
        if inner is not None:
            name = self.names.get(inner, "")
            where = f"layer {name!r} ({type(inner).__name__})" if name else type(inner).__name__
        raise _Refused(
            f"receptive_field cannot follow {func} in {where}: it {why}. Supported: "
            "convolutions, pooling, interpolation, padding, crops, point-wise operations and "
            "concatenation along channels."
        )

    def _propagate(
        self, func: OpOverload, a: dict[str, Any], traced: list[Tensor], out: Tensor
    ) -> _Field | None:
        packet = func.overloadpacket
        if torch.Tag.pointwise in func.tags or packet in _EXTRA_POINTWISE:
            return self._merged(traced, out.shape, func)
        if packet in (aten.fill_, aten.zero_):
            return None
        if packet is aten.copy_:
            src = a["src"]
            return self._fit(src, out.shape, func) if id(src) in self.records else None
        if packet in (aten.cat, aten.stack, aten.select, aten.split, aten.split_with_sizes,
                      aten.unbind, aten.index_select, aten.flip, aten.roll):
            dim = a["dims"] if "dims" in a else a.get("dim", 0)
            ndim = out.dim() if packet is aten.stack else traced[0].dim()
            if _spatial_dims(dim, ndim) and not self._whole(traced):
                self._refuse(func, "splits, joins, indexes or reorders a spatial axis")
            return self._merged(traced, out.shape, func)
        primary = a.get("self", a.get("input"))
        x = next((t for t in traced if t is primary), traced[0])
        field = self._global(x) if self._whole([x]) else self._spatial(func, a, x, out)
        if any(t is not x for t in traced):
            # Another operand computed from the input (a weight, a scale) reaches every pixel.
            return self._global(x)
        return field

    def _whole(self, tensors: Sequence[Tensor]) -> bool:
        return all(axis.whole for t in tensors for axis in self._known(t))

    def _spatial(self, func: OpOverload, a: dict[str, Any], x: Tensor, out: Tensor) -> _Field:
        """Field of the output of a one-input operation that may move spatial positions."""
        packet = func.overloadpacket
        if packet in _SAME_LAYOUT:
            return self._fit(x, out.shape, func)
        if packet is aten.convolution:
            return self._convolution(a, x, out)
        if packet in (aten.max_pool2d_with_indices, aten.max_pool2d, aten.avg_pool2d):
            k = _two(a["kernel_size"], 1)
            s = _two(a["stride"], 0)
            s = k if s == (0, 0) else s
            p, d = _two(a["padding"], 0), _two(a.get("dilation"), 1)
            return self._per_axis(x, lambda ax, n_in, n_out, i: _window(
                ax, n_out, k[i], s[i], p[i], d[i]), out)
        if packet in (aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d):
            return self._per_axis(x, lambda ax, n_in, n_out, i: _adaptive(ax, n_in, n_out), out)
        if packet in _UPSAMPLES:
            return self._upsample(func, a, x, out)
        if packet in (aten.constant_pad_nd, aten.reflection_pad2d, aten.replication_pad2d):
            pad = list(a["pad"] if "pad" in a else a["padding"])
            before = (pad[2] if len(pad) > 2 else 0, pad[0])
            return self._per_axis(x, lambda ax, n_in, n_out, i: _window(
                ax, n_out, 1, 1, before[i], 1), out)
        if packet is aten.slice:
            return self._slice(a, x, out, func)
        if packet in (aten.pixel_shuffle, aten.pixel_unshuffle):
            r = a["upscale_factor"] if "upscale_factor" in a else a["downscale_factor"]
            step = _transposed if packet is aten.pixel_shuffle else _window
            return self._per_axis(x, lambda ax, n_in, n_out, i: step(ax, n_out, r, r, 0, 1), out)
        if packet in (aten.permute, aten.transpose, aten.t):
            return self._permuted(func, a, x, out)
        if packet in _REDUCTIONS:
            axes = _spatial_dims(a.get("dim"), x.dim())
            if not axes:
                return self._fit(x, x.shape, func)
            return self._global(x, axes if a.get("keepdim") else {0, 1})
        if packet in (aten._softmax, aten._log_softmax):
            return self._global(x, _spatial_dims(a["dim"], x.dim()))
        if packet in _BATCH_NORMS:
            # Batch statistics average over every pixel; running statistics are per channel.
            return self._global(x) if a.get("training", True) else self._fit(x, x.shape, func)
        if packet is aten._native_batch_norm_legit_no_training:
            return self._fit(x, x.shape, func)
        if packet is aten.native_layer_norm:
            return self._global(x, {2 - k for k in range(1, len(a["normalized_shape"]) + 1)})
        if packet is aten.native_group_norm:
            return self._global(x)
        self._refuse(func, "is not an operation whose effect on spatial positions is known")

    def _per_axis(
        self, x: Tensor, rule: Callable[[_Axis, int, int, int], _Axis], out: Tensor
    ) -> _Field:
        """Applies ``rule(axis, n_in, n_out, i)`` to the height (i = 0) and width (i = 1)."""
        height, width = self._known(x)
        return (rule(height, x.shape[-2], out.shape[-2], 0),
                rule(width, x.shape[-1], out.shape[-1], 1))

    def _convolution(self, a: dict[str, Any], x: Tensor, out: Tensor) -> _Field:
        kernel = a["weight"].shape[2:]
        if len(kernel) != 2:
            self._refuse(aten.convolution.default, f"is a {len(kernel)}-d convolution")
        s, p, d = _two(a["stride"], 1), _two(a["padding"], 0), _two(a["dilation"], 1)
        step = _transposed if a["transposed"] else _window
        return self._per_axis(x, lambda ax, n_in, n_out, i: step(
            ax, n_out, kernel[i], s[i], p[i], d[i]), out)

    def _upsample(self, func: OpOverload, a: dict[str, Any], x: Tensor, out: Tensor) -> _Field:
        mode = _UPSAMPLES[func.overloadpacket]
        factors = a.get("scale_factors")
        scales = factors if factors is not None else (a.get("scales_h"), a.get("scales_w"))
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        return self._per_axis(x, lambda ax, n_in, n_out, i: _interpolated(
            ax, n_in, n_out, mode, a.get("align_corners"), scales[i], dt), out)

    def _slice(self, a: dict[str, Any], x: Tensor, out: Tensor, func: OpOverload) -> _Field:
        axes = _spatial_dims(a["dim"], x.dim())
        if not axes:
            return self._fit(x, out.shape, func)
        axis = axes.pop()
        n = x.shape[a["dim"]]
        begin = 0 if a.get("start") is None else a["start"]
        begin = min(max(begin + n if begin < 0 else begin, 0), n)
        field = list(self._known(x))
        field[axis] = _window(field[axis], out.shape[a["dim"]], 1, a.get("step", 1), -begin, 1)
        return field[0], field[1]

    def _permuted(self, func: OpOverload, a: dict[str, Any], x: Tensor, out: Tensor) -> _Field:
        n = x.dim()
        if func.overloadpacket is aten.permute:
            order = [d % n for d in a["dims"]]
        else:
            order = list(range(n))
            if n >= 2:
                d0, d1 = (a["dim0"] % n, a["dim1"] % n) if "dim0" in a else (n - 2, n - 1)
                order[d0], order[d1] = order[d1], order[d0]
        if order[-2:] != [n - 2, n - 1]:
            self._refuse(func, "moves or swaps the spatial axes")
        return self._known(x)
