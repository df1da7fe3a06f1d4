"""Weight-only INT8 / INT4 matmul in the GLM-130B packing, dequantised inside the kernel.

``y = x @ (q * scale)^T + bias`` with ``q`` int8 [N, K] (INT8) or int8 [N, K/2] holding two
signed nibbles per byte, the even input element in the high nibble (INT4; see
:mod:`glm_runtime.core.quant`). The weight tile is read in its packed form (1 or 1/2 byte per
element, the point of weight-only quantization: decode is bound by weight bandwidth),
unpacked in registers to small integers, which are exact in fp16/bf16, and multiplied on
the tensor/matrix cores with fp32 accumulation. A per-output-row scale is applied once
to the fp32 accumulator: ``(x @ q^T) * s == x @ (q * s)^T``; block-wise scales (one per
``QBLOCK`` input columns) are applied to each K tile's partial product, the K tile being
no wider than a quantization block so that it lies inside one.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_in_fp32


@triton.jit
def _wq_matmul_kernel(X, Q, S, Bias, Y, M, N, K,
                      sxm, sxk, sqn, sqk, ssn, ssb, sym, syn,
                      BITS: tl.constexpr, QBLOCK: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rm[:, None] * sxm + rk[None, :] * sxk,
                    mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        wmask = (rk[:, None] < K) & (rn[None, :] < N)
        if BITS == 8:
            q = tl.load(Q + rn[None, :] * sqn + rk[:, None] * sqk, mask=wmask, other=0).to(tl.int32)
        else:
            byte = tl.load(Q + rn[None, :] * sqn + (rk[:, None] // 2) * sqk, mask=wmask, other=0).to(tl.int32)
            hi = byte >> 4  # arithmetic shift of the sign-extended byte: the high nibble, signed
            lo = ((byte & 15) ^ 8) - 8  # the low nibble, sign-extended
            q = tl.where((rk[:, None] % 2) == 0, hi, lo)
        if DOT_F32:
            part = tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
        else:
            part = tl.dot(x, q.to(x.dtype))
        if QBLOCK > 0:  # this K tile lies inside quantization block k0 // QBLOCK
            part = part * tl.load(S + rn * ssn + (k0 // QBLOCK) * ssb, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        acc += part
    if QBLOCK == 0:
        acc = acc * tl.load(S + rn * ssn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + rm[:, None] * sym + rn[None, :] * syn, acc.to(Y.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))


def quantized_linear(x, qweight, scale, bias, bits, cfg_prefill, cfg_decode):
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    K = x.shape[-1]
    N = qweight.shape[0]
    if qweight.shape[1] * (2 if bits == 4 else 1) != K:
        raise ValueError(f"INT{bits} weight {tuple(qweight.shape)} does not match input features {K}")
    x2 = x.reshape(-1, K)
    M = x2.shape[0]
    cfg = cfg_decode if M <= cfg_decode.block_m else cfg_prefill
    qblock = 0 if scale.dim() == 1 else K // scale.shape[1]
    block_k = cfg.block_k if not qblock else min(cfg.block_k, qblock)  # a K tile inside one block
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M and N:
        grid = (triton.cdiv(M, cfg.block_m), triton.cdiv(N, cfg.block_n))
        _wq_matmul_kernel[grid](x2, qweight, scale, scale if bias is None else bias, y, M, N, K,
                                x2.stride(0), x2.stride(1), qweight.stride(0), qweight.stride(1),
                                scale.stride(0), scale.stride(-1) if qblock else 0,
                                y.stride(0), y.stride(1), BITS=bits, QBLOCK=qblock, HAS_BIAS=bias is not None,
                                DOT_F32=dot_in_fp32(x.dtype), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                BLOCK_K=block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.view(*x.shape[:-1], N)
