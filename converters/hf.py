"""Hugging Face transformers ``glm`` (GlmForCausalLM: ChatGLM2/3, GLM-4-9B weights) and
``glm4`` (Glm4ForCausalLM: GLM-4-0414) directories <-> native.

The mapping is a rename plus a concatenation of q/k/v into the blocked fused QKV; no
rotary permutation is involved (transformers' glm keeps THUDM's interleaved pairing).
Both directions move tensors unchanged, so HF -> native -> HF is bit-exact.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError
from glm_runtime.core.presets import PRESETS

from .native import atomic_dir
from .tensor_io import read_config_json, read_state_dict

MODEL_TYPES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}
_GLM4_TOKENS = {k: v for k, v in PRESETS["glm-4-9b"].items() if k.endswith("_token_id")}


def is_hf_glm(path: Path) -> bool:
    return read_config_json(path, required=False).get("model_type") in MODEL_TYPES


def config_from_hf(hf: dict, source: str) -> GLMConfig:
    mt = hf.get("model_type")
    if mt not in MODEL_TYPES:
        raise CheckpointError(f"model_type {mt!r} is not a transformers GLM model (glm, glm4)", source)
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    vocab = hf["vocab_size"]
    eos = hf.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    in_vocab = lambda t: t is not None and 0 <= t < vocab  # noqa: E731
    tokens = {k: v for k, v in _GLM4_TOKENS.items() if in_vocab(v)}
    try:
        return GLMConfig(
            family="glm-4-0414" if mt == "glm4" else "glm-4-9b",
            vocab_size=vocab, hidden_size=hf["hidden_size"], num_layers=hf["num_hidden_layers"],
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads, head_dim=head_dim,
            ffn_hidden_size=hf["intermediate_size"],
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-5), residual="pre",
            sandwich_norm=(mt == "glm4"), qkv_layout="blocked", qkv_bias=hf.get("attention_bias", True),
            dense_bias=False, mlp_bias=False, activation="swiglu", rope="interleaved",
            rope_dim=int(head_dim * partial), rope_base=float(theta), attention="causal",
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            torch_dtype=str(hf.get("dtype") or hf.get("torch_dtype") or "float32"),
            **dict(tokens, pad_token_id=hf.get("pad_token_id") if in_vocab(hf.get("pad_token_id")) else None,
                   eos_token_ids=[t for t in eos if in_vocab(t)]),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json lacks field {e.args[0]!r}", source) from None
    except TypeError as e:
        raise CheckpointError(f"bad config.json: {e}", source) from None


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
