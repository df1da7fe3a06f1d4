"""Reference implementations of the op contract: plain PyTorch, fp32 compute.

These define what every op means. A backend kernel is correct when it matches these
within the tolerance of :data:`glm_runtime.core.ops.contract.TOLERANCES` for its dtype. Inputs
of any float dtype are computed in fp32 and the result is cast back to the input dtype.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from glm_runtime.core.quant import dequantize


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Rows of ``weight`` [V, H] for ``ids`` [B, T] -> [B, T, H]."""
    return F.embedding(ids, weight)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``; weight is [out, in] like torch.nn.Linear."""
    dt = x.dtype
    y = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(dt)


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                     bias: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Weight-only quantized linear in the GLM-130B/ChatGLM scheme.

    ``qweight`` is int8 [out, in] (bits=8) or int8 [out, in/2] holding two int4 values per
    byte, the even input element in the high nibble (bits=4); ``scale`` is the per-output-
    row absmax scale [out]. The reference dequantises and runs an fp32 matmul.
    """
    w = dequantize(qweight, scale, bits)
    return linear(x, w, bias)


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    dt = x.dtype
    y = F.layer_norm(x.float(), (x.shape[-1],), weight.float(), None if bias is None else bias.float(), eps)
    return y.to(dt)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm with fp32 statistics: ``weight * x / sqrt(mean(x^2) + eps)``."""
    dt = x.dtype
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * y).to(dt)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    """Rotate the first ``rot`` features of every head of ``x``.

    x: [B, heads, T, d]. cos, sin: [B, T, n] with one angle per rotated pair, where the
    rotated width is ``rot = 2 n``; features ``rot..d`` pass through unchanged.

    layouts (pairing of features):
      * ``neox``: feature j with j + n (rotate-half; GLM-130B, full head);
      * ``neox_2d``: two blocks of width n, each rotate-half inside itself, the first block
        driven by angles ``[..., :n/2]`` and the second by ``[..., n/2:]`` (ChatGLM-6B's
        2D RoPE: position id and block position id);
      * ``interleaved``: features (2i, 2i+1) (GPT-J style; ChatGLM2/3, GLM-4).
    """
    dt = x.dtype
    xf = x.float()
    c = cos.float().unsqueeze(1)
    s = sin.float().unsqueeze(1)
    n = c.shape[-1]
    rot = 2 * n
    xr, xp = xf[..., :rot], xf[..., rot:]
    if layout == "neox":
        x1, x2 = xr[..., :n], xr[..., n:]
        out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), -1)
    elif layout == "neox_2d":
        h = n // 2
        blocks = []
        for b in range(2):
            blk = xr[..., b * n:(b + 1) * n]
            cb, sb = c[..., b * h:(b + 1) * h], s[..., b * h:(b + 1) * h]
            x1, x2 = blk[..., :h], blk[..., h:]
            blocks.append(torch.cat((x1 * cb - x2 * sb, x2 * cb + x1 * sb), -1))
        out = torch.cat(blocks, -1)
    elif layout == "interleaved":
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), -1).flatten(-2)
    else:
        raise ValueError(f"unknown rotary layout {layout!r}")
    return torch.cat((out, xp), -1).to(dt)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              scale: float, mask_value: float | None = None, layer_scale: float = 1.0) -> torch.Tensor:
    """Scaled dot-product attention with the softmax in fp32.

    q: [B, nh, Tq, d]; k, v: [B, g, Tk, d] with nh % g == 0 (grouped KV heads: query head
    i uses KV group i // (nh/g)). mask: bool [B, 1, Tq, Tk], True = may attend, or None
    for no masking. Masked scores are ``mask_value`` (None: the most negative finite
    float). ``layer_scale`` is GLM's query-key layer scaling coefficient: scores are
    computed as ``(q * scale / c) k^T`` and multiplied by ``c`` in fp32; exact in fp32,
    it exists for half-precision kernels. Returns [B, nh, Tq, d] in q's dtype.
    """
    dt = q.dtype
    nh, g = q.shape[1], k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    if g != nh:
        kf = kf.repeat_interleave(nh // g, dim=1)
        vf = vf.repeat_interleave(nh // g, dim=1)
    scores = torch.matmul(qf * (scale / layer_scale), kf.transpose(-1, -2)) * layer_scale
    if mask is not None:
        fill = torch.finfo(torch.float32).min if mask_value is None else mask_value
        scores = scores.masked_fill(~mask, fill)
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, vf).to(dt)


def glu(u: torch.Tensor, activation: str) -> torch.Tensor:
    """Gated activations on a fused [.., 2F] projection.

    ``swiglu``: SiLU(first half) * second half (ChatGLM2+/GLM-4/transformers ``glm``).
    ``geglu``: first half * exact-erf GeLU(second half) (GLM-130B: the gate is the
    *second* half).
    """
    dt = u.dtype
    a, b = u.float().chunk(2, dim=-1)
    if activation == "swiglu":
        out = F.silu(a) * b
    elif activation == "geglu":
        out = a * F.gelu(b)
    else:
        raise ValueError(f"unknown gated activation {activation!r}")
    return out.to(dt)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """Tanh-approximation GeLU ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (ChatGLM-6B)."""
    dt = x.dtype
    xf = x.float()
    return (0.5 * xf * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (xf + 0.044715 * xf.pow(3))))).to(dt)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean token cross-entropy in fp32 over targets != ignore_index."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)
