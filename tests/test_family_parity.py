"""Cross-family checks: GLM-130B left-padded [MASK]/[gMASK] batches and 16-token greedy
continuations against the independent reference of test_sat, format round trips
(THUDM -> native -> transformers -> native -> THUDM bit-exact), and the rotary precision
switch."""
from __future__ import annotations

import torch
from test_sat import TINY_ARGS, _weights, reference_glm130b

from glm_runtime import load_model
from glm_runtime.cli.main import main
from glm_runtime.converters import chatglm, hf, sat
from glm_runtime.converters.tensor_io import read_pickle, read_state_dict
from glm_runtime.core.build import random_state
from glm_runtime.core.model import Rotary
from glm_runtime.core.presets import preset

MASK, GMASK, SOP, EOP, EOS = 150000, 150001, 150004, 150005, 20002


def _row_inputs(row, T):
    """GLM-130B generate.py's mask/positions for one row, left-padded to T (pads: masked, 0)."""
    s, ctx = len(row), row.index(SOP)
    m = torch.ones(s, s).tril()
    m[:, :ctx] = 1
    pos = list(range(s))
    if MASK in row:
        pos[ctx:] = [row.index(MASK)] * (s - ctx)
    n = T - s
    masked = torch.ones(T, T, dtype=torch.bool)
    masked[n:, n:] = m < 0.5
    return [0] * n + row, [0] * n + pos, masked


def test_glm130b_left_padded_batch_and_greedy(tmp_path):
    cfg, _ = sat.config_from_sat_args(TINY_ARGS)
    sat.write(tmp_path / "sat", cfg, _weights(cfg, seed=5), tp=4)
    files = sat.read(tmp_path / "sat", TINY_ARGS)[1]
    sat.write(tmp_path / "tp1", cfg, files, tp=1)
    m = read_pickle(tmp_path / "tp1" / "1" / "mp_rank_00_model_states.pt")["module"]
    model = load_model(tmp_path / "sat", backend="cpu", sat_args=TINY_ARGS)

    rows = [[10, 11, MASK, 12, 13, EOS, SOP], [20, 21, GMASK, SOP], [30, MASK, 31, EOS, SOP, 32]]
    T = max(map(len, rows))
    built = [_row_inputs(r, T) for r in rows]
    ids = torch.tensor([b[0] for b in built])
    ref = reference_glm130b(m, cfg, ids, torch.tensor([b[1] for b in built]),
                            torch.stack([b[2] for b in built])[:, None])
    am = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    err = (model(ids, attention_mask=am) - ref)[am.bool()].abs().max().item()
    assert err < 1e-4, err

    for row in rows[:2]:  # greedy 16 tokens; GLM-130B's rule: the span keeps the mask position
        seq = list(row)
        for _ in range(16):
            ii, pp, mm = _row_inputs(seq, len(seq))
            t = int(reference_glm130b(m, cfg, torch.tensor([ii]), torch.tensor([pp]), mm[None, None])[0, -1].argmax())
            seq.append(t)
            if t in (EOP, EOS):
                break
        out = model.generate([row], max_new_tokens=16)[0].tolist()
        assert out[:len(seq)] == seq


def test_thudm_native_transformers_round_trip_bit_exact(tmp_path):
    cfg = preset("tiny-glm-4")
    sd = random_state(cfg, seed=4)
    chatglm.write(tmp_path / "thudm", cfg, sd)
    assert main(["convert", str(tmp_path / "thudm"), str(tmp_path / "n1")]) == 0
    assert main(["convert", str(tmp_path / "n1"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    c, s = hf.read(tmp_path / "hf")
    assert all(torch.equal(s[k], sd[k]) for k in sd) and set(s) == set(sd)
    assert main(["convert", str(tmp_path / "n1"), str(tmp_path / "thudm2"), "--to", "chatglm"]) == 0
    a, b = read_state_dict(tmp_path / "thudm"), read_state_dict(tmp_path / "thudm2")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_rope_fp16_rounds_frequencies_and_fp16_angles_only_on_fp16_models():
    cfg = preset("tiny-chatglm-6b", rope_fp16=True)
    r = Rotary(cfg)
    half = cfg.head_dim // 2
    exact = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
    assert torch.equal(r.inv_freq, exact.half().float()) and not torch.equal(r.inv_freq, exact)
    pos = torch.tensor([[[0, 1, 2, 250], [0, 0, 1, 2]]])
    cos32, _ = r(pos, torch.float32)
    assert torch.allclose(cos32[0, 3, :half // 2], (250 * exact.half().float()).cos(), atol=1e-6)
    cos16, _ = r(pos, torch.float16)
    want16 = (torch.tensor(250.0).half() * exact.half()).float().cos().half()  # angle rounded in fp16
    assert torch.equal(cos16[0, 3, :half // 2], want16)
    off = Rotary(preset("tiny-chatglm-6b", rope_fp16=False))
    assert torch.equal(off.inv_freq, exact)
