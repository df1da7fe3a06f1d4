"""Published GLM sizes and tiny test models.

The published numbers are those of the authors' configs (GLM-130B's SAT arguments,
the THUDM config.json files, transformers' GlmConfig/Glm4Config defaults). The tiny
presets keep every architectural flag of their family, the real special-token ids
where the vocabulary allows it, and ``head_dim != hidden_size // num_heads``.
"""
from __future__ import annotations

from .config import GLMConfig
from .errors import GLMError

# Family templates: everything but the sizes.
_GLM130B_STYLE = dict(
    norm="layernorm", norm_eps=1e-5, residual="deepnorm", qkv_layout="per_head",
    qkv_bias=True, dense_bias=True, mlp_bias=True, rope_base=10000.0,
    attention="prefix", query_key_layer_scaling=True, mask_value=-10000.0,
    tie_word_embeddings=True,
)
_CHATGLM2_STYLE = dict(
    norm="rmsnorm", residual="pre", qkv_layout="blocked", qkv_bias=True, dense_bias=False,
    mlp_bias=False, activation="swiglu", rope="interleaved", attention="causal",
    query_key_layer_scaling=True, tie_word_embeddings=False,
)

_GLM130B_TOKENS = dict(mask_token_id=150000, gmask_token_id=150001, smask_token_id=150002,
                       sop_token_id=150004, eop_token_id=150005, eos_token_ids=[150005, 20002],
                       pad_token_id=0)
_CHATGLM6B_TOKENS = dict(mask_token_id=130000, gmask_token_id=130001, smask_token_id=130002,
                         sop_token_id=130004, eop_token_id=130005, eos_token_ids=[130005],
                         pad_token_id=3)
_CHATGLM2_TOKENS = dict(mask_token_id=64789, gmask_token_id=64790, smask_token_id=64791,
                        sop_token_id=64792, eop_token_id=64793, eos_token_ids=[2], pad_token_id=0)
_CHATGLM3_TOKENS = dict(_CHATGLM2_TOKENS, eos_token_ids=[2, 64795, 64797])
_GLM4_TOKENS = dict(mask_token_id=151330, gmask_token_id=151331, smask_token_id=151332,
                    sop_token_id=151333, eop_token_id=151334,
                    eos_token_ids=[151329, 151336, 151338], pad_token_id=151329)


def _glm130b(**sizes):
    return dict(_GLM130B_STYLE, family="glm-130b", activation="geglu", rope="neox", **_GLM130B_TOKENS,
                **sizes)


def _chatglm6b(**sizes):
    # rope_fp16: the HF ChatGLM-6B code rounds the rotary frequencies to fp16 (glm-spec §3.2)
    return dict(_GLM130B_STYLE, family="chatglm-6b", activation="gelu_tanh", rope="neox_2d", rope_fp16=True,
                tie_word_embeddings=False, **_CHATGLM6B_TOKENS, **sizes)


def _chatglm2(family="chatglm2-6b", tokens=_CHATGLM2_TOKENS, **sizes):
    return dict(_CHATGLM2_STYLE, family=family, **tokens, **sizes)


def _glm4(family="glm-4-9b", **sizes):
    return dict(_CHATGLM2_STYLE, family=family, **_GLM4_TOKENS, **sizes)


PRESETS: dict[str, dict] = {
    "glm-130b": _glm130b(vocab_size=150528, hidden_size=12288, num_layers=70, num_heads=96,
                         num_kv_heads=96, head_dim=128, ffn_hidden_size=32768, rope_dim=128,
                         max_position_embeddings=2048, torch_dtype="float16"),
    "chatglm-6b": _chatglm6b(vocab_size=130528, hidden_size=4096, num_layers=28, num_heads=32,
                             num_kv_heads=32, head_dim=128, ffn_hidden_size=16384, rope_dim=128,
                             deepnorm_layers=28, max_position_embeddings=2048, torch_dtype="float16"),
    "chatglm2-6b": _chatglm2(vocab_size=65024, hidden_size=4096, num_layers=28, num_heads=32,
                             num_kv_heads=2, head_dim=128, ffn_hidden_size=13696, norm_eps=1e-5,
                             max_position_embeddings=32768, torch_dtype="float16"),
    "chatglm3-6b": _chatglm2(family="chatglm3-6b", tokens=_CHATGLM3_TOKENS, vocab_size=65024,
                             hidden_size=4096, num_layers=28, num_heads=32, num_kv_heads=2,
                             head_dim=128, ffn_hidden_size=13696, norm_eps=1e-5,
                             max_position_embeddings=32768, torch_dtype="float16"),
    "glm-4-9b": _glm4(vocab_size=151552, hidden_size=4096, num_layers=40, num_heads=32,
                      num_kv_heads=2, head_dim=128, ffn_hidden_size=13696, norm_eps=1.5625e-07,
                      rope_base=10000.0 * 500, max_position_embeddings=131072,
                      torch_dtype="bfloat16"),
    "glm-4-9b-0414": _glm4(family="glm-4-0414", sandwich_norm=True, vocab_size=151552,
                           hidden_size=4096, num_layers=40, num_heads=32, num_kv_heads=2,
                           head_dim=128, ffn_hidden_size=13696, norm_eps=1e-05,
                           max_position_embeddings=32768, torch_dtype="bfloat16"),
    # ---- tiny models for tests: real vocabularies are kept where the test needs real
    # special-token ids; head_dim differs from hidden/heads on purpose.
    "tiny-glm-130b": _glm130b(vocab_size=150528, hidden_size=64, num_layers=2, num_heads=4,
                              num_kv_heads=4, head_dim=24, ffn_hidden_size=96, rope_dim=24,
                              max_position_embeddings=256),
    "tiny-chatglm-6b": _chatglm6b(vocab_size=130528, hidden_size=64, num_layers=2, num_heads=4,
                                  num_kv_heads=4, head_dim=24, ffn_hidden_size=128, rope_dim=24,
                                  deepnorm_layers=28, max_position_embeddings=256),
    "tiny-chatglm2": _chatglm2(vocab_size=65024, hidden_size=64, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=24, ffn_hidden_size=96,
                               max_position_embeddings=256),
    "tiny-glm-4": _glm4(vocab_size=151552, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=24, ffn_hidden_size=96, norm_eps=1.5625e-07,
                        rope_base=10000.0 * 500, max_position_embeddings=256),
    "tiny-glm-4-0414": _glm4(family="glm-4-0414", sandwich_norm=True, vocab_size=151552,
                             hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             head_dim=24, ffn_hidden_size=96, max_position_embeddings=256),
}


def preset(name: str, **overrides) -> GLMConfig:
    """Return the config of a named preset, with optional field overrides."""
    try:
        d = dict(PRESETS[name])
    except KeyError:
        raise GLMError(f"unknown preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
    d.update(overrides)
    return GLMConfig(**d)
