"""Hugging Face transformers ``glm`` (GlmForCausalLM: ChatGLM2/3, GLM-4-9B weights) and
``glm4`` (Glm4ForCausalLM: GLM-4-0414) directories <-> native.

The mapping is a rename plus a concatenation of q/k/v into the blocked fused QKV; no
rotary permutation is involved (transformers' glm keeps THUDM's interleaved pairing).
Both directions move tensors unchanged, so HF -> native -> HF is bit-exact.
"""
from __future__ import annotations

import json
import os
from dataclasses import MISSING
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError
from glm_runtime.core.presets import PRESETS
from glm_runtime.core.schema import Rule, number, rule_of

from .native import atomic_dir
from .tensor_io import config_value, glm_config, read_config_json, read_state_dict

MODEL_TYPES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}
_FRACTION = number(0, 1, lo_open=True)  # partial_rotary_factor: the rotated share of a head
_ANY_ID, _ANY_IDS = Rule("int", optional=True), Rule("ids")
_GLM4_TOKENS = {k: v for k, v in PRESETS["glm-4-9b"].items() if k.endswith("_token_id")}


def is_hf_glm(path: Path) -> bool:
    return read_config_json(path, required=False).get("model_type") in MODEL_TYPES


def config_from_hf(hf: dict, source: str) -> GLMConfig:
    """The GLMConfig of a transformers glm/glm4 config.json. Each value is checked by the
    rule of the GLMConfig field it becomes, in the file's own spelling, before anything is
    computed from it."""
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise CheckpointError(f"model_type {mt!r} is not a transformers GLM model (glm, glm4)", source)
    rope = hf.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise CheckpointError(f"rope_parameters={rope!r}: expected a mapping", source)

    def get(key, field, default=MISSING, within=hf):
        return config_value(within, key, rule_of(GLMConfig, field), source, default)

    theta = get("rope_theta", "rope_base", get("rope_theta", "rope_base", 10000.0), within=rope)
    partial = config_value(rope, "partial_rotary_factor", _FRACTION, source,
                           config_value(hf, "partial_rotary_factor", _FRACTION, source, 0.5))
    heads, hidden, vocab = get("num_attention_heads", "num_heads"), get("hidden_size", "hidden_size"), \
        get("vocab_size", "vocab_size")
    head_dim = get("head_dim", "head_dim", None) or hidden // heads
    eos = config_value(hf, "eos_token_id", _ANY_IDS, source, [])  # ids outside the vocabulary are dropped below
    pad = config_value(hf, "pad_token_id", _ANY_ID, source, None)
    in_vocab = lambda t: t is not None and 0 <= t < vocab  # noqa: E731
    tokens = {k: v for k, v in _GLM4_TOKENS.items() if in_vocab(v)}
    return glm_config(
        source, family="glm-4-0414" if mt == "glm4" else "glm-4-9b",
        vocab_size=vocab, hidden_size=hidden, num_layers=get("num_hidden_layers", "num_layers"),
        num_heads=heads, num_kv_heads=get("num_key_value_heads", "num_kv_heads", heads), head_dim=head_dim,
        ffn_hidden_size=get("intermediate_size", "ffn_hidden_size"),
        max_position_embeddings=get("max_position_embeddings", "max_position_embeddings", 2048),
        norm="rmsnorm", norm_eps=get("rms_norm_eps", "norm_eps", 1e-5), residual="pre",
        sandwich_norm=(mt == "glm4"), qkv_layout="blocked", qkv_bias=get("attention_bias", "qkv_bias", True),
        dense_bias=False, mlp_bias=False, activation="swiglu", rope="interleaved",
        rope_dim=int(head_dim * partial), rope_base=theta, attention="causal",
        tie_word_embeddings=get("tie_word_embeddings", "tie_word_embeddings", False),
        torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        **dict(tokens, pad_token_id=pad if in_vocab(pad) else None, eos_token_ids=[t for t in eos if in_vocab(t)]),
    )


def config_to_hf(c: GLMConfig) -> dict:
    mt = "glm4" if c.sandwich_norm else "glm"
    if c.residual != "pre" or c.norm != "rmsnorm" or c.rope != "interleaved" or c.activation != "swiglu" \
            or c.qkv_layout != "blocked" or c.dense_bias or c.mlp_bias or c.attention != "causal":
        raise CheckpointError(f"a {c.family} model has no transformers glm/glm4 equivalent "
                              "(needs pre-RMSNorm, SwiGLU, interleaved partial RoPE, causal attention)")
    if c.quantization_bits:
        raise CheckpointError("quantized checkpoints cannot be written as transformers glm/glm4")
    return {
        "architectures": [MODEL_TYPES[mt]], "model_type": mt,
        "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.ffn_hidden_size,
        "num_hidden_layers": c.num_layers, "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads, "head_dim": c.head_dim, "hidden_act": "silu",
        "max_position_embeddings": c.max_position_embeddings, "rms_norm_eps": c.norm_eps,
        "attention_bias": c.qkv_bias, "tie_word_embeddings": c.tie_word_embeddings,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_base,
                            "partial_rotary_factor": c.rope_dim / c.head_dim},
        "pad_token_id": c.pad_token_id, "eos_token_id": c.eos_token_ids or None,
        "dtype": c.torch_dtype, "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True,
    }


def _layer_map(c: GLMConfig) -> list[tuple[str, str]]:
    pairs = [("input_layernorm.weight", "input_norm.weight"),
             ("post_attention_layernorm.weight", "mlp_norm.weight"),
             ("self_attn.o_proj.weight", "attn.dense.weight"),
             ("mlp.gate_up_proj.weight", "mlp.fc1.weight"),
             ("mlp.down_proj.weight", "mlp.fc2.weight")]
    if c.sandwich_norm:
        pairs += [("post_self_attn_layernorm.weight", "post_attn_norm.weight"),
                  ("post_mlp_layernorm.weight", "post_mlp_norm.weight")]
    return pairs


def read(path: str | os.PathLike, progress: bool = False) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    c = config_from_hf(read_config_json(path), str(path / "config.json"))
    hf = read_state_dict(path)
    out: dict[str, torch.Tensor] = {}

    def take(key):
        try:
            return hf.pop(key)
        except KeyError:
            raise CheckpointError(f"weights lack {key!r} (not a {c.family} checkpoint, or incomplete)",
                                  path) from None

    out["embed.weight"] = take("model.embed_tokens.weight")
    for i in tqdm(range(c.num_layers), desc="convert hf->native", disable=not progress, unit="layer"):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        for src, dst in _layer_map(c):
            out[n + dst] = take(p + src)
        out[n + "attn.qkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if c.qkv_bias:
            out[n + "attn.qkv.bias"] = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
    out["final_norm.weight"] = take("model.norm.weight")
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = take("lm_head.weight")
    hf.pop("lm_head.weight", None)  # a tied checkpoint may still store it
    if hf:
        raise CheckpointError(f"unexpected weights for {c.family}: {sorted(hf)[0]}"
                              f"{f' and {len(hf) - 1} more' if len(hf) > 1 else ''}", path)
    return c, out


def write(dst: str | os.PathLike, c: GLMConfig, state: dict[str, torch.Tensor], overwrite: bool = False,
          progress: bool = False) -> Path:
    """Write a transformers-loadable directory (config.json + model.safetensors)."""
    hf_cfg = config_to_hf(c)
    s = dict(state)
    out = {"model.embed_tokens.weight": s.pop("embed.weight")}
    q, kv = c.q_size, c.kv_size
    for i in tqdm(range(c.num_layers), desc="convert native->hf", disable=not progress, unit="layer"):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        for src, dst_key in _layer_map(c):
            out[p + src] = s.pop(n + dst_key)
        for part in ("weight",) + (("bias",) if c.qkv_bias else ()):
            qq, kk, vv = s.pop(n + f"attn.qkv.{part}").split((q, kv, kv))
            for name, t in zip("qkv", (qq, kk, vv)):
                out[p + f"self_attn.{name}_proj.{part}"] = t.clone()
    out["model.norm.weight"] = s.pop("final_norm.weight")
    if not c.tie_word_embeddings:
        out["lm_head.weight"] = s.pop("lm_head.weight")
    if s:
        raise CheckpointError(f"native weights have keys with no transformers equivalent: {sorted(s)[0]}")
    with atomic_dir(dst, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in out.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
    return Path(dst)
