"""A tiny model of each GLM family: logits and greedy tokens against the cpu backend."""
from __future__ import annotations

import pytest

from glm_runtime.conformance.model_check import FAMILIES, compare
from glm_runtime.conformance.target import KIT_DTYPES


@pytest.mark.parametrize("dtype", KIT_DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("family,bits", [(f, None) for f in FAMILIES] + [("tiny-chatglm2", 4), ("tiny-glm-130b", 8)],
                         ids=lambda v: str(v))
def test_model_matches_cpu(glm_target, glm_strict, family, bits, dtype):
    if dtype not in glm_target.dtypes:
        pytest.skip(f"{dtype} not checked for this backend")
    r = compare(glm_target, family, dtype, bits, strict=glm_strict)
    assert r.ok, f"{glm_target.label}: {r.detail}"
