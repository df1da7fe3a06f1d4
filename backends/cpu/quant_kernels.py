"""Weight-only INT8/INT4 linear on the CPU through PyTorch's low-bit GEMM kernels.

The weights stay in their low-bit form; nothing dequantises the whole matrix per call
(the reference op does, and is what these kernels are checked against).

* INT8: ``aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])`` computes
  ``x @ (w * scales[:, None]).T``, which is our layout as it is (fp16 scales are cast to
  fp32 exactly, once).
* INT4: ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, group, scale_zeros)``
  dequantises ``(u - 8) * scale + zero`` group-wise, where ``u`` in 0..15 is packed by
  ``aten._convert_weight_to_int4pack_for_cpu(u int32 [N, K], 1)``, and ``scale_zeros`` is
  ``[K / group, N, 2]``. Our GLM-130B packing holds signed values q in [-7, 7] (even input
  element in the high nibble), so ``u = q + 8``, ``zero = 0`` and the per-row scale is
  repeated in every group (group = the largest of 256, 128, 64, 32 dividing K). That
  kernel needs ``N % 16 == 0`` and ``K % 32 == 0``; other shapes are unpacked once to int8
  (the same values) and use the INT8 kernel, with a warning.

The repacked form is built once per weight tensor (:func:`~glm_runtime.core.ops.derived.derived`),
so decoding pays only the GEMM.
"""
from __future__ import annotations

import logging

import torch

from glm_runtime.core.ops.derived import derived
from glm_runtime.core.quant import unpack_int4

log = logging.getLogger("glm_runtime.backends.cpu")
_GROUPS = (256, 128, 64, 32)


def _prepare(qweight: torch.Tensor, scale: torch.Tensor, bits: int):
    """('int8', w, s) or ('int4', packed, group, scale_zeros), built once per weight."""
    return derived(qweight, ("cpu-lowbit", bits), lambda: _repack(qweight, scale, bits), depends=(scale,))


def _repack(qweight: torch.Tensor, scale: torch.Tensor, bits: int):
    s = scale.float().contiguous()
    if bits == 8:
        prepared = ("int8", qweight.contiguous(), s)
    else:
        q = unpack_int4(qweight)
        n, k = q.shape
        group = next((g for g in _GROUPS if k % g == 0), None)
        if n % 16 or group is None:
            log.warning("int4 weight [%d, %d]: shape not supported by the int4 CPU GEMM (needs out %% 16 == 0 and "
                        "in %% 32 == 0); running it through the int8 kernel", n, k)
            prepared = ("int8", q.contiguous(), s)
        else:
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
            sz = torch.zeros(k // group, n, 2, dtype=torch.float32)
            sz[..., 0] = s
            prepared = ("int4", packed, group, sz)
    return prepared


def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     bits: int) -> torch.Tensor:
    """fp32 ``x @ dequant(qweight, scale).T + bias`` on the low-bit CPU kernels."""
    p = _prepare(qweight, scale, bits)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float().contiguous()
    if p[0] == "int8":
        y = torch.ops.aten._weight_int8pack_mm(x2, p[1], p[2])
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, p[1], p[2], p[3])
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*shape[:-1], y.shape[-1]).to(x.dtype)
