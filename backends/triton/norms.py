"""Fused RMSNorm and LayerNorm: one row per program, statistics in fp32.

The row is read once into registers (the hidden sizes of GLM models, <= 12288, fit one
block), normalised in fp32 and written once in the input dtype: one read and one write
of the activations instead of the several passes of the unfused PyTorch expression.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import pow2

MAX_ROW = 65536


@triton.jit
def _rms_norm_kernel(X, W, Y, stride_x, stride_y, N, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    r = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    w = tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, (w * (x * r)).to(Y.dtype.element_ty), mask=m)


@triton.jit
def _layer_norm_kernel(X, W, B, Y, stride_x, stride_y, N, eps, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    m = cols < N
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / N
    xc = tl.where(m, x - mean, 0.0)
    r = tl.rsqrt(tl.sum(xc * xc, axis=0) / N + eps)
    y = xc * r * tl.load(W + cols, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=m, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=m)


def _rows(x: torch.Tensor):
    n = x.shape[-1]
    if n > MAX_ROW:
        raise ValueError(f"fused norm handles rows up to {MAX_ROW} features, got {n}")
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return x2, n


def rms_norm(x, weight, eps, cfg):
    x2, n = _rows(x)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), n, float(eps),
                                         BLOCK=pow2(n), num_warps=cfg.warps_for(n))
    return y.view(x.shape)


def layer_norm(x, weight, bias, eps, cfg):
    x2, n = _rows(x)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        _layer_norm_kernel[(x2.shape[0],)](x2, weight, weight if bias is None else bias, y, x2.stride(0),
                                           y.stride(0), n, float(eps), HAS_BIAS=bias is not None,
                                           BLOCK=pow2(n), num_warps=cfg.warps_for(n))
    return y.view(x.shape)
