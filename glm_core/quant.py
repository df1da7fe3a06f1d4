"""Weight-only INT8/INT4 quantization in the GLM-130B / ChatGLM scheme.

Symmetric absmax per output row: ``scale[r] = max|W[r]| / (2^(b-1) - 1)`` (127 or 7),
``q = round(W / scale)`` (round half to even, as torch.round). INT4 packs two values
along the input dimension into one int8 byte, the even element in the high nibble:
``byte = (q[2k] << 4) | (q[2k+1] & 0xF)``. Scales are stored in fp16 as in the
authors' code. Only the per-layer linears are quantized (not embeddings, norms, biases
or the output layer).
"""
from __future__ import annotations

import torch


def quantize(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (qweight int8, scale fp16 [out]) for a [out, in] weight."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    w = weight.float()
    qmax = 2 ** (bits - 1) - 1
    scale = (w.abs().amax(dim=1) / qmax).half()
    # Divide by the stored (fp16, possibly subnormal) scale itself so that |w - q*s| <= s/2;
    # an all-zero row has scale 0 and quantizes to zeros.
    s = scale.float()
    s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(1)
    q = torch.round(w / s).clamp_(-qmax, qmax).to(torch.int8)
    if bits == 4:
        if q.shape[1] % 2:
            raise ValueError(f"INT4 packing needs an even input size, got {q.shape[1]}")
        q = pack_int4(q)
    return q, scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    hi, lo = q[:, 0::2], q[:, 1::2]
    return ((hi.to(torch.int16) << 4) | (lo.to(torch.int16) & 0xF)).to(torch.uint8).view(torch.int8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """int8 [out, in/2] -> int8 [out, in] with sign-extending shifts."""
    hi = packed >> 4
    lo = (packed << 4) >> 4
    return torch.stack((hi, lo), dim=-1).flatten(-2)


def dequantize(qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """fp32 [out, in] weight from its quantized form."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    return q.float() * scale.float().unsqueeze(1)


def keeps_stored_dtype(key: str, tensor: torch.Tensor) -> bool:
    """Whether a tensor (checkpoint key, or a module's own name for it) keeps its stored
    dtype when a model is loaded or cast: integer tensors (quantized weights) and the fp16
    scales of quantized linears. Every other tensor follows the model's compute dtype."""
    return not tensor.is_floating_point() or key.rsplit(".", 1)[-1] == "scale"
