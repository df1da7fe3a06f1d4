"""The Triton implementations as op-contract kernels, bound to one tuning entry."""
from __future__ import annotations

import functools

import torch

from glm_runtime.core.ops import Kernel

from . import activations, attention, norms, quant_matmul, rotary
from .tuning import Tuning

HALF = frozenset({torch.float16, torch.bfloat16, torch.float32})

# op name -> what the kernel is, for the op report and docs/backends.md
TRITON_OPS = {
    "rms_norm": "Triton fused RMSNorm, fp32 statistics",
    "layer_norm": "Triton fused LayerNorm, fp32 statistics",
    "rotary": "Triton fused rotary (neox / neox_2d / interleaved)",
    "glu": "Triton fused SwiGLU / GeGLU (erf)",
    "gelu_tanh": "Triton fused tanh GeLU",
    "quantized_linear": "Triton weight-only INT8/INT4 matmul, GLM-130B packing",
    "attention": "Triton flash attention, fp32 softmax, bool/prefix masks, GQA",
}


def triton_kernels(t: Tuning, dtypes: frozenset = HALF) -> dict[str, Kernel]:
    """{op: Kernel} for the Triton ops, launched with the configurations of ``t``."""
    tag = f" [{t.platform}/{t.arch}]"
    fns = {
        "rms_norm": functools.partial(_rms_norm, t),
        "layer_norm": functools.partial(_layer_norm, t),
        "rotary": functools.partial(_rotary, t),
        "glu": functools.partial(_glu, t),
        "gelu_tanh": functools.partial(_gelu_tanh, t),
        "quantized_linear": functools.partial(_quantized_linear, t),
        "attention": functools.partial(_attention, t),
    }
    return {op: Kernel(fn, dtypes, TRITON_OPS[op] + tag) for op, fn in fns.items()}


def _rms_norm(t, x, weight, eps):
    return norms.rms_norm(x, weight, eps, t.row)


def _layer_norm(t, x, weight, bias, eps):
    return norms.layer_norm(x, weight, bias, eps, t.row)


def _rotary(t, x, cos, sin, layout):
    return rotary.rotary(x, cos, sin, layout, t.rotary)


def _glu(t, u, activation):
    return activations.glu(u, activation, t.row)


def _gelu_tanh(t, x):
    return activations.gelu_tanh(x, t.row)


def _quantized_linear(t, x, qweight, scale, bias, bits):
    return quant_matmul.quantized_linear(x, qweight, scale, bias, bits, t.matmul, t.matmul_decode)


def _attention(t, q, k, v, mask, scale, mask_value=None, layer_scale=1.0):
    return attention.attention(q, k, v, mask, scale, mask_value, layer_scale, t.attention)
