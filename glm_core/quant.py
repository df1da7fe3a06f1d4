"""Weight-only INT8/INT4 quantization: the GLM-130B / ChatGLM scheme and its block-wise form.

Symmetric absmax, per output row in the authors' scheme: ``scale[r] = max|W[r]| / qmax``
with ``qmax = 2^(b-1) - 1`` (127 or 7), ``q = round(W / scale)`` (round half to even, as
torch.round). Block-wise (INT4 only): one scale per block of ``block`` input columns of a
row, ``scale`` [out, in / block]; finer scales follow the weights' local range, so
INT4's error falls (docs/families.md has the measured perplexities), and the CPU int4
kernels take the scales as they are. INT4 packs two values along the input dimension
into one int8 byte, the even element in the high nibble:
``byte = (q[2k] << 4) | (q[2k+1] & 0xF)``. Scales are stored in fp16 as in the authors'
code.

What is quantized: the four linears of every layer (:data:`LINEARS`), as the authors'
code does, and optionally the output projection (``lm_head_bits``: 8, per row), which on
models with a large vocabulary is most of what a decode step reads once the layers are
INT4. Embeddings, norms and biases keep their dtype.
"""
from __future__ import annotations

import torch

LINEARS = ("attn.qkv", "attn.dense", "mlp.fc1", "mlp.fc2")


def quantize(weight: torch.Tensor, bits: int, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (qweight int8, scale fp16) for a [out, in] weight: scale [out] per row, or
    [out, in / block] block-wise."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = weight.float()
    n, k = w.shape
    qmax = 2 ** (bits - 1) - 1
    if block is not None and k % block:
        raise ValueError(f"input size {k} is not a multiple of the block size {block}")
    groups = w.view(n, k // block, block) if block else w.view(n, 1, k)
    scale = (groups.abs().amax(dim=-1) / qmax).half()
    # Divide by the stored (fp16, possibly subnormal) scale itself so that |w - q*s| <= s/2;
    # an all-zero block has scale 0 and quantizes to zeros.
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
    q = torch.round(groups / s).clamp_(-qmax, qmax).to(torch.int8).view(n, k)
    if bits == 4:
        if k % 2:
            raise ValueError(f"INT4 packing needs an even input size, got {k}")
        q = pack_int4(q)
    return q, scale if block else scale.view(n)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    hi, lo = q[:, 0::2], q[:, 1::2]
    return ((hi.to(torch.int16) << 4) | (lo.to(torch.int16) & 0xF)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out, in/2] -> int8 [out, in] with sign-extending shifts."""
    hi = packed >> 4
    lo = (packed << 4) >> 4
    return torch.stack((hi, lo), dim=-1).flatten(-2)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 [out, in] weight from its quantized form (per-row or block-wise scales)."""
    q = (unpack_int4(qweight) if bits == 4 else qweight).float()
    s = scale.float()
    if s.dim() == 1:
        return q * s.unsqueeze(1)
    n, k = q.shape
    return (q.view(n, s.shape[1], -1) * s.unsqueeze(-1)).view(n, k)


def block_of(scale: torch.Tensor, in_features: int) -> int | None:
    """The block size a scale tensor implies (None: per row)."""
    return None if scale.dim() == 1 else in_features // scale.shape[1]


def keeps_stored_dtype(key: str, tensor: torch.Tensor) -> bool:
    """Whether a tensor (checkpoint key, or a module's own name for it) keeps its stored
    dtype when a model is loaded or cast: integer tensors (quantized weights) and the fp16
    scales of quantized linears. Every other tensor follows the model's compute dtype."""
    return not tensor.is_floating_point() or key.rsplit(".", 1)[-1] == "scale"
