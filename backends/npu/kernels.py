"""The op contract mapped onto torch-npu's documented fused operators.

Each function converts our layouts and dtypes to what the operator documents and back:

* attention -> ``torch_npu.npu_fusion_attention`` (BNSD layout, ``head_num`` = query heads,
  grouped KV heads passed as they are). Its ``atten_mask`` means the opposite of ours
  (True = masked out), so it is ``~mask``. A GLM prefix mask (bidirectional context of
  length ``ctx`` per row, causal after it, no padding) is recognised and sent as
  ``sparse_mode=5`` ("prefix, uncompressed": causal plus a left rectangle of width
  ``prefix[b]``), which lets the operator skip masked blocks; every other mask goes as
  ``sparse_mode=0`` (the explicit mask). The head size is zero-padded to a multiple of 16
  where needed (a documented constraint; padding q and k adds zero to scores, padded v
  columns are cut off). Output: element 0 of the returned tuple.
* rms_norm -> ``torch_npu.npu_rms_norm(x, gamma, epsilon)`` (gamma in x's dtype), element 0.
* rotary -> ``torch_npu.npu_rotary_mul(x, r1, r2, rotary_mode)`` on the rotated slice, in
  BSND layout (a free view of our [B, heads, T, d] tensors, which are transposes of
  [B, T, heads, d]) with r1/r2 as BS1D: ``half`` mode for neox, ``interleave`` for
  interleaved, and one ``half`` call per block for ChatGLM's 2D layout.
* glu (swiglu) -> ``torch_npu.npu_swiglu(u, dim=-1)`` (swish of the first half times the
  second half: exactly our SwiGLU). GeGLU (gate on the second half, erf GeLU) runs as
  composed torch ops: the documented ``npu_geglu`` does not state which half it activates
  in every version we could read, and a silent half-swap is the bug we must not ship.
* quantized_linear -> ``torch_npu.npu_weight_quant_batchmatmul(x2d, weight[K, N],
  antiquant_scale, bias=...)``: INT8 weights as the transposed view (documented as
  accepted); INT4 weights unpacked from the GLM nibble packing to int32 [N, K] and packed
  with ``npu_convert_weight_to_int4pack`` once per weight (cached), then transposed.
  The fp16 scale is passed as is for fp16 inputs; for bf16 inputs it would have to be
  rounded to bf16 (the operator wants the scale in x's dtype), so bf16 runs with unit
  scales and applies the fp16 scale to the output in fp32. Block-wise scales go in as the
  operator's per-group ``antiquant_scale`` (``antiquant_group_size`` = the block), in x's
  dtype (bf16-rounded for bf16 inputs: within the op contract's rounding of 8 bits).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from glm_runtime.core.ops.derived import derived
from glm_runtime.core.quant import unpack_int4

MAX_SEQ = 2147483647


def npu():
    """The torch_npu module, imported at call time (tests may substitute it)."""
    import torch_npu

    return torch_npu


# ------------------------------------------------------------------ attention
def prefix_lengths(mask: torch.Tensor) -> list[int] | None:
    """Per-batch ``ctx`` if ``mask`` [B, 1, T, T] is exactly causal | (column < ctx), else None."""
    B, _, Tq, Tk = mask.shape
    if Tq != Tk:
        return None
    m = mask[:, 0]
    ctx = m[:, 0, :].sum(-1)  # row 0 sees exactly the columns < max(ctx, 1)
    i = torch.arange(Tq, device=mask.device)
    causal = i[None, :] <= i[:, None]
    expect = causal[None] | (i[None, None, :] < ctx[:, None, None])
    if not bool((expect == m).all()):
        return None
    return [int(c) for c in ctx.tolist()]


def attention(q, k, v, mask, scale, mask_value=None, layer_scale=1.0):
    tnpu = npu()
    B, NH, Tq, D = q.shape
    pad = (-D) % 16
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    kw = dict(scale=float(scale), keep_prob=1.0, pre_tockens=MAX_SEQ, next_tockens=MAX_SEQ, inner_precise=0)
    if mask is None:
        kw["sparse_mode"] = 0
    else:
        mask = mask.expand(B, 1, Tq, mask.shape[-1])
        kw["atten_mask"] = (~mask).contiguous()
        pre = prefix_lengths(mask)
        if pre is not None:
            kw.update(sparse_mode=5, prefix=pre)
        else:
            kw["sparse_mode"] = 0
    out = tnpu.npu_fusion_attention(q.contiguous(), k.contiguous(), v.contiguous(), NH, "BNSD", **kw)[0]
    return out[..., :D] if pad else out


# ---------------------------------------------------------------------- norms
def rms_norm(x, weight, eps):
    return npu().npu_rms_norm(x, weight.to(x.dtype), epsilon=float(eps))[0]


def layer_norm(x, weight, bias, eps):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# --------------------------------------------------------------------- rotary
def rotary(x, cos, sin, layout):
    """x [B, heads, T, d]; cos, sin [B, T, n]."""
    tnpu = npu()
    n = cos.shape[-1]
    rot = 2 * n
    xs = x.transpose(1, 2)  # BSND view
    xr = xs[..., :rot].contiguous()
    c = cos.to(x.dtype)[:, :, None, :]  # BS1D
    s = sin.to(x.dtype)[:, :, None, :]
    if layout == "neox":
        out = tnpu.npu_rotary_mul(xr, torch.cat((c, c), -1), torch.cat((s, s), -1), rotary_mode="half")
    elif layout == "interleaved":
        r1 = torch.stack((c, c), -1).flatten(-2)  # angle i drives features 2i and 2i+1
        r2 = torch.stack((s, s), -1).flatten(-2)
        out = tnpu.npu_rotary_mul(xr, r1, r2, rotary_mode="interleave")
    elif layout == "neox_2d":
        h = n // 2
        blocks = []
        for b in range(2):
            cb, sb = c[..., b * h:(b + 1) * h], s[..., b * h:(b + 1) * h]
            blocks.append(tnpu.npu_rotary_mul(xr[..., b * n:(b + 1) * n].contiguous(), torch.cat((cb, cb), -1),
                                              torch.cat((sb, sb), -1), rotary_mode="half"))
        out = torch.cat(blocks, -1)
    else:
        raise ValueError(f"unknown rotary layout {layout!r}")
    if rot < x.shape[-1]:
        out = torch.cat((out, xs[..., rot:]), -1)
    return out.transpose(1, 2).contiguous()


# ---------------------------------------------------------------- activations
def glu(u, activation):
    if activation == "swiglu":
        return npu().npu_swiglu(u.contiguous(), dim=-1)
    if activation == "geglu":
        a, b = u.float().chunk(2, dim=-1)
        return (a * F.gelu(b)).to(u.dtype)
    raise ValueError(f"unknown gated activation {activation!r}")


def gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


# ----------------------------------------------------------- quantized linear
def _int4_weight(qweight: torch.Tensor) -> torch.Tensor:
    """GLM-packed int8 [N, K/2] -> torch-npu int4 pack, transposed to [K/8, N] as the matmul takes it.

    Packed once per weight tensor (:func:`~glm_runtime.core.ops.derived.derived`).
    """
    def pack():
        q = unpack_int4(qweight).to(torch.int32).contiguous()  # [N, K], values in [-8, 7]
        return npu().npu_convert_weight_to_int4pack(q)  # [N, K/8] int32

    return derived(qweight, "npu-int4pack", pack).transpose(-1, -2)


def quantized_linear(x, qweight, scale, bias, bits):
    tnpu = npu()
    K = x.shape[-1]
    N = qweight.shape[0]
    x2 = x.reshape(-1, K)
    w = qweight.t() if bits == 8 else _int4_weight(qweight)
    if scale.dim() == 2:  # block-wise: the operator's per-group antiquant scale, (K / group, N) in x's dtype
        y = tnpu.npu_weight_quant_batchmatmul(x2, w, scale.t().contiguous().to(x.dtype),
                                              bias=None if bias is None else bias.to(x.dtype),
                                              antiquant_group_size=K // scale.shape[1])
    elif x.dtype == torch.float16:
        y = tnpu.npu_weight_quant_batchmatmul(x2, w, scale.to(torch.float16),
                                              bias=None if bias is None else bias.to(x.dtype))
    else:
        ones = torch.ones(N, dtype=x.dtype, device=x.device)
        y = tnpu.npu_weight_quant_batchmatmul(x2, w, ones).float() * scale.float()
        if bias is not None:
            y = y + bias.float()
        y = y.to(x.dtype)
    return y.view(*x.shape[:-1], N)


def linear(x, weight, bias=None):
    return F.linear(x, weight, bias)


def lm_head(x, weight):
    return F.linear(x, weight)
