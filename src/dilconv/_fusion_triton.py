"""WeightedFusion's fused Triton kernels, registered as ``dilconv::weighted_fusion``.

:class:`~dilconv.fusion.WeightedFusion` computes ``sum_i f_i I_i`` with ``f`` the normalised
weights (EfficientDet, sec. 3.3: eq. 3 ``"fast"``, eq. 2 ``"softmax"``). In plain PyTorch that
is a few tiny kernels for the normalisation and one pass per input, each re-reading and
re-writing the output; launch-bound on a GPU. Here:

- forward: one kernel reads each input once and writes the output once; every program
  normalises the raw weight vector itself (in float32, float64 for float64 inputs);
- backward: one kernel reads the output gradient and each input once, writes each input's
  gradient and one float32 partial dot product per block and input; a one-program kernel sums
  the partials (float32, never half precision) and applies the chain rule through the
  normalisation to the raw weights. A backward pass that builds a graph (``create_graph=True``,
  for double backward) takes the same formula in torch ops instead.

Both are ``torch.library.triton_op`` ops, so ``torch.compile(fullgraph=True)`` and
``torch.export`` see them (Inductor can schedule the kernels itself), with
``register_autograd`` for the backward pass and ``register_vmap`` batching rules (vmap, and
``torch.autograd.grad`` under ``torch.func.vmap``). Forward-mode AD and
functorch's ``grad``/``jacrev`` transforms cannot be served by a custom op's autograd
registration: :func:`use_kernel` sends those calls (and anything outside the kernels' scope)
to the plain formula instead.

Triton is imported, and the ops registered, on the first eager call that uses the kernels (or
:func:`define_ops`), so ``import dilconv`` stays light and works where Triton is absent; a graph
compiled before that takes the plain formula.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "MAX_INPUTS", "available", "define_ops", "kernel_on_cpu", "use_kernel", "weighted_fusion",
]

MAX_INPUTS = 5
"""The kernels take up to this many input pointers (unused ones repeat the first)."""

_WEIGHTS_PAD = 8
"""The weight vector padded to a power of two (Triton blocks need one); >= MAX_INPUTS."""

_BLOCK = 1024
_REDUCE_BLOCK = 256
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_ON_CPU = False


_OPS_DEFINED = False
"""Whether :func:`define_ops` has registered the ops (a plain flag Dynamo can guard on)."""
_HAS_TRITON = importlib.util.find_spec("triton") is not None
"""Found, not imported (a constant, so that Dynamo reads it without a graph break)."""


def available() -> bool:
    """Whether this torch has ``torch.library.triton_op`` and Triton is installed."""
    return _HAS_TRITON and hasattr(torch.library, "triton_op")


def define_ops() -> None:
    """Register ``dilconv::weighted_fusion`` and its backward, once. Registering imports
    Triton (and sympy, through torch.library), about 1.6 s, so it happens on the first call
    that uses the kernels, not at ``import dilconv``."""
    global _OPS_DEFINED
    if not _OPS_DEFINED and available():
        _define_ops()
        _OPS_DEFINED = True


@contextlib.contextmanager
def kernel_on_cpu() -> Iterator[None]:
    """Let :func:`use_kernel` pick the kernels for CPU tensors too, for tests run under
    Triton's interpreter (``TRITON_INTERPRET=1`` set before the first kernel call)."""
    global _ON_CPU
    saved, _ON_CPU = _ON_CPU, True
    try:
        yield
    finally:
        _ON_CPU = saved


def _transform_without_rule() -> bool:
    """Whether forward-mode AD (``dual_level``, ``torch.func.jvp``) or a functorch transform
    other than vmap (``torch.func.grad``, ``jacrev``, ...) is active: the custom ops have no
    rule for those, so such calls take the plain path."""
    if torch.autograd.forward_ad._current_level >= 0:
        return True
    if torch.compiler.is_compiling():
        return False  # Dynamo runs functorch transforms itself
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    return any(i.key() != TransformType.Vmap for i in retrieve_all_functorch_interpreters())


def _dense_layout(x: Tensor) -> bool:
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def use_kernel(weight: Tensor, inputs: Sequence[Tensor]) -> bool:
    """Whether :func:`weighted_fusion` serves this call: CUDA tensors (or CPU tensors inside
    :func:`kernel_on_cpu`), 2 to :data:`MAX_INPUTS` inputs of one floating dtype, one shape
    and one contiguous or channels-last layout, and no forward-mode AD or functorch transform
    other than vmap."""
    first = inputs[0]
    if not (first.is_cuda or (_ON_CPU and first.device.type == "cpu")):
        return False
    if not 2 <= len(inputs) <= MAX_INPUTS or not available():
        return False
    if first.dtype not in _DTYPES or not weight.is_floating_point():
        return False
    if weight.device != first.device or not _dense_layout(first):
        return False
    same = all(
        x.dtype == first.dtype and x.device == first.device and x.stride() == first.stride()
        for x in inputs[1:]
    )
    if not same or _transform_without_rule():
        return False
    if torch.compiler.is_compiling():
        return _OPS_DEFINED  # registering ops while Dynamo traces would break the graph
    define_ops()
    return True


def _compute_dtype(weight: Tensor, inputs: Sequence[Tensor]) -> torch.dtype:
    dtype = torch.promote_types(weight.dtype, torch.float32)
    return torch.float64 if inputs[0].dtype == torch.float64 else dtype


def weighted_fusion(weight: Tensor, inputs: Sequence[Tensor], mode: str, eps: float) -> Tensor:
    """``sum_i f_i inputs[i]`` with ``f`` the ``mode`` normalisation of the raw ``weight``
    (``"fast"``: ``relu(w) / (eps + sum relu(w))``, ``"softmax"``), by the fused kernels.

    The factors and the sum are computed in float32 (float64 for float64 inputs) and the
    result rounded once to the inputs' dtype. Call it where :func:`use_kernel` is true.

    Args:
        weight: the raw weights, one per input.
        inputs: 2 to 5 tensors of one shape, dtype and layout.
        mode: ``"fast"`` or ``"softmax"``.
        eps: added to the sum of the weights in ``"fast"`` mode.

    Shape:
        weight (len(inputs),), inputs any shape -> output of the inputs' shape
    """
    if not _OPS_DEFINED:
        define_ops()
    w = weight.to(_compute_dtype(weight, inputs))
    return torch.ops.dilconv.weighted_fusion(w, list(inputs), mode, float(eps))


@functools.cache
def _kernels() -> tuple[Any, Any, Any]:
    """The Triton kernels, imported on first use (Triton is imported then, and its
    interpreter chosen from ``TRITON_INTERPRET``)."""
    from dilconv import _fusion_kernels as k

    return k.forward, k.backward, k.weight_grad


def _pointers(tensors: Sequence[Tensor]) -> list[Tensor]:
    return [*tensors, *[tensors[0]] * (MAX_INPUTS - len(tensors))]


def _shared_layout(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors with one dense layout (the first's when it is dense, else contiguous): the
    kernels walk the flat storage."""
    first = tensors[0]
    if _dense_layout(first) and all(t.stride() == first.stride() for t in tensors):
        return list(tensors)
    if not _dense_layout(first):
        return [t.contiguous() for t in tensors]
    return [t if t.stride() == first.stride() else torch.empty_like(first).copy_(t)
            for t in tensors]


def _check(weight: Tensor, inputs: Sequence[Tensor], mode: str) -> None:
    if not 2 <= len(inputs) <= MAX_INPUTS:
        raise ValueError(f"dilconv::weighted_fusion expected 2 to {MAX_INPUTS} inputs, "
                         f"got {len(inputs)}")
    if weight.shape != (len(inputs),):
        raise ValueError(f"dilconv::weighted_fusion expected a weight of shape "
                         f"({len(inputs)},), got {tuple(weight.shape)}")
    if mode not in ("fast", "softmax"):
        raise ValueError(f"dilconv::weighted_fusion expected mode 'fast' or 'softmax', "
                         f"got {mode!r}")


def _fusion_forward(weight: Tensor, inputs: list[Tensor], mode: str, eps: float) -> Tensor:
    from torch.library import wrap_triton

    _check(weight, inputs, mode)
    if _traced_under_interpreter([weight, *inputs]):
        return _plain_forward(weight, inputs, mode, eps)
    inputs = _shared_layout(inputs)
    out = _like(inputs[0])
    n = out.numel()
    forward = _kernels()[0]
    grid = ((n + _BLOCK - 1) // _BLOCK,)
    wrap_triton(forward)[grid](
        weight, *_pointers(inputs), out, n, eps, N=len(inputs), SOFTMAX=mode == "softmax",
        PAD=_WEIGHTS_PAD, BLOCK=_BLOCK,
    )
    return out


def _fusion_backward(grad: Tensor, weight: Tensor, inputs: list[Tensor], mode: str, eps: float,
                     needs: list[bool]) -> tuple[Tensor, list[Tensor]]:
    """``(grad of weight, grads of the inputs whose needs[i + 1] is set)``; an empty weight
    gradient when ``needs[0]`` is not set."""
    from torch.library import wrap_triton

    if _traced_under_interpreter([grad, weight, *inputs]):
        return _plain_backward(grad, weight, inputs, mode, eps, needs)
    inputs = _shared_layout(inputs)
    grad = _shared_layout([inputs[0], grad])[1]
    n, count = grad.numel(), len(inputs)
    blocks = (n + _BLOCK - 1) // _BLOCK
    need_w = needs[0]
    grads = [_like(inputs[0]) if needed else inputs[0] for needed in needs[1:]]
    partial = weight.new_empty((blocks if need_w else 1, _WEIGHTS_PAD))
    _, backward, weight_grad = _kernels()
    wrap_triton(backward)[(blocks,)](
        weight, grad, *_pointers(inputs), *_pointers(grads), partial, n, eps, N=count,
        SOFTMAX=mode == "softmax", NEEDS=sum(1 << i for i, x in enumerate(needs[1:]) if x),
        NEED_W=need_w, PAD=_WEIGHTS_PAD, BLOCK=_BLOCK,
    )
    grad_weight = weight.new_empty((count,) if need_w else (0,))
    if need_w:
        wrap_triton(weight_grad)[(1,)](
            partial, weight, grad_weight, blocks, eps, N=count, SOFTMAX=mode == "softmax",
            PAD=_WEIGHTS_PAD, RBLOCK=_REDUCE_BLOCK,
        )
    return grad_weight, [g for g, needed in zip(grads, needs[1:], strict=True) if needed]


def _plain_factors(weight: Tensor, mode: str, eps: float) -> Tensor:
    """The normalisation in torch ops, over the last dim (a leading batch dim under vmap)."""
    if mode == "softmax":
        return weight.softmax(dim=-1)
    w = weight.relu()
    return w / (w.sum(dim=-1, keepdim=True) + eps)


def _define_ops() -> None:
    forward_op: Any = torch.library.triton_op(
        "dilconv::weighted_fusion", _fusion_forward, mutates_args=(),
        schema="(Tensor weight, Tensor[] inputs, str mode, float eps) -> Tensor",
    )
    backward_op: Any = torch.library.triton_op(
        "dilconv::weighted_fusion_backward", _fusion_backward, mutates_args=(),
        schema="(Tensor grad, Tensor weight, Tensor[] inputs, str mode, float eps, "
               "bool[] needs) -> (Tensor, Tensor[])",
    )

    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        weight, xs, mode, eps = inputs
        ctx.save_for_backward(weight, *xs)
        ctx.mode, ctx.eps = mode, eps

    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, list[Tensor | None], None, None]:
        weight, *xs = ctx.saved_tensors
        needs_weight, needs_inputs = ctx.needs_input_grad[:2]
        needs_inputs = list(needs_inputs) if isinstance(needs_inputs, (list, tuple)) else (
            [bool(needs_inputs)] * len(xs))
        needs = [bool(needs_weight), *map(bool, needs_inputs)]
        if torch.is_grad_enabled():  # create_graph=True: torch ops, differentiable again
            grad_weight, grads = _plain_backward(grad, weight, xs, ctx.mode, ctx.eps, needs)
        else:
            grad_weight, grads = torch.ops.dilconv.weighted_fusion_backward(
                grad, weight, xs, ctx.mode, ctx.eps, needs)
        it = iter(grads)
        grad_inputs = [next(it) if needed else None for needed in needs[1:]]
        return (grad_weight if needs[0] else None), grad_inputs, None, None

    forward_op.register_autograd(backward, setup_context=setup_context)
    forward_op.register_vmap(_forward_vmap)
    backward_op.register_vmap(_backward_vmap)


def _batched(tensors: Sequence[Tensor], dims: Sequence[int | None], size: int) -> list[Tensor]:
    """Each tensor with its vmap dim first (expanded where it has none)."""
    out = []
    for t, d in zip(tensors, dims, strict=True):
        out.append(t.movedim(d, 0) if d is not None else t.expand(size, *t.shape))
    return out


def _like(x: Tensor) -> Tensor:
    """An empty tensor in the layout the kernels write: ``x``'s when dense, else contiguous."""
    return torch.empty_like(x) if _dense_layout(x) else torch.empty(x.shape, dtype=x.dtype,
                                                                      device=x.device)


def _plain_forward(weight: Tensor, inputs: Sequence[Tensor], mode: str, eps: float) -> Tensor:
    """The fused op's result in torch ops: computed in the weight's dtype and rounded once.
    ``weight`` is (N,) or, under vmap, (B, N) with the inputs' leading dim B."""
    f = _plain_factors(weight, mode, eps)
    shape = f.shape[:-1] + (1,) * (inputs[0].dim() - f.dim() + 1)
    out = inputs[0].to(f.dtype) * f[..., 0].reshape(shape)
    for i, x in enumerate(inputs[1:], start=1):
        out = out + x.to(f.dtype) * f[..., i].reshape(shape)
    return _like(inputs[0]).copy_(out)


def _plain_backward(grad: Tensor, weight: Tensor, inputs: Sequence[Tensor], mode: str,
                    eps: float, needs: Sequence[bool]) -> tuple[Tensor, list[Tensor]]:
    """The backward op's result in torch ops (shapes as for :func:`_plain_forward`); the weight
    gradient accumulated in the weight's dtype (float32 or float64), per sample under vmap."""
    f = _plain_factors(weight, mode, eps)
    shape = f.shape[:-1] + (1,) * (grad.dim() - f.dim() + 1)
    grads = [_like(inputs[0]).copy_(grad.to(f.dtype) * f[..., i].reshape(shape))
             for i, needed in enumerate(needs[1:]) if needed]
    if not needs[0]:
        return weight.new_empty(f.shape[:-1] + (0,)), grads
    dims = tuple(range(f.dim() - 1, grad.dim()))
    gf = torch.stack([(grad.to(f.dtype) * x.to(f.dtype)).sum(dims) for x in inputs], dim=-1)
    mean = (gf * f).sum(dim=-1, keepdim=True)
    if mode == "softmax":
        return f * (gf - mean), grads
    total = weight.relu().sum(dim=-1, keepdim=True) + eps
    return torch.where(weight > 0, (gf - mean) / total, torch.zeros_like(f)), grads


def _traced_under_interpreter(tensors: Sequence[Tensor]) -> bool:
    """Whether an interpreted kernel (``TRITON_INTERPRET=1``) would be handed traced tensors:
    ``wrap_triton`` cannot capture those, so the op computes the plain formula instead."""
    from torch._library.triton import _is_interpreted_triton_kernel
    from torch._subclasses.fake_tensor import is_fake
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    if not _is_interpreted_triton_kernel(_kernels()[0]):
        return False
    return _get_current_dispatch_mode() is not None or any(is_fake(t) for t in tensors)


def _forward_vmap(info: Any, in_dims: tuple[Any, ...], weight: Tensor, inputs: list[Tensor],
                  mode: str, eps: float) -> tuple[Tensor, int]:
    """vmap: a shared weight folds the batch dim into the elements (one kernel call); a
    batched weight takes the plain formula."""
    xs = _batched(inputs, in_dims[1] or [None] * len(inputs), info.batch_size)
    if in_dims[0] is None:
        return torch.ops.dilconv.weighted_fusion(weight, xs, mode, eps), 0
    return _plain_forward(weight.movedim(in_dims[0], 0), xs, mode, eps), 0


def _backward_vmap(info: Any, in_dims: tuple[Any, ...], grad: Tensor, weight: Tensor,
                   inputs: list[Tensor], mode: str, eps: float,
                   needs: list[bool]) -> tuple[tuple[Tensor, list[Tensor]], tuple[int, list[int]]]:
    """vmap of the backward pass (per-sample gradients): the plain formula, the weight
    gradient per sample and accumulated in float32 (float64 for float64 weights)."""
    size = info.batch_size
    g = _batched([grad], [in_dims[0]], size)[0]
    w = _batched([weight], [in_dims[1]], size)[0]
    xs = _batched(inputs, in_dims[2] or [None] * len(inputs), size)
    grad_weight, grads = _plain_backward(g, w, xs, mode, eps, needs)
    return (grad_weight, grads), (0, [0] * len(grads))


