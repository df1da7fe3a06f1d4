"""ChatGLM-6B (THUDM remote code, v1) against an independent re-implementation.

There is no authors' code here, so the reference below is written straight from the
spec's description of ``modeling_chatglm.py`` in its own [seq, batch, hidden] layout:
per-head interleaved QKV, 2D RoPE on the two head halves with fp16-rounded inverse
frequencies, q divided by sqrt(d)*(l+1), -10000 masking before the fp32 rescale,
DeepNorm with alpha = sqrt(2*28) whatever num_layers is, tanh GeLU. It reads the
checkpoint files written in the original layout (pickled .bin shards), not our native
state. Position ids and masks come from a hand-written copy of the HF tokenizer's rule,
itself checked against a hand-computed table.

Tolerance: 1e-4 on logits (fp32; both sides differ only in summation order, ~1e-6).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import peaked_state

from glm_runtime import load_model
from glm_runtime.converters import chatglm
from glm_runtime.converters.tensor_io import read_config_json
from glm_runtime.core.masks import prefill_inputs
from glm_runtime.core.presets import preset

MASK, GMASK, SOP, EOP, PAD = 130000, 130001, 130004, 130005, 3


def _random_weights(cfg, seed=0):
    return peaked_state(cfg, seed, salt=1)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = preset("tiny-chatglm-6b", num_layers=3, rope_fp16=True)  # 3 layers: alpha must still use 28
    sd = _random_weights(cfg)
    d = tmp_path_factory.mktemp("chatglm6b") / "ckpt"
    chatglm.write(d, cfg, sd, shards=3)
    return d, cfg


# ------------------------------------------------------------------ independent reference
def hf_tokenizer_inputs(ids: list[int]):
    """Position ids [2, s] and mask [s, s] (True = masked) as ChatGLM-6B's tokenizer builds them."""
    s = len(ids)
    ctx = ids.index(SOP) if SOP in ids else s
    mask_tok = MASK if MASK in ids else GMASK
    mpos = ids.index(mask_tok)
    pos = list(range(ctx)) + [mpos] * (s - ctx)
    block = [0] * ctx + list(range(1, s - ctx + 1))
    m = torch.ones(s, s).tril()
    m[:, :ctx] = 1
    return torch.tensor([pos, block]), m < 0.5


def left_pad(rows):
    """Batch rows as the tokenizer's _pad does: pad ids, zero positions, masked rows/cols."""
    T = max(len(r) for r in rows)
    ids, pos, masks = [], [], []
    for r in rows:
        p, m = hf_tokenizer_inputs(r)
        n = T - len(r)
        ids.append([PAD] * n + r)
        pos.append(F.pad(p, (n, 0)))
        masks.append(F.pad(m, (n, 0, n, 0), value=True))
    return torch.tensor(ids), torch.stack(pos), torch.stack(masks)[:, None]


def reference_logits(files_sd, hfc, ids, pos, mask):
    """[b, s, V] logits of the original model, re-implemented in [s, b, h]."""
    sd = {k: v.float() for k, v in files_sd.items()}
    H, nh = hfc["hidden_size"], hfc["num_attention_heads"]
    d = hfc.get("kv_channels") or H // nh
    alpha = math.sqrt(2 * 28)
    inv = (1.0 / (10000 ** (torch.arange(0, d // 2, 2).float() / (d // 2)))).half().float()

    def rope(t, p):  # t [s, b, nh, d/2], p [b, s]
        f = p.t().float()[..., None] * inv
        e = torch.cat((f, f), -1)[:, :, None]
        t1, t2 = t.chunk(2, -1)
        return t * e.cos() + torch.cat((-t2, t1), -1) * e.sin()

    def ln(x, name):
        return F.layer_norm(x, (H,), sd[name + ".weight"], sd[name + ".bias"], hfc["layernorm_epsilon"])

    def lin(x, name):
        return F.linear(x, sd[name + ".weight"], sd[name + ".bias"])

    x = sd["transformer.word_embeddings.weight"][ids].transpose(0, 1)
    s, b = x.shape[:2]
    for i in range(hfc["num_layers"]):
        p = f"transformer.layers.{i}."
        a = ln(x, p + "input_layernorm")
        qkv = lin(a, p + "attention.query_key_value").view(s, b, nh, 3 * d)
        q, k, v = qkv.split(d, -1)
        q = torch.cat((rope(q[..., :d // 2], pos[:, 0]), rope(q[..., d // 2:], pos[:, 1])), -1)
        k = torch.cat((rope(k[..., :d // 2], pos[:, 0]), rope(k[..., d // 2:], pos[:, 1])), -1)
        c = float(i + 1)
        q = q / (math.sqrt(d) * c)
        scores = torch.einsum("sbnd,tbnd->bnst", q, k)
        scores = scores.masked_fill(mask, -10000.0).float() * c
        ctx = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v).reshape(s, b, nh * d)
        h = a * alpha + lin(ctx, p + "attention.dense")
        m = ln(h, p + "post_attention_layernorm")
        u = lin(m, p + "mlp.dense_h_to_4h")
        u = 0.5 * u * (1.0 + torch.tanh(0.7978845608028654 * u * (1.0 + 0.044715 * u * u)))
        x = m * alpha + lin(u, p + "mlp.dense_4h_to_h")
    y = ln(x, "transformer.final_layernorm")
    return F.linear(y, sd["lm_head.weight"]).transpose(0, 1)


def reference_greedy(files_sd, hfc, row, n):
    """HF generate's incremental rule: new position = (same first id, block + 1); the new
    token sees everything before it."""
    pos, mask = hf_tokenizer_inputs(row)
    ids = list(row)
    for _ in range(n):
        logits = reference_logits(files_sd, hfc, torch.tensor([ids]), pos[None], mask[None, None])
        t = int(logits[0, -1].argmax())
        ids.append(t)
        if t == EOP:
            break
        pos = torch.cat((pos, pos[:, -1:] + torch.tensor([[0], [1]])), 1)
        m = torch.zeros(len(ids), len(ids), dtype=torch.bool)
        m[:-1, :-1] = mask
        m[:-1, -1] = True
        mask = m
    return ids


def _files(d):
    from glm_runtime.converters.tensor_io import read_state_dict

    return read_state_dict(d)


# ------------------------------------------------------------------------------- tests
def test_hand_computed_position_table():
    # a b [MASK] c [gMASK] <sop> x, left-padded by 2: the tokenizer's rule takes [MASK]
    row = [10, 11, MASK, 12, GMASK, SOP, 13]
    ids, pos, mask = left_pad([row, [10] * 7 + [GMASK, SOP]])
    assert pos[0].tolist() == [[0, 0, 0, 1, 2, 3, 4, 2, 2], [0, 0, 0, 0, 0, 0, 0, 1, 2]]
    cfg = preset("tiny-chatglm-6b")
    ours, allowed, _ = prefill_inputs(cfg, ids, torch.tensor([[0, 0] + [1] * 7, [1] * 9]))
    assert ours[0].tolist() == pos[0].tolist()
    # real rows: the context (5 real tokens) is visible to all; <sop> and x are causal
    real = ~mask[0, 0, 2:, 2:]
    assert real.long().tolist() == [[1, 1, 1, 1, 1, 0, 0]] * 5 + [[1, 1, 1, 1, 1, 1, 0], [1] * 7]
    assert torch.equal(allowed[0, 0, 2:, 2:], real)
    # gMASK only: positions of the generated span are the [gMASK] index
    p, _ = hf_tokenizer_inputs([10, 11, GMASK, SOP])
    assert p.tolist() == [[0, 1, 2, 2], [0, 0, 0, 1]]


def test_config_and_tying(ckpt):
    d, cfg = ckpt
    c, state = chatglm.read(d)
    assert c.family == "chatglm-6b" and c.deepnorm_layers == 28 and c.rope_fp16
    assert c.head_dim == cfg.head_dim and not c.tie_word_embeddings and "lm_head.weight" in state


def test_logits_match_reference_with_left_padding(ckpt):
    d, _ = ckpt
    hfc = read_config_json(d)
    long = [100 + i for i in range(180)]  # positions up to 180: the fp16-rounded frequencies matter
    rows = [[20, 21, MASK, 22, 23, GMASK, SOP], [30, 31, 32, GMASK, SOP], [40, GMASK, SOP, 41, 42],
            long + [MASK, 7, GMASK, SOP, 8, 9]]
    ids, pos, mask = left_pad(rows)
    ref = reference_logits(_files(d), hfc, ids, pos, mask)
    m = load_model(d, backend="cpu")
    am = torch.tensor([[0] * (ids.shape[1] - len(r)) + [1] * len(r) for r in rows])
    ours = m(ids, attention_mask=am)
    real = am.bool()
    err = (ours - ref)[real].abs().max().item()
    assert err < 1e-4, err


def test_greedy_16_tokens_match_reference(ckpt):
    d, _ = ckpt
    hfc = read_config_json(d)
    m = load_model(d, backend="cpu")
    for row in ([50, 51, MASK, 52, GMASK, SOP], [60, 61, 62, GMASK, SOP]):
        ref = reference_greedy(_files(d), hfc, row, 16)
        out = m.generate([row], max_new_tokens=16)[0].tolist()
        assert out[:len(ref)] == ref


def test_tied_head_roundtrip_bit_exact(tmp_path):
    cfg = preset("tiny-chatglm-6b", tie_word_embeddings=True, rope_fp16=True)
    sd = _random_weights(cfg, seed=3)
    chatglm.write(tmp_path / "a", cfg, sd, shards=4)
    files = _files(tmp_path / "a")
    assert files["lm_head.weight"].untyped_storage().data_ptr() == \
        files["transformer.word_embeddings.weight"].untyped_storage().data_ptr()  # one shared storage
    c, back = chatglm.read(tmp_path / "a")
    assert c.tie_word_embeddings and set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    chatglm.write(tmp_path / "b", c, back)
    again = _files(tmp_path / "b")
    assert set(again) == set(files) and all(torch.equal(again[k], files[k]) for k in files)
