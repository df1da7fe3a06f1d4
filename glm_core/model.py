"""The one GLM graph.

Every published GLM generation is this module with different :class:`GLMConfig`
switches. It holds parameters and the order of computation only: each computation a
backend may want to do its own way is a call into the op table (``self.ops``), so there
is no device or vendor code here.

Parameter names are the native checkpoint's keys::

    embed.weight
    layers.{i}.input_norm.{weight,bias}       norm before attention
    layers.{i}.attn.qkv.{weight,bias}         fused QKV, layout per config.qkv_layout
    layers.{i}.attn.dense.{weight,bias}
    layers.{i}.post_attn_norm.weight          sandwich norm (GLM-4-0414)
    layers.{i}.mlp_norm.{weight,bias}         norm before the MLP
    layers.{i}.mlp.fc1.{weight,bias}          [2F, H] when gated
    layers.{i}.mlp.fc2.{weight,bias}
    layers.{i}.post_mlp_norm.weight           sandwich norm (GLM-4-0414)
    final_norm.{weight,bias}
    lm_head.weight                            absent when tied to embed.weight
    lm_head.{qweight,scale}                   instead of lm_head.weight when lm_head_bits is set

A quantized linear stores ``qweight`` (int8) and ``scale`` instead of ``weight``.

The forward pass is written once, here: a pipeline stage (:mod:`glm_runtime.parallel`) is
this module with the other stages' layers removed and, where the stage does not hold
them, no embedding (it takes hidden states in) or no final norm and head (it gives hidden
states out); the ONNX export traces this forward with a cache that concatenates.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import GLMConfig
from .kv_cache import KVCache
from .ops.table import OpTable
from .quant import keeps_stored_dtype


class Linear(nn.Module):
    def __init__(self, ops: OpTable, n_in: int, n_out: int, bias: bool, **factory):
        super().__init__()
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(n_out, n_in, **factory))
        self.bias = nn.Parameter(torch.empty(n_out, **factory)) if bias else None

    def forward(self, x):
        return self.ops.linear(x, self.weight, self.bias)


class QuantizedLinear(nn.Module):
    """Weight-only INT8/INT4 linear; ``qweight``/``scale`` as in :mod:`glm_runtime.core.quant`
    (``block``: scales per block of that many input columns, else per output row)."""

    def __init__(self, ops: OpTable, n_in: int, n_out: int, bias: bool, bits: int, block: int | None = None,
                 dtype=None, device=None):
        super().__init__()
        self.ops, self.bits = ops, bits
        cols = n_in if bits == 8 else n_in // 2
        self.register_buffer("qweight", torch.empty(n_out, cols, dtype=torch.int8, device=device))
        scale_shape = (n_out, n_in // block) if block else (n_out,)
        self.register_buffer("scale", torch.empty(scale_shape, dtype=torch.float16, device=device))
        self.bias = nn.Parameter(torch.empty(n_out, dtype=dtype, device=device)) if bias else None

    def forward(self, x):
        return self.ops.quantized_linear(x, self.qweight, self.scale, self.bias, self.bits)


class Norm(nn.Module):
    def __init__(self, ops: OpTable, config: GLMConfig, **factory):
        super().__init__()
        self.ops, self.eps, self.kind = ops, config.norm_eps, config.norm
        h = config.hidden_size
        self.weight = nn.Parameter(torch.ones(h, **factory))
        self.bias = nn.Parameter(torch.zeros(h, **factory)) if self.kind == "layernorm" else None

    def forward(self, x):
        if self.kind == "rmsnorm":
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.layer_norm(x, self.weight, self.bias, self.eps)


def _linear(ops, config: GLMConfig, n_in, n_out, bias, **factory):
    """A layer's linear: quantized as the config says (:data:`~glm_runtime.core.quant.LINEARS`)."""
    if config.quantization_bits:
        return QuantizedLinear(ops, n_in, n_out, bias, config.quantization_bits, config.quantization_block, **factory)
    return Linear(ops, n_in, n_out, bias, **factory)


class Attention(nn.Module):
    def __init__(self, ops: OpTable, config: GLMConfig, layer: int, **factory):
        super().__init__()
        c = config
        self.ops, self.config, self.layer = ops, c, layer
        self.qkv = _linear(ops, c, c.hidden_size, c.q_size + 2 * c.kv_size, c.qkv_bias, **factory)
        self.dense = _linear(ops, c, c.q_size, c.hidden_size, c.dense_bias, **factory)
        self.scale = 1.0 / math.sqrt(c.head_dim)
        self.layer_scale = float(layer + 1) if c.query_key_layer_scaling else 1.0

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start, kv_len: int):
        c = self.config
        B, T, _ = x.shape
        qkv = self.qkv(x)
        nh, g, d = c.num_heads, c.num_kv_heads, c.head_dim
        if c.qkv_layout == "per_head":  # [q_h; k_h; v_h] rows per head (GLM-130B, ChatGLM-6B)
            q, k, v = qkv.view(B, T, nh, 3, d).transpose(1, 2).unbind(3)
            q = self.ops.rotary(q, cos, sin, c.rope)
            k = self.ops.rotary(k, cos, sin, c.rope)
        else:  # blocked [Q | K | V] (ChatGLM2+, GLM-4): the q and k heads are rotated in one call
            heads = qkv.view(B, T, nh + 2 * g, d).transpose(1, 2)
            qk = self.ops.rotary(heads[:, :nh + g], cos, sin, c.rope)
            q, k, v = qk[:, :nh], qk[:, nh:], heads[:, nh + g:]
        if cache is not None:
            k, v = cache.update(self.layer, k, v, start, kv_len)
        o = self.ops.attention(q, k, v, mask, self.scale, c.mask_value, self.layer_scale)
        o = o.transpose(1, 2).reshape(B, T, c.q_size)
        return self.dense(o)


class MLP(nn.Module):
    def __init__(self, ops: OpTable, config: GLMConfig, **factory):
        super().__init__()
        c = config
        self.ops, self.activation = ops, c.activation
        width = c.ffn_hidden_size * (2 if c.gated else 1)
        self.fc1 = _linear(ops, c, c.hidden_size, width, c.mlp_bias, **factory)
        self.fc2 = _linear(ops, c, c.ffn_hidden_size, c.hidden_size, c.mlp_bias, **factory)

    def forward(self, x):
        u = self.fc1(x)
        z = self.ops.gelu_tanh(u) if self.activation == "gelu_tanh" else self.ops.glu(u, self.activation)
        return self.fc2(z)


class Block(nn.Module):
    """One transformer layer: pre-norm (ChatGLM2+), sandwich (GLM-4-0414) or DeepNorm
    post-LN (GLM-130B, ChatGLM-6B: the residual is the *normalised* input times alpha)."""

    def __init__(self, ops: OpTable, config: GLMConfig, layer: int, **factory):
        super().__init__()
        c = config
        self.deepnorm = c.residual == "deepnorm"
        self.alpha = c.deepnorm_alpha
        self.input_norm = Norm(ops, c, **factory)
        self.attn = Attention(ops, c, layer, **factory)
        self.mlp_norm = Norm(ops, c, **factory)
        self.mlp = MLP(ops, c, **factory)
        self.sandwich = c.sandwich_norm
        if self.sandwich:
            self.post_attn_norm = Norm(ops, c, **factory)
            self.post_mlp_norm = Norm(ops, c, **factory)

    def forward(self, x, cos, sin, mask, cache, start, kv_len):
        if self.deepnorm:
            a = self.input_norm(x)
            h = a * self.alpha + self.attn(a, cos, sin, mask, cache, start, kv_len)
            m = self.mlp_norm(h)
            return m * self.alpha + self.mlp(m)
        a = self.attn(self.input_norm(x), cos, sin, mask, cache, start, kv_len)
        if self.sandwich:
            a = self.post_attn_norm(a)
        h = x + a
        m = self.mlp(self.mlp_norm(h))
        if self.sandwich:
            m = self.post_mlp_norm(m)
        return h + m


class Layers(nn.ModuleDict):
    """The blocks a model holds, keyed by their global layer id (``layers[3]`` or
    ``layers["3"]``; the keys are the checkpoint's ``layers.{i}``), so a pipeline stage holds
    some of them under their own ids."""

    def __getitem__(self, i):
        return super().__getitem__(str(i))

    def __setitem__(self, i, block):
        super().__setitem__(str(i), block)

    def __delitem__(self, i):
        super().__delitem__(str(i))

    def __contains__(self, i):
        return super().__contains__(str(i))


class Embedding(nn.Module):
    """Token ids -> rows of ``weight`` [V, H] (``embed.weight``)."""

    def __init__(self, ops: OpTable, vocab: int, hidden: int, **factory):
        super().__init__()
        self.ops = ops
        self.weight = nn.Parameter(torch.empty(vocab, hidden, **factory))

    def forward(self, ids):
        return self.ops.embedding(ids, self.weight)


class Head(nn.Module):
    """Hidden states -> logits over the vocabulary, ``x @ W^T``.

    An untied model's head owns ``weight`` (``lm_head.weight``). A tied model's head reads
    the embedding's matrix through ``tied``, a reference kept out of the module tree on
    purpose: the one matrix then has one name in the state dict and one entry in
    ``parameters()`` (so an optimiser updates it once), and it stays the embedding's
    current parameter after a state dict is assigned into the model. (A quantized head,
    ``lm_head_bits``, is a :class:`QuantizedLinear` of its own.)
    """

    def __init__(self, ops: OpTable, weight: nn.Parameter | None = None, tied: Embedding | None = None):
        super().__init__()
        if (weight is None) == (tied is None):
            raise ValueError("a head has its own weight or is tied to an embedding, not both or neither")
        self.ops = ops
        self.weight = weight
        self.__dict__["tied"] = tied  # not a submodule: see the class docstring

    @property
    def matrix(self) -> torch.Tensor:
        return self.tied.weight if self.tied is not None else self.weight

    def forward(self, x):
        return self.ops.lm_head(x, self.matrix)


class Rotary(nn.Module):
    """Angles per token for the config's RoPE variant: [B, T, pairs] cos and sin."""

    def __init__(self, config: GLMConfig, device=None):
        super().__init__()
        c = config
        self.two_d = c.rope == "neox_2d"
        width = c.rope_dim // 2 if self.two_d else c.rope_dim  # rotated width per position index
        inv = 1.0 / (c.rope_base ** (torch.arange(0, width, 2, dtype=torch.float32, device=device) / width))
        self.fp16 = c.rope_fp16
        if self.fp16:  # SAT 0.2.x / HF ChatGLM-6B round the frequencies to fp16 at construction
            inv = inv.half().float()
        self.register_buffer("inv_freq", inv, persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids: [B, T] (1D) or [B, 2, T] (2D: position, block position)."""
        if self.two_d:
            ang = torch.cat((self._angles(position_ids[:, 0], dtype), self._angles(position_ids[:, 1], dtype)), -1)
        else:
            ang = self._angles(position_ids, dtype)
        return ang.cos().to(dtype), ang.sin().to(dtype)

    def _angles(self, pos, dtype):
        # The original code computes the angles in its frequency buffer's dtype, which
        # follows the model's: fp16 on a half model, fp32 after ``.float()`` (still from
        # the fp16-rounded frequencies). Reproduce both.
        if self.fp16 and dtype == torch.float16:
            return (pos.half().unsqueeze(-1) * self.inv_freq.half()).float()
        return pos.float().unsqueeze(-1) * self.inv_freq


class GLMModel(nn.Module):
    """The GLM graph: ``embed`` -> ``layers`` -> ``final_norm`` -> ``lm_head``.

    ``layers`` is keyed by the global layer id (``"0"``, ``"1"`` ...: the checkpoint keys), so
    a model may hold a subset of them. ``embed`` is None on a pipeline stage that receives
    hidden states; ``final_norm`` and ``lm_head`` are None on one that passes them on.
    """

    def __init__(self, config: GLMConfig, ops: OpTable, device=None, dtype=torch.float32):
        super().__init__()
        self.config, self.ops = config, ops
        factory = dict(device=device, dtype=dtype)
        c = config
        self.embed: Embedding | None = Embedding(ops, c.vocab_size, c.hidden_size, **factory)
        self.layers = Layers({str(i): Block(ops, c, i, **factory) for i in range(c.num_layers)})
        self.final_norm: Norm | None = Norm(ops, c, **factory)
        self.lm_head: nn.Module | None
        if c.lm_head_bits:
            self.lm_head = QuantizedLinear(ops, c.hidden_size, c.vocab_size, False, c.lm_head_bits, **factory)
        elif c.tie_word_embeddings:
            self.lm_head = Head(ops, tied=self.embed)
        else:
            self.lm_head = Head(ops, weight=nn.Parameter(torch.empty(c.vocab_size, c.hidden_size, **factory)))
        self.rotary = Rotary(c, device=device)

    @property
    def dtype(self) -> torch.dtype:
        """What activations and the KV cache are computed in (the float weights' dtype)."""
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def layer_ids(self) -> list[int]:
        return [int(k) for k in self.layers]

    def new_cache(self, rows: int, max_len: int) -> KVCache:
        """An empty KV cache of the layers this model holds, for ``rows`` sequences of up to
        ``max_len`` positions (KV heads as the attention modules hold them: a
        tensor-parallel rank has its share)."""
        heads = next(iter(self.layers.values())).attn.config.num_kv_heads if len(self.layers) else 0
        return KVCache(self.layer_ids, rows, heads, max_len, self.config.head_dim, self.dtype, self.device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None, start: int | torch.Tensor = 0,
                logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, T, V], or [B, len(logits_index), V] for the positions ``logits_index``.

        x: token ids [B, T], or hidden states [B, T, H] for a model without ``embed``; a
        model without ``lm_head`` returns hidden states [B, T, H].
        mask: bool [B, 1, T, Tk], True = may attend; None = attend to everything (then Tk
        = start + T). With a cache, the new keys and values are written at positions
        start..start+T (``start`` an int), or each row's one new token at its own position
        (``start`` a LongTensor [B]); attention reads the first Tk cached positions.
        """
        kv_len = mask.shape[-1] if mask is not None else start + x.shape[1]
        if self.embed is not None:
            x = self.embed(x)
        cos, sin = self.rotary(position_ids, x.dtype)
        for layer in self.layers.values():
            x = layer(x, cos, sin, mask, cache, start, kv_len)
        if self.lm_head is None:
            return x
        if logits_index is not None:  # project only the positions asked for (T x H x V otherwise)
            x = x.index_select(1, logits_index)
        return self.lm_head(self.final_norm(x))


def parameter_shapes(config: GLMConfig) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """Every checkpoint key of ``config`` with its shape, and its dtype where that is fixed
    (:func:`~glm_runtime.core.quant.keeps_stored_dtype`): what a checkpoint must hold to
    match a config."""
    with torch.device("meta"):
        m = GLMModel(config, OpTable("reference", {}, torch.float32, strict=False))
    return {k: (tuple(v.shape), v.dtype if keeps_stored_dtype(k, v) else None) for k, v in m.state_dict().items()}
