"""Weight-only INT8/INT4 linear on the CPU through PyTorch's low-bit GEMM kernels.

The weights stay in their low-bit form; nothing dequantises the whole matrix per call
(the reference op does, and is what these kernels are checked against).

torch's x86 kernels are vectorised for bf16 activations only (with fp32 activations they
run a scalar loop, 10-30x slower), so the activations are rounded to bf16 on the way in
and the product comes back in bf16: the rounding the op contract allows for
``quantized_linear`` (docs/architecture.md, "The op contract"). Scales that are one per
output row are applied after the product in fp32, so they are not rounded.

* INT8: ``aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])`` computes
  ``x @ (w * scales[:, None]).T``; our layout as it is, with unit scales. Its bf16 path
  on AVX-512 processors (torch 2.13) loads rows with aligned vector loads: a weight row
  must start on a 16-byte boundary and an activation row on a 32-byte one, or it
  segfaults or returns garbage (K = 40 crashed, K = 24 gave 3e14, and so did a K = 64
  weight 8 bytes into a checkpoint's mapping). Hence bf16 activations only when
  ``K % 16 == 0`` (other widths keep fp32 activations: exact, the slow scalar loop), and
  weights and activations that do not start on a 64-byte boundary are copied to ones that
  do (:func:`aligned`; once per weight, at repacking).
* INT4: ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, scale_zeros)``
  dequantises ``(u - 8) * scale + zero`` group-wise, where ``u`` in 0..15 is packed by
  ``aten._convert_weight_to_int4pack_for_cpu(u int32 [N, K], 1)`` and ``scale_zeros`` is
  ``[K / group, N, 2]``. Our packing holds signed q in [-7, 7] (even input element in the
  high nibble), so ``u = q + 8`` and ``zero = 0``; block-wise scales are the groups'
  scales (in bf16, as the kernel takes them), per-row scales are applied afterwards
  (unit scales in the kernel, group = the largest of 256, 128, 64, 32 dividing K). That
  kernel needs ``N % 16 == 0`` and ``K % 32 == 0``; other shapes are unpacked once to
  int8 (the same values) and use the INT8 kernel, with a warning (block-wise ones, whose
  scales the INT8 kernel cannot hold, are dequantised once to fp32).

The repacked form is built once per weight tensor (:func:`~glm_runtime.core.ops.derived.derived`),
so a call pays only the GEMM.
"""
from __future__ import annotations

import logging

import torch

from glm_runtime.core.ops.derived import derived
from glm_runtime.core.quant import block_of, dequantize, unpack_int4

log = logging.getLogger("glm_runtime.backends.cpu")
_GROUPS = (256, 128, 64, 32)
BF16 = torch.bfloat16
BF16_K_MULTIPLE = 16  # the INT8 kernel's bf16 path is safe for these input widths only (docstring)
ALIGN = 64  # bytes: the widest vector load; torch's CPU allocator aligns fresh tensors to it


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous and starting on an :data:`ALIGN`-byte boundary (copied if not)."""
    t = t.contiguous()
    return t if t.data_ptr() % ALIGN == 0 else t.clone()


def _prepare(qweight: torch.Tensor, scale: torch.Tensor, bits: int):
    """(kind, weight, kernel scales, group, row scales or None), built once per weight."""
    return derived(qweight, ("cpu-lowbit", bits), lambda: _repack(qweight, scale, bits), depends=(scale,))


def _repack(qweight: torch.Tensor, scale: torch.Tensor, bits: int):
    n = qweight.shape[0]
    q = unpack_int4(qweight) if bits == 4 else qweight
    k = q.shape[1]
    block = block_of(scale, k)
    row_scale = None if block else scale.float().contiguous()
    if bits == 4:
        group = block or next((g for g in _GROUPS if k % g == 0), None)
        if n % 16 == 0 and group is not None:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
            sz = torch.zeros(k // group, n, 2, dtype=BF16)
            sz[..., 0] = 1.0 if block is None else scale.t().to(BF16)
            return "int4", packed, sz, group, row_scale
        log.warning("int4 weight [%d, %d]: shape not supported by the int4 CPU GEMM (needs out %% 16 == 0 and "
                    "in %% 32 == 0); running it through the %s", n, k,
                    "fp32 GEMM, dequantised once" if block else "int8 kernel")
        if block:  # the int8 kernel has one scale per row
            return "dense", dequantize(qweight, scale, bits), None, None, None
    act = BF16 if k % BF16_K_MULTIPLE == 0 else torch.float32
    return "int8", aligned(q), torch.ones(n, dtype=act), None, row_scale


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     bits: int) -> torch.Tensor:
    """fp32 ``x @ dequant(qweight, scale).T + bias`` on the low-bit CPU kernels."""
    kind, w, ks, group, row_scale = _prepare(qweight, scale, bits)
    if kind == "dense":
        return torch.nn.functional.linear(x, w.to(x.dtype), bias)
    shape = x.shape
    x2 = aligned(x.reshape(-1, shape[-1]).to(ks.dtype))
    if kind == "int8":
        y = torch.ops.aten._weight_int8pack_mm(x2, w, ks)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, w, group, ks)
    y = y.float()
    if row_scale is not None:
        y = y * row_scale
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)
