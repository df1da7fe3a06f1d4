"""The op table the ONNX export traces the model with: one ONNX operator per op.

Traced as written, the op contract's reference ops lower to many small ONNX nodes (the
rotary reference alone to about twenty: slices, multiplies, concatenations), and a decode
step of a small model then spends most of its time in onnxruntime's per-node overhead
(measured: ~960 nodes per step of a 12-layer model, 11 ms of which the weights take 4).
So each op that ONNX has as one operator is traced as a marker op (a ``torch.library``
custom op whose eager implementation is the reference itself, so the traced model still
computes the reference in PyTorch) and written as that operator:

==================  ===================================================================
op                  ONNX operator
==================  ===================================================================
rms_norm            ``RMSNormalization`` (opset 23)
layer_norm          ``LayerNormalization`` (opset 17)
rotary              ``RotaryEmbedding`` (opset 23; ChatGLM-6B's 2D layout as two of them
                    on the two halves of each head)
attention           ``Attention`` (opset 23; grouped KV heads, boolean mask)
gelu_tanh           ``Gelu(approximate="tanh")`` (opset 20)
glu                 ``Split`` + ``Sigmoid``/``Gelu`` + ``Mul``
quantized_linear    ``com.microsoft.MatMulNBits`` (a marker node, lowered by :mod:`.lowbit`)
cached_attention    ``com.microsoft.GroupQueryAttention`` (rotary, attention and the KV
                    cache append; the causal families' export, :mod:`.cached_attention`)
==================  ===================================================================

Below opset 23 only the quantized linear is a marker and the rest is traced from the
reference (a slower graph for runtimes without those operators). Each operator was
checked against the reference op on onnxruntime's CPU provider (tests/test_onnx.py: every
family's exported logits within 1e-4 of PyTorch's). The reference's ``mask_value`` and
query-key layer scaling change nothing in fp32 (every query row attends at least to
itself), which is what the export computes in.
"""
from __future__ import annotations

import torch

from glm_runtime.core.ops import Kernel, OpTable, reference

from . import lowbit, markers

FUSED_OPSET = 23  # RMSNormalization, RotaryEmbedding and Attention


# ----------------------------------------------------------------- marker ops (eager = reference)
@torch.library.custom_op("glm::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return reference.rms_norm(x, weight, eps)


@torch.library.custom_op("glm::layer_norm", mutates_args=())
def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    return reference.layer_norm(x, weight, bias, eps)


@torch.library.custom_op("glm::rotary", mutates_args=())
def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: str) -> torch.Tensor:
    return reference.rotary(x, cos, sin, layout)


@torch.library.custom_op("glm::attention", mutates_args=())
def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float,
              mask_value: float | None, layer_scale: float) -> torch.Tensor:
    return reference.attention(q, k, v, mask, scale, mask_value, layer_scale)


@torch.library.custom_op("glm::glu", mutates_args=())
def glu(u: torch.Tensor, activation: str) -> torch.Tensor:
    return reference.glu(u, activation)


@torch.library.custom_op("glm::gelu_tanh", mutates_args=())
def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return reference.gelu_tanh(x)


@torch.library.custom_op("glm::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                     bits: int) -> torch.Tensor:
    return reference.quantized_linear(x, qweight, scale, bias, bits)


@torch.library.custom_op("glm::cached_attention", mutates_args=())
def cached_attention(qkv: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, cos_table: torch.Tensor,
                     sin_table: torch.Tensor, position_ids: torch.Tensor, bias: torch.Tensor, seqlens_k: torch.Tensor,
                     total: torch.Tensor, query_lens: torch.Tensor, heads: int, kv_heads: int, scale: float,
                     layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """onnxruntime's ``GroupQueryAttention`` as the export uses it (:mod:`.cached_attention`).

    ``qkv`` [B, S, (heads + 2 kv_heads) d] packed per token ([Q | K | V] heads); q and k
    rotated (``layout``: interleaved or neox) by the angles of their ``position_ids``
    [B, S], rows of ``cos_table`` / ``sin_table`` [positions, pairs]; k and v appended to
    the past [B, kv_heads, P, d]; causal attention (query s at position P + s) plus the
    additive ``bias`` [B, 1, S, P + S], softmax in fp32. Returns the output [B, S, heads * d]
    and the presents. (``seqlens_k``, ``total`` and ``query_lens`` are the operator's
    bookkeeping: P + S - 1 per row, P + S, and S per row.)"""
    B, S, _ = qkv.shape
    d = past_k.shape[-1]
    x = qkv.view(B, S, heads + 2 * kv_heads, d).transpose(1, 2)
    qk = reference.rotary(x[:, :heads + kv_heads], cos_table[position_ids], sin_table[position_ids], layout)
    q, k, v = qk[:, :heads], qk[:, heads:], x[:, heads + kv_heads:]
    K, V = torch.cat((past_k, k), 2), torch.cat((past_v, v), 2)
    total_len = K.shape[2]
    causal = torch.arange(total_len)[None, :] <= torch.arange(total_len - S, total_len)[:, None]
    o = reference.attention(q, K, V, causal & (bias == 0), scale)  # the export's bias: 0 or the most negative
    return o.transpose(1, 2).reshape(B, S, heads * d), K, V


for _op in (rms_norm, layer_norm, rotary, gelu_tanh):
    _op.register_fake(lambda x, *args: torch.empty_like(x))
attention.register_fake(lambda q, k, v, *args: torch.empty_like(q))
glu.register_fake(lambda u, activation: u.new_empty(*u.shape[:-1], u.shape[-1] // 2))


@cached_attention.register_fake
def _(qkv, past_k, past_v, cos_table, sin_table, position_ids, bias, seqlens_k, total, query_lens, heads: int, *args):
    (B, g, P, d), S = past_k.shape, qkv.shape[1]
    return qkv.new_empty(B, S, heads * d), past_k.new_empty(B, g, P + S, d), past_v.new_empty(B, g, P + S, d)


quantized_linear.register_fake(lambda x, qweight, *args: x.new_empty(*x.shape[:-1], qweight.shape[0]))


def op_table(opset: int, quantized: bool) -> OpTable:
    """The ops to build the exported model with: markers for what ``opset`` has as one
    operator (and for the quantized linear, at any opset), the reference for the rest."""
    fp32 = frozenset({torch.float32})
    ops = {"quantized_linear": torch.ops.glm.quantized_linear}
    if opset >= FUSED_OPSET:
        ops.update(rms_norm=torch.ops.glm.rms_norm, layer_norm=torch.ops.glm.layer_norm,
                   rotary=torch.ops.glm.rotary, attention=torch.ops.glm.attention, glu=torch.ops.glm.glu,
                   gelu_tanh=torch.ops.glm.gelu_tanh)
    kernels = {name: Kernel(fn, fp32, "one ONNX operator") for name, fn in ops.items()}
    return OpTable("onnx-export", kernels, torch.float32, strict=False,
                   required=("quantized_linear",) if quantized else ())  # the rest is the reference on purpose


# ----------------------------------------------------------------- translations (onnxscript)
def translation_table(opset: int) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export``: each marker -> its operator."""
    import onnxscript  # the exporter's own dependency, imported where used

    op = onnxscript.values.Opset("", opset)
    qnode = lowbit.marker_node()

    def t_quantized_linear(x, qweight, scale, bias, bits: int):
        return qnode(x, qweight, scale, bias, bits=bits) if bias is not None else qnode(x, qweight, scale, bits=bits)

    table = {torch.ops.glm.quantized_linear.default: t_quantized_linear}
    if opset < FUSED_OPSET:
        return table

    def t_rms_norm(x, weight, eps: float):
        return op.RMSNormalization(x, weight, axis=-1, epsilon=eps)

    def t_layer_norm(x, weight, bias, eps: float):
        args = (x, weight) if bias is None else (x, weight, bias)
        return _first(op.LayerNormalization(*args, axis=-1, epsilon=eps))

    def t_rotary(x, cos, sin, layout: str):
        n = _last_dim(cos)
        if layout != "neox_2d":
            return op.RotaryEmbedding(x, cos, sin, interleaved=int(layout == "interleaved"), rotary_embedding_dim=2 * n)
        # two blocks of width n, each rotate-half inside itself with half of the angles
        h = n // 2
        halves = op.Split(x, num_outputs=2, axis=-1)
        c0, c1 = op.Split(cos, num_outputs=2, axis=-1)
        s0, s1 = op.Split(sin, num_outputs=2, axis=-1)
        return op.Concat(op.RotaryEmbedding(halves[0], c0, s0, interleaved=0, rotary_embedding_dim=2 * h),
                         op.RotaryEmbedding(halves[1], c1, s1, interleaved=0, rotary_embedding_dim=2 * h), axis=-1)

    gqa = group_query_attention()

    def t_cached_attention(qkv, past_k, past_v, cos_table, sin_table, position_ids, bias, seqlens_k, total,
                           query_lens, heads: int, kv_heads: int, scale: float, layout: str):
        return gqa(qkv, None, None, past_k, past_v, seqlens_k, total, cos_table, sin_table, position_ids, bias,
                   None, None, None, None, None, query_lens, num_heads=heads, kv_num_heads=kv_heads, scale=scale,
                   causal=1, do_rotary=1, rotary_interleaved=int(layout == "interleaved"))

    def t_attention(q, k, v, mask, scale: float, mask_value=None, layer_scale: float = 1.0):
        args = (q, k, v) if mask is None else (q, k, v, mask)
        return _first(op.Attention(*args, scale=scale))

    def t_glu(u, activation: str):
        a, b = op.Split(u, num_outputs=2, axis=-1)
        if activation == "swiglu":
            return op.Mul(op.Mul(a, op.Sigmoid(a)), b)
        return op.Mul(a, op.Gelu(b))

    def t_gelu_tanh(x):
        return op.Gelu(x, approximate="tanh")

    table.update({torch.ops.glm.rms_norm.default: t_rms_norm, torch.ops.glm.layer_norm.default: t_layer_norm,
                  torch.ops.glm.rotary.default: t_rotary, torch.ops.glm.attention.default: t_attention,
                  torch.ops.glm.glu.default: t_glu, torch.ops.glm.gelu_tanh.default: t_gelu_tanh,
                  torch.ops.glm.cached_attention.default: t_cached_attention})
    return table


GQA_INPUTS = ("query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache",
              "sin_cache", "position_ids", "attention_bias", "head_sink", "k_scale", "v_scale", "q_norm_weight",
              "k_norm_weight", "query_seqlens")


def group_query_attention():
    """onnxscript's writer of ``com.microsoft.GroupQueryAttention`` (onnxruntime's contrib
    operator; its inputs in onnxruntime's order, the integer ones int32, position_ids int64)."""
    types = {"seqlens_k": "M", "total_sequence_length": "M", "query_seqlens": "M", "position_ids": "P"}
    return markers.op(markers.MSFT, "GroupQueryAttention",
                      inputs=[(n, types.get(n, "T"), n not in ("query", "seqlens_k", "total_sequence_length"))
                              for n in GQA_INPUTS],
                      outputs=[("output", "T"), ("present_key", "T"), ("present_value", "T")],
                      types={"T": ["tensor(float)"], "M": ["tensor(int32)"], "P": ["tensor(int64)"]},
                      attributes={"num_heads": "INT", "kv_num_heads": "INT", "scale": "FLOAT", "causal": "INT",
                                  "do_rotary": "INT", "rotary_interleaved": "INT"})


def _first(outputs):
    """The result of an operator whose other (optional) outputs are statistics or caches."""
    return outputs[0] if isinstance(outputs, tuple) else outputs


def _last_dim(t) -> int:
    """The static size of the last dimension of a symbolic tensor (cos/sin: one per pair)."""
    return int(t.shape[-1])
