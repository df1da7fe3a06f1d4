"""Blank infilling: hand-computed masks/positions for GLM-130B prompts, the fill loop of
GLM-130B's generate.py, and ``glmrt generate`` on a [MASK] prompt."""
from __future__ import annotations

import torch

from glm_runtime import load_model
from glm_runtime.cli.main import main
from glm_runtime.converters import native
from glm_runtime.core.build import random_state
from glm_runtime.core.infilling import fill_blanks, infill_prompt
from glm_runtime.core.masks import decode_inputs, prefill_inputs
from glm_runtime.core.presets import preset
from glm_runtime.core.tokenizer import Tokenizer

MASK, GMASK, SMASK, SOP, EOP, EOS = 150000, 150001, 150002, 150004, 150005, 20002


def test_glm130b_masks_and_positions_by_hand():
    cfg = preset("tiny-glm-130b")
    ids = torch.tensor([[10, MASK, 11, EOS, SOP, 12],
                        [0, 0, 10, 11, GMASK, SOP]])
    am = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    pos, allowed, state = prefill_inputs(cfg, ids, am)
    assert pos.tolist() == [[0, 1, 2, 3, 1, 1], [0, 0, 0, 1, 2, 3]]
    assert allowed[0, 0].long().tolist() == [[1, 1, 1, 1, 0, 0]] * 4 + [[1, 1, 1, 1, 1, 0], [1] * 6]
    assert allowed[1, 0].long().tolist() == [[1, 0, 0, 0, 0, 0], [0, 1, 0, 0, 0, 0]] + \
        [[0, 0, 1, 1, 1, 0]] * 3 + [[0, 0, 1, 1, 1, 1]]
    steps = [decode_inputs(state) for _ in range(2)]
    assert [p.tolist() for p, _ in steps] == [[[1], [4]], [[1], [5]]]  # [MASK] frozen, [gMASK] continues
    assert steps[1][1][1, 0, 0].long().tolist() == [0, 0, 1, 1, 1, 1, 1, 1]  # pads stay invisible


def test_chatglm6b_no_sop_continues_from_last_position():
    """Without <sop> HF's generate appends (last position, block + 1)."""
    cfg = preset("tiny-chatglm-6b")
    pos, _, state = prefill_inputs(cfg, torch.tensor([[10, 11, GMASK - 20000]]), None)
    assert pos.tolist() == [[[0, 1, 2], [0, 0, 0]]]
    assert decode_inputs(state)[0].tolist() == [[[2], [1]]]


class _Recorder:
    """Stands in for a GLM: records prompts and answers each with a fixed span + <eop>."""

    def __init__(self, config, spans):
        self.config, self.spans, self.prompts = config, list(spans), []

    def generate(self, prompts, **kw):
        assert kw["stop_token_ids"] == sorted({EOP, *self.config.eos_token_ids})
        self.prompts.append(list(prompts[0]))
        return torch.tensor([list(prompts[0]) + self.spans.pop(0) + [EOP, 7]])


def test_fill_loop_left_to_right(sp_model):
    cfg = preset("tiny-glm-130b")
    tok = Tokenizer(sp_model, cfg)
    a, b, c = tok.encode_text("The"), tok.encode_text("is"), tok.encode_text("here.")
    ids, kind = infill_prompt(cfg, tok, "The [MASK] is [MASK] here.")
    assert kind == MASK and ids == a + [MASK] + b + [MASK] + c + [EOS]
    s1, s2 = tok.encode_text(" file"), tok.encode_text(" not")
    rec = _Recorder(cfg, [s1, s2])
    out = fill_blanks(rec, tok, "The [MASK] is [MASK] here.")
    assert rec.prompts == [ids + [SOP], a + s1 + b + [MASK] + c + [EOS, SOP]]
    assert out == tok.decode(a + s1 + b + s2 + c)
    # no mask: [gMASK] appended, and the text then ends with a mask (no </s>)
    assert infill_prompt(cfg, tok, "Hello")[0] == tok.encode_text("Hello") + [GMASK]
    # [sMASK] is preferred over [gMASK]
    assert infill_prompt(cfg, tok, "A [sMASK] B [gMASK]")[1] == SMASK
    # ChatGLM-6B: its tokenizer's [gMASK] suffix, no </s>
    c6 = preset("tiny-chatglm-6b")
    t6 = Tokenizer(sp_model, c6)
    assert infill_prompt(c6, t6, "x [MASK] y")[0] == t6.encode("x [MASK] y") + [c6.gmask_token_id]


def test_generate_cli_fills_masks(sp_model, tmp_path, capsys):
    cfg = preset("tiny-glm-130b")
    native.save(tmp_path / "m", cfg, random_state(cfg), tokenizer=sp_model)
    assert main(["generate", str(tmp_path / "m"), "--prompt", "The [MASK] of the [MASK].", "--max-new-tokens",
                 "3", "--backend", "cpu"]) == 0
    out = capsys.readouterr().out.strip()
    assert out.startswith("The") and "of the" in out and "[MASK]" not in out
    m = load_model(tmp_path / "m", backend="cpu")
    tok = Tokenizer(m.tokenizer_path, m.config)
    assert out == fill_blanks(m, tok, "The [MASK] of the [MASK].", max_new_tokens=3)
