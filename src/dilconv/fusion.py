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

import torch
from torch import Tensor, nn

from dilconv._checks import check_choice, check_positive, check_same_shape

__all__ = ["WeightedFusion"]

FUSION_MODES = ("fast", "softmax", "sum")


class WeightedFusion(nn.Module):
    """Sums ``num_inputs`` same-shaped tensors with learned, normalised scalar weights.

    Modes (EfficientDet sec. 3.3):

    - ``"fast"``: ``O = sum_i w_i I_i / (eps + sum_j w_j)``, ``w = relu(weight)`` (eq. 3). Every
      factor lies in [0, 1) and they sum to just under 1, so the output is a (slightly shrunk)
      convex combination of the inputs.
    - ``"softmax"``: ``O = sum_i softmax(weight)_i I_i`` (eq. 2).
    - ``"sum"``: ``O = sum_i I_i``. ``weight`` is kept, so that the three modes share one
      state_dict layout, but as a buffer (all ones, unused): a parameter that never receives
      a gradient would stop DistributedDataParallel.

    The normalisation runs in float32 and the factors are then cast to the inputs' dtype, so
    the output stays finite in float16/bfloat16 even with every weight driven to zero (the
    output is then zero). Inputs of different floating dtypes are combined in their promoted
    dtype, as ``a + b`` would.

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
        device=None,
        dtype=None,
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
        """The float32 factor applied to each input (all ones in ``"sum"`` mode)."""
        weight = self.weight.float()
        if self.mode == "fast":
            weight = weight.relu()
            return weight / (weight.sum() + self.eps)
        if self.mode == "softmax":
            return weight.softmax(dim=0)
        return torch.ones_like(weight)

    def forward(self, inputs: Sequence[Tensor]) -> Tensor:
        check_same_shape(inputs, count=self.num_inputs, name=type(self).__name__)
        dtype = reduce(torch.promote_types, (x.dtype for x in inputs))
        factors = self.fusion_weights().to(dtype).unbind()
        if self.mode == "sum":
            out = inputs[0].to(dtype, copy=True)
            for x in inputs[1:]:
                out.add_(x)
            return out
        # One output buffer, accumulated in place: no full-size temporary per input.
        out = inputs[0].to(dtype) * factors[0]
        for factor, x in zip(factors[1:], inputs[1:], strict=True):
            out.addcmul_(x, factor)
        return out

    def extra_repr(self) -> str:
        return f"num_inputs={self.num_inputs}, eps={self.eps}, mode={self.mode!r}"
