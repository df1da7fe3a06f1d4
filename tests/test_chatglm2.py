"""ChatGLM2/3 and GLM-4-9B remote-code directories against transformers' GlmForCausalLM.

The directory is written in the THUDM layout (pickled .bin shards for ChatGLM2, as the
released files; config.json with THUDM field names), loaded by us, and compared with
transformers' ``glm`` model built from the same tensors renamed as the spec's conversion
table says (fused QKV split by rows into q/k/v, no rotary permutation). Both compute in
fp32; the tolerance 1e-4 covers summation order only (observed ~1e-6).
"""
from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import peaked_state

from glm_runtime import load_model
from glm_runtime.converters import chatglm
from glm_runtime.converters.tensor_io import read_state_dict
from glm_runtime.core.build import random_state
from glm_runtime.core.errors import CheckpointError
from glm_runtime.core.presets import preset


def _weights(cfg, seed=0):
    return peaked_state(cfg, seed, salt=7)


def to_transformers(files: dict, hfc: dict):
    """THUDM keys/config -> (GlmConfig, state) following the spec's conversion table."""
    nh, d = hfc["num_attention_heads"], hfc["kv_channels"]
    g = hfc["multi_query_group_num"]
    cfg = transformers.GlmConfig(
        vocab_size=hfc["padded_vocab_size"], hidden_size=hfc["hidden_size"],
        intermediate_size=hfc["ffn_hidden_size"], num_hidden_layers=hfc["num_layers"],
        num_attention_heads=nh, num_key_value_heads=g, head_dim=d, partial_rotary_factor=0.5,
        max_position_embeddings=hfc["seq_length"], rms_norm_eps=hfc["layernorm_epsilon"],
        rope_theta=10000.0 * hfc.get("rope_ratio", 1), attention_bias=hfc["add_qkv_bias"],
        tie_word_embeddings=False, pad_token_id=None, eos_token_id=None, bos_token_id=None)
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0 * hfc.get("rope_ratio", 1),
                           "partial_rotary_factor": 0.5}
    out = {"model.embed_tokens.weight": files["transformer.embedding.word_embeddings.weight"],
           "model.norm.weight": files["transformer.encoder.final_layernorm.weight"],
           "lm_head.weight": files["transformer.output_layer.weight"]}
    for i in range(hfc["num_layers"]):
        p, q = f"transformer.encoder.layers.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = files[p + "input_layernorm.weight"]
        out[q + "post_attention_layernorm.weight"] = files[p + "post_attention_layernorm.weight"]
        out[q + "self_attn.o_proj.weight"] = files[p + "self_attention.dense.weight"]
        out[q + "mlp.gate_up_proj.weight"] = files[p + "mlp.dense_h_to_4h.weight"]
        out[q + "mlp.down_proj.weight"] = files[p + "mlp.dense_4h_to_h.weight"]
        for part in ("weight", "bias"):
            a, b, c = files[p + f"self_attention.query_key_value.{part}"].split((nh * d, g * d, g * d))
            out[q + f"self_attn.q_proj.{part}"], out[q + f"self_attn.k_proj.{part}"], \
                out[q + f"self_attn.v_proj.{part}"] = a, b, c
    return cfg, out


@pytest.mark.parametrize("name", ["tiny-chatglm2", "tiny-glm-4"])
def test_matches_transformers_glm(tmp_path, name):
    cfg = preset(name, rope_base=10000.0 * (500 if "glm-4" in name else 1))
    sd = _weights(cfg)
    chatglm.write(tmp_path / "thudm", cfg, sd, shards=2)
    hfc = json.loads((tmp_path / "thudm" / "config.json").read_text())
    assert "padded_vocab_size" in hfc and hfc.get("rope_ratio", 1) == (500 if "glm-4" in name else 1)

    tcfg, tsd = to_transformers(read_state_dict(tmp_path / "thudm"), hfc)
    ref = transformers.GlmForCausalLM(tcfg).eval()
    ref.load_state_dict(tsd, strict=True)

    m = load_model(tmp_path / "thudm", backend="cpu")
    assert m.config.family == ("glm-4-9b" if "glm-4" in name else "chatglm2-6b")
    gmask, sop = m.config.gmask_token_id, m.config.sop_token_id
    rows = [[gmask, sop, 100, 101, 102, 103, 104], [gmask, sop, 200, 201], [gmask, sop, 300, 301, 302]]
    T = max(map(len, rows))
    pad = m.config.pad_token_id
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    am = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=am, position_ids=pos).logits
    got = m(ids, attention_mask=am)
    err = (got - want)[am.bool()].abs().max().item()
    assert err < 1e-4, err

    # greedy 16 tokens (no stop tokens: compare the full length)
    with torch.no_grad():
        hf_out = ref.generate(torch.tensor([rows[0]]), max_new_tokens=16, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    ours = m.generate([rows[0]], max_new_tokens=16, stop_token_ids=[])
    assert ours[0].tolist() == hf_out[0].tolist()


def test_roundtrip_bit_exact_and_family_detection(tmp_path):
    cfg = preset("tiny-chatglm2", family="chatglm3-6b", eos_token_ids=[2, 64795, 64797])
    sd = _weights(cfg, seed=2)
    chatglm.write(tmp_path / "a", cfg, sd)
    c, back = chatglm.read(tmp_path / "a")
    assert c.family == "chatglm3-6b" and c.eos_token_ids == [2, 64795, 64797]
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    chatglm.write(tmp_path / "b", c, back)
    a, b = read_state_dict(tmp_path / "a"), read_state_dict(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_keys_of_another_family_named(tmp_path):
    """A ChatGLM2 config.json over ChatGLM-6B weights: one clear error naming the directory."""
    v2 = preset("tiny-chatglm2")
    v1 = preset("tiny-chatglm-6b", rope_fp16=True)
    chatglm.write(tmp_path / "v2", v2, random_state(v2))
    chatglm.write(tmp_path / "v1", v1, random_state(v1))
    for f in (tmp_path / "v2").glob("*.bin*"):
        f.unlink()
    for f in (tmp_path / "v1").glob("*.bin*"):
        f.rename(tmp_path / "v2" / f.name)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "v2", backend="cpu")
    msg = str(e.value)
    assert str(tmp_path / "v2") in msg and "ChatGLM-6B/GLM-130B-style weights" in msg
