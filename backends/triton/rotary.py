"""Fused rotary embedding for the three GLM layouts in one kernel.

Every output feature ``j`` is ``x[j] * cos[a(j)] + sign(j) * x[p(j)] * sin[a(j)]``: only
the partner index ``p``, the angle index ``a`` and the sign depend on the layout, so the
layout is a compile-time switch over three small index formulas (see
:func:`glm_runtime.core.ops.reference.rotary` for the definitions):

* neox (LAYOUT 0): p = j +- n, a = j mod n;
* neox_2d (LAYOUT 1): the same inside each of the two blocks of width n, block b using
  angles ``b*n/2 ...``;
* interleaved (LAYOUT 2): p = j xor 1, a = j // 2.

Features past the rotated width ``2n`` pass through. The input is read through its strides,
so the [B, T, heads, d] -> [B, heads, T, d] transpose of the attention block costs no copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pow2

LAYOUTS = {"neox": 0, "neox_2d": 1, "interleaved": 2}


@triton.jit
def _rotary_kernel(X, C, S, Y, H, T, D, NP,
                   sxb, sxh, sxt, sxd, scb, sct, scn, ssb, sst, ssn, syb, syh, syt,
                   LAYOUT: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)[:, None]
    j = tl.arange(0, BLOCK_D)[None, :]
    tm = t < T
    if LAYOUT == 0:
        first = j < NP
        partner = tl.where(first, j + NP, j - NP)
        ang = tl.where(first, j, j - NP)
    elif LAYOUT == 1:
        half = NP // 2
        jj = j % NP
        first = jj < half
        partner = tl.where(first, j + half, j - half)
        ang = (j // NP) * half + tl.where(first, jj, jj - half)
    else:
        first = (j % 2) == 0
        partner = tl.where(first, j + 1, j - 1)
        ang = j // 2
    sign = tl.where(first, -1.0, 1.0)
    rot = (j < 2 * NP) & tm
    xb = X + b * sxb + h * sxh + t * sxt
    x = tl.load(xb + j * sxd, mask=tm & (j < D), other=0.0).to(tl.float32)
    xp = tl.load(xb + partner * sxd, mask=rot, other=0.0).to(tl.float32)
    c = tl.load(C + b * scb + t * sct + ang * scn, mask=rot, other=1.0).to(tl.float32)
    s = tl.load(S + b * ssb + t * sst + ang * ssn, mask=rot, other=0.0).to(tl.float32)
    y = tl.where(j < 2 * NP, x * c + sign * xp * s, x)
    tl.store(Y + b * syb + h * syh + t * syt + j, y.to(Y.dtype.element_ty), mask=tm & (j < D))


def rotary(x, cos, sin, layout, cfg):
    """x [B, heads, T, d] (any strides); cos, sin [B or 1, T, n]. Returns contiguous."""
    try:
        code = LAYOUTS[layout]
    except KeyError:
        raise ValueError(f"unknown rotary layout {layout!r}") from None
    B, H, T, D = x.shape
    n = cos.shape[-1]
    if 2 * n > D or (code == 1 and n % 2):
        raise ValueError(f"rotary: {n} angle pairs do not fit head size {D} for layout {layout}")
    cos = cos.expand(B, T, n)
    sin = sin.expand(B, T, n)
    y = torch.empty((B, H, T, D), dtype=x.dtype, device=x.device)
    if y.numel():
        grid = (B * H, triton.cdiv(T, cfg.block_t))
        _rotary_kernel[grid](x, cos, sin, y, H, T, D, n, *x.stride(), *cos.stride(), *sin.stride(),
                             y.stride(0), y.stride(1), y.stride(2), LAYOUT=code, BLOCK_T=cfg.block_t,
                             BLOCK_D=pow2(D), num_warps=cfg.num_warps)
    return y
