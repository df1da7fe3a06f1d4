"""Quantized linears in an ONNX export: onnxruntime's ``MatMulNBits``.

A weight-only INT8/INT4 linear must stay low-bit in the exported graph: traced as the op
contract's reference (dequantise, then an fp32 MatMul) it would dequantise every weight
on every call. So the export traces it as a marker op (:mod:`.export_ops`), written as a
``glm.QuantizedLinear`` node holding the checkpoint's own tensors, and :func:`lower` then
rewrites each marker into ``com.microsoft.MatMulNBits`` with the same values in that
operator's layout:

* ``B`` uint8 ``[N, K/block, block*bits/8]``: unsigned values ``q + 2^(bits-1)`` (the
  operator's default zero point), two per byte for INT4 with the *even* element in the
  low nibble (ours keeps it in the high nibble);
* ``scales`` float ``[N * K/block]``: a per-row scale (GLM-130B's scheme) repeated over
  the row's blocks, or the block-wise scales as they are;
* the bias as the operator's ``bias`` input.

The result is exact: ``MatMulNBits`` dequantises to the same ``q * scale`` the reference
does. ``accuracy_level=4`` lets onnxruntime compute with the activations rounded to int8
per block (the rounding the op contract allows for ``quantized_linear``); 0 keeps them
fp32, which onnxruntime runs far slower for 8-bit weights.
"""
from __future__ import annotations

import numpy as np

from glm_runtime.core.errors import GLMError

from . import markers

MARKER_DOMAIN = "glm"
MARKER_OP = "QuantizedLinear"
ROW_BLOCKS = (256, 128, 64, 32, 16)  # per-row scales: the widest block dividing K (measured fastest)
ACCURACY_LEVEL = 4  # int8 activations


def marker_node():
    """The onnxscript op that writes a ``glm.QuantizedLinear`` node."""
    return markers.op(MARKER_DOMAIN, MARKER_OP,
                      inputs=[("x", "T", False), ("qweight", "Q", False), ("scale", "S", False), ("bias", "T", True)],
                      outputs=[("y", "T")],
                      types={"T": ["tensor(float)"], "Q": ["tensor(int8)"], "S": ["tensor(float16)", "tensor(float)"]},
                      attributes={"bits": "INT"})


def matmul_nbits_tensors(qweight: np.ndarray, scale: np.ndarray, bits: int,
                         block: int) -> tuple[np.ndarray, np.ndarray]:
    """(B, scales) of ``MatMulNBits`` with blocks of ``block`` for our ``qweight`` (int8
    [N, K] or [N, K/2] packed) and ``scale`` ([N] per row, or [N, K/block'] block-wise with
    block' a multiple of ``block``)."""
    q = qweight.astype(np.int16)
    if bits == 4:  # ours: even element in the high nibble, signed (two's complement)
        hi, lo = q >> 4, ((q << 12) >> 12)  # arithmetic shifts on int16 sign-extend both nibbles
        q = np.stack((hi, lo), -1).reshape(q.shape[0], -1)
    n, k = q.shape
    nb = -(-k // block)
    zero = 1 << (bits - 1)
    u = np.full((n, nb * block), zero, dtype=np.uint8)
    u[:, :k] = (q + zero).astype(np.uint8)
    u = u.reshape(n, nb, block)
    if bits == 4:
        u = (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)
    s = scale.astype(np.float32)
    if s.ndim == 1:
        s = np.repeat(s[:, None], nb, axis=1)
    else:
        reps = nb // s.shape[1]
        if reps * s.shape[1] != nb:
            raise GLMError(f"block-wise scales of {s.shape[1]} blocks do not divide into {nb} blocks of {block}")
        s = np.repeat(s, reps, axis=1)
    return np.ascontiguousarray(u), np.ascontiguousarray(s.reshape(-1))


def operator_block(scale: np.ndarray, k: int) -> int:
    """``MatMulNBits``' block size for our scales: block-wise scales' own block; for one scale
    per row the widest of :data:`ROW_BLOCKS` dividing K (the row's scale repeated over its
    blocks; wider blocks decode faster: an INT8 [16384, 768] product measured 0.36 ms with
    blocks of 256 against 0.60 ms with 32)."""
    if scale.ndim == 2:
        return k // scale.shape[1]
    return next((b for b in ROW_BLOCKS if k % b == 0), ROW_BLOCKS[-1])


def lower(proto, accuracy_level: int = ACCURACY_LEVEL) -> int:
    """Rewrite every ``glm.QuantizedLinear`` marker of ``proto`` (an ``onnx.ModelProto``
    with its weights loaded) into ``MatMulNBits``, in place; returns how many were rewritten."""
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {t.name: t for t in g.initializer}
    used = {}
    for n in g.node:
        for i in n.input:
            used[i] = used.get(i, 0) + 1
    rewritten = 0
    for idx, n in enumerate(list(g.node)):
        if n.domain != MARKER_DOMAIN or n.op_type != MARKER_OP:
            continue
        bits = next(a.i for a in n.attribute if a.name == "bits")
        x, qname, sname = n.input[:3]
        bias = n.input[3] if len(n.input) > 3 else ""
        if qname not in inits or sname not in inits:
            raise GLMError(f"quantized linear {n.name}: its weights are not constant initializers")
        q, s = numpy_helper.to_array(inits[qname]), numpy_helper.to_array(inits[sname])
        N, K = q.shape[0], q.shape[1] * (2 if bits == 4 else 1)
        block = operator_block(s, K)
        b, scales = matmul_nbits_tensors(q, s, bits, block)
        for name in (qname, sname):
            used[name] -= 1
        g.initializer.extend([numpy_helper.from_array(b, qname + ".nbits"),
                              numpy_helper.from_array(scales, sname + ".nbits")])
        node = helper.make_node("MatMulNBits", [x, qname + ".nbits", sname + ".nbits", "", "", bias], list(n.output),
                                name=n.name or f"MatMulNBits_{idx}", domain=markers.MSFT, K=K, N=N, bits=bits,
                                block_size=block, accuracy_level=accuracy_level)
        g.node.remove(n)
        g.node.insert(idx, node)
        rewritten += 1
    keep = [t for t in g.initializer if used.get(t.name, 1) > 0 or t.name.endswith(".nbits")]
    del g.initializer[:]
    g.initializer.extend(keep)
    if rewritten:
        markers.use_domain(proto, markers.MSFT)
    keep_opsets = [o for o in proto.opset_import if o.domain != MARKER_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep_opsets)
    return rewritten
