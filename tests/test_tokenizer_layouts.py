"""Tokenizer id layouts of the GLM families, on sentencepiece models built here with the
same layout as the released files (nothing is downloaded):

* ChatGLM-6B "slim" ``ice_text.model``: specials and the icetk pieces (``<n>``,
  ``<|tab|>``, ``<|blank_k|>``) are pieces of the model; ids = piece ids.
* ChatGLM-6B before the slim update: the same model with 20000 image ids in front
  (``tokenizer_config.json`` ``num_image_tokens``), ids = piece ids + 20000.
* GLM-130B icetk: text ids = piece ids + 20000, specials from 150000, eos 20002.
* ChatGLM2/3 and GLM-4: specials appended after the text pieces; role tokens after eop.
"""
from __future__ import annotations

import io
import json

import pytest
import sentencepiece as spm

from glm_runtime.core.presets import preset
from glm_runtime.core.tokenizer import Tokenizer

ICE_SPECIALS = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
ICE_PIECES = ["<n>", "<|tab|>"] + [f"<|blank_{k}|>" for k in range(2, 81)]


@pytest.fixture(scope="module")
def ice_model(tmp_path_factory):
    """unk 0, bos 1, eos 2, pad 3 (<pad>, ChatGLM-6B's pad id), then the icetk pieces."""
    from pathlib import Path

    corpus = (Path(__file__).resolve().parent.parent / "data" / "corpus" / "en_python_docs.txt").read_text()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus.splitlines()[:3000]), model_writer=buf,
                                   vocab_size=600, model_type="unigram", unk_id=0, bos_id=1, eos_id=2,
                                   pad_id=3, user_defined_symbols=ICE_PIECES + ICE_SPECIALS, num_threads=1,
                                   minloglevel=2)
    d = tmp_path_factory.mktemp("ice")
    (d / "ice_text.model").write_bytes(buf.getvalue())
    return d / "ice_text.model"


def _ids(path):
    sp = spm.SentencePieceProcessor(model_file=str(path))
    return {p: sp.piece_to_id(p) for p in ICE_SPECIALS + ICE_PIECES}, sp


def test_chatglm6b_slim_layout(ice_model):
    pid, sp = _ids(ice_model)
    cfg = preset("tiny-chatglm-6b", vocab_size=sp.get_piece_size(), mask_token_id=pid["[MASK]"],
                 gmask_token_id=pid["[gMASK]"], smask_token_id=pid["[sMASK]"], sop_token_id=pid["<sop>"],
                 eop_token_id=pid["<eop>"], eos_token_ids=[pid["<eop>"]], pad_token_id=3)
    tok = Tokenizer(ice_model, cfg)
    assert tok.offset == 0 and tok.ice
    text = "def f(x):\n\treturn   x"  # newline, tab, a run of 3 spaces
    ids = tok.encode(text + "[gMASK]<sop>")
    assert pid["<n>"] in ids and pid["<|tab|>"] in ids and pid["<|blank_3|>"] in ids
    assert ids[-2:] == [pid["[gMASK]"], pid["<sop>"]]
    assert tok.decode(ids) == text
    assert tok.decode([3, 3] + ids) == text  # left pads dropped
    # specials found as pieces of the model when the config gives no ids
    bare = Tokenizer(ice_model, cfg.replace(mask_token_id=None, gmask_token_id=None))
    assert bare.encode("[MASK][gMASK]") == [pid["[MASK]"], pid["[gMASK]"]]


def test_chatglm6b_original_layout_with_image_tokens(ice_model, tmp_path):
    pid, sp = _ids(ice_model)
    d = tmp_path / "orig"
    d.mkdir()
    (d / "ice_text.model").write_bytes(ice_model.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"num_image_tokens": 20000}))
    cfg = preset("tiny-chatglm-6b", vocab_size=20000 + sp.get_piece_size(), mask_token_id=None,
                 gmask_token_id=None, smask_token_id=None, sop_token_id=None, eop_token_id=None,
                 eos_token_ids=[], pad_token_id=20003)
    tok = Tokenizer(d / "ice_text.model", cfg)
    assert tok.offset == 20000
    assert tok.encode("[gMASK]<sop>") == [pid["[gMASK]"] + 20000, pid["<sop>"] + 20000]
    slim = Tokenizer(ice_model, None)
    assert tok.encode_text("a  b\nc") == [i + 20000 for i in slim.encode_text("a  b\nc")]
    assert tok.decode([5, 17] + tok.encode_text("a  b\nc")) == "a  b\nc"  # image ids dropped


def test_glm130b_icetk_layout(sp_model):
    cfg = preset("tiny-glm-130b")
    tok = Tokenizer(sp_model, cfg)
    plain = spm.SentencePieceProcessor(model_file=str(sp_model))
    assert tok.offset == 20000 and tok.eos_id == 20002
    assert tok.encode("Hello[gMASK]") == [i + 20000 for i in plain.encode("Hello")] + [150001]
    assert tok.decode(tok.encode("Hello [MASK] world")) == plain.decode(plain.encode("Hello")) + " world"


def test_chatglm3_and_glm4_role_tokens(sp_model):
    n = spm.SentencePieceProcessor(model_file=str(sp_model)).get_piece_size()
    c3 = preset("tiny-chatglm2", family="chatglm3-6b", vocab_size=n + 9, mask_token_id=n, gmask_token_id=n + 1,
                smask_token_id=n + 2, sop_token_id=n + 3, eop_token_id=n + 4, eos_token_ids=[2])
    t3 = Tokenizer(sp_model, c3)
    assert t3.encode("<|system|><|user|><|assistant|><|observation|>") == [n + 5, n + 6, n + 7, n + 8]
    # the real ids follow from the same rule: eop 64793 -> roles 64794..64797
    real3 = Tokenizer(sp_model, preset("chatglm3-6b"))
    assert real3.encode("[gMASK]<sop><|user|><|observation|>") == [64790, 64792, 64795, 64797]
    g4 = Tokenizer(sp_model, preset("tiny-glm-4"))
    assert g4.encode("[gMASK]<sop><|system|><|user|><|assistant|><|observation|><|endoftext|>") == \
        [151331, 151333, 151335, 151336, 151337, 151338, 151329]


def test_glm4_tiktoken_file(tmp_path):
    """GLM-4-9B's tokenizer.model format (base64 token, rank); merges computed by hand."""
    import base64

    ranks = {bytes([b]): b for b in range(256)}
    ranks.update({b"he": 256, b"ll": 257, b"hell": 258, b" w": 259})
    f = tmp_path / "tokenizer.model"
    f.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    tok = Tokenizer(f, preset("tiny-glm-4"))
    # "hello": h e l l o -> he l l o -> he ll o -> hell o;  " world": " w" o r l d
    assert tok.encode_text("hello world") == [258, 111, 259, 111, 114, 108, 100]
    ids = tok.encode("[gMASK]<sop><|user|>\nhello")
    assert ids == [151331, 151333, 151336, 10, 258, 111]
    assert tok.decode(ids) == "\nhello" and tok.decode(tok.encode("héllo, 世界")) == "héllo, 世界"
    (tmp_path / "junk.model").write_bytes(b"\x00\x01not a model")
    with pytest.raises(Exception, match="neither a sentencepiece model nor a tiktoken"):
        Tokenizer(tmp_path / "junk.model")
