"""The Triton kernels behind ``dilconv::weighted_fusion`` (see :mod:`dilconv._fusion_triton`).

Imported on first use only: this module imports Triton. Weights are padded to a vector of
``PAD`` (a power of two) and each program normalises them itself (EfficientDet, sec. 3.3,
eq. 2 and 3), in the weight pointer's dtype (float32, or float64).
"""

# Triton kernels take Triton values (pointers, blocks, constexprs): no Python annotations.
# mypy: disable-error-code="no-untyped-def,import-untyped,import-not-found"

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["backward", "forward", "weight_grad"]


@triton.jit
def factors(w_ptr, eps, N: tl.constexpr, SOFTMAX: tl.constexpr, PAD: tl.constexpr):
    idx = tl.arange(0, PAD)
    raw = tl.load(w_ptr + idx, mask=idx < N, other=0.0)
    if SOFTMAX:
        shifted = tl.where(idx < N, raw - tl.max(tl.where(idx < N, raw, -float("inf"))), 0.0)
        e = tl.where(idx < N, tl.exp(shifted), 0.0)
        f = e / tl.sum(e)
    else:
        w = tl.where(raw > 0, raw, 0.0)
        f = w / (tl.sum(w) + eps)
    return idx, raw, f


@triton.jit
def pick(f, idx, i: tl.constexpr):
    return tl.sum(tl.where(idx == i, f, 0.0))


@triton.jit
def forward(w_ptr, x0, x1, x2, x3, x4, out_ptr, n, eps, N: tl.constexpr,
            SOFTMAX: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr):
    idx, raw, f = factors(w_ptr, eps, N, SOFTMAX, PAD)
    ct = f.dtype
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(x0 + offs, mask=mask).to(ct) * pick(f, idx, 0)
    acc += tl.load(x1 + offs, mask=mask).to(ct) * pick(f, idx, 1)
    if N > 2:
        acc += tl.load(x2 + offs, mask=mask).to(ct) * pick(f, idx, 2)
    if N > 3:
        acc += tl.load(x3 + offs, mask=mask).to(ct) * pick(f, idx, 3)
    if N > 4:
        acc += tl.load(x4 + offs, mask=mask).to(ct) * pick(f, idx, 4)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def one_input(x_ptr, gx_ptr, g, offs, mask, fi, NEED_X: tl.constexpr, NEED_W: tl.constexpr):
    # The input's gradient fi * g, and (when the weights need one) the block's float32 (or
    # float64) partial dot product <g, x>.
    if NEED_X:
        tl.store(gx_ptr + offs, (g * fi).to(gx_ptr.dtype.element_ty), mask=mask)
    if NEED_W:
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(g.dtype)
        return tl.sum(g * x)
    return tl.sum(g * 0.0)


@triton.jit
def backward(w_ptr, g_ptr, x0, x1, x2, x3, x4, gx0, gx1, gx2, gx3, gx4, partial_ptr, n, eps,
             N: tl.constexpr, SOFTMAX: tl.constexpr, NEEDS: tl.constexpr,
             NEED_W: tl.constexpr, PAD: tl.constexpr, BLOCK: tl.constexpr):
    idx, raw, f = factors(w_ptr, eps, N, SOFTMAX, PAD)
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(f.dtype)
    p = tl.zeros_like(f)
    d = one_input(x0, gx0, g, offs, mask, pick(f, idx, 0), NEEDS & 1, NEED_W)
    p = tl.where(idx == 0, d, p)
    d = one_input(x1, gx1, g, offs, mask, pick(f, idx, 1), NEEDS & 2, NEED_W)
    p = tl.where(idx == 1, d, p)
    if N > 2:
        d = one_input(x2, gx2, g, offs, mask, pick(f, idx, 2), NEEDS & 4, NEED_W)
        p = tl.where(idx == 2, d, p)
    if N > 3:
        d = one_input(x3, gx3, g, offs, mask, pick(f, idx, 3), NEEDS & 8, NEED_W)
        p = tl.where(idx == 3, d, p)
    if N > 4:
        d = one_input(x4, gx4, g, offs, mask, pick(f, idx, 4), NEEDS & 16, NEED_W)
        p = tl.where(idx == 4, d, p)
    if NEED_W:
        tl.store(partial_ptr + pid * PAD + idx, p)


@triton.jit
def weight_grad(partial_ptr, w_ptr, gw_ptr, blocks, eps, N: tl.constexpr,
                SOFTMAX: tl.constexpr, PAD: tl.constexpr, RBLOCK: tl.constexpr):
    idx, raw, f = factors(w_ptr, eps, N, SOFTMAX, PAD)
    rows = tl.arange(0, RBLOCK)
    total = tl.zeros([RBLOCK, PAD], dtype=f.dtype)
    for start in range(0, blocks, RBLOCK):
        r = start + rows
        tile = tl.load(partial_ptr + r[:, None] * PAD + idx[None, :],
                       mask=(r < blocks)[:, None], other=0.0)
        total += tile
    gf = tl.sum(total, axis=0)  # dL/df_i
    mean = tl.sum(gf * f)
    # Chain rule through the normalisation (EfficientDet eq. 2 / eq. 3).
    if SOFTMAX:
        gw = f * (gf - mean)
    else:
        s = tl.sum(tl.where(raw > 0, raw, 0.0)) + eps
        gw = tl.where(raw > 0, (gf - mean) / s, 0.0)
    tl.store(gw_ptr + idx, gw.to(gw_ptr.dtype.element_ty), mask=idx < N)
