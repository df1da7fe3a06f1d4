"""THUDM remote-code checkpoints (``model_type: chatglm``) <-> native.

Two generations share the model type and are told apart by their config fields:

* **v1, ChatGLM-6B** (``inner_hidden_size``, ``position_encoding_2d``): keys
  ``transformer.word_embeddings``, ``transformer.layers.{i}.attention.query_key_value``
  (per-head interleaved QKV, exactly our ``per_head`` layout), LayerNorm with biases,
  ``lm_head.weight``. The original code always uses DeepNorm alpha = sqrt(2*28) and
  rounds the rotary frequencies to fp16; the config we build says so
  (``deepnorm_layers=28``, ``rope_fp16=True``). ``lm_head.weight`` is stored separately;
  when it equals the embedding the model is tied, otherwise the stored head is used
  (transformers would tie it to the embedding; we keep what the file says).
* **v2, ChatGLM2-6B / ChatGLM3-6B / GLM-4-9B** (``padded_vocab_size``,
  ``ffn_hidden_size``): keys ``transformer.embedding.word_embeddings``,
  ``transformer.encoder.layers.{i}.self_attention.query_key_value`` (blocked [Q|K|V]),
  RMSNorm, ``transformer.output_layer``; RoPE base ``10000 * rope_ratio`` (GLM-4).

Pre-quantized checkpoints (``quantization_bit`` 4 or 8) store an int8 ``weight`` and a
``weight_scale`` per quantized linear; they map to our ``qweight``/``scale`` unchanged
(the packing is the same GLM-130B scheme). Pickled ``.bin`` shards are read with
``weights_only=True`` (no code runs; shared storages, e.g. a tied ``lm_head``, load as
the same values). Writing produces the same layout, so chatglm -> native -> chatglm is
bit-exact.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import MISSING
from pathlib import Path

import torch
from tqdm import tqdm

from glm_runtime.core.config import GLMConfig
from glm_runtime.core.errors import CheckpointError
from glm_runtime.core.presets import PRESETS
from glm_runtime.core.quant import LINEARS as QUANT_LINEARS
from glm_runtime.core.schema import FLAG, Rule, number, rule_of

from .native import atomic_dir
from .tensor_io import config_value, glm_config, read_config_json, read_state_dict

log = logging.getLogger("glm_runtime.converters.chatglm")

_AUTO_MAP_V1 = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
_AUTO_MAP_V2 = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
_TOKEN_FIELDS = ("mask_token_id", "gmask_token_id", "smask_token_id", "sop_token_id", "eop_token_id")


def is_chatglm(path: Path) -> bool:
    return read_config_json(path, required=False).get("model_type") == "chatglm"


def generation(hf: dict) -> str:
    """'v1' (ChatGLM-6B) or 'v2' (ChatGLM2/3, GLM-4-9B) from the config's field names."""
    if "padded_vocab_size" in hf or "ffn_hidden_size" in hf:
        return "v2"
    return "v1"


# ---------------------------------------------------------------------------- configs
def _get(hf: dict, key: str, field: str, source, default=MISSING):
    """``hf[key]`` checked by the rule of the GLMConfig field it becomes (see config_value)."""
    return config_value(hf, key, rule_of(GLMConfig, field), source, default)


_ANY_ID, _ANY_IDS = Rule("int", optional=True), Rule("ids")  # ids outside the vocabulary are dropped


def _quant_bits(hf: dict, source) -> int | None:
    bits = hf.get("quantization_bit") or None
    if bits not in (None, 4, 8) or isinstance(bits, bool):
        raise CheckpointError(f"quantization_bit={bits!r} is not supported (4 or 8)", source)
    return bits


def config_from_chatglm(hf: dict, source) -> GLMConfig:
    return _config_v1(hf, source) if generation(hf) == "v1" else _config_v2(hf, source)


def _config_v1(hf: dict, source) -> GLMConfig:
    if not hf.get("position_encoding_2d", True):
        raise CheckpointError("position_encoding_2d=false (1D ChatGLM-6B) is not supported: no released model "
                              "uses it", source)
    if hf.get("pre_seq_len"):
        raise CheckpointError("P-tuning v2 prefixes (pre_seq_len) are not supported", source)
    h, nh = _get(hf, "hidden_size", "hidden_size", source), _get(hf, "num_attention_heads", "num_heads", source)
    head_dim = _get(hf, "kv_channels", "head_dim", source, None) or h // nh  # our extension, see config_to_chatglm
    mask = _get(hf, "mask_token_id", "mask_token_id", source)
    eos = _get(hf, "eos_token_id", "eop_token_id", source)
    d = dict(PRESETS["chatglm-6b"])
    d.update(vocab_size=_get(hf, "vocab_size", "vocab_size", source), hidden_size=h,
             num_layers=_get(hf, "num_layers", "num_layers", source), num_heads=nh,
             num_kv_heads=nh, head_dim=head_dim, rope_dim=head_dim,
             ffn_hidden_size=_get(hf, "inner_hidden_size", "ffn_hidden_size", source, None) or 4 * h,
             max_position_embeddings=_get(hf, "max_sequence_length", "max_position_embeddings", source, 2048),
             norm_eps=_get(hf, "layernorm_epsilon", "norm_eps", source, 1e-5), deepnorm_layers=28, rope_fp16=True,
             torch_dtype=str(hf.get("torch_dtype") or "float16"), quantization_bits=_quant_bits(hf, source),
             mask_token_id=mask, gmask_token_id=_get(hf, "gmask_token_id", "gmask_token_id", source),
             smask_token_id=mask + 2, sop_token_id=_get(hf, "bos_token_id", "sop_token_id", source),
             eop_token_id=eos, eos_token_ids=[eos], pad_token_id=_get(hf, "pad_token_id", "pad_token_id", source, None))
    return glm_config(source, **d)


def _v2_family(hf: dict, vocab: int) -> str:
    name = str(hf.get("_name_or_path", "")).lower()
    if vocab >= 151552 or "glm-4" in name:
        return "glm-4-9b"
    eos = hf.get("eos_token_id")
    if "chatglm3" in name or (isinstance(eos, list) and 64795 in eos):
        return "chatglm3-6b"
    return "chatglm2-6b"


def _config_v2(hf: dict, source) -> GLMConfig:
    for field, want in (("rmsnorm", True), ("apply_residual_connection_post_layernorm", False),
                        ("post_layer_norm", True), ("original_rope", True)):
        if hf.get(field, want) != want:
            raise CheckpointError(f"{field}={hf[field]!r} is not supported (every released model has {want})",
                                  source)
    if hf.get("pre_seq_len"):
        raise CheckpointError("P-tuning v2 prefixes (pre_seq_len) are not supported", source)
    vocab = _get(hf, "padded_vocab_size", "vocab_size", source, None) or _get(hf, "vocab_size", "vocab_size", source)
    nh, hidden = _get(hf, "num_attention_heads", "num_heads", source), _get(hf, "hidden_size", "hidden_size", source)
    head_dim = _get(hf, "kv_channels", "head_dim", source, None) or hidden // nh
    multi_query = config_value(hf, "multi_query_attention", FLAG, source, False)
    kv = _get(hf, "multi_query_group_num", "num_kv_heads", source, nh) if multi_query else nh
    family = _v2_family(hf, vocab)
    preset = {"glm-4-9b": "glm-4-9b", "chatglm3-6b": "chatglm3-6b"}.get(family, "chatglm2-6b")
    d = dict(PRESETS[preset])
    bias_linear = config_value(hf, "add_bias_linear", FLAG, source, False)
    eos = config_value(hf, "eos_token_id", _ANY_IDS, source, d["eos_token_ids"])
    pad = config_value(hf, "pad_token_id", _ANY_ID, source, None)
    rope_ratio = config_value(hf, "rope_ratio", number(0, lo_open=True), source, 1.0)
    tokens = {k: d[k] for k in _TOKEN_FIELDS}
    if any(t >= vocab for t in tokens.values()):  # a test-sized vocabulary: no special ids
        tokens = {k: None for k in tokens}
    d.update(family=family, vocab_size=vocab, hidden_size=hidden,
             num_layers=_get(hf, "num_layers", "num_layers", source), num_heads=nh, num_kv_heads=kv,
             head_dim=head_dim, rope_dim=head_dim // 2,
             ffn_hidden_size=_get(hf, "ffn_hidden_size", "ffn_hidden_size", source),
             max_position_embeddings=_get(hf, "seq_length", "max_position_embeddings", source, 2048),
             norm_eps=_get(hf, "layernorm_epsilon", "norm_eps", source, 1e-5),
             qkv_bias=bias_linear or config_value(hf, "add_qkv_bias", FLAG, source, False),
             dense_bias=bias_linear, mlp_bias=bias_linear, rope_base=10000.0 * rope_ratio,
             query_key_layer_scaling=_get(hf, "apply_query_key_layer_scaling", "query_key_layer_scaling", source, True),
             tie_word_embeddings=_get(hf, "tie_word_embeddings", "tie_word_embeddings", source, False),
             torch_dtype=str(hf.get("torch_dtype") or "float16"), quantization_bits=_quant_bits(hf, source),
             eos_token_ids=[t for t in eos if 0 <= t < vocab],
             pad_token_id=pad if pad is not None and 0 <= pad < vocab else None, **tokens)
    return glm_config(source, **d)


def config_to_chatglm(c: GLMConfig) -> dict:
    """config.json of the THUDM remote code for ``c`` (v1 for ChatGLM-6B-style models, v2 for
    ChatGLM2-style ones); a config neither can express is a CheckpointError."""
    if c.residual == "deepnorm":
        return _to_v1(c)
    return _to_v2(c)


def _to_v1(c: GLMConfig) -> dict:
    want = dict(norm="layernorm", qkv_layout="per_head", activation="gelu_tanh", rope="neox_2d",
                attention="prefix", qkv_bias=True, dense_bias=True, mlp_bias=True, rope_fp16=True,
                deepnorm_layers=28, sandwich_norm=False)
    bad = [f"{k}={getattr(c, k)!r}" for k, v in want.items() if getattr(c, k) != v]
    if bad:
        raise CheckpointError(f"a {c.family} model cannot be written as ChatGLM-6B: the original code would "
                              f"compute something else ({', '.join(bad)})")
    if None in (c.mask_token_id, c.gmask_token_id, c.sop_token_id, c.eop_token_id):
        raise CheckpointError("ChatGLM-6B needs the [MASK], [gMASK], <sop> and <eop> ids in the config")
    d = {"architectures": ["ChatGLMModel"], "auto_map": _AUTO_MAP_V1, "model_type": "chatglm",
         "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "num_layers": c.num_layers,
         "num_attention_heads": c.num_heads, "inner_hidden_size": c.ffn_hidden_size,
         "layernorm_epsilon": c.norm_eps, "max_sequence_length": c.max_position_embeddings,
         "position_encoding_2d": True, "bos_token_id": c.sop_token_id, "eos_token_id": c.eop_token_id,
         "mask_token_id": c.mask_token_id, "gmask_token_id": c.gmask_token_id,
         "pad_token_id": c.pad_token_id, "quantization_bit": c.quantization_bits or 0, "pre_seq_len": None,
         "prefix_projection": False, "use_cache": True, "torch_dtype": c.torch_dtype}
    if c.head_dim * c.num_heads != c.hidden_size:
        # The original code always uses hidden/heads; this field is read back by us only.
        d["kv_channels"] = c.head_dim
    return d


def _to_v2(c: GLMConfig) -> dict:
    want = dict(norm="rmsnorm", residual="pre", qkv_layout="blocked", activation="swiglu", rope="interleaved",
                attention="causal", sandwich_norm=False, dense_bias=c.mlp_bias)
    bad = [f"{k}={getattr(c, k)!r}" for k, v in want.items() if getattr(c, k) != v]
    if c.rope_dim * 2 != c.head_dim:
        bad.append(f"rope_dim={c.rope_dim} (the remote code rotates head_dim/2)")
    if bad:
        raise CheckpointError(f"a {c.family} model cannot be written as a ChatGLM2/3/GLM-4 directory "
                              f"({', '.join(bad)})")
    ratio = c.rope_base / 10000.0
    d = {"architectures": ["ChatGLMModel"], "auto_map": _AUTO_MAP_V2, "model_type": "chatglm",
         "_name_or_path": f"THUDM/{c.family}", "num_layers": c.num_layers, "padded_vocab_size": c.vocab_size,
         "hidden_size": c.hidden_size, "ffn_hidden_size": c.ffn_hidden_size, "kv_channels": c.head_dim,
         "num_attention_heads": c.num_heads, "seq_length": c.max_position_embeddings, "hidden_dropout": 0.0,
         "attention_dropout": 0.0, "layernorm_epsilon": c.norm_eps, "rmsnorm": True,
         "apply_residual_connection_post_layernorm": False, "post_layer_norm": True,
         "add_bias_linear": c.dense_bias, "add_qkv_bias": c.qkv_bias,
         "multi_query_attention": c.num_kv_heads != c.num_heads, "multi_query_group_num": c.num_kv_heads,
         "apply_query_key_layer_scaling": c.query_key_layer_scaling, "attention_softmax_in_fp32": True,
         "fp32_residual_connection": False, "original_rope": True, "quantization_bit": c.quantization_bits or 0,
         "pre_seq_len": None, "prefix_projection": False, "tie_word_embeddings": c.tie_word_embeddings,
         "eos_token_id": c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids),
         "pad_token_id": c.pad_token_id, "torch_dtype": c.torch_dtype, "use_cache": True}
    if ratio != 1.0:
        d["rope_ratio"] = ratio
    return d


# ------------------------------------------------------------------------ key maps
def _key_map(c: GLMConfig, v1: bool) -> list[tuple[str, str]]:
    """(THUDM key, native key) for every tensor except quantized linears' scales."""
    if v1:
        pairs = [("transformer.word_embeddings.weight", "embed.weight"),
                 ("transformer.final_layernorm.weight", "final_norm.weight"),
                 ("transformer.final_layernorm.bias", "final_norm.bias")]
        layer = [("input_layernorm.weight", "input_norm.weight"), ("input_layernorm.bias", "input_norm.bias"),
                 ("attention.query_key_value.weight", "attn.qkv.weight"),
                 ("attention.query_key_value.bias", "attn.qkv.bias"),
                 ("attention.dense.weight", "attn.dense.weight"), ("attention.dense.bias", "attn.dense.bias"),
                 ("post_attention_layernorm.weight", "mlp_norm.weight"),
                 ("post_attention_layernorm.bias", "mlp_norm.bias"),
                 ("mlp.dense_h_to_4h.weight", "mlp.fc1.weight"), ("mlp.dense_h_to_4h.bias", "mlp.fc1.bias"),
                 ("mlp.dense_4h_to_h.weight", "mlp.fc2.weight"), ("mlp.dense_4h_to_h.bias", "mlp.fc2.bias")]
        prefix = "transformer.layers.{i}."
        head = "lm_head.weight"
    else:
        pairs = [("transformer.embedding.word_embeddings.weight", "embed.weight"),
                 ("transformer.encoder.final_layernorm.weight", "final_norm.weight")]
        layer = [("input_layernorm.weight", "input_norm.weight"),
                 ("self_attention.query_key_value.weight", "attn.qkv.weight"),
                 ("self_attention.dense.weight", "attn.dense.weight"),
                 ("post_attention_layernorm.weight", "mlp_norm.weight"),
                 ("mlp.dense_h_to_4h.weight", "mlp.fc1.weight"), ("mlp.dense_4h_to_h.weight", "mlp.fc2.weight")]
        if c.qkv_bias:
            layer.append(("self_attention.query_key_value.bias", "attn.qkv.bias"))
        if c.dense_bias:
            layer += [("self_attention.dense.bias", "attn.dense.bias"), ("mlp.dense_h_to_4h.bias", "mlp.fc1.bias"),
                      ("mlp.dense_4h_to_h.bias", "mlp.fc2.bias")]
        prefix = "transformer.encoder.layers.{i}."
        head = "transformer.output_layer.weight"
    for i in range(c.num_layers):
        p = prefix.format(i=i)
        pairs += [(p + a, f"layers.{i}.{b}") for a, b in layer]
    if not c.tie_word_embeddings:
        pairs.append((head, "lm_head.weight"))
    return pairs


def _quantized_native(native_key: str, c: GLMConfig) -> bool:
    return bool(c.quantization_bits) and native_key.endswith(".weight") and \
        native_key.rsplit(".", 1)[0].split(".", 2)[-1] in QUANT_LINEARS


def _other_family_hint(keys) -> str:
    keys = set(keys)
    if any(k.startswith("transformer.encoder.") for k in keys):
        return " (these are ChatGLM2/3/GLM-4 weights: transformer.encoder.*)"
    if any(k.startswith("transformer.layers.") for k in keys):
        return " (these are ChatGLM-6B/GLM-130B-style weights: transformer.layers.*)"
    if any(k.startswith("model.layers.") for k in keys):
        return " (these are transformers glm/glm4 weights: model.layers.*)"
    return ""


def _fp16_scale(t: torch.Tensor, key: str, path) -> torch.Tensor:
    s = t.to(torch.float16)
    if not torch.equal(s.to(t.dtype), t):
        raise CheckpointError(f"{key} is not representable in fp16 (native scales are fp16)", path)
    return s


# ---------------------------------------------------------------------------- read
def read(path: str | os.PathLike, progress: bool = False) -> tuple[GLMConfig, dict[str, torch.Tensor]]:
    path = Path(path)
    hf_cfg = read_config_json(path)
    v1 = generation(hf_cfg) == "v1"
    c = config_from_chatglm(hf_cfg, str(path / "config.json"))
    src = read_state_dict(path)
    out: dict[str, torch.Tensor] = {}
    probe = "transformer.layers.0.input_layernorm.weight" if v1 else \
        "transformer.encoder.layers.0.input_layernorm.weight"
    if probe not in src:
        raise CheckpointError(f"weights do not belong to a {'ChatGLM-6B' if v1 else 'ChatGLM2/3/GLM-4'} "
                              f"config.json{_other_family_hint(src)}", path)

    def take(key):
        try:
            return src.pop(key)
        except KeyError:
            raise CheckpointError(f"weights lack {key!r} (incomplete checkpoint, or another family"
                                  f"{_other_family_hint(src)})", path) from None

    if v1 and "lm_head.weight" in src and torch.equal(src["lm_head.weight"], src.get(
            "transformer.word_embeddings.weight", torch.empty(0))):
        c = c.replace(tie_word_embeddings=True)  # tied (possibly one shared storage)
        src.pop("lm_head.weight")
    elif v1 and "lm_head.weight" in src:
        log.warning("%s: lm_head.weight differs from the word embedding; using the stored lm_head "
                    "(transformers' remote code would tie it to the embedding)", path)
    pairs = _key_map(c, v1)
    for a, b in tqdm(pairs, desc="convert chatglm->native", disable=not progress, unit="tensor"):
        t = take(a)
        if _quantized_native(b, c):
            if t.dtype != torch.int8:
                raise CheckpointError(f"{a} has dtype {t.dtype}; quantization_bit={c.quantization_bits} in "
                                      f"config.json needs int8 weights", path)
            out[b[:-len("weight")] + "qweight"] = t
            out[b[:-len("weight")] + "scale"] = _fp16_scale(take(a + "_scale"), a + "_scale", path)
        else:
            out[b] = t
    for k in [k for k in src if k.endswith("rotary_emb.inv_freq") or k.endswith("rotary_pos_emb.inv_freq")]:
        src.pop(k)  # recomputed, as the original code does
    if src:
        raise CheckpointError(f"unexpected weights for {c.family}: {sorted(src)[0]}"
                              f"{f' and {len(src) - 1} more' if len(src) > 1 else ''}", path)
    return c, out


# --------------------------------------------------------------------------- write
def to_chatglm_state(c: GLMConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Native state -> THUDM keys (tensors unchanged; a tied ChatGLM-6B head shares the
    embedding's storage, as the released files' lm_head duplicates the embedding)."""
    v1 = c.residual == "deepnorm"
    s = dict(state)
    out: dict[str, torch.Tensor] = {}
    for a, b in _key_map(c, v1):
        if _quantized_native(b, c):
            base = b[:-len("weight")]
            out[a] = s.pop(base + "qweight")
            out[a + "_scale"] = s.pop(base + "scale")
        else:
            out[a] = s.pop(b)
        if v1 and c.tie_word_embeddings and b == "embed.weight":  # next to it: same shard, one storage
            out["lm_head.weight"] = out[a]
    if s:
        raise CheckpointError(f"native weights have keys with no THUDM equivalent: {sorted(s)[0]}")
    return out


def write(dst: str | os.PathLike, c: GLMConfig, state: dict[str, torch.Tensor], overwrite: bool = False,
          shards: int = 2, progress: bool = False, tokenizer: str | os.PathLike | None = None) -> Path:
    """Write a THUDM remote-code directory: config.json, pytorch_model-XXXXX-of-YYYYY.bin
    shards (whole layers per shard) and pytorch_model.bin.index.json."""
    cfg = config_to_chatglm(c)
    out = to_chatglm_state(c, state)
    units = [[k] for k in out if k != "lm_head.weight" or not c.tie_word_embeddings]
    if c.tie_word_embeddings and "lm_head.weight" in out:  # tied head in the embedding's file: one storage
        units[0].append("lm_head.weight")
    shards = max(1, min(shards, len(units)))
    per = -(-len(units) // shards)
    groups = [sum(units[i:i + per], []) for i in range(0, len(units), per)]
    with atomic_dir(dst, overwrite) as tmp:
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        weight_map = {}
        for n, group in enumerate(tqdm(groups, desc="write chatglm shards", disable=not progress), 1):
            name = f"pytorch_model-{n:05d}-of-{len(groups):05d}.bin"
            torch.save({k: out[k] for k in group}, tmp / name)
            weight_map.update({k: name for k in group})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in out.values())},
                 "weight_map": weight_map}
        (tmp / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2) + "\n")
        if tokenizer is not None:
            shutil.copyfile(tokenizer, tmp / ("ice_text.model" if c.residual == "deepnorm" else "tokenizer.model"))
    return Path(dst)
