"""Residual add + norm as one onnxruntime operator.

Every GLM block ends its two halves with ``x + f(x)`` and the next op normalises that
sum; traced, that is an ``Add`` then an ``RMSNormalization`` (or ``LayerNormalization``),
two nodes and two passes over the hidden state, 49 ``Add`` nodes a decode step for the
98M benchmark model. onnxruntime fuses this pair for its own contrib norms but not for
the standard opset-23 operators the export writes, so :func:`skip_norms` rewrites each
pair into ``com.microsoft.SkipSimplifiedLayerNormalization`` (``SkipLayerNormalization``)
whose fourth output is the sum, which the next residual add reads. Same arithmetic (the
sum, then the norm in fp32); the export's check against PyTorch runs on the result.
"""
from __future__ import annotations

from . import layout, markers

FUSED = {"RMSNormalization": "SkipSimplifiedLayerNormalization", "LayerNormalization": "SkipLayerNormalization"}


def skip_norms(proto) -> int:
    """Rewrite ``Add -> norm`` pairs of ``proto`` in place (the norm over the last axis
    of a 3D hidden state, the sum of two same-shaped tensors); returns how many."""
    from onnx import helper

    g = proto.graph
    producer = {o: n for n in g.node for o in n.output}
    inits = {t.name for t in g.initializer}
    fused = 0
    for norm in list(g.node):
        if norm.op_type not in FUSED or norm.domain not in ("", "ai.onnx"):
            continue
        add = producer.get(norm.input[0])
        attrs = layout.attrs(norm)
        if (add is None or add.op_type != "Add" or attrs.get("axis", -1) != -1
                or any(i in inits or getattr(producer.get(i), "op_type", "") == "Constant" for i in add.input)
                or len(norm.output) != 1):
            continue  # a sum with a constant (a bias) broadcasts: not this operator's skip input
        gamma_beta = list(norm.input[1:])
        node = helper.make_node(FUSED[norm.op_type], [add.input[0], add.input[1], *gamma_beta],
                                [norm.output[0], "", "", add.output[0]], name=f"{norm.name or 'norm'}_skip",
                                domain=markers.MSFT, epsilon=attrs.get("epsilon", 1e-5))
        at = list(g.node).index(add)  # where the sum was made: its other readers come later
        g.node.remove(norm)
        g.node.remove(add)
        g.node.insert(at, node)
        fused += 1
    if fused:
        markers.use_domain(proto, markers.MSFT)
    return fused
