"""Weight-only quantization of a whole native state (GLM-130B / ChatGLM scheme).

Only the four per-layer linears are quantized (``attn.qkv``, ``attn.dense``, ``mlp.fc1``,
``mlp.fc2``), as the authors' code does; embeddings, the output layer, norms and biases
keep their dtype. Each ``...weight`` becomes ``...qweight`` (int8, or two int4 per byte)
plus ``...scale`` (fp16, one per output row); see :mod:`glm_runtime.core.quant`.

Quantizing is done on the full (unsplit) weights, so a quantized native checkpoint is
independent of any tensor-parallel degree (GLM-130B's own quantized files are per TP rank;
see glm_runtime.converters.sat).
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import GLMError
from glm_runtime.core.quant import dequantize, quantize

LINEARS = ("attn.qkv", "attn.dense", "mlp.fc1", "mlp.fc2")


def quantized_keys(config: GLMConfig) -> list[str]:
    """Native prefixes (``layers.{i}.attn.qkv`` ...) of the linears that get quantized."""
    return [f"layers.{i}.{n}" for i in range(config.num_layers) for n in LINEARS]


def quantize_state(config: GLMConfig, state: dict[str, torch.Tensor], bits: int,
                   progress: bool = False) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    if bits not in (4, 8):
        raise GLMError(f"--bits must be 8 or 4, got {bits}")
    if config.quantization_bits:
        raise GLMError(f"the checkpoint is already quantized to INT{config.quantization_bits}; "
                       "quantize the unquantized weights instead")
    out = dict(state)
    for p in tqdm(quantized_keys(config), desc=f"quantize INT{bits}", disable=not progress, unit="linear"):
        w = out.pop(p + ".weight")
        if bits == 4 and w.shape[1] % 2:
            raise GLMError(f"{p}.weight has an odd input size {w.shape[1]}: INT4 packs two values per byte")
        out[p + ".qweight"], out[p + ".scale"] = quantize(w, bits)
    return config.replace(quantization_bits=bits), out


def dequantize_state(config: GLMConfig, state: dict[str, torch.Tensor],
                     dtype: torch.dtype = torch.float32) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    """The float model a quantized checkpoint stands for (weights = q * scale)."""
    if not config.quantization_bits:
        return config, dict(state)
    out = dict(state)
    for p in quantized_keys(config):
        out[p + ".weight"] = dequantize(out.pop(p + ".qweight"), out.pop(p + ".scale"),
                                        config.quantization_bits).to(dtype)
    return config.replace(quantization_bits=None), out
