"""GLM-130B SAT checkpoints: layout, TP merge/split, resharding, the GLM-130B graph, bad input.

The graph is checked against an independent re-implementation of SAT's GLM-130B block
written from the spec in [seq, batch, hidden] layout (per-head interleaved QKV, 1D
rotate-half RoPE over the whole head with fp16-rounded frequencies, q / (sqrt(d)*(l+1)),
-10000 masking, fp32 softmax * (l+1), DeepNorm alpha = sqrt(2L), GeGLU with the *second*
half through erf-GeLU, output tied to the word embedding), reading the rank-0 file of a
TP-1 checkpoint. Tolerance 1e-4 on fp32 logits (summation order only).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import peaked_state

from glm_runtime import load_model
from glm_runtime.cli.main import main
from glm_runtime.converters import sat
from glm_runtime.converters.tensor_io import read_pickle
from glm_runtime.core.errors import CheckpointError
from glm_runtime.core.presets import preset

MASK, GMASK, SOP, EOS = 150000, 150001, 150004, 20002
TINY_ARGS = ("--model-parallel-size 4 --num-layers 2 --hidden-size 64 --inner-hidden-size 96 --vocab-size 150528 "
             "--num-attention-heads 4 --hidden-size-per-attention-head 24 --max-sequence-length 256 "
             "--tokenizer-type icetk-glm-130B --layernorm-order post --load ckpt --skip-init --fp16")


def _weights(cfg, seed=0):
    return peaked_state(cfg, seed, salt=11)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    cfg, _ = sat.config_from_sat_args(TINY_ARGS)
    sd = _weights(cfg)
    root = tmp_path_factory.mktemp("sat")
    sat.write(root / "tp1", cfg, sd, tp=1)
    sat.write(root / "tp4", cfg, sd, tp=4, iteration="49300")
    return root, cfg, sd


def test_sat_args_parse_like_the_preset():
    cfg, extra = sat.config_from_sat_args(TINY_ARGS)
    want = preset("tiny-glm-130b", rope_fp16=True, torch_dtype="float16")
    assert cfg == want and extra == {"tp": 4}
    full, _ = sat.config_from_sat_args(
        "--num-layers 70 --hidden-size 12288 --inner-hidden-size 32768 --vocab-size 150528 --num-attention-heads 96 "
        "--max-sequence-length 2048 --layernorm-order post --tokenizer-type icetk-glm-130B --fp16")
    assert full == preset("glm-130b", rope_fp16=True)
    with pytest.raises(Exception, match="layernorm-order"):
        sat.config_from_sat_args("--num-layers 2 --hidden-size 64 --vocab-size 100 --num-attention-heads 4")


def test_tp4_layout_by_hand(dirs):
    """Rank r holds heads [r*nh/4, (r+1)*nh/4) of the interleaved QKV, column slices of the
    row-parallel weights, [value slice r; gate slice r] of dense_h_to_4h, vocab rows."""
    root, cfg, sd = dirs
    assert (root / "tp4" / "latest").read_text().strip() == "49300"
    d, F_, V = cfg.head_dim, cfg.ffn_hidden_size, cfg.vocab_size
    per_heads = cfg.num_heads // 4 * 3 * d
    for r in range(4):
        m = read_pickle(root / "tp4" / "49300" / f"mp_rank_{r:02d}_model_states.pt")["module"]
        p = "transformer.layers.1."
        assert torch.equal(m[p + "attention.query_key_value.weight"],
                           sd["layers.1.attn.qkv.weight"][r * per_heads:(r + 1) * per_heads])
        w = cfg.q_size // 4
        assert torch.equal(m[p + "attention.dense.weight"], sd["layers.1.attn.dense.weight"][:, r * w:(r + 1) * w])
        assert torch.equal(m[p + "attention.dense.bias"], sd["layers.1.attn.dense.bias"])
        f = F_ // 4
        fc1 = sd["layers.1.mlp.fc1.weight"]
        assert torch.equal(m[p + "mlp.dense_h_to_4h.weight"],
                           torch.cat((fc1[r * f:(r + 1) * f], fc1[F_ + r * f:F_ + (r + 1) * f])))
        assert torch.equal(m[p + "mlp.dense_4h_to_h.weight"], sd["layers.1.mlp.fc2.weight"][:, r * f:(r + 1) * f])
        assert torch.equal(m["transformer.word_embeddings.weight"], sd["embed.weight"][r * V // 4:(r + 1) * V // 4])


def test_tp4_loads_with_same_logits_as_tp1(dirs):
    root, _, _ = dirs
    ids = torch.tensor([[100, 101, MASK, 102, EOS, SOP, 103], [200, 201, 202, 203, GMASK, SOP, 204]])
    a = load_model(root / "tp1", backend="cpu", sat_args="tiny-glm-130b")(ids)
    b = load_model(root / "tp4", backend="cpu", sat_args=TINY_ARGS)(ids)
    assert torch.equal(a, b)


def test_reshard_4_2_1_bit_exact(dirs, tmp_path):
    root, cfg, _ = dirs
    c4, s4 = sat.read(root / "tp4", TINY_ARGS)
    sat.write(tmp_path / "tp2", c4, s4, tp=2)
    c2, s2 = sat.read(tmp_path / "tp2", "tiny-glm-130b")
    sat.write(tmp_path / "tp1", c2, s2, tp=1)
    a = read_pickle(tmp_path / "tp1" / "1" / "mp_rank_00_model_states.pt")["module"]
    b = read_pickle(root / "tp1" / "1" / "mp_rank_00_model_states.pt")["module"]
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def reference_glm130b(m, cfg, ids, pos, masked):
    """Logits [b, s, V] from a TP-1 SAT state dict ``m``; masked: bool [b, 1, s, s], True = masked."""
    H, nh, d, L = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.num_layers
    alpha = math.sqrt(2 * L)
    inv = (1.0 / (10000 ** (torch.arange(0, d, 2).float() / d))).half().float()

    def rope(t, p):  # t [s, b, nh, d]; p [b, s]
        f = p.t().float()[..., None] * inv
        e = torch.cat((f, f), -1)[:, :, None]
        t1, t2 = t.chunk(2, -1)
        return t * e.cos() + torch.cat((-t2, t1), -1) * e.sin()

    def ln(x, n):
        return F.layer_norm(x, (H,), m[n + ".weight"], m[n + ".bias"], 1e-5)

    def lin(x, n):
        return F.linear(x, m[n + ".weight"], m[n + ".bias"])

    x = m["transformer.word_embeddings.weight"][ids].transpose(0, 1)
    s, b = x.shape[:2]
    for i in range(L):
        p = f"transformer.layers.{i}."
        a = ln(x, p + "input_layernorm")
        q, k, v = lin(a, p + "attention.query_key_value").view(s, b, nh, 3 * d).split(d, -1)
        q, k = rope(q, pos), rope(k, pos)
        c = float(i + 1)
        scores = torch.einsum("sbnd,tbnd->bnst", q / (math.sqrt(d) * c), k).masked_fill(masked, -10000.0) * c
        ctx = torch.einsum("bnst,tbnd->sbnd", scores.softmax(-1), v).reshape(s, b, nh * d)
        h = a * alpha + lin(ctx, p + "attention.dense")
        mm = ln(h, p + "post_attention_layernorm")
        u = lin(mm, p + "mlp.dense_h_to_4h")
        val, gate = u.chunk(2, -1)
        x = mm * alpha + lin(val * F.gelu(gate), p + "mlp.dense_4h_to_h")
    y = ln(x, "transformer.final_layernorm")
    return F.linear(y, m["transformer.word_embeddings.weight"]).transpose(0, 1)


def test_glm130b_graph_matches_reference_on_mask_prompts(dirs):
    """GLM-130B generate.py's rules, hand-written: [MASK]: generated span at the mask's
    position; [gMASK]: positions continue; context bidirectional, span causal."""
    root, cfg, _ = dirs
    m = read_pickle(root / "tp1" / "1" / "mp_rank_00_model_states.pt")["module"]
    model = load_model(root / "tp1", backend="cpu", sat_args="tiny-glm-130b")
    for row, positions in (([10, 11, MASK, 12, EOS, SOP, 13, 14], [0, 1, 2, 3, 4, 2, 2, 2]),
                           ([10, 11, 12, GMASK, SOP, 13, 14], [0, 1, 2, 3, 4, 5, 6])):
        s, ctx = len(row), row.index(SOP)
        masked = torch.ones(s, s).tril()
        masked[:, :ctx] = 1
        masked = (masked < 0.5)[None, None]
        ref = reference_glm130b(m, cfg, torch.tensor([row]), torch.tensor([positions]), masked)
        ours = model([row])
        assert (ours - ref).abs().max().item() < 1e-4


def test_missing_rank_file_named(dirs, tmp_path):
    root, cfg, sd = dirs
    sat.write(tmp_path / "c", cfg, sd, tp=4)
    (tmp_path / "c" / "1" / "mp_rank_02_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="mp_rank_02_model_states.pt"):
        load_model(tmp_path / "c", backend="cpu", sat_args="tiny-glm-130b")
    (tmp_path / "c" / "1" / "mp_rank_03_model_states.pt").unlink()  # now 00, 01 of 4 are left
    with pytest.raises(CheckpointError, match="mp_rank_02_model_states.pt"):
        load_model(tmp_path / "c", backend="cpu", sat_args=TINY_ARGS)  # names --model-parallel-size 4
    with pytest.raises(CheckpointError, match="rank file is missing"):
        load_model(tmp_path / "c", backend="cpu", sat_args="tiny-glm-130b")


class _Payload:
    def __reduce__(self):
        import os

        return (os.mkdir, (str(_Payload.marker),))


def test_pickle_with_code_refused_and_not_run(tmp_path):
    _Payload.marker = tmp_path / "PWNED"
    (tmp_path / "c" / "1").mkdir(parents=True)
    (tmp_path / "c" / "latest").write_text("1\n")
    bad = tmp_path / "c" / "1" / "mp_rank_00_model_states.pt"
    torch.save({"module": {"x": _Payload()}}, bad)
    with pytest.raises(CheckpointError) as e:
        load_model(tmp_path / "c", backend="cpu", sat_args="tiny-glm-130b")
    assert str(bad) in str(e.value) and "refusing" in str(e.value)
    assert not _Payload.marker.exists()


def test_cli_convert_sat_roundtrip(dirs, tmp_path, capsys):
    root, _, _ = dirs
    assert main(["convert", str(root / "tp4"), str(tmp_path / "native"), "--sat-args", TINY_ARGS]) == 0
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "sat1"), "--to", "sat", "--tp", "1"]) == 0
    assert "--sat-args" in capsys.readouterr().out
    a = read_pickle(tmp_path / "sat1" / "1" / "mp_rank_00_model_states.pt")["module"]
    b = read_pickle(root / "tp1" / "1" / "mp_rank_00_model_states.pt")["module"]
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert main(["convert", str(root / "tp4"), str(tmp_path / "x")]) == 2  # no --sat-args: one-line error
    assert "sat-args" in capsys.readouterr().err


def test_quantized_sat_tp1_loads_and_tp2_is_refused(dirs, tmp_path):
    from glm_runtime.converters import native
    from glm_runtime.converters.quantize import quantize_state

    _, cfg, sd = dirs
    qc, qs = quantize_state(cfg, sd, 4)
    sat.write(tmp_path / "q", qc, qs, tp=1)
    m = read_pickle(tmp_path / "q" / "1" / "mp_rank_00_model_states.pt")["module"]
    k = "transformer.layers.0.attention.dense"
    assert m[k + ".weight"].dtype == torch.int8 and m[k + ".weight_scale"].dtype == torch.float16
    args = sat.sat_args_for(qc, 1)
    assert "--quantization-bit-width 4 --from-quantized-checkpoint" in args
    native.save(tmp_path / "n", qc, qs)
    ids = [[100, 101, GMASK, SOP, 102]]
    assert torch.equal(load_model(tmp_path / "q", backend="cpu", sat_args=args)(ids),
                       load_model(tmp_path / "n", backend="cpu")(ids))
    with pytest.raises(CheckpointError, match="TP 1"):
        sat.write(tmp_path / "q2", qc, qs, tp=2)
