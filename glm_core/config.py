"""GLMConfig: one description for every published GLM generation.

The graph in :mod:`glm_runtime.core.model` reads only these fields; nothing in it branches on a
family name. Each switch corresponds to one architectural difference documented in the
GLM papers and code (see docs/architecture.md):

======================  ==========  ==========  ==============  =============
switch                  GLM-130B    ChatGLM-6B  ChatGLM2/3,      GLM-4-0414
                                                GLM-4-9B
======================  ==========  ==========  ==============  =============
norm                    layernorm   layernorm   rmsnorm         rmsnorm
residual                deepnorm    deepnorm    pre             pre
sandwich_norm           no          no          no              yes
qkv_layout              per_head    per_head    blocked         blocked
activation              geglu       gelu_tanh   swiglu          swiglu
rope                    neox        neox_2d     interleaved     interleaved
rope_dim                head_dim    head_dim    head_dim/2      head_dim/2
attention               prefix      prefix      causal          causal
======================  ==========  ==========  ==============  =============
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from .errors import GLMError

NORMS = ("layernorm", "rmsnorm")
RESIDUALS = ("pre", "deepnorm")
ACTIVATIONS = ("swiglu", "geglu", "gelu_tanh")
ROPES = ("neox", "neox_2d", "interleaved")
ATTENTIONS = ("causal", "prefix")
QKV_LAYOUTS = ("blocked", "per_head")
QUANT_BLOCKS = (32, 64, 128, 256)  # what the CPU int4 kernels (torch's and onnxruntime's) take


@dataclass
class GLMConfig:
    """Architecture and special tokens of one GLM model.

    ``head_dim`` is its own field: GLM-4 style models may have
    ``head_dim != hidden_size // num_heads`` (transformers' ``GlmConfig.head_dim``).
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_hidden_size: int
    max_position_embeddings: int = 2048
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    residual: str = "pre"
    # DeepNorm alpha = sqrt(2 * deepnorm_layers). None means num_layers. ChatGLM-6B's
    # original code always uses 28 whatever the config says (its GLMBlock never receives
    # config.num_layers); the ChatGLM-6B converter sets 28 here to reproduce that.
    deepnorm_layers: int | None = None
    sandwich_norm: bool = False
    qkv_layout: str = "blocked"
    qkv_bias: bool = True
    dense_bias: bool = False
    mlp_bias: bool = False
    activation: str = "swiglu"
    rope: str = "interleaved"
    rope_dim: int | None = None  # width of the rotated part of each head; None = head_dim // 2
    rope_base: float = 10000.0
    # Round rotary frequencies to fp16 as GLM-130B's SAT 0.2.x and the HF ChatGLM-6B code
    # do (and compute the angles in fp16 when the model runs in fp16, as they do); needed
    # for faithful comparison with those runs (fp32 runs included: the rounded frequencies
    # change the angles by up to ~1e-3 rad at position 256).
    rope_fp16: bool = False
    attention: str = "causal"
    # Query-key layer scaling (divide q by layer number, multiply back in fp32 before the
    # softmax). Exact in fp32; fp16 kernels use it to avoid overflow in deep layers.
    query_key_layer_scaling: bool = False
    # Fill value for masked scores. GLM-130B/ChatGLM-6B use -10000 (a fully masked row is
    # uniform, not NaN); None means the most negative finite value of the compute dtype.
    mask_value: float | None = None
    tie_word_embeddings: bool = False
    torch_dtype: str = "float32"
    # Weight-only quantization of the per-layer linears (None, 8 or 4); see glm_runtime.core.quant.
    quantization_bits: int | None = None
    # None: one scale per output row (GLM-130B, ChatGLM); INT4 may use one per block of
    # this many input columns (32, 64, 128 or 256) instead.
    quantization_block: int | None = None
    # Weight-only quantization of the output projection (None or 8). A quantized head is
    # its own matrix: a tied model's head becomes an INT8 copy of the embedding.
    lm_head_bits: int | None = None
    # special tokens
    pad_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    mask_token_id: int | None = None
    gmask_token_id: int | None = None
    smask_token_id: int | None = None
    sop_token_id: int | None = None
    eop_token_id: int | None = None

    def __post_init__(self):
        if self.rope_dim is None:
            self.rope_dim = self.head_dim // 2
        if isinstance(self.eos_token_ids, int):
            self.eos_token_ids = [self.eos_token_ids]
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        def bad(msg):
            raise GLMError(f"invalid GLM config: {msg}")

        for name, allowed in (("norm", NORMS), ("residual", RESIDUALS), ("activation", ACTIVATIONS),
                              ("rope", ROPES), ("attention", ATTENTIONS), ("qkv_layout", QKV_LAYOUTS)):
            if getattr(self, name) not in allowed:
                bad(f"{name}={getattr(self, name)!r}, expected one of {', '.join(allowed)}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim", "ffn_hidden_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                bad(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads:
            bad(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        if self.qkv_layout == "per_head" and self.num_kv_heads != self.num_heads:
            bad("the per-head interleaved QKV layout needs num_kv_heads == num_heads")
        if self.rope == "neox_2d":
            if self.rope_dim != self.head_dim:
                bad("2D RoPE rotates the whole head (rope_dim must equal head_dim)")
            if self.head_dim % 4:
                bad("2D RoPE needs head_dim divisible by 4")
        if self.quantization_bits not in (None, 4, 8):
            bad(f"quantization_bits={self.quantization_bits!r}, expected 4, 8 or none")
        if self.quantization_block is not None:
            if self.quantization_bits != 4 or self.quantization_block not in QUANT_BLOCKS:
                bad(f"quantization_block={self.quantization_block!r}: block-wise scales are for INT4, with blocks of "
                    f"{', '.join(map(str, QUANT_BLOCKS))}")
            for name in ("hidden_size", "ffn_hidden_size"):
                if getattr(self, name) % self.quantization_block:
                    bad(f"{name}={getattr(self, name)} is not a multiple of quantization_block="
                        f"{self.quantization_block}")
            if self.q_size % self.quantization_block:
                bad(f"num_heads x head_dim = {self.q_size} is not a multiple of quantization_block="
                    f"{self.quantization_block}")
        if self.lm_head_bits not in (None, 8):
            bad(f"lm_head_bits={self.lm_head_bits!r}, expected 8 or none")
        if self.lm_head_bits and self.tie_word_embeddings:
            bad("a quantized output projection is its own matrix: tie_word_embeddings must be false")
        if self.rope_dim % 2 or not 0 < self.rope_dim <= self.head_dim:
            bad(f"rope_dim={self.rope_dim} must be even and within head_dim={self.head_dim}")
        for t in self.eos_token_ids + [self.pad_token_id]:
            if t is not None and not 0 <= t < self.vocab_size:
                bad(f"special token id {t} is outside the vocabulary (size {self.vocab_size})")

    # ---------------------------------------------------------------- derived
    @property
    def deepnorm_alpha(self) -> float:
        layers = self.deepnorm_layers or self.num_layers
        return math.sqrt(2.0 * layers) if self.residual == "deepnorm" else 1.0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    def num_parameters(self) -> int:
        h, f = self.hidden_size, self.ffn_hidden_size
        qkv = h * (self.q_size + 2 * self.kv_size) + (self.q_size + 2 * self.kv_size) * self.qkv_bias
        dense = self.q_size * h + h * self.dense_bias
        fc1 = h * f * (2 if self.gated else 1) + f * (2 if self.gated else 1) * self.mlp_bias
        fc2 = f * h + h * self.mlp_bias
        norms = (4 if self.sandwich_norm else 2) * h * (2 if self.norm == "layernorm" else 1)
        layer = qkv + dense + fc1 + fc2 + norms
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + h * (2 if self.norm == "layernorm" else 1)

    # ------------------------------------------------------------ (de)serial
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str | None = None) -> "GLMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise GLMError(f"unknown config field(s): {', '.join(unknown)}", source)
        try:
            return cls(**d)
        except TypeError as e:  # missing required fields
            raise GLMError(f"incomplete config: {e}", source) from None

    def save(self, path: str | os.PathLike) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GLMConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except FileNotFoundError:
            raise GLMError("config file not found", path) from None
        except json.JSONDecodeError as e:
            raise GLMError(f"config is not valid JSON ({e})", path) from None
        return cls.from_dict(d, source=os.fspath(path))

    def replace(self, **changes) -> "GLMConfig":
        return dataclasses.replace(self, **changes)
