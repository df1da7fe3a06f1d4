"""Chat prompt formats (spec section 8), written out by hand per family."""
from __future__ import annotations

import pytest
import sentencepiece as spm

from glm_runtime.core.chat import build_chat_ids, stop_ids
from glm_runtime.core.errors import GLMError
from glm_runtime.core.presets import preset
from glm_runtime.core.tokenizer import Tokenizer


def test_chatglm6b_rounds(sp_model):
    cfg = preset("tiny-chatglm-6b")
    tok = Tokenizer(sp_model, cfg)
    g, s = cfg.gmask_token_id, cfg.sop_token_id
    assert build_chat_ids(cfg, tok, [{"role": "user", "content": "hi"}]) == tok.encode_text("hi") + [g, s]
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    want = tok.encode_text("[Round 0]\n问：a\n答：b\n[Round 1]\n问：c\n答：") + [g, s]
    assert build_chat_ids(cfg, tok, msgs) == want
    assert stop_ids(cfg, tok) == [130005]


def test_chatglm2_one_based_rounds(sp_model):
    cfg = preset("tiny-chatglm2")
    tok = Tokenizer(sp_model, cfg)
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    want = [64790, 64792] + tok.encode_text("[Round 1]\n\n问：a\n\n答：b\n\n[Round 2]\n\n问：c\n\n答：")
    assert build_chat_ids(cfg, tok, msgs) == want
    assert build_chat_ids(cfg, tok, [{"role": "user", "content": "c"}]) == \
        [64790, 64792] + tok.encode_text("[Round 1]\n\n问：c\n\n答：")
    with pytest.raises(GLMError, match="system"):
        build_chat_ids(cfg, tok, [{"role": "system", "content": "x"}, {"role": "user", "content": "c"}])


def test_chatglm3_role_tokens_separate_calls(sp_model):
    n = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    cfg = preset("tiny-chatglm2", family="chatglm3-6b", vocab_size=n + 9, mask_token_id=n, gmask_token_id=n + 1,
                 smask_token_id=n + 2, sop_token_id=n + 3, eop_token_id=n + 4, eos_token_ids=[2])
    tok = Tokenizer(sp_model, cfg)
    sys_, user, asst, obs = n + 5, n + 6, n + 7, n + 8
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Run it"},
            {"role": "assistant", "metadata": "tool", "content": "call()"},
            {"role": "observation", "content": "42"}]
    e = tok.encode_text
    want = [n + 1, n + 3, sys_] + e("\n") + e("Be brief.") + [user] + e("\n") + e("Run it") + \
        [asst] + e("tool\n") + e("call()") + [obs] + e("\n") + e("42") + [asst]
    assert build_chat_ids(cfg, tok, msgs) == want
    assert stop_ids(cfg, tok) == [2, user, obs]


def test_glm4_messages(sp_model):
    cfg = preset("tiny-glm-4")
    tok = Tokenizer(sp_model, cfg)
    ids = build_chat_ids(cfg, tok, [{"role": "user", "content": "hi"}])
    assert ids == [151331, 151333, 151336] + tok.encode_text("\nhi") + [151337]
    assert stop_ids(cfg, tok) == [151329, 151336, 151338]
    with pytest.raises(GLMError, match="no chat format"):
        build_chat_ids(preset("tiny-glm-130b"), tok, [{"role": "user", "content": "hi"}])
