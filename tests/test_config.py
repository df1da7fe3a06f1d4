"""Presets and config validation."""
from __future__ import annotations

import pytest

from glm_runtime import GLMConfig, GLMError, preset
from glm_runtime.core.presets import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name, tmp_path):
    c = preset(name)
    c.save(tmp_path / "c.json")
    assert GLMConfig.load(tmp_path / "c.json") == c


@pytest.mark.parametrize("name,billions,tol", [
    # parameter counts derived from the published shapes (glm-spec §1.1)
    ("glm-130b", 128.7, 0.1), ("chatglm2-6b", 6.24, 0.01), ("glm-4-9b", 9.40, 0.01),
    ("chatglm-6b", 6.7, 0.05),  # with a separate lm_head counted (spec: ~6.7-6.9 B)
])
def test_published_sizes(name, billions, tol):
    assert abs(preset(name).num_parameters() / 1e9 - billions) <= tol


def test_head_dim_is_its_own_field():
    c = preset("tiny-glm-4")
    assert c.head_dim * c.num_heads != c.hidden_size


@pytest.mark.parametrize("change,msg", [
    (dict(num_kv_heads=3), "not a multiple"),
    (dict(norm="batchnorm"), "norm='batchnorm'"),
    (dict(rope_dim=25), "rope_dim=25"),
    (dict(pad_token_id=10 ** 6), "outside the vocabulary"),
])
def test_validation(change, msg):
    with pytest.raises(GLMError, match=msg):
        preset("tiny-glm-4", **change)


def test_deepnorm_alpha_and_chatglm6b_fixed_layers():
    assert preset("glm-130b").deepnorm_alpha == pytest.approx(140 ** 0.5)
    assert preset("tiny-chatglm-6b").deepnorm_alpha == pytest.approx(56 ** 0.5)  # L fixed to 28
    assert preset("tiny-glm-4").deepnorm_alpha == 1.0


def test_unknown_fields_and_bad_json(tmp_path):
    f = tmp_path / "c.json"
    f.write_text('{"family": "x", "hidden": 3}')
    with pytest.raises(GLMError, match="unknown GLM config field.*hidden .did you mean hidden_size"):
        GLMConfig.load(f)
    f.write_text("{")
    with pytest.raises(GLMError, match="not valid JSON"):
        GLMConfig.load(f)
