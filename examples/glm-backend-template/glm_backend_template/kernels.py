"""The template's kernels: every op of glm-runtime's op contract, written out explicitly.

Each function has the signature of the contract (``glm_runtime.core.ops.contract``, typed
on ``glm_runtime.core.ops.OpTable``) and must match the reference
(``glm_runtime.core.ops.reference``) within the contract's tolerance; the conformance
kit checks exactly that (``pytest --glm-backend template``). Replace a body with a call
into your device's library, keep the signature, run the kit.
"""
from __future__ import annotations

import math

import torch

OPS = ("embedding", "linear", "lm_head", "quantized_linear", "layer_norm", "rms_norm", "rotary", "attention",
       "glu", "gelu_tanh", "cross_entropy")


def embedding(ids, weight):
    return weight[ids]


def linear(x, weight, bias=None):
    y = x @ weight.t()
    return y if bias is None else y + bias


def lm_head(x, weight):
    return x @ weight.t()


def quantized_linear(x, qweight, scale, bias, bits):
    """GLM-130B packing: int8 [out, in], or two int4 per byte with the even input in the high
    nibble; ``scale`` [out] per row, or [out, in / block] block-wise."""
    if bits == 4:
        hi = qweight >> 4
        lo = (qweight << 4) >> 4
        q = torch.stack((hi, lo), dim=-1).flatten(-2)
    else:
        q = qweight
    n, k = q.shape
    s = scale.to(x.dtype).view(n, -1, 1)  # [out, blocks, 1]; one block per row when per row
    return linear(x, (q.to(x.dtype).view(n, s.shape[1], -1) * s).view(n, k), bias)


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    y = (x - mean) / torch.sqrt(var + eps) * weight
    return y if bias is None else y + bias


def rms_norm(x, weight, eps):
    return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rotary(x, cos, sin, layout):
    """x [B, heads, T, d]; cos, sin [B, T, n]; rotates the first 2n features.

    Written as "partner index" arithmetic, the form a device kernel uses: output feature j
    is x[j] cos[a(j)] + sign(j) x[p(j)] sin[a(j)].
    """
    n = cos.shape[-1]
    j = torch.arange(2 * n)
    if layout == "neox":
        first = j < n
        partner, ang = torch.where(first, j + n, j - n), torch.where(first, j, j - n)
    elif layout == "neox_2d":
        h, jj = n // 2, j % n
        first = jj < h
        partner = torch.where(first, j + h, j - h)
        ang = (j // n) * h + torch.where(first, jj, jj - h)
    elif layout == "interleaved":
        first = j % 2 == 0
        partner, ang = torch.where(first, j + 1, j - 1), j // 2
    else:
        raise ValueError(f"unknown rotary layout {layout!r}")
    sign = torch.where(first, -1.0, 1.0).to(x.dtype)
    c, s = cos[:, None, :, ang], sin[:, None, :, ang]
    xr = x[..., :2 * n]
    out = xr * c + sign * x[..., partner] * s
    return torch.cat((out, x[..., 2 * n:]), -1)


def attention(q, k, v, mask, scale, mask_value=None, layer_scale=1.0):
    """Softmax in fp32; KV group i // (heads / groups) serves query head i."""
    nh, g = q.shape[1], k.shape[1]
    if g != nh:
        k = k.repeat_interleave(nh // g, dim=1)
        v = v.repeat_interleave(nh // g, dim=1)
    s = (q.float() @ k.float().transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, torch.finfo(torch.float32).min if mask_value is None else mask_value)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    p = p / p.sum(-1, keepdim=True)
    return (p @ v.float()).to(q.dtype)


def glu(u, activation):
    a, b = u.chunk(2, dim=-1)
    if activation == "swiglu":
        return a * torch.sigmoid(a) * b
    if activation == "geglu":
        return a * 0.5 * b * (1 + torch.erf(b / math.sqrt(2)))
    raise ValueError(f"unknown gated activation {activation!r}")


def gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x.pow(3))))


def cross_entropy(logits, targets, ignore_index=-100):
    lf = logits.float().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1)
    keep = t != ignore_index
    logp = lf - torch.logsumexp(lf, -1, keepdim=True)
    nll = -logp[keep].gather(-1, t[keep][:, None]).squeeze(-1)
    return nll.mean()
