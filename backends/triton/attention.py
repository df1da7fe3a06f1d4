"""Attention with the softmax in fp32 and GLM's masks, as a hand-written Triton kernel.

A FlashAttention-style forward: one program per (block of queries, query head); it
streams blocks of keys/values, keeps the running max and sum in fp32 ("online softmax")
and never materialises the [Tq, Tk] score matrix. Scores are fp32 (tensor-core dot with
fp32 accumulation), scaled in fp32, masked, exponentiated in fp32; only the probabilities
fed to the P.V product are rounded to the input dtype, as in FlashAttention.

Masks: the contract's bool mask [B, 1, Tq, Tk] is read tile by tile (1 byte per entry,
broadcast over heads), which covers GLM's prefix-bidirectional blank-infilling mask, left
padding and decode steps with one kernel. Masked scores take the contract's fill value
(``mask_value`` or the most negative fp32), exactly as the reference, so even a row with
no allowed key matches it. Grouped KV heads are indexed (query head h reads KV head
h // (nh/g)), never copied. ``layer_scale`` (GLM's query-key layer scaling) exists to keep
fp16 *scores* from overflowing; scores here are fp32, where the scaling is exact, so it is
not applied.

Why not FlexAttention: it would generate a similar Triton kernel from a ``mask_mod``, but
only through ``torch.compile`` (not runnable by Triton's interpreter, so unverifiable in
our CPU CI), with a block mask rebuilt for every new prefix length, and with ROCm/DTK
support that lags CUDA; this kernel is ~80 lines, runs on all three GPU platforms and is
verified in CI. See docs/backends.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import dot_in_fp32, pow2


@triton.jit
def _attn_kernel(Q, K, V, Mask, O, sm_scale, fill, Tq, Tk, NH, GROUP, D,
                 sqb, sqh, sqt, sqd, skb, skh, skt, skd, svb, svh, svt, svd,
                 smb, smq, smk, sob, soh, sot,
                 HAS_MASK: tl.constexpr, DOT_F32: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    bh = tl.program_id(1)
    b = bh // NH
    h = bh % NH
    kvh = h // GROUP
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    q = tl.load(Q + b * sqb + h * sqh + rm[:, None] * sqt + rd[None, :] * sqd,
                mask=(rm[:, None] < Tq) & (rd[None, :] < D), other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for n0 in range(0, Tk, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        kt = tl.load(K + b * skb + kvh * skh + rn[None, :] * skt + rd[:, None] * skd,
                     mask=(rn[None, :] < Tk) & (rd[:, None] < D), other=0.0)
        v = tl.load(V + b * svb + kvh * svh + rn[:, None] * svt + rd[None, :] * svd,
                    mask=(rn[:, None] < Tk) & (rd[None, :] < D), other=0.0)
        if DOT_F32:
            s = tl.dot(q, kt.to(tl.float32), input_precision="ieee")
        else:
            s = tl.dot(q, kt)
        s = s * sm_scale
        if HAS_MASK:
            allowed = tl.load(Mask + b * smb + rm[:, None] * smq + rn[None, :] * smk,
                              mask=(rm[:, None] < Tq) & (rn[None, :] < Tk), other=0)
            s = tl.where(allowed != 0, s, fill)
        s = tl.where(rn[None, :] < Tk, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + rm[:, None] * sot + rd[None, :], out.to(O.dtype.element_ty),
             mask=(rm[:, None] < Tq) & (rd[None, :] < D))


def attention(q, k, v, mask, scale, mask_value, layer_scale, cfg):
    """q [B, nh, Tq, d]; k, v [B, g, Tk, d]; mask bool [B, 1, Tq, Tk] (or broadcastable) or None."""
    B, NH, Tq, D = q.shape
    G, Tk = k.shape[1], k.shape[2]
    if NH % G:
        raise ValueError(f"{NH} query heads are not a multiple of {G} KV heads")
    o = torch.empty((B, NH, Tq, D), dtype=q.dtype, device=q.device)
    if mask is not None:
        m8 = mask.expand(B, 1, Tq, Tk).view(torch.uint8)
        mstrides = (m8.stride(0), m8.stride(2), m8.stride(3))
    else:
        m8, mstrides = q, (0, 0, 0)
    fill = torch.finfo(torch.float32).min if mask_value is None else float(mask_value)
    if o.numel():
        grid = (triton.cdiv(Tq, cfg.block_m), B * NH)
        _attn_kernel[grid](q, k, v, m8, o, float(scale), fill, Tq, Tk, NH, NH // G, D,
                           *q.stride(), *k.stride(), *v.stride(), *mstrides,
                           o.stride(0), o.stride(1), o.stride(2),
                           HAS_MASK=mask is not None, DOT_F32=dot_in_fp32(q.dtype),
                           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=pow2(D),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o
