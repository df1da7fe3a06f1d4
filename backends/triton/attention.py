"""Attention with the softmax in fp32 and GLM's masks, as a hand-written Triton kernel.

A FlashAttention-style forward: one program per (block of queries, query head); it
streams blocks of keys/values, keeps the running max and sum in fp32 ("online softmax")
and never materialises the [Tq, Tk] score matrix. Scores are fp32 (tensor-core dot with
fp32 accumulation), scaled in fp32, masked, exponentiated in fp32; only the probabilities
fed to the P.V product are rounded to the input dtype, as in FlashAttention.

Masks: the contract's bool mask [B, 1, Tq, Tk] is read tile by tile (1 byte per entry,
broadcast over heads), which covers GLM's prefix-bidirectional blank-infilling mask, left
padding and decode steps with one kernel. A small table says which (query block, key
block) tiles hold any allowed entry; the kernel skips the others, so a causal or prefix
prefill does about half the work of a full one. The table is built once per mask (the
graph passes the same mask to every layer) and keeps every tile of a query block that
has a row with no allowed key at all, so such rows still match the reference exactly. Masked scores take the contract's fill value
(``mask_value`` or the most negative fp32), exactly as the reference, so even a row with
no allowed key matches it. Grouped KV heads are indexed (query head h reads KV head
h // (nh/g)), never copied. ``layer_scale`` (GLM's query-key layer scaling) exists to keep
fp16 *scores* from overflowing; scores here are fp32, where the scaling is exact, so it is
not applied.

Why not FlexAttention: it would generate a similar Triton kernel from a ``mask_mod``, but
only through ``torch.compile`` (not runnable by Triton's interpreter, so unverifiable in
our CPU CI), with a block mask rebuilt for every new prefix length, and with ROCm/DTK
support that lags CUDA; this kernel is ~90 lines, runs on all three GPU platforms and is
verified in CI. See docs/backends.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from glm_runtime.core.ops.derived import derived

from .launch import dot_in_fp32, pow2


@triton.jit
def _attn_kernel(Q, K, V, Mask, Live, O, sm_scale, fill, Tq, Tk, NH, GROUP, D, NQB, NKB,
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
        live = 1
        if HAS_MASK:
            live = tl.load(Live + (b * NQB + tl.program_id(0)) * NKB + n0 // BLOCK_N)
        if live != 0:
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


def live_tiles(mask: torch.Tensor, B: int, Tq: int, Tk: int, bm: int, bn: int) -> torch.Tensor:
    """uint8 [B, Tq/bm, Tk/bn]: 1 where the tile holds an allowed entry (or its query block
    has a row with none, which must see every key to match the reference).

    Built once per mask (every layer of a forward shares it; see
    :func:`~glm_runtime.core.ops.derived.derived` for which masks may be cached)."""
    def build():
        m = mask.expand(B, 1, Tq, Tk)[:, 0]
        nq, nk = triton.cdiv(Tq, bm), triton.cdiv(Tk, bn)
        padded = torch.zeros(B, nq * bm, nk * bn, dtype=torch.bool, device=mask.device)
        padded[:, :Tq, :Tk] = m
        live = padded.view(B, nq, bm, nk, bn).any(4).any(2)
        empty = torch.zeros(B, nq * bm, dtype=torch.bool, device=mask.device)
        empty[:, :Tq] = ~m.any(-1)
        live |= empty.view(B, nq, bm).any(2, keepdim=True)
        return live.to(torch.uint8).contiguous()

    return derived(mask, ("triton-live-tiles", B, Tq, Tk, bm, bn), build)


def attention(q, k, v, mask, scale, mask_value, layer_scale, cfg):
    """q [B, nh, Tq, d]; k, v [B, g, Tk, d]; mask bool [B, 1, Tq, Tk] (or broadcastable) or None."""
    B, NH, Tq, D = q.shape
    G, Tk = k.shape[1], k.shape[2]
    if NH % G:
        raise ValueError(f"{NH} query heads are not a multiple of {G} KV heads")
    o = torch.empty((B, NH, Tq, D), dtype=q.dtype, device=q.device)
    nqb, nkb = triton.cdiv(Tq, cfg.block_m), triton.cdiv(Tk, cfg.block_n)
    if mask is not None:
        m8 = mask.expand(B, 1, Tq, Tk).view(torch.uint8)
        mstrides = (m8.stride(0), m8.stride(2), m8.stride(3))
        live = live_tiles(mask, B, Tq, Tk, cfg.block_m, cfg.block_n)
    else:
        m8, mstrides, live = q, (0, 0, 0), q
    fill = torch.finfo(torch.float32).min if mask_value is None else float(mask_value)
    if o.numel():
        grid = (nqb, B * NH)
        _attn_kernel[grid](q, k, v, m8, live, o, float(scale), fill, Tq, Tk, NH, NH // G, D, nqb, nkb,
                           *q.stride(), *k.stride(), *v.stride(), *mstrides,
                           o.stride(0), o.stride(1), o.stride(2),
                           HAS_MASK=mask is not None, DOT_F32=dot_in_fp32(q.dtype),
                           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=pow2(D),
                           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return o
