"""Fused gated activations (SwiGLU, GeGLU) and the tanh GeLU, computed in fp32.

The gated kernel reads both halves of the fused [.., 2F] projection once and writes the
[.., F] product: SwiGLU gates with the *first* half (ChatGLM2+, GLM-4), GeGLU with the
*second* half and the exact erf GeLU (GLM-130B), as the op contract defines them.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ACTS = {"swiglu": 0, "geglu": 1}


@triton.jit
def _glu_kernel(U, Y, F, stride_u, stride_y, ACT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < F
    a = tl.load(U + row * stride_u + cols, mask=m, other=0.0).to(tl.float32)
    b = tl.load(U + row * stride_u + F + cols, mask=m, other=0.0).to(tl.float32)
    if ACT == 0:
        out = a * tl.sigmoid(a) * b
    else:
        out = a * (0.5 * b * (1.0 + tl.erf(b * 0.7071067811865476)))
    tl.store(Y + row * stride_y + cols, out.to(Y.dtype.element_ty), mask=m)


@triton.jit
def _gelu_tanh_kernel(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    x = tl.load(X + offs, mask=m, other=0.0).to(tl.float32)
    z = 0.7978845608028654 * (x + 0.044715 * x * x * x)
    th = 2.0 * tl.sigmoid(2.0 * z) - 1.0  # tanh(z), no vendor libdevice needed
    tl.store(Y + offs, (0.5 * x * (1.0 + th)).to(Y.dtype.element_ty), mask=m)


def glu(u, activation, cfg):
    try:
        code = ACTS[activation]
    except KeyError:
        raise ValueError(f"unknown gated activation {activation!r}") from None
    two_f = u.shape[-1]
    if two_f % 2:
        raise ValueError(f"gated activation needs an even last dimension, got {two_f}")
    f = two_f // 2
    u2 = u.reshape(-1, two_f)
    if u2.stride(-1) != 1:
        u2 = u2.contiguous()
    y = torch.empty((u2.shape[0], f), dtype=u.dtype, device=u.device)
    if y.numel():
        grid = (u2.shape[0], triton.cdiv(f, cfg.block))
        _glu_kernel[grid](u2, y, f, u2.stride(0), y.stride(0), ACT=code, BLOCK=cfg.block,
                          num_warps=cfg.warps_for(cfg.block))
    return y.view(*u.shape[:-1], f)


def gelu_tanh(x, cfg):
    xc = x.contiguous()
    y = torch.empty_like(xc)
    n = xc.numel()
    if n:
        _gelu_tanh_kernel[(triton.cdiv(n, cfg.block),)](xc, y, n, BLOCK=cfg.block,
                                                         num_warps=cfg.warps_for(cfg.block))
    return y
