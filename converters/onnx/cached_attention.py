"""A causal layer's attention and its KV cache as one onnxruntime operator,
``com.microsoft.GroupQueryAttention``.

Traced from :class:`glm_runtime.core.model.Attention`, a layer's attention is about a dozen
ONNX nodes: reshape and transpose into heads, slices for q, k and v, the rotary, a
``Concat`` of past and new keys and another of values, ``Attention``, transpose and
reshape back. The two concatenations copy the whole cache every decode step (14 MB a
step for the 98M benchmark model 576 positions in: measured 1.4 ms of its 8.5 ms INT4
step, more than the attention itself). ``GroupQueryAttention`` takes the qkv projection
as it comes out ([B, S, (heads + 2 kv_heads) d]), rotates q and k by their positions,
appends k and v to the cache, and, when the caller binds one buffer as both a layer's
past and its present, writes the new positions into it in place (onnxruntime's
past-present buffer sharing; :class:`glm_runtime.backends.onnx.runtime.OnnxRunner` does
so): no copy per step, and one node per layer instead of twelve.

The export swaps this module in for each layer's attention while it traces
(:func:`swapped`); the model's own attention stays what the exported graph is checked
against (which checks the operator's rotary too). It applies to the causal families with
blocked QKV and 1D rotary (ChatGLM2/3, GLM-4; :func:`applies`): the operator's per-row
query lengths, which a batch of multi-token steps needs, require its causal mode, so the
prefix-attention families (GLM-130B, ChatGLM-6B) keep the standard ``Attention``.

Masks stay host inputs. The operator applies its causal mask; the host mask (left
padding) enters as an additive bias: 0 where the mask allows, the most negative float
where not, as the reference masks. Rows advance together (the runner's contract), so
every row's ``seqlens_k`` is the mask's width minus one.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from glm_runtime.core.config import GLMConfig

from .export_ops import FUSED_OPSET

NEG = torch.finfo(torch.float32).min


def applies(config: GLMConfig, opset: int) -> bool:
    """The causal families (module docstring) with heads whose size the operator's rotary
    takes: a multiple of 16 (128 in every released GLM; onnxruntime refuses others)."""
    return (opset >= FUSED_OPSET and config.attention == "causal" and config.qkv_layout == "blocked"
            and config.rope != "neox_2d" and config.head_dim % 16 == 0)


class CachedAttentionCache:
    """The traced model's cache: the past as graph inputs (``past``), the presents the
    operator returns (``present``), and the operator's per-step inputs, computed once for
    every layer from the mask [B, 1, S, P + S], the positions [B, S] and the rotary's
    frequencies ``inv_freq``.

    The rotary angles are a table over positions 0 .. P + S - 1, which covers every
    position of a causal family (a position counts the real tokens before it, so it is
    below the token's cache index); row p is computed as the model's rotary computes the
    angles of position p, so looking rows up by position gives the same values."""

    def __init__(self, past: tuple, mask: torch.Tensor, position_ids: torch.Tensor, inv_freq: torch.Tensor):
        B, _, S, total = mask.shape
        self.past, self.present = past, [None] * len(past)
        self.bias = torch.where(mask, 0.0, NEG)
        self.seqlens_k = torch.full((B,), total - 1, dtype=torch.int32)
        self.total = torch.full((), total, dtype=torch.int32)
        self.query_lens = torch.full((B,), S, dtype=torch.int32)
        self.position_ids = position_ids
        angles = torch.arange(total, dtype=torch.float32).unsqueeze(-1) * inv_freq
        self.cos, self.sin = angles.cos(), angles.sin()


class CachedAttention(nn.Module):
    """:class:`~glm_runtime.core.model.Attention` (same linears) computed as qkv ->
    ``GroupQueryAttention`` (rotary included) -> dense."""

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.qkv, self.dense = attn.qkv, attn.dense
        self.config, self.layer, self.scale = attn.config, attn.layer, attn.scale

    def forward(self, x, cos, sin, mask, cache: CachedAttentionCache, start, kv_len):
        c = self.config
        pk, pv = cache.past[self.layer]
        o, k, v = torch.ops.glm.cached_attention(self.qkv(x), pk, pv, cache.cos, cache.sin, cache.position_ids,
                                                 cache.bias, cache.seqlens_k, cache.total, cache.query_lens,
                                                 c.num_heads, c.num_kv_heads, self.scale, c.rope)
        cache.present[self.layer] = (k, v)
        return self.dense(o)


@contextlib.contextmanager
def swapped(model: nn.Module):
    """``model`` with every layer's attention replaced by :class:`CachedAttention` (sharing
    its weights) for the duration."""
    blocks = list(model.layers.values())
    originals = [b.attn for b in blocks]
    try:
        for b in blocks:
            b.attn = CachedAttention(b.attn)
        yield model
    finally:
        for b, attn in zip(blocks, originals):
            b.attn = attn
