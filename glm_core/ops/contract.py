"""The op contract: the small set of ops the GLM graph calls, and their numeric contract.

The graph in :mod:`glm_runtime.core.model` calls nothing device-specific; every computation that
a backend may want to run its own way goes through one of these names. Each op has a
reference implementation (:mod:`glm_runtime.core.ops.reference`, fp32 compute) that defines it.

Tolerances. A backend kernel given inputs of dtype ``dt`` must satisfy
``|out - ref| <= atol + rtol * |ref|`` elementwise, where ``ref`` is the reference computed
in fp32 from the same (rounded) inputs and then compared in fp32. The bounds are a few
units in the last place of the output dtype (fp32 eps 1.2e-7, fp16 9.8e-4, bf16 7.8e-3)
scaled for accumulation over the reduction sizes the conformance kit uses (<= 512):

=========  =======  =======  =============================================
dtype      atol     rtol     why
=========  =======  =======  =============================================
float32    1e-5     1e-5     summation order differs (blocked GEMM, SDPA)
float16    2e-3     2e-3     one output rounding (~1 ulp) + fp32 accumulation
bfloat16   1.6e-2   1.6e-2   same, bf16 has 3 fewer mantissa bits
=========  =======  =======  =============================================

The quantized linear is compared against the dequantise-then-matmul reference: the
quantization error itself is not the kernel's business. The reference multiplies in
fp32; the fast low-bit kernels do not, so the contract lets a kernel round the
*activations* (and its own copy of block scales) to 8 bits on the way in: to bf16
(relative error 2^-9; torch's CPU kernels) or to int8 with one absmax scale per block of
at most 256 inputs (onnxruntime's ``MatMulNBits`` at ``accuracy_level`` 4), and its output
to bf16. Each such rounding moves input k by at most ``e_k = max_{j in b(k)} |x_j| / 254``
(its block b of 256 inputs; bf16's ``|x_k| 2^-9`` is smaller) and the output by at most
``|y| 2^-9``. The errors of different inputs are independent and centred, so their sum
has a standard deviation of at most ``sqrt(sum_k (w_nk e_k)^2)``; the contract allows
six of those plus ``2^-8 |y|`` on top of the table's bound (:func:`quantized_linear_slack`).
The worst case (every rounding in the same direction) would be ~sqrt(K) times looser and
would let a kernel with a wrong scale pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..quant import dequantize
from . import reference


@dataclass(frozen=True)
class OpSpec:
    name: str
    doc: str
    reference: Callable


OPS: dict[str, OpSpec] = {
    s.name: s for s in (
        OpSpec("embedding", "token ids -> rows of the embedding matrix", reference.embedding),
        OpSpec("linear", "x @ W^T + b (all projections of the layers)", reference.linear),
        OpSpec("lm_head", "final projection to the vocabulary: x @ E^T", reference.linear),
        OpSpec("quantized_linear", "weight-only INT8/INT4 linear (GLM-130B packing)",
               reference.quantized_linear),
        OpSpec("layer_norm", "LayerNorm with fp32 statistics", reference.layer_norm),
        OpSpec("rms_norm", "RMSNorm with fp32 statistics", reference.rms_norm),
        OpSpec("rotary", "rotary embedding, layouts neox / neox_2d / interleaved", reference.rotary),
        OpSpec("attention", "scaled dot-product attention, GQA, bool mask, fp32 softmax",
               reference.attention),
        OpSpec("glu", "gated activation: swiglu (gate first) / geglu (gate second)", reference.glu),
        OpSpec("gelu_tanh", "tanh-approximation GeLU", reference.gelu_tanh),
        OpSpec("cross_entropy", "token cross-entropy in fp32", reference.cross_entropy),
    )
}

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def tolerance(dtype: torch.dtype) -> tuple[float, float]:
    """(atol, rtol) of the op contract for outputs of ``dtype``."""
    return TOLERANCES[dtype]


ACTIVATION_BLOCK = 256  # the widest block a low-bit kernel may round activations over


def quantized_linear_slack(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The extra error a ``quantized_linear`` kernel may make by rounding activations (and
    its output) to 8 bits (module docstring): [..., N], added to the table's bound."""
    w = dequantize(qweight, scale, bits)
    a = x.float().abs()
    k = a.shape[-1]
    nb = -(-k // ACTIVATION_BLOCK)
    padded = torch.nn.functional.pad(a, (0, nb * ACTIVATION_BLOCK - k))
    block_max = padded.unflatten(-1, (nb, ACTIVATION_BLOCK)).amax(-1, keepdim=True)
    step = block_max.expand(*block_max.shape[:-1], ACTIVATION_BLOCK).flatten(-2)[..., :k] / 254
    y = x.float() @ w.t()
    return 6 * (step.square() @ w.square().t()).sqrt() + 2.0 ** -8 * y.abs()


@dataclass
class Kernel:
    """A backend's implementation of one op.

    ``dtypes`` lists the compute dtypes it handles; for others the op table falls back to
    the reference (loudly). ``note`` says what it is (shown in the op report).
    """

    fn: Callable
    dtypes: frozenset = field(default_factory=lambda: frozenset({torch.float32}))
    note: str = ""

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes
