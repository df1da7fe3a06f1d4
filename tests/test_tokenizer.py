"""The sentencepiece wrapper: markers, special ids after the pieces, decoding."""
from __future__ import annotations

from glm_runtime.core.tokenizer import Tokenizer


def test_markers_and_round_trip(sp_model):
    tok = Tokenizer(sp_model)
    n = tok.sp.get_piece_size()
    ids = tok.encode("Return the [MASK] of the file.[gMASK]<sop>")
    assert n in ids and n + 1 == ids[-2] and n + 3 == ids[-1]
    assert tok.decode(ids) == "Return the of the file."  # special tokens dropped
    assert tok.decode(ids, keep_special=True) == "Return the[MASK] of the file.[gMASK]<sop>"


def test_config_ids_override_the_default_layout(sp_model):
    from glm_runtime.core.presets import preset

    tok = Tokenizer(sp_model, preset("tiny-chatglm2"))
    assert tok.encode("[gMASK]<sop>") == [64790, 64792]


def test_missing_model_is_a_clear_error(tmp_path):
    import pytest

    from glm_runtime.core.errors import GLMError

    with pytest.raises(GLMError, match="tokenizer model not found"):
        Tokenizer(tmp_path / "nope.model")
