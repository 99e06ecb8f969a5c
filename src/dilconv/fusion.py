"""Weighted feature fusion (Tan, Pang & Le, EfficientDet, CVPR 2020, sec. 3.3, eq. 1-3).

EfficientDet fuses same-sized maps with one learned scalar per input. Its "fast normalized
fusion" (eq. 3), ``O = sum_i w_i I_i / (eps + sum_j w_j)`` with ``w = relu(weight)``, is the
default; the softmax fusion of eq. 2 and an unweighted sum (eq. 1 with fixed weights) are the
alternatives the paper compares against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import reduce
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx

from dilconv import _fusion_triton
from dilconv._checks import (
    check_choice,
    check_positive,
    check_same_shape,
    is_tracing,
    is_transforming,
)
from dilconv._layers import Device, DType

__all__ = ["WeightedFusion"]

FUSION_MODES = ("fast", "softmax", "sum")

_LEAN_BACKWARD_MIN_NUMEL = 1 << 16
"""Elements per input from which :class:`_WeightedSum` pays: below, its Python overhead (about
60 us a call, forward and backward) exceeds what its backward saves (about 1 ns an element)."""


def _inner(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum()`` in the promoted dtype, as one BLAS dot product where both share a dense
    float32/float64 layout."""
    if is_transforming():  # no memory-format queries
        return (a * b).sum()
    same_layout = a.dtype == b.dtype and a.stride() == b.stride()
    if same_layout and a.dtype in (torch.float32, torch.float64):
        channels_last = a.dim() == 4 and a.is_contiguous(memory_format=torch.channels_last)
        if channels_last and not a.is_contiguous():
            a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
        if a.is_contiguous():
            return torch.dot(a.view(-1), b.view(-1))
    return (a * b).sum()


def _weighted_sum(factors: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """``sum_i factors[i] * inputs[i]`` in ``factors``' dtype, accumulated in one output buffer.

    ``factors[i]`` may be a scalar or any tensor that broadcasts against the inputs.
    """
    out = inputs[0].to(factors.dtype) * factors[0]
    for i in range(1, len(inputs)):
        if is_transforming():  # addcmul_ has no batching rule: vmap would loop
            out = torch.addcmul(out, inputs[i], factors[i])
        else:
            out.addcmul_(inputs[i], factors[i])
    return out


class _WeightedSum(torch.autograd.Function):
    """:func:`_weighted_sum` with a lean backward pass.

    Autograd through ``mul`` and ``addcmul_`` would take four full-size products per input in
    the backward pass; here each input costs one (its gradient) and each factor one dot product.
    The output, the factors' gradients and the products behind them are in the factors' dtype
    (float32 or float64), whatever the inputs'. The map is bilinear in (factors, inputs), so
    its forward-mode derivative is the same sum over the tangents (:meth:`jvp`); under
    ``torch.func.vmap`` the batch dimension is moved first and broadcast (:meth:`vmap`).
    """

    @staticmethod
    def forward(factors: Tensor, *inputs: Tensor) -> Tensor:
        return _weighted_sum(factors, inputs)

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs)
        ctx.save_for_forward(*inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:  # a C++ node's ctx
        factors, *inputs = ctx.saved_tensors
        needs_factors, *needs_inputs = ctx.needs_input_grad
        grad_factors = torch.stack([_inner(grad, x) for x in inputs]) if needs_factors else None
        grad_inputs = [
            (grad * factors[i]).to(inputs[i].dtype) if needed else None
            for i, needed in enumerate(needs_inputs)
        ]
        return (grad_factors, *grad_inputs)

    @staticmethod
    def jvp(ctx: Any, factors_tangent: Tensor | None, *inputs_tangent: Tensor | None) -> Tensor:
        factors, *inputs = ctx.saved_tensors
        dtype = factors.dtype
        terms = []
        for i, (x, x_tangent) in enumerate(zip(inputs, inputs_tangent, strict=True)):
            if factors_tangent is not None:
                terms.append(x.to(dtype) * factors_tangent[i])
            if x_tangent is not None:
                terms.append(x_tangent.to(dtype) * factors[i])
        return reduce(torch.add, terms)

    @staticmethod
    def vmap(
        info: Any, in_dims: tuple[int | None, ...], factors: Tensor, *inputs: Tensor
    ) -> tuple[Tensor, int]:
        factors_dim, *inputs_dims = in_dims
        batch = info.batch_size
        maps = [
            x.expand(batch, *x.shape) if d is None else x.movedim(d, 0)
            for x, d in zip(inputs, inputs_dims, strict=True)
        ]
        # (num_inputs, batch, 1, ...): factor i of sample b broadcast over that sample's map.
        if factors_dim is not None:
            factors = factors.movedim(factors_dim, 1)
        factors = factors.reshape(factors.shape[0], -1, *[1] * (maps[0].dim() - 1))
        return _weighted_sum(factors, maps), 0


def _promoted_dtype(inputs: Sequence[Tensor]) -> torch.dtype:
    """The dtype ``inputs[0] + inputs[1] + ...`` would have."""
    return reduce(torch.promote_types, (x.dtype for x in inputs))


def _plain_fusion(factors: Tensor, inputs: Sequence[Tensor]) -> Tensor:
    """:func:`_weighted_sum` in float32 (float64 for float64 inputs), rounded once to the
    inputs' promoted dtype; autograd then reduces the factors' gradients in float32 too."""
    dtype = _promoted_dtype(inputs)
    factors = factors.to(torch.promote_types(dtype, torch.float32))
    return _weighted_sum(factors, inputs).to(dtype)


def _plain_sum(inputs: Sequence[Tensor]) -> Tensor:
    """``inputs[0] + inputs[1] + ...`` in one output buffer (a new tensor for one input)."""
    dtype = _promoted_dtype(inputs)
    if len(inputs) == 1:
        return inputs[0].to(dtype, copy=True)
    out = inputs[0].to(dtype) + inputs[1]
    for x in inputs[2:]:
        out.add_(x)
    return out


# torch.fx records these as single calls (they read dtypes, which a proxy does not have).
torch.fx.wrap("_plain_fusion")
torch.fx.wrap("_plain_sum")


class WeightedFusion(nn.Module):
    r"""Sums ``num_inputs`` same-shaped tensors with learned, normalised scalar weights.

    Modes (EfficientDet sec. 3.3), with :math:`w'` the ``weight`` vector (one scalar per input,
    initialised to 1) and :math:`I_i` the inputs:

    - ``"fast"``, fast normalised fusion (eq. 3), the ReLU keeping every weight
      non-negative and :math:`\epsilon` = ``eps`` added to the denominator only:

      .. math::

          O = \sum_i \frac{w_i}{\epsilon + \sum_j w_j} I_i, \qquad w_i = \mathrm{ReLU}(w'_i).

      Every factor lies in [0, 1) and they sum to just under 1, so the output is a (slightly
      shrunk) convex combination of the inputs.
    - ``"softmax"``, softmax-based fusion (eq. 2):
      :math:`O = \sum_i \frac{e^{w'_i}}{\sum_j e^{w'_j}} I_i`.
    - ``"sum"``: :math:`O = \sum_i I_i`. ``weight`` is kept, so that the three modes share one
      state_dict layout, but as a buffer (all ones, unused): a parameter that never receives
      a gradient would stop DistributedDataParallel.

    Precision: the weights are normalised in float32, whatever the parameter's dtype; the
    products and their sum run in float32 (float64 when an input is float64) and the output is
    rounded once to the inputs' promoted dtype, the dtype ``a + b`` would have. With float16 or
    bfloat16 inputs (autocast included) the backward pass is then float32 too: each factor's
    gradient, a sum over every element of the maps, is accumulated and kept in float32 through
    the normalisation (the weight's gradient then takes the parameter's dtype), and the inputs'
    gradients are computed in float32 and rounded to their dtype. The price, with such inputs,
    is float32 temporaries the size of the output. The output stays finite even with every
    weight driven to zero (it is then zero). ``"sum"`` mode adds in the promoted dtype.

    Args:
        num_inputs: number of tensors fused.
        eps: added to the sum of the weights in ``"fast"`` mode; must be > 0.
        mode: ``"fast"``, ``"softmax"`` or ``"sum"``.

    Shape:
        inputs: ``num_inputs`` tensors of one shape (any rank, e.g. (N, C, H, W)) -> output of
        that shape

    Example:
        >>> import torch
        >>> from dilconv import WeightedFusion
        >>> fuse = WeightedFusion(2)
        >>> a, b = torch.zeros(1, 8, 5, 5), torch.ones(1, 8, 5, 5)
        >>> fuse([a, b]).shape
        torch.Size([1, 8, 5, 5])
        >>> round(fuse([a, b])[0, 0, 0, 0].item(), 4)
        0.5
    """

    def __init__(
        self,
        num_inputs: int,
        eps: float = 1e-4,
        mode: str = "fast",
        *,
        device: Device = None,
        dtype: DType = None,
    ) -> None:
        super().__init__()
        check_positive("num_inputs", num_inputs)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(f"eps must be a float, got {type(eps).__name__}")
        if not (eps > 0 and math.isfinite(eps)):
            raise ValueError(f"eps must be a finite float > 0, got {eps}")
        check_choice("mode", mode, FUSION_MODES)
        self.num_inputs = num_inputs
        self.eps = float(eps)
        self.mode = mode
        weight = torch.empty(num_inputs, device=device, dtype=dtype)
        if mode == "sum":
            self.register_buffer("weight", weight)
        else:
            self.weight = nn.Parameter(weight)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set every weight to 1 (EfficientDet's initial equal fusion)."""
        with torch.no_grad():
            self.weight.fill_(1.0)

    def fusion_weights(self) -> Tensor:
        """The factor applied to each input (all ones in ``"sum"`` mode), computed in float32,
        or in float64 for float64 weights."""
        weight = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.mode == "fast":
            weight = weight.relu()
            return weight / (weight.sum() + self.eps)
        if self.mode == "softmax":
            return weight.softmax(dim=0)
        return torch.ones_like(weight)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        check_same_shape(inputs, count=self.num_inputs, name=type(self).__name__)
        if self.mode == "sum":
            return _plain_sum(inputs)
        # CUDA: one fused Triton kernel each way (dilconv._fusion_triton), where it serves;
        # traced code (fx, jit.trace) records the plain ops, which serve every device.
        if not is_tracing() and _fusion_triton.use_kernel(self.weight, inputs):
            return _fusion_triton.weighted_fusion(self.weight, inputs, self.mode, self.eps)
        factors = self.fusion_weights()
        # The lean backward only for large maps, in eager, when a gradient is wanted; elsewhere
        # plain ops (also what Dynamo needs: compiled, Inductor fuses the backward itself, and
        # its no-grad path for an autograd.Function mis-binds a forward that takes *inputs).
        # Traced code takes the plain path at every size and grad mode: jit.trace's check
        # re-traces under no_grad, and a traced graph serves every size.
        if (
            not torch.compiler.is_compiling()
            and not is_tracing()
            and torch.is_grad_enabled()
            and any(t.requires_grad for t in (factors, *inputs))
            and inputs[0].numel() >= _LEAN_BACKWARD_MIN_NUMEL
        ):
            dtype = _promoted_dtype(inputs)
            factors = factors.to(torch.promote_types(dtype, torch.float32))
            return _WeightedSum.apply(factors, *inputs).to(dtype)
        return _plain_fusion(factors, inputs)

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}, eps={self.eps}, mode={self.mode!r}"
