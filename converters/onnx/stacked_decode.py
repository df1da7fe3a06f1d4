"""Decode steps whose attention reads each KV group's cache once: the query heads of a
group stacked as query rows, in a branch of the graph of its own.

onnxruntime's CPU ``GroupQueryAttention`` computes each query head on its own, so at a
decode step each of a KV group's G query heads reads the group's whole cached keys and
values again (and packs the keys for its product): the attention grows with the cache G
times faster than the bytes it must read. For the 98M benchmark model (12 query / 2 KV
heads, head 64) one layer's operator alone took ~75 us at 513 cached positions against
~21 at 17 (Intel Xeon, 2 threads); on an AMD EPYC ~145 against ~35.

Stacked, the operator runs with ``num_heads`` = the KV heads and a group's G query heads
as G rows of one "sequence": one pass over the group's cache (~33 us at 513 on the same
Intel machine, ~20 at 17). The operator then appends one key and one value row per query
row, so the new token's key and value are padded with G - 1 zero rows. Those land in
the cache positions after the new token's (T .. T + G - 2 for a step ending at position
T - 1); every query row's additive bias masks them off, and each later step overwrites
them with its real key before any step reads them (a step only reads positions below
its own). Every row carries the new token's position, so the rotary turns the query
heads and the key as the unstacked operator would. The cache buffers therefore need G - 1
positions of slack (metadata :data:`~.layout.KV_SLACK`); the runner allocates them.

Only a step of one new token can be stacked (the causal rows of several tokens would
mix), and over a short cache the nine reshaping nodes a layer gains cost more than the
stacking saves, so :func:`add_decode_branch` makes the graph ``If(one new token and at
least STACK_FROM positions, decode, full)``: ``full`` is the graph as exported, ``decode``
a copy of it with its attention nodes stacked. Both read the same weights, outer-scope
initializers of the main graph, which onnxruntime prepacks once (resident memory of the
98M INT8 export +13 MB, ~9 %, from the second copy of the small nodes and their buffers);
the ``If`` itself costs nothing measurable (1.00x with the plain graph in both branches).
A generation switches branch as its cache grows; the full branch writes real positions
only, so the two mix freely. With a cache written in place the stacked branch's logits
equal the plain graph's to ~1e-6 (fp32); the export's check runs a decode step through it.

The stacked branch relies on the in-place cache: with separate past and present buffers
its presents come out G - 1 positions longer than past + 1 (the zero rows, at the end).
A runtime that concatenates caches itself keeps the first past + 1 positions.
"""
from __future__ import annotations

import numpy as np

from . import layout, markers
from .cached_attention import NEG  # the export's mask bias

GQA = "GroupQueryAttention"
# The decode branch runs from this many positions (the step's included) on; shorter steps
# take the full branch. Its nine added nodes a layer cost ~6 us each on a 2-core machine,
# more than the stacking saves over a short cache: on the Intel machine, decode steps of
# the 98M model (12 query / 2 KV heads), stacked against not, median of 10-12 interleaved
# rounds: INT4 0.84 / 0.92 / 0.93 / 1.06 / 1.07 / 1.21x at 17 / 65 / 129 / 257 / 385 / 513
# positions, INT8 0.94 / 0.95 / 0.90 / 1.03 / 0.98 / 1.06x, fp32 0.99x at 17, 1.05x at 513.
# More query heads per KV head (GLM-4-9B has 16) save more per node; 256 is the crossover
# measured for 6. The export checks the branch with this set to 1 (:func:`set_threshold`).
STACK_FROM = 256
THRESHOLD = "stacked_decode/from"  # the initializer holding it
INT64 = 7  # onnx.TensorProto.INT64 (onnx is imported where used)
# GroupQueryAttention's inputs, by position (export_ops.GQA_INPUTS)
QKV, PAST_K, PAST_V, SEQLENS_K, TOTAL, COS, SIN, POSITIONS, BIAS, QUERY_SEQLENS = 0, 3, 4, 5, 6, 7, 8, 9, 10, 16


def group_size(proto) -> int:
    """G, the query heads per KV head of the graph's GroupQueryAttention nodes (1 when
    there are none: nothing to stack)."""
    sizes = {layout.attrs(n)["num_heads"] // layout.attrs(n)["kv_num_heads"] for n in proto.graph.node if n.op_type == GQA}
    if len(sizes) > 1:
        raise ValueError(f"attention nodes with different group sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1


class _Writer:
    """New nodes and constants of the decode branch, names under one prefix."""

    def __init__(self):
        self.nodes, self.constants, self._derived = [], [], {}

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        name = f"stacked/const/{name}"
        if all(t.name != name for t in self.constants):
            self.constants.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, **attrs) -> str:
        from onnx import helper

        self.nodes.append(helper.make_node(op, inputs, [output], **attrs))
        return output

    def derived(self, name: str, make) -> str:
        """One node per (kind, input) shared by every layer (the step's positions, bias ...)."""
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]


def _stack(n, w: _Writer, g: int, head_dim: int) -> list:
    """The nodes replacing GroupQueryAttention node ``n`` in the decode branch."""
    from onnx import helper

    a = layout.attrs(n)
    heads, kv_heads = a["num_heads"], a["kv_num_heads"]
    d = head_dim
    ins = list(n.input) + [""] * (QUERY_SEQLENS + 1 - len(n.input))
    p = f"stacked/{n.output[0]}"
    if not ins[BIAS]:
        raise ValueError(f"attention node {n.name or n.output[0]} has no attention_bias to mask the slack rows with")

    def plus_slack(x: str, kind: str) -> str:  # a per-step count, G - 1 larger
        return w.derived(f"{kind}+{x}", lambda: w.node("Add", [x, w.const("g-1", np.int32(g - 1))], f"stacked/{kind}"))

    def table_rows(x: str, kind: str) -> str:  # a rotary table, G - 1 rows longer (never read)
        pads = w.const("pad_table", np.array([0, 0, g - 1, 0], np.int64))
        return w.derived(kind, lambda: w.node("Pad", [x, pads], f"stacked/{kind}"))

    def rows_bias() -> str:  # [B, 1, 1, T] -> [B, 1, G, T + G - 1], the slack columns masked
        rows = w.node("Expand", [ins[BIAS], w.const("bias_rows", np.array([1, 1, g, 1], np.int64))],
                      "stacked/bias_expanded")
        pads = w.const("pad_bias", np.array([0, 0, 0, 0, 0, 0, 0, g - 1], np.int64))
        return w.node("Pad", [rows, pads, w.const("neg", np.float32(NEG))], "stacked/bias")

    seqlens, total = plus_slack(ins[SEQLENS_K], "seqlens_k"), plus_slack(ins[TOTAL], "total")
    cos, sin = table_rows(ins[COS], "cos"), table_rows(ins[SIN], "sin")
    positions = w.derived("positions", lambda: w.node(
        "Expand", [ins[POSITIONS], w.const("row_shape", np.array([1, g], np.int64))], "stacked/positions"))
    bias = w.derived("bias", rows_bias)
    query_seqlens = plus_slack(ins[QUERY_SEQLENS], "query_seqlens") if ins[QUERY_SEQLENS] else ""
    pad_rows = w.const("pad_rows", np.array([0, 0, 0, 0, g - 1, 0], np.int64))
    nodes = [
        helper.make_node("Split", [ins[QKV], w.const(f"split_{heads}_{kv_heads}",
                                                     np.array([heads * d, kv_heads * d, kv_heads * d], np.int64))],
                         [f"{p}/q", f"{p}/k", f"{p}/v"], axis=-1),
        # q [B, 1, (kv, g, d)] -> rows [B, g, (kv, d)]
        helper.make_node("Reshape", [f"{p}/q", w.const("q_heads", np.array([0, kv_heads, g, d], np.int64))],
                         [f"{p}/q4"]),
        helper.make_node("Transpose", [f"{p}/q4"], [f"{p}/qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{p}/qt", w.const("q_rows", np.array([0, g, kv_heads * d], np.int64))],
                         [f"{p}/qrows"]),
        helper.make_node("Pad", [f"{p}/k", pad_rows], [f"{p}/krows"]),
        helper.make_node("Pad", [f"{p}/v", pad_rows], [f"{p}/vrows"]),
    ]
    gqa_in = ins[:QUERY_SEQLENS + 1]
    gqa_in[:3] = [f"{p}/qrows", f"{p}/krows", f"{p}/vrows"]
    gqa_in[SEQLENS_K], gqa_in[TOTAL], gqa_in[COS], gqa_in[SIN] = seqlens, total, cos, sin
    gqa_in[POSITIONS], gqa_in[BIAS], gqa_in[QUERY_SEQLENS] = positions, bias, query_seqlens
    while gqa_in and not gqa_in[-1]:
        gqa_in.pop()
    nodes += [
        helper.make_node(GQA, gqa_in, [f"{p}/out", n.output[1], n.output[2]], domain=markers.MSFT,
                         **{**a, "num_heads": kv_heads}),
        # out rows [B, g, (kv, d)] -> [B, 1, (kv, g, d)], the head order the output projection reads
        helper.make_node("Reshape", [f"{p}/out", w.const("out_rows", np.array([0, g, kv_heads, d], np.int64))],
                         [f"{p}/o4"]),
        helper.make_node("Transpose", [f"{p}/o4"], [f"{p}/ot"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", [f"{p}/ot", w.const("out", np.array([0, 1, heads * d], np.int64))],
                         [n.output[0]]),
    ]
    return nodes


def _branch(nodes, outputs, constants, outer: set[str], prefix: str, name: str):
    """A subgraph of ``nodes`` whose own names are prefixed (a subgraph may not redefine a
    name of the outer scope, whose inputs and initializers it reads as they are)."""
    from onnx import NodeProto, helper

    rename = lambda x: x if not x or x in outer else prefix + x  # noqa: E731
    body = []
    for n in nodes:
        m = NodeProto()
        m.CopyFrom(n)
        m.input[:] = [rename(x) for x in n.input]
        m.output[:] = [rename(x) for x in n.output]
        body.append(m)
    for t in constants:
        t.name = rename(t.name)
    outs = [helper.make_tensor_value_info(rename(o.name), o.type.tensor_type.elem_type, None) for o in outputs]
    return helper.make_graph(body, name, [], outs, constants)


def add_decode_branch(proto, threshold: int = STACK_FROM) -> int:
    """Rewrite ``proto`` in place into ``If(one new token and at least ``threshold``
    positions, stacked decode, full)`` (module docstring); returns the cache slack the
    decode branch needs (G - 1), 0 when there is nothing to stack (no GroupQueryAttention,
    or one query head per KV head)."""
    from onnx import helper

    g = group_size(proto)
    if g == 1:
        return 0
    graph = proto.graph
    dims = {v.name: v.type.tensor_type.shape.dim for v in graph.input}
    w = _Writer()
    decode = []
    for n in graph.node:
        if n.op_type == GQA:
            decode += _stack(n, w, g, dims[n.input[PAST_K]][3].dim_value)
        else:
            decode.append(n)
    outer = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    decode = _topological(w.nodes + decode, outer | {t.name for t in w.constants})
    then_branch = _branch(decode, graph.output, w.constants, outer, "decode/", "decode")
    else_branch = _branch(list(graph.node), graph.output, [], outer, "full/", "full")
    one = "stacked_decode/one"
    graph.initializer.extend([helper.make_tensor(one, INT64, [1], [1]),
                              helper.make_tensor(THRESHOLD, INT64, [1], [threshold])])
    cond = [helper.make_node("Shape", ["input_ids"], ["stacked_decode/seq"], start=1, end=2),
            helper.make_node("Equal", ["stacked_decode/seq", one], ["stacked_decode/one_token"]),
            helper.make_node("Shape", ["attention_mask"], ["stacked_decode/width"], start=3, end=4),
            helper.make_node("GreaterOrEqual", ["stacked_decode/width", THRESHOLD], ["stacked_decode/long"]),
            helper.make_node("And", ["stacked_decode/one_token", "stacked_decode/long"], ["stacked_decode/both"]),
            helper.make_node("Squeeze", ["stacked_decode/both"], ["stacked_decode/cond"]),
            helper.make_node("If", ["stacked_decode/cond"], [o.name for o in graph.output],
                             then_branch=then_branch, else_branch=else_branch)]
    del graph.node[:]
    graph.node.extend(cond)
    del graph.value_info[:]  # intermediate shapes of the old single graph; onnxruntime infers its own
    return g - 1


def _topological(nodes, available: set[str]) -> list:
    """``nodes`` in an order where each comes after what it reads, otherwise as given (the
    layers' shared nodes read the rotary tables and the bias, which the exported graph
    computes ahead of the first layer)."""
    done, out, pending = set(available), [], list(nodes)
    while pending:
        rest = []
        for n in pending:
            if all(not x or x in done for x in n.input):
                out.append(n)
                done.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(pending):
            raise ValueError(f"the decode branch reads values nothing computes: {rest[0].input}")
        pending = rest
    return out


def set_threshold(proto, threshold: int) -> None:
    """Set the positions from which the decode branch runs (the export checks the branch
    at 1, then keeps :data:`STACK_FROM`)."""
    from onnx import helper

    (t,) = [t for t in proto.graph.initializer if t.name == THRESHOLD]
    t.CopyFrom(helper.make_tensor(THRESHOLD, INT64, [1], [threshold]))
