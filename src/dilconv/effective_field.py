"""Measured receptive fields: gradient boxes, gridding holes (Wang et al., WACV 2018) and the
effective receptive field (Luo et al., NeurIPS 2016, section 2).

Everything here differentiates one output pixel with respect to the input. For the field's
extent (:func:`empirical_receptive_field`, :func:`gridding_holes`) a copy of the module gets
weights that make every path count: parameters ``|w| + 0.01`` (and each weight tensor
normalised to unit sum per output unit, so activations neither overflow nor vanish), norm
layers in eval mode with running mean 0 and variance 1, max pooling replaced by sum pooling
over the same window, inputs drawn from ``U(0.5, 1.5)``, float32 arithmetic (float64
where the smallest gradient nears float32's range). Then every
activation is positive, no ReLU is closed and nothing cancels: an input pixel has a non-zero
gradient exactly when some path reaches it. The effective receptive field instead uses the
module's real weights. The module passed in is never modified.

Every function takes its arguments as :func:`~dilconv.receptive_field` does:
``(module, input_size, *, in_channels=None, output_index=None, position=None, ...)``, with
``input_size`` an int or ``(H, W)`` and ``in_channels`` inferred from the module unless given.
dilconv 0.1's forms (``input_shape=(C, H, W)``, a ``(C, H, W)`` size, ``output_index`` passed
positionally) still work until dilconv 0.3, with a ``DeprecationWarning`` saying what to write.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from copy import deepcopy
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from dilconv._checks import check_choice, check_positive, pair
from dilconv._field_call_forms import old_call_forms
from dilconv._field_trace import _two
from dilconv.analytic_field import (
    OutputIndex,
    ReceptiveField,
    _in_channels,
    _number,
    _position,
    _select_output,
)

__all__ = [
    "effective_receptive_field",
    "empirical_receptive_field",
    "gradient_map",
    "gridding_holes",
]

_MAX_POOLS = {F.max_pool2d, F.max_pool2d_with_indices, torch.max_pool2d}
_ADAPTIVE_MAX_POOLS = {F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices}


def _sum_pool(
    x: Tensor,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    ceil_mode: bool = False,
    return_indices: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Max pooling's window and output size, with every element of the window summed."""
    k, p, d = _two(kernel_size, 1), _two(padding, 0), _two(dilation, 1)
    s = k if stride is None or stride == [] else _two(stride, 1)
    pooled, indices = F.max_pool2d_with_indices(x.detach(), k, s, p, d, ceil_mode=ceil_mode)
    out = pooled.shape[-2:]
    extra = [max(0, (n - 1) * s[i] + d[i] * (k[i] - 1) + 1 - (x.shape[i - 2] + 2 * p[i]))
             for i, n in enumerate(out)]
    padded = F.pad(x, (p[1], p[1] + extra[1], p[0], p[0] + extra[0]))
    ones = x.new_ones(x.shape[-3], 1, *k)
    summed = F.conv2d(padded, ones, stride=s, dilation=d, groups=x.shape[-3])
    summed = summed[..., : out[0], : out[1]]
    return (summed, indices) if return_indices else summed


class _SumPooling(TorchFunctionMode):
    """Max pooling passes a gradient to one element per window; sum pooling to all of them."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Sequence[type], args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.max_pool2d_with_indices:
            return _sum_pool(*args, **{**kwargs, "return_indices": True})
        if func in _MAX_POOLS:
            return _sum_pool(*args, **kwargs)
        if func in _ADAPTIVE_MAX_POOLS:
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            pooled = F.adaptive_avg_pool2d(args[0], size)
            if func is F.adaptive_max_pool2d_with_indices or kwargs.get("return_indices"):
                return pooled, func(*args, **kwargs)[1]
            return pooled
        return func(*args, **kwargs)


@torch.no_grad()
def _all_paths(module: nn.Module) -> nn.Module:
    for m in module.modules():
        mean, var = getattr(m, "running_mean", None), getattr(m, "running_var", None)
        if isinstance(mean, Tensor):
            mean.zero_()
        if isinstance(var, Tensor):
            var.fill_(1)
    for p in module.parameters():
        if p.is_floating_point():
            p.abs_().add_(0.01)
            if p.dim() >= 2:
                p.div_(p.sum(tuple(range(1, p.dim())), keepdim=True))
    return module


def _input_shape(
    module: nn.Module, input_size: int | Sequence[int], in_channels: int | None
) -> tuple[int, int, int]:
    """``(C, H, W)`` from ``input_size`` and ``in_channels`` (inferred as receptive_field does)."""
    height, width = pair("input_size", input_size)
    return _in_channels(module, in_channels), height, width


def _gradients(module: nn.Module, shape: tuple[int, int, int], output_index: OutputIndex,
               position: Sequence[int] | None, *, probes: int, weights: str, samples: int = 1,
               seed: int = 0) -> tuple[Tensor, list[tuple[int, int]], tuple[int, int]]:
    """|d out[b, :, y, x].sum() / d input| summed over channels, one map per probe.

    Probe ``i`` is the output pixel ``position + (i, i)`` (stepping back where the output
    ends), so that two probes show how the field moves. Returns the maps (probes, H, W) averaged
    over ``samples`` inputs, the probed positions and the output's spatial size.
    """
    copy = deepcopy(module).eval().requires_grad_(False)
    if weights == "real":
        return _backward(copy, shape, output_index, position, probes, samples, seed, None)
    _all_paths(copy)
    maps, positions, size = _backward(copy.float(), shape, output_index, position, probes,
                                      samples, seed, _SumPooling())
    # The gradient at the field's corners is a product of one small weight per layer; in a
    # deep network it can near float32's smallest normal number, so measure again in float64.
    if (maps > 0).any() and maps[maps > 0].min() < 1e-30:
        return _backward(copy.double(), shape, output_index, position, probes, samples, seed,
                         _SumPooling())
    return maps, positions, size


def _backward(copy: nn.Module, shape: tuple[int, int, int], output_index: OutputIndex,
              position: Sequence[int] | None, probes: int, samples: int, seed: int,
              mode: TorchFunctionMode | None,
              ) -> tuple[Tensor, list[tuple[int, int]], tuple[int, int]]:
    like = next((t for t in copy.parameters() if t.is_floating_point()), None)
    device, dtype = (like.device, like.dtype) if like is not None else ("cpu", torch.float32)
    generator = torch.Generator().manual_seed(seed)
    batch = probes * samples
    if mode is None:
        x = torch.randn(batch, *shape, generator=generator)
    else:
        x = torch.rand(batch, *shape, generator=generator) + 0.5
    x = x.to(device=device, dtype=dtype).requires_grad_(True)
    with torch.enable_grad(), mode or nullcontext():
        out = _select_output(copy(x), output_index)
    size = (out.shape[-2], out.shape[-1]) if out.dim() >= 3 else (1, 1)
    base = _position(position, size)
    positions: list[tuple[int, int]] = []
    for i in range(probes):
        y, x_ = (q + i if q + i < n else max(q - i, 0) for q, n in zip(base, size))
        positions.append((y, x_))
    picked = [
        out[b].sum() if out.dim() < 3 else out[b, ..., y, x_].sum()
        for b, (y, x_) in enumerate(p for p in positions for _ in range(samples))
    ]
    (grad,) = torch.autograd.grad(torch.stack(picked).sum(), x)
    maps = grad.abs().sum(1).reshape(probes, samples, *shape[1:]).mean(1)
    return maps.cpu(), positions, size


def _box(mask: Tensor) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive (first, last) rows and columns of the True entries of a 2-d mask."""
    if not mask.any():
        raise ValueError("the output pixel does not depend on the input (zero gradient)")
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    return (int(rows[0]), int(rows[-1])), (int(cols[0]), int(cols[-1]))


@old_call_forms(positional=1)
def gradient_map(
    module: nn.Module,
    input_size: int | Sequence[int],
    *,
    in_channels: int | None = None,
    output_index: OutputIndex = None,
    position: Sequence[int] | None = None,
    weights: str = "positive",
    samples: int = 1,
    seed: int = 0,
) -> Tensor:
    """``|d y / d x|`` over the input for one output pixel ``y``, summed over channels.

    Args:
        module: called with one NCHW tensor; may return a tensor, a sequence or a mapping.
        input_size: ``(H, W)`` of the input, or one int for a square.
        in_channels: C; by default inferred as in :func:`~dilconv.receptive_field` (the
            module's ``in_channels`` attribute or the input channels of its first convolution).
        output_index: which output, when the module returns several (an index, or a key of a
            mapping).
        position: ``(y, x)`` output pixel; default the centre of the output.
        weights: ``"positive"`` (every path counts, see the module docstring) or ``"real"``
            (the module's own weights, standard normal inputs).
        samples: inputs averaged over.
        seed: seed of the random inputs.

    Shape:
        input: ``samples`` draws of (C, H, W) with ``(H, W)`` = ``input_size`` -> output (H, W),
        float.

    Example:
        >>> from torch import nn
        >>> from dilconv import gradient_map
        >>> conv = nn.Conv2d(1, 1, 3, padding=2, dilation=2)
        >>> (gradient_map(conv, (7, 7)) > 0).int()[1:6, 1:6]
        tensor([[1, 0, 1, 0, 1],
                [0, 0, 0, 0, 0],
                [1, 0, 1, 0, 1],
                [0, 0, 0, 0, 0],
                [1, 0, 1, 0, 1]], dtype=torch.int32)
    """
    check_choice("weights", weights, ("positive", "real"))
    check_positive("samples", samples)
    shape = _input_shape(module, input_size, in_channels)
    maps, _, _ = _gradients(module, shape, output_index, position, probes=1, weights=weights,
                            samples=samples, seed=seed)
    return maps[0]


@old_call_forms(positional=1)
def empirical_receptive_field(
    module: nn.Module,
    input_size: int | Sequence[int],
    *,
    in_channels: int | None = None,
    output_index: OutputIndex = None,
    position: Sequence[int] | None = None,
    jump: float | Sequence[float] | None = None,
) -> ReceptiveField:
    """Receptive field measured as the box of input pixels with a non-zero gradient.

    ``size`` and the field's centre come from the gradient of output pixel ``position`` (all
    paths made positive, see the module docstring); ``start`` is that centre minus
    ``position * jump``, as :func:`~dilconv.receptive_field` reports it. ``jump`` is measured
    as the distance the box's centre moves when the output pixel moves by one (with one output
    pixel along an axis: input size / output size). That is the jump wherever every output
    pixel sees the same pattern; after fractional up-sampling the field depends on the pixel's
    phase, and the analytic jump should be passed in instead. A box that touches the border
    of the input may be clipped: a warning says so (the analytic field assumes no border).

    Args:
        module: called with one NCHW tensor; may return a tensor, a sequence or a mapping.
        input_size: ``(H, W)`` of the input, or one int for a square.
        in_channels: C; by default inferred as in :func:`~dilconv.receptive_field` (the
            module's ``in_channels`` attribute or the input channels of its first convolution).
        output_index: which output, when the module returns several (an index, or a key of a
            mapping).
        position: ``(y, x)`` output pixel; default the centre of the output.
        jump: ``(h, w)`` (or one number) to use instead of measuring it.

    Shape:
        input: (2, C, H, W) with ``(H, W)`` = ``input_size`` (one probe pixel per sample, two
        to measure the jump; one with ``jump`` given) -> the chosen output, spatial axes last.

    Example:
        >>> from torch import nn
        >>> from dilconv import empirical_receptive_field
        >>> stack = nn.Sequential(*(nn.Conv2d(1, 1, 3, padding=d, dilation=d) for d in (1, 2, 4)))
        >>> empirical_receptive_field(stack, (32, 32))
        ReceptiveField(size=(15, 15), jump=(1, 1), start=(0, 0))
    """
    shape = _input_shape(module, input_size, in_channels)
    _, height, width = shape
    maps, positions, size = _gradients(module, shape, output_index, position,
                                       probes=1 if jump is not None else 2, weights="positive")
    boxes = [_box(m > 0) for m in maps]
    sizes: list[float] = []
    jumps: list[float] = []
    starts: list[float] = []
    for axis, n_in in enumerate((height, width)):
        lo, hi = boxes[0][axis]
        q = positions[0][axis]
        if jump is not None:
            step = Fraction(jump if isinstance(jump, int | float) else jump[axis])
        elif positions[1][axis] != q:
            moved = Fraction(sum(boxes[1][axis]) - lo - hi, 2)
            step = moved / (positions[1][axis] - q)
        else:
            step = Fraction(n_in, size[axis])
        if lo == 0 or hi == n_in - 1:
            warnings.warn(
                f"the measured field ({lo}..{hi} on axis {axis}) touches the border of the "
                f"{height}x{width} input and may be clipped; use a larger input", stacklevel=3,
            )
        sizes.append(hi - lo + 1)
        jumps.append(_number(step))
        starts.append(_number(Fraction(lo + hi, 2) - q * step))
    return ReceptiveField((sizes[0], sizes[1]), (jumps[0], jumps[1]), (starts[0], starts[1]))


@old_call_forms(positional=1)
def gridding_holes(
    module: nn.Module,
    input_size: int | Sequence[int],
    *,
    in_channels: int | None = None,
    output_index: OutputIndex = None,
    position: Sequence[int] | None = None,
) -> Tensor:
    """Input pixels inside the field's box that no path from the output pixel reaches.

    Stacked dilations that share a common factor leave such holes (the "gridding" of Yu et
    al., DRN, CVPR 2017 and Wang et al., WACV 2018): 3x3 convolutions dilated (2, 2, 2) reach
    only every other pixel, while (1, 2, 5) or (1, 2, 4) reach them all.

    Args:
        module: called with one NCHW tensor; may return a tensor, a sequence or a mapping.
        input_size: ``(H, W)`` of the input, or one int for a square.
        in_channels: C; by default inferred as in :func:`~dilconv.receptive_field` (the
            module's ``in_channels`` attribute or the input channels of its first convolution).
        output_index: which output, when the module returns several (an index, or a key of a
            mapping).
        position: ``(y, x)`` output pixel; default the centre of the output.

    Returns:
        bool tensor (H, W), True at the holes; ``.nonzero()`` lists them as (y, x).

    Shape:
        input: (1, C, H, W) with ``(H, W)`` = ``input_size`` -> output (H, W), bool.

    Example:
        >>> from torch import nn
        >>> from dilconv import gridding_holes
        >>> stack = nn.Sequential(*(nn.Conv2d(1, 1, 3, padding=d, dilation=d) for d in (1, 2, 5)))
        >>> bool(gridding_holes(stack, (33, 33)).any())
        False
        >>> stack = nn.Sequential(*(nn.Conv2d(1, 1, 3, padding=2, dilation=2) for _ in range(3)))
        >>> int(gridding_holes(stack, 33).sum())
        120
    """
    shape = _input_shape(module, input_size, in_channels)
    maps, _, _ = _gradients(module, shape, output_index, position, probes=1, weights="positive")
    reached = maps[0] > 0
    (top, bottom), (left, right) = _box(reached)
    inside = torch.zeros_like(reached)
    inside[top : bottom + 1, left : right + 1] = True
    return inside & ~reached


@old_call_forms(positional=2)
def effective_receptive_field(
    module: nn.Module,
    input_size: int | Sequence[int],
    share: float = 0.95,
    *,
    in_channels: int | None = None,
    output_index: OutputIndex = None,
    position: Sequence[int] | None = None,
    samples: int = 8,
    seed: int = 0,
) -> float:
    r"""Radius around the field's centre that holds ``share`` of the gradient mass.

    Luo et al. (2016, sec. 2) define the effective receptive field of an output pixel
    :math:`y` as the gradient :math:`\partial y / \partial x_{i,j}` over the input pixels, and
    show that with real weights it is roughly Gaussian and occupies a small part of the
    theoretical field. Here :math:`y` is the output pixel ``position`` summed over the output
    channels, the module (a copy) is in eval mode, and the mass is averaged over
    :math:`N` = ``samples`` standard-normal inputs :math:`x^{(n)}`:

    .. math::

        g(i, j) = \frac{1}{N} \sum_{n=1}^{N} \sum_c
        \left| \frac{\partial y}{\partial x^{(n)}_{c,i,j}} \right| .

    With :math:`m` the centre of the box where :math:`g > 0`, the result is the smallest
    Euclidean radius that holds ``share`` of the mass:

    .. math::

        \rho = \min \Big\{ \|(i, j) - m\| \;:\; \sum_{\|(i', j') - m\| \le \|(i, j) - m\|}
        g(i', j') \ge \mathrm{share} \sum_{i', j'} g(i', j') \Big\} .

    Args:
        module: called with one NCHW tensor; may return a tensor, a sequence or a mapping.
        input_size: ``(H, W)`` of the input, or one int for a square.
        share: fraction of the gradient mass the radius holds, in (0, 1].
        in_channels: C; by default inferred as in :func:`~dilconv.receptive_field` (the
            module's ``in_channels`` attribute or the input channels of its first convolution).
        output_index: which output, when the module returns several (an index, or a key of a
            mapping).
        position: ``(y, x)`` output pixel; default the centre of the output.
        samples: :math:`N`, standard-normal inputs averaged over.
        seed: seed of the random inputs.

    Returns:
        :math:`\rho`, in input pixels.

    Shape:
        input: ``samples`` draws of (C, H, W) with ``(H, W)`` = ``input_size`` -> a float.

    Example:
        >>> from torch import nn
        >>> from dilconv import effective_receptive_field
        >>> effective_receptive_field(nn.Conv2d(3, 8, 1), (9, 9))
        0.0
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    check_positive("samples", samples)
    shape = _input_shape(module, input_size, in_channels)
    maps, _, _ = _gradients(module, shape, output_index, position, probes=1, weights="real",
                            samples=samples, seed=seed)
    mass = maps[0].double()
    if not mass.any():
        raise ValueError(
            "no gradient reaches the input from the output pixel with these weights and "
            f"{samples} samples (closed activations?); try more samples"
        )
    (top, bottom), (left, right) = _box(mass > 0)
    rows = torch.arange(mass.shape[0], dtype=torch.float64) - (top + bottom) / 2
    cols = torch.arange(mass.shape[1], dtype=torch.float64) - (left + right) / 2
    distance = (rows[:, None] ** 2 + cols[None, :] ** 2).sqrt().flatten()
    order = distance.argsort()
    held = mass.flatten()[order].cumsum(0)
    k = int(torch.searchsorted(held, share * held[-1]))
    return float(distance[order][min(k, distance.numel() - 1)])
