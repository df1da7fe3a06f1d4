"""Weight-only quantization of a whole native state (GLM-130B / ChatGLM scheme, optionally
block-wise INT4 and an INT8 output projection; see :mod:`glm_runtime.core.quant`).

The four per-layer linears are quantized (``attn.qkv``, ``attn.dense``, ``mlp.fc1``,
``mlp.fc2``), as the authors' code does; each ``...weight`` becomes ``...qweight`` (int8,
or two int4 per byte) plus ``...scale`` (fp16, one per output row or per block). With
``head_bits`` the output projection becomes ``lm_head.qweight``/``lm_head.scale`` too; a
tied model's head is then an INT8 copy of the embedding (the embedding keeps its dtype
for the lookup). Embeddings, norms and biases keep their dtype.

Quantizing is done on the full (unsplit) weights, so a quantized native checkpoint is
independent of any tensor-parallel degree (GLM-130B's own quantized files are per TP rank;
see glm_runtime.converters.sat).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import GLMError
from glm_runtime.core.quant import LINEARS, dequantize, quantize

SCHEMES = {
    # INT4 scales per block of 32 inputs and an INT8 output projection: what the CPU fast
    # path reads fastest, and more accurate than per-row INT4 (docs/families.md)
    "fast": {"block": 32, "head_bits": 8},
    # the authors' scheme: one scale per output row, a float output projection (THUDM's
    # quantized ChatGLM files, GLM-130B's INT4/INT8)
    "glm130b": {"block": None, "head_bits": None},
}


def quantize_scheme(config: GLMConfig, state: dict[str, torch.Tensor], bits: int, scheme: str = "fast",
                    progress: bool = False) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    """:func:`quantize_state` with one of the named :data:`SCHEMES` (block-wise scales are INT4's)."""
    if scheme not in SCHEMES:
        raise GLMError(f"unknown quantization scheme {scheme!r}; choose from {', '.join(SCHEMES)}")
    s = SCHEMES[scheme]
    return quantize_state(config, state, bits, block=s["block"] if bits == 4 else None, head_bits=s["head_bits"],
                          progress=progress)


def quantized_keys(config: GLMConfig) -> list[str]:
    """Native prefixes (``layers.{i}.attn.qkv`` ...) of the layers' linears that get quantized."""
    return [f"layers.{i}.{n}" for i in range(config.num_layers) for n in LINEARS]


def quantize_state(config: GLMConfig, state: dict[str, torch.Tensor], bits: int, block: int | None = None,
                   head_bits: int | None = None, progress: bool = False) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    if bits not in (4, 8):
        raise GLMError(f"--bits must be 8 or 4, got {bits}")
    if config.quantization_bits:
        raise GLMError(f"the checkpoint is already quantized to INT{config.quantization_bits}; "
                       "quantize the unquantized weights instead")
    qconfig = config.replace(quantization_bits=bits, quantization_block=block, lm_head_bits=head_bits,
                             tie_word_embeddings=config.tie_word_embeddings and not head_bits)
    out = dict(state)
    for p in tqdm(quantized_keys(config), desc=f"quantize INT{bits}", disable=not progress, unit="linear"):
        w = out.pop(p + ".weight")
        if bits == 4 and w.shape[1] % 2:
            raise GLMError(f"{p}.weight has an odd input size {w.shape[1]}: INT4 packs two values per byte")
        out[p + ".qweight"], out[p + ".scale"] = quantize(w, bits, block)
    if head_bits:
        head = out.pop("lm_head.weight") if "lm_head.weight" in out else out["embed.weight"]
        out["lm_head.qweight"], out["lm_head.scale"] = quantize(head, head_bits)
    return qconfig, out


def dequantize_state(config: GLMConfig, state: dict[str, torch.Tensor],
                     dtype: torch.dtype = torch.float32) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    """The float model a quantized checkpoint stands for (weights = q * scale)."""
    if not config.quantization_bits:
        return config, dict(state)
    out = dict(state)
    for p in quantized_keys(config):
        out[p + ".weight"] = dequantize(out.pop(p + ".qweight"), out.pop(p + ".scale"),
                                        config.quantization_bits).to(dtype)
    if config.lm_head_bits:
        out["lm_head.weight"] = dequantize(out.pop("lm_head.qweight"), out.pop("lm_head.scale"),
                                           config.lm_head_bits).to(dtype)
    return config.replace(quantization_bits=None, quantization_block=None, lm_head_bits=None), out
