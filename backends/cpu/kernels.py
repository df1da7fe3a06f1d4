"""CPU kernels for the op contract (fp32).

Where a faster CPU formulation than the reference's explicit math exists, it is used:
oneDNN's GEMM for linears (``F.linear`` where gradients are needed), grouped-query attention without repeating K/V,
``F.rms_norm``. Ops whose reference is
already the best plain-PyTorch form are adopted as they are, by name, so the op report
shows them as the cpu backend's choice rather than a fallback.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_runtime.core.ops.derived import derived


# oneDNN's fp32 GEMM (the op torch's own compiler lowers CPU linears to), when this torch
# build has it. Measured on an AVX2 EPYC with 2 threads, a 98M-parameter model's linears:
# as fast as MKL's best layout at one row (decode), 2.5x faster at 4 to 16 rows (batched
# decode: MKL's small-M SGEMM is slow there) and 2x at 128-512 rows (prefill). It has no
# autograd formula, so a linear whose inputs need gradients (training) runs F.linear.
ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _needs_grad(x, weight) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)


def linear(x, weight, bias=None):
    if ONEDNN_LINEAR and not _needs_grad(x, weight):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def lm_head(x, weight):
    return linear(x, weight)


def rms_norm(x, weight, eps):
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attention(q, k, v, mask, scale, mask_value=None, layer_scale=1.0):
    """Grouped-query attention as two batched matmuls per KV group, softmax in fp32.

    The query heads that share a KV group (head i uses group i // (nh/g)) are stacked
    into one matrix, so K and V are read once per group and never repeated in memory.
    Measured on 2 CPU cores, this is 5-25x faster than ``scaled_dot_product_attention``
    for decoding (one query against a KV-cache view), whose CPU flash kernel is built
    for long query blocks. ``layer_scale`` is exact in fp32 and not applied; every query
    row has at least one allowed key (the mask builders guarantee it), so ``mask_value``
    does not change the result.
    """
    B, nh, T, d = q.shape
    g, tk = k.shape[1], k.shape[2]
    rep = nh // g
    s = torch.matmul(q.reshape(B, g, rep * T, d), k.transpose(-1, -2))
    s.mul_(scale)
    if mask is not None:
        s = s.view(B, g, rep, T, tk).masked_fill_(~mask[:, :, None], torch.finfo(s.dtype).min)
        s = s.view(B, g, rep * T, tk)
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, v).view(B, nh, T, d)


def _rotary_tables(cos, sin, layout: str, d: int):
    """(partner index [d], C [B, 1, T, d], S [B, 1, T, d]) with
    ``rotary(x) = x * C + x[..., partner] * S``: every layout of the reference is a
    pairing of features, each rotated feature taking its pair's angle, with the sign of
    the sine on the pair's first member; features past the rotated width pass through
    (C = 1, S = 0)."""
    n = cos.shape[-1]
    rot = 2 * n
    j = torch.arange(rot)
    if layout == "neox":
        partner, angle, first = (j + n) % rot, j % n, j < n
    elif layout == "neox_2d":  # two blocks of width n, each rotate-half inside itself, half the angles each
        h = n // 2
        block, i = j // n, j % n
        partner, angle, first = block * n + (i + h) % n, block * h + i % h, i < h
    elif layout == "interleaved":
        partner, angle, first = j ^ 1, j // 2, j % 2 == 0
    else:
        raise ValueError(f"unknown rotary layout {layout!r}")
    perm = torch.cat((partner, torch.arange(rot, d)))
    c, s = cos.float()[..., angle], sin.float()[..., angle] * torch.where(first, -1.0, 1.0)
    B, T = c.shape[:2]
    C = torch.cat((c, c.new_ones(B, T, d - rot)), -1).unsqueeze(1)
    S = torch.cat((s, s.new_zeros(B, T, d - rot)), -1).unsqueeze(1)
    return perm, C, S


def rotary(x, cos, sin, layout):
    """The reference's rotations as ``x * C + x[partner] * S``, three ops per call. The
    tables are built once per forward (every layer's q and k share the ``cos`` tensor the
    model computed; :func:`~glm_runtime.core.ops.derived.derived`), where the reference
    slices, stacks and concatenates about twenty tensors per call."""
    perm, C, S = derived(cos, ("cpu-rotary", layout, x.shape[-1]),
                         lambda: _rotary_tables(cos, sin, layout, x.shape[-1]), depends=(sin,))
    return torch.addcmul(x * C, x.index_select(-1, perm), S)


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
